"""MLflow: the store and the live logger, the records a run keeps while MLflow is away (and their replay), the served
model; `python -m fwray.tracking replay|metrics`."""
