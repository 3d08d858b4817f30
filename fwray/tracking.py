"""MLflow, live: the experiment, the runs, their params, metrics and artifacts.

Everything goes through `MlflowClient` with explicit run ids, so the driver and a Ray worker (rank 0 only) log
into the same run without sharing process state. A tracking failure mid-run never stops training: one warning,
and the records (metrics, and the artifacts, tags and final status that could not be logged) wait in the run's
outbox, `<run_dir>/unlogged_metrics.jsonl` (fwray.outbox), which `python -m fwray.tracking replay` logs later.

Who uses what: fwray.run holds one `Tracker` (store, parent run, nested prepare run, params, tags, artifacts, finish);
a Ray worker logs with a `RunLogger` built from (uri, run_id, run_dir) and reads `metric_history`; the probe nests its
runs with `start_run`, `log_params` and `finish` on the tracker's client.

Layout: one MLflow experiment per experiment name (tagged as model training for MLflow 3's UI); one parent run per
`fwray.run`, named after the Ray run; the data preparation as a nested run `prepare` (tag mlflow.parentRunId).
The metrics of the parent run, x = optimizer step, are listed in METRICS.
"""
from __future__ import annotations

import argparse
import getpass
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Fail fast against an unreachable server instead of retrying for minutes; set before mlflow reads them.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from . import __version__, outbox  # noqa: E402
from .config import Experiment, flatten  # noqa: E402
from .data_report import DATA_REPORT, data_metrics, data_report  # noqa: E402
from .errors import FwrayError, first_line  # noqa: E402

# The parent run's metrics (names are stable: dashboards and the loss curve read them). x = optimizer step.
METRICS = {
    "train_loss": "mean training loss over the last log_interval steps (non-finite steps left out)",
    "val_loss": "validation loss, mean of eval_iters batches, at every eval_interval steps and after the last",
    "lr": "learning rate of the step just taken",
    "tokens_per_s": "training throughput over the last log_interval steps, all workers (evaluation time excluded)",
    "mfu": "model FLOPs utilisation, 0..1, per worker against the GPU's dense bf16 peak (absent on CPU)",
    "peak_alloc_gb": "peak GPU memory allocated by tensors, GiB (absent on CPU)",
    "peak_reserved_gb": "peak GPU memory reserved by the caching allocator, GiB (absent on CPU)",
    "tokens_seen": "training tokens consumed so far (step x tokens per step)",
    "epoch": "passes over the prepared train split so far",
    "nonfinite_skipped": "optimizer steps skipped so far because the loss or gradient was not finite",
    "eta_s": "estimated seconds of training left",
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


def ui_command(uri: str) -> str:
    """How to browse `uri` in a browser: a server URI is already a UI; a local store needs `mlflow ui`."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


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
    root = Path(folder) if folder else Path(__file__).resolve().parent.parent
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
        self.run_dir: Path | None = None
        self._log: RunLogger | None = None

    def start(self, run_name: str, run_dir: str | os.PathLike, device: str) -> str:
        """A new parent run, tagged with fwray's version and commit, `device` and the library versions."""
        return self.reuse(start_run(self.client, self.exp, run_name, tags=run_tags(self.exp, device)), run_dir)

    def reuse(self, run_id: str, run_dir: str | os.PathLike) -> str:
        """Log into `run_id` from here on (an earlier run's, on --resume), its outbox in `run_dir`."""
        self.run_id, self.run_dir = run_id, Path(run_dir)
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

    def finish(self, ok: bool, tags: dict[str, str] | None = None) -> bool:
        """FINISHED or FAILED with the outcome `tags`; never raises (an outage keeps them in the outbox)."""
        return finish(self.client, self.run_id, ok, self.run_dir, tags)

    def ui_command(self) -> str:
        return ui_command(self.uri)


# ---------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwray.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="log what a run kept in unlogged_metrics.jsonl while MLflow was unreachable")
    rp.add_argument("jsonl", help="<run_dir>/unlogged_metrics.jsonl")
    rp.add_argument("--uri", help="tracking URI (default: the URI the run used, as recorded in the file)")
    sub.add_parser("metrics", help="list the metric names fwray logs and what they mean")
    args = parser.parse_args(argv)
    if args.command == "metrics":
        for name, text in METRICS.items():
            print(f"{name:18s} {text}")
        return 0
    # a record names the store it was meant for; one that names none goes where a run without tracking.uri goes
    return outbox.replay_command(args.jsonl, args.uri, default_uri())


if __name__ == "__main__":
    sys.exit(main())
