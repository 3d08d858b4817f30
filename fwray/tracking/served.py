"""A trained fwray GPT as an MLflow model: text in, generated text out (pyfunc), logged under its run and registered.

The MLflow model holds the run's model folder (model.pt + model_config.json) as its artifact and fwray's own code
(code_paths), and MLflow loads it by running `served_entry.py` (models from code): no pickled Python object, and
the weights load with `weights_only=True`. So `mlflow models serve -m models:/NAME/VERSION --env-manager local` serves
it from any environment with torch, tiktoken, numpy, pyyaml and mlflow, fwray installed or not, with the fwray code
that trained it.

Request: {"inputs": ["The ocean"], "params": {"max_new_tokens": 32}}; response: {"predictions": ["The ocean ..."]}.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.artifacts import download_artifacts
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from ..core import checkpoint
from ..core.model import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED, DEFAULT_TEMPERATURE, DEFAULT_TOP_K

ARTIFACT = "model"  # the key of the fwray model folder among the MLflow model's artifacts
ENTRY = Path(__file__).with_name("served_entry.py")
# generation settings a request may pass as params, with fwray's defaults
PARAMS = ParamSchema([
    ParamSpec("max_new_tokens", DataType.long, DEFAULT_MAX_NEW_TOKENS),
    ParamSpec("temperature", DataType.double, DEFAULT_TEMPERATURE),  # 0: greedy
    ParamSpec("top_k", DataType.long, DEFAULT_TOP_K),  # 0: no top-k cut
    ParamSpec("seed", DataType.long, DEFAULT_SEED),
])
SIGNATURE = ModelSignature(inputs=Schema([ColSpec(DataType.string)]), outputs=Schema([ColSpec(DataType.string)]),
                           params=PARAMS)
# shown in the UI and tried once when the model is logged (MLflow loads the model and runs it): a few tokens only
EXAMPLE = (["The meaning of life is"], {"max_new_tokens": 8})


class Generator(PythonModel):
    """Each prompt continued by the model (the prompt included, cut at the first end-of-text): fwray.sample's text."""

    def load_context(self, context) -> None:
        import torch

        from ..core import tokens

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, meta = checkpoint.load_model(context.artifacts[ARTIFACT], self.device)
        self.enc = tokens.get_tokenizer(meta.get("tokenizer", "gpt2"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from ..core.model import generate_text

        p = {s.name: s.default for s in PARAMS.params} | (params or {})
        return [generate_text(self.model, self.enc, prompt, int(p["max_new_tokens"]), float(p["temperature"]),
                              int(p["top_k"]) or None, seed=int(p["seed"]), device=self.device)
                for prompt in model_input.iloc[:, 0]]


def requirements() -> list[str]:
    """What loading needs besides fwray's code, pinned to this environment (given, so MLflow does not load the model
    in a subprocess to infer them). Local version labels (+cpu, +cu128) are dropped: pip cannot resolve them."""
    return [f"{name}=={version(name).split('+')[0]}" for name in ("mlflow", "torch", "tiktoken", "numpy", "pyyaml")]


@contextmanager
def _logging_to(uri: str):
    """Model.log and the registry read MLflow's global tracking URI: point it at the run's store for the call only
    (mlflow.set_tracking_uri keeps $MLFLOW_TRACKING_URI in step with it, so that is what is restored). And no
    progress bars for the model's local files, nor the INFO line about checking the input example: fwray says what
    it registered."""
    before = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    pyfunc_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        if before[1] is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before[1]
        pyfunc_log.setLevel(level)


def log_run_model(uri: str, run_id: str, folder: str | os.PathLike, registered_name: str):
    """`log_model` for a run's final model: `folder` (the run folder's model/), fetched from the run's model/
    artifacts first when it is not there (rank 0 trained on another node), at the step it was saved at."""
    folder = Path(folder)
    if not checkpoint.is_model(folder):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # then moved in: the folder is whole or absent
            got = Path(download_artifacts(run_id=run_id, artifact_path=checkpoint.MODEL_DIR, tracking_uri=uri,
                                          dst_path=tmp))
            for name in (checkpoint.MODEL_FILE, checkpoint.MODEL_CONFIG):
                os.replace(got / name, folder / name)
    step = json.loads((folder / checkpoint.MODEL_CONFIG).read_text())["step"]
    return log_model(uri, run_id, folder, registered_name, step)


def log_model(uri: str, run_id: str, model_dir: str | os.PathLike, registered_name: str, step: int):
    """Log the fwray model folder `model_dir` as an MLflow model under `run_id` (MLflow 3: a logged model, on the
    run's page, carrying the run's metrics at `step`) and register it as a new version of `registered_name`.
    Returns MLflow's ModelInfo (its `registered_model_version` is the version). Raises whatever MLflow raises."""
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    # created here rather than by Model.log, which would take $MLFLOW_EXPERIMENT_ID/NAME over the run's experiment
    logged = client.create_logged_model(run.info.experiment_id, name=run.info.run_name or "model",
                                        source_run_id=run_id, params=run.data.params, model_type="fwray-gpt")
    with _logging_to(uri):
        return Model.log(artifact_path=None, name=logged.name, flavor=mlflow.pyfunc, run_id=run_id,
                         model_id=logged.model_id, step=step, registered_model_name=registered_name,
                         python_model=str(ENTRY), code_paths=[str(Path(__file__).parents[1])],
                         artifacts={ARTIFACT: str(Path(model_dir).resolve())}, signature=SIGNATURE,
                         input_example=EXAMPLE, pip_requirements=requirements())
