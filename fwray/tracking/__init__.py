"""MLflow, one job a module: the store (where runs go, starting one), the live path of a run's records, every metric
and its finish (live), the outbox a run keeps while MLflow is away (records) and its replay, a run's tags, one run
and its nested runs (tracked_run), the Tracker every command's runs come from (tracker), a trained model named by
run id or folder (trained), the served model; `python -m fwray.tracking replay|metrics`."""
import os

# Fail fast against an unreachable server instead of retrying for minutes: set here, before any module of this
# package imports mlflow (which reads them)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
