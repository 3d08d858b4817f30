"""`python -m fwray.prepare EXP.yaml [section.key=value ...]`: tokenize an experiment's parquet into the token cache
(fwray.data.prepare has how)."""
import argparse
import sys
from pathlib import Path

from . import config
from .config import Experiment
# the stage under its own module name, never __main__: Ray's workers unpickle its functions by module path
from .data import prepare
from .data.report import data_report
from .errors import command


def summary(exp: Experiment, folder: Path, manifest: dict) -> str:
    """The data report the run logs (one set of figures, here and in MLflow) and the epochs the configured run does."""
    lines = [f"prepared {folder}", data_report(manifest).rstrip("\n")]
    train_tokens = manifest["splits"]["train"]["tokens"]
    if train_tokens:
        iters = config.resolve(exp, train_tokens).train.max_iters
        epochs = iters * exp.tokens_per_step / train_tokens
        lines.append(f"  the run: {iters:,} steps x {exp.tokens_per_step:,} tokens = {epochs:.2f} epochs of train")
    return "\n".join(lines)


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwray.prepare",
                                     description="Tokenize an experiment's parquet inputs into cached token shards.")
    parser.add_argument("experiment", help="experiments/*.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.num_workers=2")
    args = parser.parse_args(argv)
    exp = config.load(args.experiment, args.overrides)
    folder, manifest = prepare.prepare(exp)
    print(summary(exp, folder, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
