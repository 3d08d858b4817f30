"""MLflow, live: the experiment, the runs, their params, metrics and artifacts.

Everything goes through `MlflowClient` with explicit run ids, so the driver and a Ray worker (rank 0 only) log
into the same run without sharing process state. A tracking failure mid-run never stops training: one warning,
and the records (metrics, and the artifacts, tags and final status that could not be logged) wait in the run's
outbox, `<run_dir>/unlogged_metrics.jsonl` (fwray.tracking.records), which `python -m fwray.tracking replay` logs later.

Who uses what: fwray.run holds one `Tracker` (store, parent run, nested prepare run, params, tags, artifacts, finish);
a Ray worker logs with a `RunLogger` built from (uri, run_id, run_dir) and reads `metric_history`; the probe nests its
runs with `start_run`, `log_params` and `finish` on the tracker's client.

Layout: one MLflow experiment per experiment name (tagged as model training for MLflow 3's UI); one parent run per
`fwray.run`, named after the Ray run; the data preparation as a nested run `prepare` (tag mlflow.parentRunId).
The metrics of the parent run, x = optimizer step, are listed in METRICS. The parent run's dataset input is the data
it trained on (`training_dataset`); its final model is an MLflow model under it, registered under the experiment's
name (`Tracker.log_model`, fwray.tracking.served).
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Fail fast against an unreachable server instead of retrying for minutes; set before mlflow reads them.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .. import __version__  # noqa: E402
from ..config import DataConfig, Experiment, flatten  # noqa: E402
from ..core import health  # noqa: E402
from ..data.report import DATA_REPORT, data_metrics, data_report  # noqa: E402
from ..errors import FwrayError, first_line  # noqa: E402
from . import records as outbox  # noqa: E402

# MLflow announces at INFO that it creates a new sqlite store's tables; fwray's last lines say where the run is
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

# The parent run's metrics (names are stable: dashboards and the loss curve read them). x = optimizer step.
METRICS = {
    "train_loss": "mean training loss over the last log_interval steps (non-finite steps left out)",
    "val_loss": "validation loss, mean of eval_iters batches, at every eval_interval steps and after the last",
    "val_bpb": "the same evaluation in bits per UTF-8 byte of validation text (EOT targets left out: fwray.bpb)",
    "lr": "learning rate of the step just taken",
    "tokens_per_s": "training throughput over the last log_interval steps, all workers (evaluation time excluded)",
    "mfu": "model FLOPs utilisation, 0..1, per worker against the GPU's dense bf16 peak (absent on CPU)",
    "peak_alloc_gb": "peak GPU memory allocated by tensors, GiB (absent on CPU)",
    "peak_reserved_gb": "peak GPU memory reserved by the caching allocator, GiB (absent on CPU)",
    "tokens_seen": "training tokens consumed so far (step x tokens per step)",
    "epoch": "passes over the prepared train split so far",
    "nonfinite_skipped": "optimizer steps skipped so far because the loss or gradient was not finite",
    "eta_s": "estimated seconds of training left",
    # logged by `python -m fwray.eval --run-id`, at the evaluated model's step
    "eval_val_loss": "fwray.eval: validation loss of the final model (the training's windows, or --all-val's)",
    "eval_val_bpb": "fwray.eval: the same in bits per UTF-8 byte (fwray.bpb)",
    "hellaswag_acc": "fwray.eval: HellaSwag accuracy, the ending with the lowest summed loss",
    "hellaswag_acc_norm": "fwray.eval: HellaSwag accuracy, the ending with the lowest loss per token",
    **health.METRICS,  # the machine at each log interval, as MLflow names system metrics
}
PREPARE_RUN = "prepare"

DEFAULT_STORE = ".fwray/mlflow.db"
PARENT_TAG = "mlflow.parentRunId"


class TrackingUnavailable(FwrayError):
    """The tracking store cannot be reached at start, before any work."""


def resolve_uri(exp: Experiment) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a local sqlite store under .fwray/."""
    return exp.tracking.uri or default_uri()


def default_uri() -> str:
    """Where a run without tracking.uri goes, and where the commands look by default: $MLFLOW_TRACKING_URI, else the
    local store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_fallback_uri()


def local_fallback_uri() -> str:
    """fwray's local sqlite store under .fwray/ (artifacts beside it)."""
    return "sqlite:///" + str(Path(DEFAULT_STORE).resolve())


def is_server(uri: str) -> bool:
    """A tracking server (which serves the UI too), not a local store."""
    return uri.startswith(("http://", "https://"))


def ui_command(uri: str) -> str:
    """How to browse `uri` in a browser: a server URI is already a UI; a local store needs `mlflow ui`."""
    if is_server(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


def ui_address(uri: str) -> str:
    """The UI's address for a store: a server serves its own; a local store's is where `ui_command` puts it."""
    return uri.rstrip("/") if is_server(uri) else "http://127.0.0.1:5000"


def run_page(uri: str, experiment_id: str, run_id: str) -> str:
    # MLflow 3.17's UI routes (a hash router): /experiments/:experimentId/runs/:runUuid is a run's page...
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def runs_table(uri: str, experiment_id: str) -> str:
    # ...and /experiments/:experimentId/runs the experiment's "Training runs" table. The experiment's own address
    # (/experiments/:experimentId) can open on the GenAI overview instead, whatever the experiment's kind tag says
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs"


def connect(exp: Experiment) -> MlflowClient:
    """A client for the run's store, checked reachable; with tracking.required false, a local store instead."""
    uri = resolve_uri(exp)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    # a new sqlite store logs its table creation at INFO on stderr, where fwray's one-line errors go
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
        return client
    except Exception as e:  # MlflowException, requests' ConnectionError, ...
        if exp.tracking.required:
            raise TrackingUnavailable(
                f"MLflow tracking store {uri} is unreachable ({type(e).__name__}); start it (e.g. `mlflow server "
                f"--host 127.0.0.1 --port 5000`), fix tracking.uri / MLFLOW_TRACKING_URI, or set "
                f"tracking.required: false to fall back to a local store") from None
        fallback = local_fallback_uri()
        print(f"fwray: warning: MLflow store {uri} is unreachable; tracking.required is false, so this run is "
              f"tracked in {fallback}", file=sys.stderr)
        Path(fallback[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=fallback)


def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # without this tag MLflow 3's UI opens the experiment in its GenAI view
    return client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})


def start_run(client: MlflowClient, exp: Experiment, run_name: str, tags: dict[str, str],
              parent_run_id: str | None = None) -> str:
    tags = dict(tags)
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id(client, exp.tracking.experiment or exp.name), run_name=run_name, tags=tags)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, object]) -> None:
    # One call: MlflowClient.log_batch splits params into requests of at most 100, and MLflow's store cuts a value
    # over 6000 characters to 6000 with a warning (mlflow/mlflow#11208), so fwray neither chunks nor truncates.
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def _now_ms() -> int:
    return int(time.time() * 1000)


def finish(client: MlflowClient, run_id: str, ok: bool, run_dir: str | os.PathLike | None = None,
           tags: dict[str, str] | None = None) -> bool:
    """Mark the run FINISHED or FAILED, with its last `tags` (the outcome). Never raises: an unreachable store gets
    one warning, and with `run_dir` the tags and status wait in the run's outbox for `replay`. Returns whether MLflow
    took them."""
    status = "FINISHED" if ok else "FAILED"
    record = {"run_id": run_id, "uri": client.tracking_uri, "status": status, "timestamp": _now_ms(),
              **({"tags": {k: str(v) for k, v in tags.items()}} if tags else {})}
    try:
        outbox.send(client, record)
        return True
    except Exception as e:
        where = ""
        if run_dir is not None:
            path = Path(run_dir) / outbox.FALLBACK_FILE
            outbox.keep(path, record)
            where = f"; the status is kept in {path}: log it with `python -m fwray.tracking replay {path}`"
        print(f"fwray: warning: MLflow at {client.tracking_uri} did not take the run's final status {status} "
              f"({type(e).__name__}){where}", file=sys.stderr, flush=True)
        return False


# ---------------------------------------------------------------- what a run is tagged with


def git_commit(folder: str | os.PathLike | None = None) -> tuple[str, bool] | None:
    """(commit, dirty) of the checkout holding the fwray package; None when it is not a git checkout."""
    root = Path(folder) if folder else Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(status)) if commit else None


def version_tags() -> dict[str, str]:
    # torch and ray here, not at the top: `python -m fwray.tracking replay` and `metrics` need neither (~1.5 s)
    import ray
    import torch

    return {"torch_version": torch.__version__, "ray_version": ray.__version__, "mlflow_version": mlflow.__version__,
            "python_version": platform.python_version()}


def run_tags(exp: Experiment, device: str) -> dict[str, str]:
    """The parent run's tags: fwray version and commit, device (GPU name or "cpu"), library versions, source."""
    tags = {"fwray.version": __version__, "fwray.device": device, "fwray.experiment_file": exp.source,
            "mlflow.source.name": "fwray.run", "mlflow.source.type": "LOCAL", **version_tags()}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # no user name in some containers
        pass
    found = git_commit()
    if found:
        tags["fwray.git_commit"] = tags["mlflow.source.git.commit"] = found[0]
        tags["fwray.git_dirty"] = str(found[1]).lower()
    return tags


# ---------------------------------------------------------------- the data and the model, as MLflow shows them


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


# ---------------------------------------------------------------- logging that never stops training


class RunLogger:
    """Metrics, params, tags and artifacts into one run from any process.

    Each is an outbox record, sent to MLflow as it comes. On the first failure it prints one warning and from then on
    keeps every record in `<fallback_dir>/unlogged_metrics.jsonl` (artifacts as their local paths) for
    `python -m fwray.tracking replay`.
    """

    def __init__(self, uri: str, run_id: str, fallback_dir: str | os.PathLike):
        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(tracking_uri=uri)
        self.fallback = Path(fallback_dir) / outbox.FALLBACK_FILE
        self.failed = False

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._send({"step": step, "timestamp": _now_ms(),
                    "metrics": {k: float(v) for k, v in values.items() if v is not None}})

    def params(self, values: dict[str, object]) -> None:
        self._send({"params": {k: str(v) for k, v in values.items()}})

    def tags(self, values: dict[str, object]) -> None:
        self._send({"tags": {k: str(v) for k, v in values.items()}})

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._send({"artifact": str(Path(path).resolve()), "artifact_path": artifact_path})

    def dataset(self, fields: dict, context: str) -> None:
        """A dataset input of the run (`training_dataset`'s fields), with its context ("training")."""
        self._send({"dataset": fields, "context": context})

    def _send(self, record: dict) -> None:
        record = {"run_id": self.run_id, "uri": self.uri, **record}
        if not self.failed:
            try:
                outbox.send(self.client, record)
                return
            except Exception as e:  # MlflowException, requests' ConnectionError, OSError from a store, ...
                self._fail(e)
        try:
            outbox.keep(self.fallback, record)
        except OSError as e:  # a full disk must not stop training either
            print(f"fwray: warning: cannot write {self.fallback} ({e.strerror}); a record is lost", file=sys.stderr)

    def _fail(self, e: Exception) -> None:
        self.failed = True
        print(f"fwray: warning: MLflow at {self.uri} stopped answering ({type(e).__name__}); training goes on and "
              f"metrics are kept in {self.fallback}; log them later with `python -m fwray.tracking replay "
              f"{self.fallback}`", file=sys.stderr, flush=True)


def metric_history(uri: str, run_id: str, names: tuple[str, ...] = ("train_loss", "val_loss"),
                   fallback: str | os.PathLike | None = None,
                   max_step: int | None = None) -> dict[str, dict[int, float]]:
    """{name: {step: value}} of the run so far, from MLflow and from any JSONL of unlogged records; steps after
    `max_step` (logged after the checkpoint a restarted worker resumes from) are left out. Never raises."""
    out: dict[str, dict[int, float]] = {n: {} for n in names}
    try:
        client = MlflowClient(tracking_uri=uri)
        for n in names:
            for m in client.get_metric_history(run_id, n):
                out[n][m.step] = m.value
    except Exception as e:
        print(f"fwray: warning: could not read the run's metric history ({type(e).__name__}); the loss curve "
              "starts from here", file=sys.stderr, flush=True)
    if fallback is not None:
        for n, points in outbox.kept_metrics(fallback, run_id, names).items():
            out[n].update(points)
    if max_step is not None:
        out = {n: {s: v for s, v in pts.items() if s <= max_step} for n, pts in out.items()}
    return out


# ---------------------------------------------------------------- a finished run, read back (sample, eval, export)


@dataclass(frozen=True)
class FetchedRun:
    model_dir: Path  # the run's model/ artifacts, downloaded
    config_file: Path | None  # its config.yaml (the resolved experiment), when asked for and logged
    tags: dict[str, str]


def fetch_run(run_id: str, uri: str, dst: str | os.PathLike, with_config: bool = False) -> FetchedRun:
    """Download a run's `model/` artifacts (and `config.yaml`) from a local store or a server into `dst`. An unknown
    run, an unreadable store or a run without a model is one-line `ModelNotFound`."""
    # here, not at the top: checkpoint brings torch, which replay and metrics do without (~1.5 s)
    from mlflow.artifacts import download_artifacts

    from ..core.checkpoint import CONFIG_FILE, MODEL_CONFIG, MODEL_DIR, MODEL_FILE, ModelNotFound

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise ModelNotFound(f"no MLflow run {run_id!r} at {uri}") from None
        raise ModelNotFound(f"MLflow at {uri} cannot be read ({first_line(e)})") from None
    except Exception as e:  # requests' ConnectionError and friends
        raise ModelNotFound(f"MLflow at {uri} is unreachable ({type(e).__name__})") from None
    names = {Path(a.path).name for a in client.list_artifacts(run_id, MODEL_DIR)}
    if not {MODEL_FILE, MODEL_CONFIG} <= names:
        raise ModelNotFound(f"MLflow run {run_id} has no model artifacts ({MODEL_DIR}/{MODEL_FILE}, "
                            f"{MODEL_DIR}/{MODEL_CONFIG}); did its training finish? (python -m fwray.tracking replay "
                            "logs what an outage held back)")
    model_dir = Path(download_artifacts(run_id=run_id, artifact_path=MODEL_DIR, tracking_uri=uri, dst_path=str(dst)))
    config_file = None
    if with_config and CONFIG_FILE in {a.path for a in client.list_artifacts(run_id)}:
        config_file = Path(download_artifacts(run_id=run_id, artifact_path=CONFIG_FILE, tracking_uri=uri,
                                              dst_path=str(dst)))
    return FetchedRun(model_dir, config_file, dict(run.data.tags))


def log_evaluation(run_id: str, uri: str, step: int, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """An evaluation's results into the run it evaluated (at the model's step), in one request."""
    try:
        MlflowClient(tracking_uri=uri).log_batch(
            run_id, metrics=[Metric(k, float(v), _now_ms(), step) for k, v in metrics.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()])
    except Exception as e:
        raise TrackingUnavailable(f"MLflow at {uri} did not take the results for run {run_id} ({type(e).__name__}: "
                                  f"{first_line(e)}); they are printed above") from None


# ---------------------------------------------------------------- fwray.run's one tracking object


class Tracker:
    """fwray.run's one handle on MLflow, made before any work: the store checked reachable (an unreachable one is
    `TrackingUnavailable`, one line; with tracking.required false, the local store with a warning), then the parent
    run started or reused, the data preparation as a nested run, what the run logs, and its finish.

    Once a run is started or reused, logging goes through a `RunLogger`: an outage warns and never stops the run.
    `client` and `run_id` are what other code needs to nest its own runs (the probe).
    """

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.client = connect(exp)
        self.uri = self.client.tracking_uri
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.run_dir: Path | None = None
        self._log: RunLogger | None = None

    def start(self, run_name: str, run_dir: str | os.PathLike, device: str) -> str:
        """A new parent run, tagged with fwray's version and commit, `device` and the library versions."""
        return self.reuse(start_run(self.client, self.exp, run_name, tags=run_tags(self.exp, device)), run_dir)

    def reuse(self, run_id: str, run_dir: str | os.PathLike) -> str:
        """Log into `run_id` from here on (an earlier run's, on --resume), its outbox in `run_dir`."""
        self.run_id, self.run_dir = run_id, Path(run_dir)
        self.experiment_id = self.client.get_run(run_id).info.experiment_id  # for the addresses the run ends with
        self._log = RunLogger(self.uri, run_id, self.run_dir)
        return run_id

    def log_prepare(self, cache_dir: str | os.PathLike, manifest: dict, wall_seconds: float) -> str | None:
        """A `prepare` run nested under the parent: data settings, documents/tokens per split, seconds, manifest and
        data report (written to the run folder first). Returns its id, or None (after one warning) when MLflow fails:
        data logging never stops a run."""
        report = self.run_dir / DATA_REPORT
        report.write_text(data_report(manifest))
        try:
            tags = {"fwray.cache": str(cache_dir), "fwray.fingerprint": manifest.get("fingerprint", "")}
            child = start_run(self.client, self.exp, PREPARE_RUN, tags, parent_run_id=self.run_id)
            params = {k: v for k, v in flatten(self.exp).items() if k.startswith("data.")}
            params["fingerprint"] = manifest.get("fingerprint", "")
            log_params(self.client, child, params)
            values = {**data_metrics(manifest), "wall_seconds": wall_seconds}
            self.client.log_batch(child, metrics=[Metric(k, float(v), _now_ms(), 0) for k, v in values.items()])
            self.client.log_artifact(child, str(Path(cache_dir) / "manifest.json"))
            self.client.log_artifact(child, str(report))
            self.client.set_terminated(child, "FINISHED")
            return child
        except Exception as e:
            print(f"fwray: warning: could not log the data preparation to MLflow ({type(e).__name__}: "
                  f"{first_line(e)}); training goes on", file=sys.stderr, flush=True)
            return None

    def params(self, values: dict[str, object]) -> None:
        self._log.params(values)

    def tags(self, values: dict[str, object]) -> None:
        self._log.tags(values)

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._log.artifact(path, artifact_path)

    def dataset(self, manifest: dict) -> None:
        """The prepared data as the run's training dataset: the runs table's Dataset column, the run page's inputs."""
        self._log.dataset(training_dataset(manifest, self.exp.data), "training")

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
        return finish(self.client, self.run_id, ok, self.run_dir, tags)

    def ui_command(self) -> str:
        return ui_command(self.uri)

    def run_page(self) -> str:
        return run_page(self.uri, self.experiment_id, self.run_id)

    def runs_table(self) -> str:
        return runs_table(self.uri, self.experiment_id)
