"""`fwray COMMAND [ARGS ...]`: every fwray command under one name (`fwray COMMAND --help` for its options). Each is
also `python -m fwray.COMMAND ...` (replay: `python -m fwray.tracking replay ...`)."""
import difflib
import importlib
import sys

# name -> (the module whose main(argv) runs it, what it does). Imported only once chosen, so that `fwray --help`
# answers without loading torch, Ray or MLflow
COMMANDS = {
    "run": ("fwray.run", "prepare the data, probe (if enabled), train on Ray and track the run in MLflow"),
    "prepare": ("fwray.prepare", "tokenize an experiment's parquet into the token cache (Ray Data)"),
    "probe": ("fwray.probe.__main__", "which micro-batch fits the card, and which is fastest (Ray Tune)"),
    "plan": ("fwray.plan.__main__", "what to train on this data, on this card, in these hours"),
    "sample": ("fwray.sample", "text from a trained model"),
    "eval": ("fwray.eval", "a trained model's validation loss, bits per byte and HellaSwag accuracy"),
    "export": ("fwray.export", "a trained model in a folder transformers (or fwray) loads"),
    "replay": ("fwray.tracking.__main__", "log what a run kept in its run folder while MLflow was away"),
}
# commands that are a subcommand of their module's own parser
SUBCOMMAND = {"replay": ["replay"]}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:{width}s}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(["usage: fwray COMMAND [ARGS ...]", "", *lines, "",
                      "fwray COMMAND --help tells a command's options; each is also python -m fwray.COMMAND",
                      "(replay: python -m fwray.tracking replay)"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean fwray {close[0]}?" if close else f"the commands: {', '.join(COMMANDS)}"
        if name.endswith((".yaml", ".yml")):
            hint = f"to train it: fwray run {name}"
        print(f"fwray: error: {name!r} is not an fwray command; {hint} (fwray --help lists them)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main([*SUBCOMMAND.get(name, []), *rest])


if __name__ == "__main__":
    sys.exit(main())
