"""Training under Ray Train around fwray.core.engine, and what a run draws on the way (loss curve, samples)."""
