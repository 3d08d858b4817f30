"""The sampler CLI on saved models (no Ray, no server), its one-line errors, and the evaluation artifacts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fwray import config, sample
from fwray.core import checkpoint, tokens
from fwray.core.model import GPT
from fwray.data import report as data_report
from fwray.train import artifacts
from pipeline import sqlite_store

EXP = config.Experiment(name="tiny", model=config.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(EXP.model)


@pytest.fixture
def model_folder(tmp_path):
    """What fwray.train.trainer writes as the run's `model/`: a weights-only state dict and the model config."""
    folder = tmp_path / checkpoint.MODEL_DIR
    checkpoint.save_model(folder, EXP, tiny_model().state_dict(), step=10, val_loss=9.9)
    return folder


def run_cli(capsys, *args):
    rc = sample.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_checkpoint_folder_prints_a_deterministic_continuation(model_folder, capsys):
    args = ["--checkpoint", str(model_folder), "--prompt", "Hello", "--max-new-tokens", "12", "--device", "cpu"]
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and out.startswith("Hello") and len(out.strip()) > len("Hello")
    assert run_cli(capsys, *args)[1] == out  # same seed, same text
    assert run_cli(capsys, *args, "--seed", "7")[1] != out


def test_ray_checkpoint_and_run_folders_load_the_same_weights(model_folder, tmp_path, capsys):
    ckpt = tmp_path / "ray_run" / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    checkpoint.save_state(ckpt, {"model": tiny_model().state_dict(), "optimizer": {}, "step": 10}, EXP)
    args = ["--prompt", "Hello", "--max-new-tokens", "8", "--device", "cpu"]
    reference = run_cli(capsys, "--checkpoint", str(model_folder), *args)[1]
    for path in (ckpt, ckpt.parent, model_folder.parent):  # a Ray checkpoint, a Ray run folder, a run folder
        rc, out, _ = run_cli(capsys, "--checkpoint", str(path), *args)
        assert (rc, out) == (0, reference)


def test_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "--checkpoint", str(tmp_path / "nope"))
    assert rc == 2 and out == "" and err.count("\n") == 1 and "no such checkpoint folder" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, "--checkpoint", str(tmp_path / "empty"))
    assert rc == 2 and err.count("\n") == 1 and "model.pt" in err


def test_missing_tokenizer_is_one_line_exit_2(model_folder, monkeypatch, capsys):
    def unavailable(name="gpt2"):
        raise tokens.TokenizerUnavailable(f"tiktoken cannot load the {name} files (test)")

    monkeypatch.setattr(tokens, "get_tokenizer", unavailable)
    rc, out, err = run_cli(capsys, "--checkpoint", str(model_folder))
    assert rc == 2 and out == "" and err.count("\n") == 1 and "tiktoken cannot load" in err


def test_unknown_run_and_run_without_model_are_one_line_exit_2(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("e"))
    rc, _, err = run_cli(capsys, "--run-id", "0123456789abcdef0123456789abcdef", "--tracking-uri", uri)
    assert rc == 2 and fwray_lines(err) == 1 and "no MLflow run" in err
    rc, _, err = run_cli(capsys, "--run-id", run.info.run_id, "--tracking-uri", uri)
    assert rc == 2 and fwray_lines(err) == 1 and "has no model artifacts" in err


def fwray_lines(err: str) -> int:
    """fwray's own lines (MLflow logs its store creation at INFO)."""
    return sum(line.startswith("fwray:") for line in err.splitlines())


def test_run_id_from_a_local_store(model_folder, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp_id).info.run_id
    client.log_artifacts(run_id, str(model_folder), "model")
    args = ["--prompt", "Hello", "--max-new-tokens", "8", "--device", "cpu"]
    rc, out, _ = run_cli(capsys, "--run-id", run_id, "--tracking-uri", uri, *args)
    assert rc == 0 and out == run_cli(capsys, "--checkpoint", str(model_folder), *args)[1]


# ---------------------------------------------------------------- evaluation artifacts


MANIFEST = {"fingerprint": "ab" * 32, "tokenizer": "gpt2", "val_fraction": 0.05, "chars": 3000, "seconds": 1.5,
            "splits": {"train": {"documents": 9, "tokens": 1009, "files": [{"name": "train-00000.bin"}]},
                       "val": {"documents": 1, "tokens": 11, "files": [{"name": "val-00000.bin"}]}},
            "skipped": {"null_or_empty": 2, "min_chars": 0},
            "token_count": {"column_sum": 1010, "produced_without_eot": 1010, "matches": True}}


def test_data_report_and_metrics_come_from_the_manifest():
    text = data_report.data_report(MANIFEST)
    assert "train" in text and "1,009 tokens" in text and "skipped rows: 2" in text and "2.97 chars/token" in text
    m = data_report.data_metrics(MANIFEST)
    assert m["train_documents"] == 9 and m["val_tokens"] == 11 and m["skipped_null_or_empty"] == 2
    assert m["chars_per_token"] == pytest.approx(3000 / 1010)


def test_eval_artifacts_write_curve_and_samples_and_hand_them_to_the_logger(tmp_path):
    logged = []

    class Logger:
        def artifact(self, path, artifact_path=None):
            logged.append((path.relative_to(tmp_path).as_posix(), artifact_path))

    model = tiny_model()
    evals = artifacts.EvalArtifacts(EXP, tmp_path, Logger(), history={"train_loss": {5: 10.5}})
    evals.record(0, {"val_loss": 10.9, "tokens_seen": 0})
    evals.on_eval(0)  # no weights at step 0: the curve only
    evals.record(10, {"train_loss": 9.5, "lr": 1e-3})
    evals.record(10, {"val_loss": 9.7})
    evals.on_eval(10, model.state_dict())
    assert logged == [("loss_curve.png", None), ("loss_curve.png", None), ("samples/step_000010.txt", "samples")]
    assert (tmp_path / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert evals.history == {"train_loss": {5: 10.5, 10: 9.5}, "val_loss": {0: 10.9, 10: 9.7}, "val_bpb": {},
                             "yardstick_val_loss": {}}
    text = (tmp_path / "samples" / "step_000010.txt").read_text()
    assert text.startswith("step 10:") and all(repr(p) in text for p in artifacts.PROMPTS)
    assert not evals.broken


def test_loss_curve_keeps_the_font_cache_notice_off_the_terminal(tmp_path):
    """A fresh matplotlib config builds its font cache on the first curve and logs it; none of that reaches stderr,
    even with the root logger at INFO (as a configured worker's may be)."""
    script = ("import logging; logging.basicConfig(level=logging.INFO)\n"
              "from fwray.train.artifacts import loss_curve_png\n"
              "assert loss_curve_png({'train_loss': {1: 2.0}}, 8).startswith(b'\\x89PNG')\n")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl"), "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "mpl").glob("fontlist-*.json"))  # the cache was built in this run
    assert "font" not in proc.stderr.lower(), proc.stderr


def test_eval_samples_borrow_the_weights_of_a_rotary_model(tmp_path):
    """The modern recipe's rotary table is no part of a state dict: the sampler, built on the meta device, rebuilds
    it beside the weights it borrows."""
    exp = config.Experiment(name="tiny", model=config.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32,
                                                                  recipe="modern"))
    torch.manual_seed(0)
    evals = artifacts.EvalArtifacts(exp, tmp_path, type("Logger", (), {"artifact": lambda *a: None})())
    evals.on_eval(4, GPT(exp.model).state_dict())
    assert not evals.broken and (tmp_path / "samples" / "step_000004.txt").is_file()
