"""fwray: a GPT from a FineWeb shard on one GPU, with Ray around the work and MLflow keeping every run."""

__version__ = "0.1.0"
