"""`python -m fwray.run EXP.yaml [section.key=value ...] [--resume]`: prepare -> (probe) -> train -> track."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints once, not again through its logger


class UserError(RuntimeError):
    """A problem the user can fix, reported as one line."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fwray.run", description=__doc__)
    parser.add_argument("experiment", help="an experiments/*.yaml file")
    parser.add_argument("overrides", nargs="*", help="section.key=value, values read as YAML (train.max_iters=50)")
    parser.add_argument("--resume", action="store_true",
                        help="continue this experiment's last run from its latest checkpoint, in the same MLflow run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .config import ConfigError, load
    from .tokens import TokenizerUnavailable

    try:
        exp = load(args.experiment, args.overrides)
        return run(exp, resume=args.resume)
    except (ConfigError, TokenizerUnavailable, UserError) as e:
        print(f"fwray: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # boundary errors that already carry one clear line
        from .prepare import PrepareError
        from .tracking import TrackingUnavailable
        from .engine import NonFiniteLoss

        if isinstance(e, (PrepareError, TrackingUnavailable, NonFiniteLoss)) or type(e) is RuntimeError:
            print(f"fwray: error: {e}", file=sys.stderr)
            return 1
        raise


def _latest_path(exp) -> Path:
    return Path(exp.resources.storage_path) / f"{exp.name}.latest.json"


def run(exp, resume: bool = False) -> int:
    import ray

    from . import config, plan, prepare, tracking, trainer
    from .tokens import get_tokenizer, split_files

    get_tokenizer(exp.data.tokenizer)  # fail in one line now rather than inside a Ray worker
    client = tracking.connect(exp)  # an unreachable server stops us before any work
    uri = client.tracking_uri
    previous = _previous_run(exp) if resume else None

    if not ray.is_initialized():
        # Ray's own INFO/WARNING chatter (report bookkeeping, state-API probes) would bury fwray's progress lines
        ray.init(include_dashboard=False, logging_level=logging.ERROR,
                 logging_config=ray.LoggingConfig(log_level="ERROR"))

    cache_dir, manifest = prepare.prepare(exp)
    exp = config.resolve(exp, manifest["splits"]["train"]["tokens"])
    if exp.probe.enabled:
        from . import probe

        exp = probe.apply_verdict(exp, probe.run_probe(exp, cache_dir, manifest, client=client))
    fig = plan.figures(exp, manifest)
    print(plan.describe(exp, fig), flush=True)

    if previous:
        run_id, ray_name = previous["mlflow_run_id"], previous["ray_run_name"]
        run_dir = Path(previous["run_dir"])
        print(f"resuming MLflow run {run_id} (Ray run {ray_name}) from its latest checkpoint")
    else:
        ray_name = f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = (Path(exp.resources.storage_path) / ray_name).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = tracking.start_run(client, exp, ray_name, tags={**tracking.version_tags(), "fwray.cache": str(cache_dir)})
        tracking.log_experiment(client, run_id, exp)
        tracking.log_params(client, run_id, {f"plan.{k}": v for k, v in fig.items()})
        (run_dir / "config.yaml").write_text(config.to_yaml(exp))
        (run_dir / "plan.txt").write_text(plan.describe(exp, fig) + "\n")
        client.log_artifact(run_id, str(run_dir / "config.yaml"))
        client.log_artifact(run_id, str(run_dir / "plan.txt"))
        client.log_artifact(run_id, str(Path(cache_dir) / "manifest.json"), "data")
        _latest_path(exp).write_text(json.dumps({"mlflow_run_id": run_id, "ray_run_name": ray_name,
                                                 "run_dir": str(run_dir), "tracking_uri": uri}))
    job = trainer.TrainJob(exp=exp, train_files=tuple(map(str, split_files(cache_dir, manifest, "train"))),
                           val_files=tuple(map(str, split_files(cache_dir, manifest, "val"))),
                           train_tokens=manifest["splits"]["train"]["tokens"], tracking_uri=uri, run_id=run_id,
                           run_dir=str(run_dir))
    ok = False
    try:
        result = trainer.fit(job, ray_name)
        ok = True
    finally:
        tracking.finish(client, run_id, ok)
    print(f"\ndone: validation loss {result['first_val_loss']:.3f} -> {result['final_val_loss']:.3f} "
          f"after {exp.train.max_iters} steps")
    print(f"MLflow run {run_id} in experiment {exp.tracking.experiment or exp.name!r} at {uri}")
    print(f"final model: {run_dir / 'model'}")
    print(f"browse it:   {tracking.ui_command(uri)}")
    return 0


def _previous_run(exp) -> dict:
    path = _latest_path(exp)
    if not path.is_file():
        raise UserError(f"--resume: no earlier run of experiment {exp.name!r} under {exp.resources.storage_path} "
                        f"(looked for {path}); run it once without --resume")
    return json.loads(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
