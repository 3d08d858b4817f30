"""Evaluation: per-target losses, bits per byte against a hand count, HellaSwag scoring with a known answer, and
`python -m fwray.eval` on saved models (no Ray), its one-line errors and what it logs to an MLflow run."""
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fwray import config
from fwray import eval as fw_eval
from fwray.core import bpb, checkpoint, engine, hellaswag, loader, tokens
from fwray.core.model import GPT
from pipeline import sqlite_store

TINY = config.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)


def test_loss_sums_leave_eot_targets_out_of_the_text_loss():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, 50257, (3, 16))
    y = torch.randint(0, 50257, (3, 16))
    y[0, 3] = y[1, 0] = y[2, 15] = tokens.EOT  # documents ending inside the windows
    with torch.no_grad():
        plain = F.cross_entropy(model.logits(model.hidden(x)).flatten(0, 1), y.flatten(), reduction="none")
        val = engine.ValLoss.of(engine.loss_sums(model, [(x, y)]))
        assert model(x, y).item() == pytest.approx(plain.mean().item(), rel=1e-6)  # the loss the engine trains on
    text = y.flatten() != tokens.EOT
    assert val.loss == pytest.approx(plain.mean().item(), rel=1e-6)
    assert val.text_loss == pytest.approx(plain[text].mean().item(), rel=1e-6)
    assert val.text_loss != pytest.approx(val.loss, rel=1e-6)


def test_bits_per_byte_is_nats_over_ln2_times_tokens_over_bytes():
    assert bpb.bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert bpb.bits_per_byte(2.0, 300, 1200) == pytest.approx(2.0 / math.log(2) / 4)
    manifest = {"splits": {"val": {"documents": 3, "tokens": 40, "bytes": 120}}}
    assert bpb.text_counts(manifest) == (37, 120)  # one EOT per document is no text
    manifest["splits"]["val"].pop("bytes")
    assert bpb.text_counts(manifest) is None  # a cache prepared before bytes were counted: no bpb


def test_progress_line_and_loss_curve_show_bpb():
    import struct

    from fwray.train.artifacts import loss_curve_png
    from fwray.train.trainer import progress_line

    line = progress_line(40, 40, {"val_loss": 3.21012, "val_bpb": 1.05123})
    assert line == "step 40/40 | val loss 3.2101 | bpb 1.0512"
    line = progress_line(40, 40, {"val_loss": 3.21012, "yardstick_val_loss": 3.40001})
    assert line == "step 40/40 | val loss 3.2101 | yardstick 3.4000"
    assert progress_line(40, 40, {"val_loss": 3.21012}) == "step 40/40 | val loss 3.2101"  # no bytes in the cache

    def height(png: bytes) -> int:  # the IHDR chunk: width, height
        return struct.unpack(">II", png[16:24])[1]

    history = {"train_loss": {10: 9.0, 20: 8.0}, "val_loss": {0: 10.9, 20: 8.1}}
    one = loss_curve_png(history, 1024)
    two = loss_curve_png({**history, "val_bpb": {0: 3.9, 20: 2.9}}, 1024)
    assert height(two) > height(one)  # a second panel for bits per byte


# ---------------------------------------------------------------- fixtures: a tiny prepared split, saved models

HAND = {"hello world": 11, "naïve café": 12, "日本": 6}  # UTF-8 bytes, counted by hand (ï, é: 2 bytes; 日, 本: 3)
EXP = config.Experiment(name="tiny", model=TINY)


def write_split(folder, splits: dict[str, list[str]]) -> dict:
    """A token cache entry as prepare leaves it: shards in fwray's format (tokens' helpers) and the manifest."""
    enc = tokens.get_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"version": 2, "tokenizer": "gpt2", "eot": tokens.EOT, "splits": {}}
    for split, texts in splits.items():
        ids, _ = tokens.encode_documents(enc, texts)
        ids.tofile(folder / f"{split}-00000.bin")
        manifest["splits"][split] = {"documents": len(texts), "tokens": int(ids.size),
                                     "bytes": sum(len(t.encode()) for t in texts),
                                     "files": [{"name": f"{split}-00000.bin", "tokens": int(ids.size)}]}
    (folder / tokens.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def save(folder, model: GPT, exp=EXP, step=7):
    checkpoint.save_model(folder, exp, model.state_dict(), step=step, val_loss=None)
    return folder


def zero_model(cfg=TINY) -> GPT:
    """Every logit 0 (the tied embedding is zero): every target costs ln(vocab_size) nats."""
    model = GPT(cfg)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
    return model


def repeat_model() -> GPT:
    """A model that predicts its input token again: no block adds anything (zero output projections), no position
    embedding, and large random embeddings whose head (tied) scores a token against itself far above the others."""
    cfg = config.ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "transformer.wpe.weight":
                p.zero_()
        model.transformer.wte.weight.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture
def split(tmp_path):
    texts = list(HAND) * 3
    return tmp_path / "cache" / "0123456789abcdef", write_split(tmp_path / "cache" / "0123456789abcdef",
                                                                 {"train": texts * 4, "val": texts})


def run_cli(main, capsys, *args):
    rc = main([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def fwray_lines(err: str) -> list[str]:
    """fwray's own lines (MLflow logs its store creation at INFO)."""
    return [line for line in err.splitlines() if line.startswith("fwray:")]


# ---------------------------------------------------------------- bits per byte, hand counted


@pytest.mark.parametrize("mode", [[], ["--all-val"], ["--limit", "3"]])
def test_bpb_of_a_model_that_knows_nothing_matches_a_hand_count(tmp_path, split, capsys, mode):
    folder, manifest = split
    assert manifest["splits"]["val"]["bytes"] == 3 * sum(HAND.values()) == 87
    text_tokens = manifest["splits"]["val"]["tokens"] - 9  # 9 documents, one EOT each
    model_dir = save(tmp_path / "model", zero_model())
    rc, out, err = run_cli(fw_eval.main, capsys, "--checkpoint", model_dir, "--data", folder, "--device", "cpu", *mode)
    assert rc == 0, err
    loss, bits = map(float, re.search(r"loss (\S+) \| bpb (\S+)", out).groups())
    assert loss == pytest.approx(math.log(50304), abs=1e-4)
    assert bits == pytest.approx(math.log2(50304) * text_tokens / 87, abs=1e-4)  # both printed to 4 decimals
    windows = int(re.search(r"validation: (\d+) windows", out).group(1))
    if mode == ["--limit", "3"]:
        assert windows == 3
    elif mode == ["--all-val"]:  # stride block_size: every token a target once, but the first and the tail
        assert windows == (manifest["splits"]["val"]["tokens"] - 1) // TINY.block_size
    else:
        assert windows == EXP.train.eval_iters * EXP.train.batch_size  # no config.yaml: TrainConfig's defaults


def test_a_cache_prepared_before_bytes_were_counted_gives_no_bpb(tmp_path, split, capsys):
    folder, manifest = split
    for s in manifest["splits"].values():
        del s["bytes"]
    (folder / tokens.MANIFEST).write_text(json.dumps(manifest))
    rc, out, err = run_cli(fw_eval.main, capsys, "--checkpoint", save(tmp_path / "model", zero_model()), "--data",
                           folder, "--device", "cpu")
    assert rc == 0, err
    assert "loss 10.8258 | no bpb: this cache was prepared before fwray counted bytes" in out


def test_default_validation_reads_the_training_windows(tmp_path, split):
    """fwray.eval's default batches are the ones the engine evaluated the run on: its figure is the run's val_loss."""
    folder, manifest = split
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    train = config.TrainConfig(eval_iters=3, eval_batch_size=2, seed=5)
    files = tokens.split_files(folder, manifest, "val")
    batches = loader.Batches.from_files(files, files, TINY.block_size, batch_size=2, seed=5, eval_batch_size=2)
    eng = engine.Engine(TINY, train, torch.device("cpu"), model, model, None, torch.float32, False)
    want = eng.evaluate(batches.val_batch, 3)
    shards = loader.TokenShards(files, TINY.block_size)
    got = engine.ValLoss.of(engine.loss_sums(model, fw_eval.val_batches(shards, train, False, None)))
    assert got == want and got.targets == 6 * TINY.block_size


@pytest.mark.parametrize("mode", [[], ["--limit", "3"]])
def test_the_yardstick_of_a_model_that_knows_nothing_is_ln_vocab(tmp_path, split, capsys, mode):
    """--yardstick FILE (llm.c's format) beside the run's validation: every target of its windows costs ln(50304)."""
    from llmc import write_llmc

    folder, _ = split
    ids, _ = tokens.encode_documents(tokens.get_tokenizer(), list(HAND) * 20)
    path = write_llmc(tmp_path / "fineweb_val_000000.bin", ids)
    rc, out, err = run_cli(fw_eval.main, capsys, "--checkpoint", save(tmp_path / "model", zero_model()), "--data",
                           folder, "--device", "cpu", "--yardstick", path, *mode)
    assert rc == 0, err
    windows = 3 if mode else (len(ids) - 1) // TINY.block_size  # the whole file: under the default budget
    line = re.search(r"yardstick: (.*): loss (\S+)\n", out)
    assert line.group(1) == (f"fineweb_val_000000: {windows} windows x 16 = {windows * 16} targets from the start "
                             f"of {path} (llm.c token file)")
    assert float(line.group(2)) == pytest.approx(math.log(50304), abs=1e-4)


def test_a_missing_yardstick_file_is_one_line(tmp_path, split, capsys):
    rc, out, err = run_cli(fw_eval.main, capsys, "--checkpoint", save(tmp_path / "model", zero_model()), "--data",
                           split[0], "--device", "cpu", "--yardstick", tmp_path / "fineweb_val_000000.bin")
    assert rc == 2 and len(fwray_lines(err)) == 1 and "fineweb_val_000000.bin: no such file; the README's" in err
    assert "--yardstick " in err


# ---------------------------------------------------------------- HellaSwag


KNOWN = [  # the repeat model's answer is the ending that goes on repeating the context's last word
    {"ctx": "the the the", "endings": ["cat sat down", "the the the", "dog ran off", "of in to"], "label": 1},
    {"ctx_a": "Paris Paris.", "ctx_b": "London London", "endings": ["London", "is big", "Rome", "and"], "label": 0},
    {"ctx": "a b c", "endings": ["d e", "x y z", "c c c c", "hello"], "label": "2"},  # a label as text (HF exports)
]


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_hellaswag_finds_the_known_answer():
    model, enc = repeat_model(), tokens.get_tokenizer()
    examples = [hellaswag._example(json.dumps(r), "test") for r in KNOWN]
    assert examples[1].context == "Paris Paris. London London"  # ctx = ctx_a + " " + ctx_b
    got = hellaswag.accuracy(model, enc, examples, torch.device("cpu"))
    assert got == {"examples": 3, "acc": 1.0, "acc_norm": 1.0}


def test_ending_losses_are_sums_and_means_over_the_ending_tokens():
    """Against a plain computation: the full row after an EOT, full logits, the ending's targets only."""
    model, enc = repeat_model(), tokens.get_tokenizer()
    example = hellaswag._example(json.dumps(KNOWN[0]), "test")
    sums, means = hellaswag.ending_losses(model, enc, example, torch.device("cpu"))
    for i, ending in enumerate(example.endings):
        ending_ids = enc.encode_ordinary(" " + ending)
        row = torch.tensor([tokens.EOT, *enc.encode_ordinary(example.context), *ending_ids])
        with torch.no_grad():
            losses = F.cross_entropy(model.logits(model.hidden(row[None, :-1]))[0], row[1:], reduction="none")
        assert sums[i].item() == pytest.approx(losses[-len(ending_ids):].sum().item(), rel=1e-5)
        assert means[i].item() == pytest.approx(losses[-len(ending_ids):].mean().item(), rel=1e-5)


def test_a_context_longer_than_the_block_keeps_the_ending_and_the_nearest_context():
    enc = tokens.get_tokenizer()
    example = hellaswag.Example("word " * 50, ("one two", "three", "four five six", "seven"), 0)
    x, y, mask = hellaswag.render(enc, example, block_size=16)
    assert x.shape[1] == 16 and mask.sum(dim=1).tolist() == [len(enc.encode_ordinary(" " + e)) for e in example.endings]
    assert y[0, mask[0]].tolist() == enc.encode_ordinary(" one two")


def test_hellaswag_through_the_command(tmp_path, capsys):
    model_dir = save(tmp_path / "model", repeat_model(), exp=config.Experiment(model=repeat_model().config))
    path = write_jsonl(tmp_path / "hs.jsonl", [*KNOWN, "", KNOWN[0]])  # a blank line is skipped
    rc, out, err = run_cli(fw_eval.main, capsys, "--checkpoint", model_dir, "--hellaswag", path, "--no-val",
                           "--limit", "3")
    assert rc == 0, err
    assert "hellaswag: 3 examples" in out and "acc 1.0000 | acc_norm 1.0000" in out


@pytest.mark.parametrize("line, why", [
    ("{not json", "not JSON"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 0}', "endings must be a list of 4 strings"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "label = 4"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": ""}', "label = '': must be"),
    ('{"endings": ["b", "c", "d", "e"], "label": 1}', "no context"),
    ('[1, 2]', "a JSON object"),
])
def test_a_malformed_line_is_one_error_naming_its_line(tmp_path, capsys, line, why):
    path = write_jsonl(tmp_path / "hs.jsonl", [KNOWN[0], "", line])
    rc, out, err = run_cli(fw_eval.main, capsys, "--checkpoint", tmp_path / "nowhere", "--hellaswag", path)
    assert rc == 2 and out == "" and fwray_lines(err) == err.splitlines()  # checked before any model is loaded
    assert len(fwray_lines(err)) == 1 and f"hs.jsonl:3: {why}" in err


# ---------------------------------------------------------------- MLflow runs


@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())


def test_unknown_run_and_run_without_model_are_one_line_exit_2(store, capsys):
    uri, client, exp_id = store
    rc, out, err = run_cli(fw_eval.main, capsys, "--run-id", "0123456789abcdef0123456789abcdef", "--tracking-uri", uri)
    assert rc == 2 and out == "" and len(fwray_lines(err)) == 1 and "no MLflow run" in err
    empty = client.create_run(exp_id).info.run_id
    rc, out, err = run_cli(fw_eval.main, capsys, "--run-id", empty, "--tracking-uri", uri)
    assert rc == 2 and out == "" and len(fwray_lines(err)) == 1 and "has no model artifacts" in err


def test_run_id_logs_the_results_to_the_run_at_the_model_step(store, tmp_path, split, capsys):
    """What fwray.run leaves: model/ and config.yaml artifacts, the cache in the tag fwray.cache; the yardstick in
    the run's config.yaml."""
    from llmc import write_llmc

    uri, client, exp_id = store
    folder, manifest = split
    val_tokens = np.fromfile(tokens.split_files(folder, manifest, "val")[0], dtype=tokens.TOKEN_DTYPE)
    yardstick = write_llmc(tmp_path / "val.bin", val_tokens)
    exp = config.from_dict({"model": dataclasses.asdict(repeat_model().config), "data": {"paths": ["x.parquet"]},
                            "train": {"max_iters": 9, "eval_iters": 2, "eval_batch_size": 3},
                            "yardstick": {"path": str(yardstick), "name": "val_again"}})
    run_id = client.create_run(exp_id, tags={"fwray.cache": str(folder)}).info.run_id
    client.log_artifacts(run_id, str(save(tmp_path / "model", repeat_model(), exp=exp, step=9)), "model")
    (tmp_path / "config.yaml").write_text(config.to_yaml(exp))
    client.log_artifact(run_id, str(tmp_path / "config.yaml"))
    path = write_jsonl(tmp_path / "hs.jsonl", KNOWN)
    rc, out, err = run_cli(fw_eval.main, capsys, "--run-id", run_id, "--tracking-uri", uri, "--hellaswag", path,
                           "--device", "cpu")
    assert rc == 0, err
    assert "validation: 6 windows" in out  # the run's eval_iters x eval_batch_size, from its config.yaml
    run = client.get_run(run_id)
    assert set(run.data.metrics) == {"eval_val_loss", "eval_val_bpb", "eval_yardstick_val_loss", "hellaswag_acc",
                                     "hellaswag_acc_norm"}
    windows = (len(val_tokens) - 1) // 32  # the validation split's tokens again, whole: under the default budget
    assert f"yardstick: val_again: {windows} windows x 32 = {windows * 32} targets from the start of {yardstick}" \
        in out
    assert run.data.tags["fwray.eval.yardstick"].startswith(f"val_again: {windows} windows")
    assert [m.step for m in client.get_metric_history(run_id, "eval_yardstick_val_loss")] == [9]
    assert run.data.metrics["hellaswag_acc"] == 1.0
    assert [m.step for m in client.get_metric_history(run_id, "eval_val_bpb")] == [9]
    assert run.data.tags["fwray.eval.val_data"] == str(folder) and "3 examples" in run.data.tags["fwray.eval.hellaswag"]
