"""`python -m fwray.plan EXP.yaml --hours H [--gpu NAME] [--measure] [--write OUT.yaml] [section.key=value ...]`:
what to train on this data, on this card, in H hours of training (fwray.plan.planner has how it decides)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import config
from ..config import Experiment
from ..core.tokens import write_atomic
from ..data.size import DataSize
from ..errors import command
from . import family as cand
from .family import PlanError
from .planner import Plan, experiment_yaml, make_plan, table


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fwray.plan", description=__doc__.split(" (fwray")[0])
    p.add_argument("experiment", help="an experiments/*.yaml file: its data, recipe, block size and tokens per step")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.paths=[shard.parquet]")
    p.add_argument("--hours", type=float, required=True, help="hours of training (data preparation not included)")
    p.add_argument("--gpu", help='the card to plan for, e.g. "RTX 4070", or "cpu" (default: hardware.gpu, else this '
                                 "machine's GPU)")
    p.add_argument("--measure", action="store_true",
                   help="time the best shapes on this machine's device with the probe's Ray Tune trials")
    p.add_argument("--write", metavar="OUT.yaml", help="write the recommended experiment there")
    p.add_argument("--force", action="store_true", help="overwrite --write's file if it exists")
    p.add_argument("--train-tokens", type=float, metavar="N",
                   help="plan for N training tokens instead of reading the data (e.g. 0.7e9 for a FineWeb shard)")
    p.add_argument("--depths", default=f"{cand.DEPTHS[0]}-{cand.DEPTHS[-1]}",
                   help="the family's depths, e.g. 2-16 or 4,8,12 (default %(default)s)")
    return p.parse_intermixed_args(argv)


def _depths(text: str) -> tuple[int, ...]:
    try:
        if "-" in text:
            lo, hi = map(int, text.split("-"))
            return tuple(range(lo, hi + 1))
        return tuple(sorted({int(d) for d in text.split(",")}))
    except ValueError:
        raise PlanError(f"--depths {text!r}: write a range (2-16) or a list (4,8,12)") from None


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the plan sets the budget, so an experiment file needs none of its own
    exp = config.load(args.experiment, [*args.overrides, "train.epochs=1"])
    plan_command(exp, args, " ".join(["python -m fwray.plan", *(argv if argv is not None else sys.argv[1:])]))
    return 0


def plan_command(exp: Experiment, args, command_line: str) -> Plan:
    """The command's work: plan, print, write the experiment (with --write), log the plan to MLflow."""
    from ..tracking.tracker import Tracker
    from . import measure as plan_run  # the boundary: the card, the data's size, Ray Tune trials, MLflow

    if not args.hours > 0:
        raise PlanError(f"--hours {args.hours:g}: give the hours of training to plan for, e.g. --hours 12")
    written = Path(args.write) if args.write else None
    if written and written.exists() and not args.force:
        raise PlanError(f"{written} exists: choose another --write path or add --force to overwrite it")
    depths = _depths(args.depths)
    target, speed_exp = plan_run.target(exp, args.gpu, args.measure)
    data = (DataSize(int(args.train_tokens), 0, 0, "given", "given with --train-tokens; the data was not read")
            if args.train_tokens else plan_run.data_size(exp))
    tracker = Tracker(exp)  # an unreachable server stops the plan before the memory estimates and trials
    out_dir = (Path(".fwray/plan") / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    measure = plan_run.measurer(exp, target, out_dir) if args.measure else None
    plan = make_plan(exp, args.hours * 3600, data, target, speed_exp, depths, plan_run.cached_estimates(),
                     measure=measure)
    text = table(plan)
    print(text, flush=True)
    if written:
        write_atomic(written, experiment_yaml(plan, command_line).encode())
    run_id = plan_run.track(tracker, plan, text, out_dir, written, command_line)
    if written:
        print(f"\nwrote {written}: train it with `python -m fwray.run {written}`")
    if run_id:  # else MLflow did not start the run, and said so
        print(f"MLflow run {run_id} (plan) in experiment {exp.tracking.experiment or exp.name!r} at {tracker.uri}")
    return plan


if __name__ == "__main__":
    sys.exit(main())
