"""fwray's one tracking object, `Tracker`: the store checked, then every run a command starts (fwray.run's parent run
and the prepare and probe runs nested under it; the run of `python -m fwray.probe` or `python -m fwray.plan` run
alone), what the parent run logs (through a RunLogger: an outage never stops it), its model registered, its finish.
The data it trained on is its dataset input (`training_dataset`); its final model an MLflow model registered under
the experiment's name (fwray.tracking.served).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from ..config import DataConfig, Experiment, flatten
from ..core.tokens import MANIFEST
from ..data.report import DATA_REPORT, data_metrics, data_report
from ..errors import first_line
from . import records as outbox
from .store import PREPARE_RUN, connect, run_page, runs_table, start_run, ui_command
from .tags import run_tags
from .tracked_run import TrackedRun, open_run


def training_dataset(manifest: dict, data: DataConfig) -> dict:
    """The data a run trains on as an MLflow dataset (the fields of mlflow.entities.Dataset), for the runs table's
    Dataset column and the run page: named after its parquet file(s), its source their path (their common folder
    when there are several), its digest the token cache's fingerprint (the cache entry's folder name), its schema
    the columns read, documents and tokens as its profile."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    paths = [f["path"] for f in manifest["inputs"]]
    name = Path(paths[0]).stem + (f" +{len(paths) - 1} more" if len(paths) > 1 else "")
    where = paths[0] if len(paths) == 1 else os.path.commonpath(paths)
    source = get_dataset_source_from_json(json.dumps({"uri": where}), "local")
    schema = Schema([ColSpec(DataType.string, data.text_column), ColSpec(DataType.string, data.id_column)])
    fields = MetaDataset(source, name=name, digest=manifest["fingerprint"][:16], schema=schema).to_dict()
    splits = manifest["splits"]
    profile = {"documents": sum(s["documents"] for s in splits.values()),
               "tokens": sum(s["tokens"] for s in splits.values()),
               "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"], "files": len(paths)}
    return {**fields, "profile": json.dumps(profile)}

def registered_model_name(exp: Experiment) -> str:
    """The registry name of an experiment's models: its MLflow experiment's name ('/' and ':' are not allowed)."""
    return re.sub(r"[/:]", "-", exp.tracking.experiment or exp.name)

class Tracker:
    """fwray's one handle on MLflow, made before any work: the store checked reachable (an unreachable one is
    `TrackingUnavailable`, one line; with tracking.required false, the local store with a warning). fwray.run starts
    (or reuses) its parent run; every other run is a `child`: nested under the parent when there is one, at the top
    level for a command run alone. Every run logs through a `RunLogger`: an outage warns and never stops the work.
    """

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.client = connect(exp)
        self.uri = self.client.tracking_uri
        self.run: TrackedRun | None = None  # the parent run, once started or reused
        self.experiment_id: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    @property
    def run_dir(self) -> Path | None:
        """The parent run's folder: its outbox, and the files it logs."""
        return self.run.folder if self.run else None

    def start(self, run_name: str, run_dir: str | os.PathLike, device: str) -> str:
        """A new parent run, tagged with fwray's version and commit, `device` and the library versions."""
        return self.reuse(start_run(self.client, self.exp, run_name, tags=run_tags(self.exp, device)), run_dir)

    def reuse(self, run_id: str, run_dir: str | os.PathLike) -> str:
        """Log into `run_id` from here on (an earlier run's, on --resume), its outbox in `run_dir`."""
        self.experiment_id = self.client.get_run(run_id).info.experiment_id  # for the addresses the run ends with
        self.run = TrackedRun(self.client, self.exp, run_id, run_dir)
        return run_id

    def child(self, name: str, tags: dict[str, str], folder: str | os.PathLike | None = None) -> TrackedRun:
        """A run named `name`: nested under the parent run when there is one, else at the top level (then `folder`,
        where its outbox goes, is needed). A store that does not start it is one warning, never an error."""
        if self.run is not None:
            return self.run.child(name, tags, folder)
        if folder is None:
            raise ValueError(f"the run {name!r} has no parent run: give it a folder for its outbox")
        return open_run(self.client, self.exp, name, tags, folder)

    def log_prepare(self, cache_dir: str | os.PathLike, manifest: dict, wall_seconds: float) -> str | None:
        """A `prepare` run nested under the parent: data settings, documents/tokens per split, seconds, manifest and
        data report (written to the run folder first). Returns its id, or None when MLflow did not start it (one
        warning): data logging never stops a run."""
        report = self.run_dir / DATA_REPORT
        report.write_text(data_report(manifest))
        manifest_file = self.run_dir / MANIFEST  # a local copy: the cache may be on object storage
        manifest_file.write_text(json.dumps(manifest, indent=1))
        fingerprint = manifest.get("fingerprint", "")
        run = self.child(PREPARE_RUN, {"fwray.cache": str(cache_dir), "fwray.fingerprint": fingerprint})
        params = {k: v for k, v in flatten(self.exp).items() if k.startswith("data.")}
        params["fingerprint"] = fingerprint
        run.params(params)
        run.metrics(0, {**data_metrics(manifest), "wall_seconds": wall_seconds})
        run.artifact(manifest_file)
        run.artifact(report)
        run.finish(True)
        return run.run_id

    def params(self, values: dict[str, object]) -> None:
        self.run.params(values)

    def tags(self, values: dict[str, object]) -> None:
        self.run.tags(values)

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.run.artifact(path, artifact_path)

    def dataset(self, manifest: dict) -> None:
        """The prepared data as the run's training dataset: the runs table's Dataset column, the run page's inputs."""
        self.run.dataset(training_dataset(manifest, self.exp.data), "training")

    def log_model(self) -> str | None:
        """The run's final model (`<run_dir>/model`, else the run's model/ artifacts: rank 0 may have trained on
        another node) as an MLflow model under the run, registered as a new version of `registered_model_name`.
        Returns its `models:/NAME/VERSION`. Never raises: the run has trained, so a failure is one warning, and the
        model waits in the outbox for `replay`."""
        from ..core import checkpoint  # torch and mlflow.pyfunc: only a run that trained needs them
        from . import served

        name = registered_model_name(self.exp)
        folder = (self.run_dir / checkpoint.MODEL_DIR).resolve()
        record = {"run_id": self.run_id, "uri": self.uri, "model": str(folder), "registered_model": name}
        try:
            info = served.log_run_model(self.uri, self.run_id, record["model"], name)
            return f"models:/{name}/{info.registered_model_version}"
        except Exception as e:
            path = self.run_dir / outbox.FALLBACK_FILE
            outbox.keep(path, record)
            print(f"fwray: warning: MLflow at {self.uri} did not take the trained model as an MLflow model "
                  f"({type(e).__name__}: {first_line(e)[:160]}); it waits in {path}: log it with "
                  f"`python -m fwray.tracking replay {path}`", file=sys.stderr, flush=True)
            return None

    def finish(self, ok: bool, tags: dict[str, str] | None = None) -> bool:
        """FINISHED or FAILED with the outcome `tags`; never raises (an outage keeps them in the outbox)."""
        return self.run.finish(ok, tags)

    def ui_command(self) -> str:
        return ui_command(self.uri)

    def run_page(self) -> str:
        return run_page(self.uri, self.experiment_id, self.run_id)

    def runs_table(self) -> str:
        return runs_table(self.uri, self.experiment_id)
