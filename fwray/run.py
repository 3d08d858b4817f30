"""`python -m fwray.run EXP.yaml [section.key=value ...] [--resume]`: prepare -> (probe) -> train -> track."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import ray_session  # noqa: F401  (first: it sets Ray's environment before Ray starts)
from . import config
from .data.report import DATA_REPORT
from .errors import FwrayError, command
from .storage import uri as locations
from .storage.check import check


class ResumeError(FwrayError):
    """--resume with nothing to resume."""

    exit_code = 2


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fwray.run", description=__doc__)
    parser.add_argument("experiment", help="an experiments/*.yaml file")
    parser.add_argument("overrides", nargs="*", help="section.key=value, values read as YAML (train.max_iters=50)")
    parser.add_argument("--resume", action="store_true",
                        help="continue this experiment's last run from its latest checkpoint, in the same MLflow run")
    return parser.parse_intermixed_args(argv)  # options and overrides in any order


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exp = config.load(args.experiment, args.overrides)
    return run(exp, resume=args.resume)


def _latest_path(exp) -> str:
    """What --resume reads: beside the runs, so on object storage a resume works from any machine."""
    return locations.join(exp.resources.storage_path, f"{exp.name}.latest.json")


def _run_location(exp, ray_name: str) -> str:
    """Where Ray keeps the run's checkpoints and fwray its final model: a folder, or a URI on object storage."""
    return locations.join(locations.absolute(exp.resources.storage_path), ray_name)


def run(exp, resume: bool = False) -> int:
    # here, not at the top: --help and a bad experiment file answer before torch, Ray and MLflow load (fwray/__init__)
    from .core import bpb
    from .core.tokens import get_tokenizer, shard_hashes
    from .plan import figures
    from .tracking.tracker import Tracker
    from .train import trainer

    get_tokenizer(exp.data.tokenizer)  # fail in one line now rather than inside a Ray worker
    check(exp.resources.storage_path, "resources.storage_path")  # one line now, not a traceback after the data
    check(exp.data.cache_dir, "data.cache_dir")
    tracker = Tracker(exp)  # an unreachable server stops us before any work
    previous = _previous_run(exp) if resume else None

    ray_session.start()  # a private Ray, or the cluster $RAY_ADDRESS names
    gpu = ray_session.use_gpu(exp.resources.use_gpu)  # stops now, not after the data, if use_gpu: true finds none
    ray_name, run_dir, run_id = _open_parent_run(exp, tracker, previous, gpu)
    location = _run_location(exp, ray_name)
    ok, outcome, registered = False, {}, None
    try:
        cache_dir, manifest, train_files, val_files = _prepare_data(exp, tracker, log=not previous)
        yardstick, yardstick_line = _find_yardstick(exp)
        exp, verdict = _probe_and_resolve(exp, cache_dir, manifest, tracker, run_dir, reuse=bool(previous))
        fig = figures.figures(exp, manifest)
        plan_text = figures.describe(exp, fig)
        print(plan_text, flush=True)
        if previous:
            print(f"resuming MLflow run {run_id} (Ray run {ray_name}) from its latest checkpoint")
        else:
            _record_plan(exp, tracker, run_dir, cache_dir, manifest, fig, plan_text, yardstick_line)
            locations.write_bytes(_latest_path(exp), json.dumps(
                {"mlflow_run_id": run_id, "ray_run_name": ray_name, "run_dir": location,
                 "tracking_uri": tracker.uri}).encode())
        job = trainer.TrainJob(exp=exp, train_files=train_files, val_files=val_files, tracking_uri=tracker.uri,
                               run_id=run_id, run_dir=location, val_text=bpb.text_counts(manifest),
                               yardstick=yardstick, shard_sha256=shard_hashes(manifest))
        result = trainer.fit(job, ray_name)
        ok = True
        outcome = figures.outcome(fig, result, predicted_peak_gb=(verdict or {}).get("chosen", {}).get("peak_gb"),
                                  planned_for=figures.target_gpu(exp))
        if exp.tracking.register_model:
            # in the driver, once, after any worker restarts (rank 0 may be on another node); never raises: it has
            # trained
            registered = tracker.log_model()
    finally:
        # never raises: an outage warns and waits for replay; tags, not params: a resume may update them
        outcome_tags = {f"fwray.outcome.{k}": v if isinstance(v, str) else f"{v:.4g}" for k, v in outcome.items()}
        tracker.finish(ok, tags=outcome_tags)
    _print_summary(exp, tracker, result, outcome, yardstick, run_id, location, registered)
    return 0


def _open_parent_run(exp, tracker, previous: dict | None, gpu: bool) -> tuple[str, Path, str]:
    """The Ray run's name, its folder and the MLflow parent run: the resumed run's, or new ones. The parent run comes
    first so the data preparation (and the probe) can nest under it; from here on an MLflow outage warns and never
    stops the run."""
    ray_name = previous["ray_run_name"] if previous else f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # the run's own folder, or this machine's for a run on object storage (files wait there to be logged)
    run_dir = locations.local_mirror(_run_location(exp, ray_name))
    run_dir.mkdir(parents=True, exist_ok=True)
    if previous:
        return ray_name, run_dir, tracker.reuse(previous["mlflow_run_id"], run_dir)
    return ray_name, run_dir, tracker.start(ray_name, run_dir, ray_session.device_label(gpu))


def _prepare_data(exp, tracker, log: bool):
    """The token cache (prepared once, logged on a new run), its manifest and each split's files, every split checked
    to hold a window: one line here, not in a Ray worker or a trial."""
    from .core import loader
    from .core.tokens import split_files
    from .data import prepare

    prepare_start = time.perf_counter()
    cache_dir, manifest = prepare.prepare(exp)
    prepare_s = time.perf_counter() - prepare_start
    if log:
        tracker.log_prepare(cache_dir, manifest, prepare_s)
    for split in ("train", "val"):  # from the manifest's counts: the shards may be on object storage
        loader.check_split(manifest, split, exp.model.block_size, exp.source)
    train_files, val_files = (tuple(split_files(cache_dir, manifest, s)) for s in ("train", "val"))
    return cache_dir, manifest, train_files, val_files


def _find_yardstick(exp):
    """The yardstick and its one-line description (printed), or (None, None); a bad file, or one too short for a
    window, stops here in one line, not in a worker."""
    from .data import yardstick as yardsticks

    yardstick = yardsticks.find(exp)
    line = (yardsticks.on_this_node(yardstick, exp.data.node_cache_dir).describe(exp.model.block_size)
            if yardstick else None)
    if line:
        print(f"yardstick: {line}", flush=True)
    return yardstick, line


def _probe_and_resolve(exp, cache_dir, manifest, tracker, run_dir: Path, reuse: bool):
    """The experiment with the probe's chosen batch applied (when probe.enabled), then resolved against the train
    split; and the probe's verdict (None without a probe)."""
    from .probe import sweep as probe
    from .probe.verdict import apply_verdict

    verdict = None
    if exp.probe.enabled:  # before resolve: an epochs budget counts in the chosen tokens per step
        # nested under this run; a resumed run reuses its saved verdict, so its batch does not change under it
        verdict = probe.run_probe(exp, cache_dir, manifest, tracker=tracker, out_dir=run_dir / "probe", reuse=reuse)
        exp = apply_verdict(exp, verdict)
    return config.resolve(exp, manifest["splits"]["train"]["tokens"]), verdict


def _record_plan(exp, tracker, run_dir: Path, cache_dir, manifest, fig: dict, plan_text: str,
                 yardstick_line: str | None) -> None:
    """A new run's decisions, written down and logged: tags, the resolved config and plan as params and files, the
    data manifest, report and dataset."""
    tracker.tags({"fwray.cache": str(cache_dir), "mlflow.note.content": plan_text})
    if yardstick_line:
        tracker.tags({"fwray.yardstick": yardstick_line})
    tracker.params(config.flatten(exp))
    tracker.params({f"plan.{k}": v for k, v in fig.items()})
    (run_dir / "config.yaml").write_text(config.to_yaml(exp))
    (run_dir / "plan.txt").write_text(plan_text + "\n")
    tracker.artifact(run_dir / "config.yaml")
    tracker.artifact(run_dir / "plan.txt")
    tracker.artifact(run_dir / "manifest.json", "data")  # log_prepare's copy: the cache may be on object storage
    tracker.artifact(run_dir / DATA_REPORT, "data")
    tracker.dataset(manifest)


def _print_summary(exp, tracker, result: dict, outcome: dict, yardstick, run_id: str, run_location: str,
                   registered: str | None) -> None:
    """The losses, the outcome against the plan, and where to find the run, its model and its UI."""
    from .plan import figures
    from .tracking.store import is_server

    print(f"\ndone: validation loss {result['first_val_loss']:.3f} -> {result['final_val_loss']:.3f} "
          f"after {exp.train.max_iters} steps" + (f"; yardstick {exp.yardstick.name} "
                                                   f"{result['final_yardstick_val_loss']:.3f}" if yardstick else ""))
    if outcome:
        print(figures.describe_outcome(outcome))
    print(f"MLflow run {run_id} in experiment {exp.tracking.experiment or exp.name!r} at {tracker.uri}")
    print(f"final model: {locations.join(run_location, 'model')}"
          + (f", registered as {registered}" if registered else ""))
    print(f"run page:    {tracker.run_page()}")
    print(f"runs table:  {tracker.runs_table()}")
    if not is_server(tracker.uri):
        print(f"browse it:   {tracker.ui_command()}")
    if registered:
        print(f"serve it:    MLFLOW_TRACKING_URI={tracker.uri} mlflow models serve -m {registered} --env-manager local "
              "--host 127.0.0.1 --port 5001")


def _previous_run(exp) -> dict:
    path = _latest_path(exp)
    if not locations.exists(path):
        raise ResumeError(f"--resume: no earlier run of experiment {exp.name!r} under {exp.resources.storage_path} "
                        f"(looked for {path}); run it once without --resume")
    return json.loads(locations.read_bytes(path))


if __name__ == "__main__":
    sys.exit(main())
