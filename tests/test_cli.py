"""`fwray COMMAND ...`: one console script, one --help listing the commands, and every command's bad input as one
`fwray: error:` line with its exit code (fwray.errors.command, the one place that turns an FwrayError into it)."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fwray import __main__ as cli

ROOT = Path(__file__).resolve().parent.parent


def test_the_console_script_is_the_dispatcher():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"fwray": "fwray.__main__:main"}


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("run", "prepare", "probe", "plan", "sample", "eval", "export", "replay"):
        assert f"\n  {name} " in out
    assert set(cli.COMMANDS) == {"run", "prepare", "probe", "plan", "sample", "eval", "export", "replay"}


def test_help_loads_no_command(tmp_path):
    """`fwray --help` answers without torch, Ray or MLflow."""
    script = ("import sys\nfrom fwray.__main__ import main\nmain(['--help'])\n"
              "loaded = [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules]\nassert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv, expected", [
    (["rn", "x.yaml"], "'rn' is not an fwray command; did you mean fwray run?"),
    (["experiments/smoke.yaml"], "to train it: fwray run experiments/smoke.yaml"),
])
def test_an_unknown_command_is_one_line(capsys, argv, expected):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fwray: error: ") and expected in err[0], err


@pytest.mark.parametrize("argv, expected", [
    (["run", "missing.yaml"], "missing.yaml: experiment file not found"),
    (["prepare", "missing.yaml"], "missing.yaml: experiment file not found"),
    (["probe", "missing.yaml"], "missing.yaml: experiment file not found"),
    (["plan", "missing.yaml", "--hours", "1"], "missing.yaml: experiment file not found"),
    (["sample", "--checkpoint", "missing", "--device", "cpu"], "missing"),
    (["eval", "--checkpoint", "missing", "--device", "cpu"], "missing"),
    (["export", "--checkpoint", "missing", "out"], "missing"),
    (["replay", "missing.jsonl"], "missing.jsonl: no such file (nothing to replay?)"),
    (["sample", "--checkpoint", "missing", "--device", "gpu0"], "--device gpu0: not a device torch knows"),
])
def test_every_command_turns_a_bad_input_into_one_line(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fwray: error: ") and expected in err[0], captured.err
    assert "Traceback" not in captured.err


def test_a_misspelt_key_through_the_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fwray", "run", str(ROOT / "experiments" / "smoke.yaml"),
                           "train.batch_sise=4"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"fwray: error: {ROOT / 'experiments' / 'smoke.yaml'}: unknown key train.batch_sise = 4 (on the command line: "
        "train.batch_sise=4); did you mean train.batch_size?"]
