"""`python -m fwray.probe EXP.yaml [section.key=value ...]`: which micro-batch fits the card, and which is fastest
(fwray.probe.sweep has how)."""
import argparse
import sys

from .. import config, ray_session
from ..data import prepare
from ..errors import command
from ..tracking.tracker import Tracker
from . import sweep, verdict as verdicts


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwray.probe", description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("experiment", help="an experiments/*.yaml file")
    parser.add_argument("overrides", nargs="*", help="section.key=value (e.g. probe.gpu_memory_gb=8)")
    parser.add_argument("--synthetic", action="store_true",
                        help="random tokens instead of the prepared data (no data needed; same memory and speed)")
    args = parser.parse_args(argv)
    exp = config.load(args.experiment, args.overrides)
    tracker = Tracker(exp)  # an unreachable server stops the probe before any work; its run is a top-level one
    # the data first: a missing or broken input is one line before Ray starts
    cache_dir, manifest = (None, None) if args.synthetic else prepare.prepare(exp)
    ray_session.start()
    verdict = sweep.run_probe(exp, cache_dir, manifest, tracker=tracker)
    verdicts.apply_verdict(exp, verdict)
    c = verdict["chosen"]
    print(f"train with: python -m fwray.run {args.experiment} train.batch_size={c['batch_size']} "
          f"train.gradient_accumulation_steps={c['gradient_accumulation_steps']}"
          + (" train.activation_checkpointing=true" if c["activation_checkpointing"] else "")
          + (f" train.compile={str(c['compile']).lower()}" if "compile" in c else "")
          + ("" if exp.probe.enabled else "   (or set probe.enabled: true)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
