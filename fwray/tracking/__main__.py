"""`python -m fwray.tracking replay FILE.jsonl [--uri URI] | metrics`: log what a run kept while MLflow was away,
or list the metric names fwray logs."""
import argparse
import sys
from pathlib import Path

from ..errors import FwrayError, command, first_line
from .live import METRICS
from .replay import replay as replay_records
from .store import default_uri


class ReplayError(FwrayError):
    """Nothing to replay (exit 2), or a store that stopped the replay (exit 1)."""


class NothingToReplay(ReplayError):
    exit_code = 2


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwray.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="log what a run kept in unlogged_metrics.jsonl while MLflow was unreachable")
    rp.add_argument("jsonl", help="<run_dir>/unlogged_metrics.jsonl")
    rp.add_argument("--uri", help="tracking URI (default: the URI the run used, as recorded in the file)")
    sub.add_parser("metrics", help="list the metric names fwray logs and what they mean")
    args = parser.parse_args(argv)
    if args.command == "metrics":
        width = max(map(len, METRICS))
        for name, text in METRICS.items():
            print(f"{name:{width}s} {text}")
        return 0
    return replay(args.jsonl, args.uri)


def replay(jsonl: str, uri: str | None) -> int:
    """Replay, one line of counts."""
    if not Path(jsonl).is_file():
        raise NothingToReplay(f"{jsonl}: no such file (nothing to replay?)")
    try:
        # a record names the store it was meant for; one that names none goes where a run without tracking.uri goes
        counts = replay_records(jsonl, uri, default_uri=default_uri())
    except Exception as e:
        raise ReplayError(f"replay stopped ({type(e).__name__}: {first_line(e)}); the file is kept, fix the store and "
                          f"run it again (metrics already logged would be logged twice)") from None
    print(f"replayed {jsonl}: {counts['metrics']} metric values, {counts['params']} params, "
          f"{counts['tags']} tags, "
          f"{counts['artifacts']} artifacts, {counts['status']} status"
          + "".join(f", {counts[k]} {k}" for k in ("datasets", "models") if counts[k])
          + (f" ({counts['missing_artifacts']} artifacts gone)" if counts["missing_artifacts"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
