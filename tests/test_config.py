"""Experiment YAML -> frozen dataclasses: one-line errors that name key, value and file; dotted overrides."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fwray import config
from fwray.config import ConfigError, load

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "smoke.yaml"

BASE = """\
name: t
model: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 16}
train: {batch_size: 2, max_iters: 5}
data: {paths: [x.parquet]}
"""


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    assert str(path) in msg, f"error does not name the file: {msg!r}"
    return msg


def test_base_loads(tmp_path):
    exp = load(write(tmp_path, BASE))
    assert exp.name == "t" and exp.model.n_layer == 1 and exp.train.max_iters == 5
    # data.paths in the file are relative to the file
    assert exp.data.paths == (str(tmp_path / "x.parquet"),)


def test_unknown_section(tmp_path):
    msg = error_of(write(tmp_path, BASE + "trian: {max_iters: 3}\n"))
    assert "unknown section" in msg and "'trian'" in msg


def test_unknown_key(tmp_path):
    msg = error_of(write(tmp_path, BASE.replace("max_iters: 5", "max_iters: 5, batchsize: 7")))
    assert "train.batchsize" in msg and "7" in msg and "unknown key" in msg


def test_a_misspelt_key_says_where_it_came_from_and_suggests_the_nearest(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as e:
        load(path, ["train.batch_sise=4"])
    assert str(e.value) == (f"{path}: unknown key train.batch_sise = 4 (on the command line: train.batch_sise=4); "
                            "did you mean train.batch_size?")
    (tmp_path / "bad").mkdir()
    msg = error_of(write(tmp_path / "bad", BASE.replace("max_iters: 5", "max_iters: 5, batch_sise: 4")))
    assert msg.endswith("unknown key train.batch_sise = 4 (in the file); did you mean train.batch_size?")
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(on the command line: trian.max_iters=3\); "
                                          r"did you mean train\?"):
        load(path, ["trian.max_iters=3"])
    with pytest.raises(ConfigError, match="train has no such key") as e:  # nothing near: no list of all 30 keys
        load(path, ["train.zzz=1"])
    assert "learning_rate" not in str(e.value)


@pytest.mark.parametrize("old, new, key, value", [
    ("n_layer: 1", "n_layer: one", "model.n_layer", "'one'"),
    ("batch_size: 2", "batch_size: 2.5", "train.batch_size", "2.5"),
    ("block_size: 16", "block_size: true", "model.block_size", "True"),
    ("paths: [x.parquet]", "paths: [x.parquet, 3]", "data.paths", "3"),
])
def test_wrong_type(tmp_path, old, new, key, value):
    msg = error_of(write(tmp_path, BASE.replace(old, new)))
    assert f"{key} = {value}" in msg and "expected" in msg, msg


def test_n_embd_not_divisible_by_n_head(tmp_path):
    msg = error_of(write(tmp_path, BASE.replace("n_embd: 32", "n_embd: 33")))
    assert "model.n_embd" in msg and "33" in msg and "divisible" in msg and "model.n_head" in msg


def test_block_size_below_one(tmp_path):
    msg = error_of(write(tmp_path, BASE.replace("block_size: 16", "block_size: 0")))
    assert "model.block_size = 0" in msg and "at least 1" in msg


def test_a_measured_speed_needs_the_figure(tmp_path):
    msg = error_of(write(tmp_path, BASE), ["hardware.tokens_per_s_measured=true"])
    assert "hardware.tokens_per_s_measured = True" in msg and "hardware.tokens_per_s" in msg and "set both" in msg


@pytest.mark.parametrize("key, value, says", [
    ("data.cache_dir", "s3://AKIAKEY:topsecret@bucket/cache", "credentials do not belong in the URI"),
    ("resources.storage_path", "s3://bucket/runs?endpoint_override=minio:9000", "without ?options"),
    ("resources.storage_path", "hdfs://namenode/runs", "s3://, gs://"),
    ("data.node_cache_dir", "s3://bucket/node", "each node's own disk"),
])
def test_a_bad_storage_uri_is_one_line_that_never_echoes_a_secret(tmp_path, key, value, says):
    msg = error_of(write(tmp_path, BASE), [f"{key}={value}"])
    assert key in msg and says in msg and "topsecret" not in msg, msg


def test_object_storage_uris_are_locations(tmp_path):
    exp = load(write(tmp_path, BASE), ["data.cache_dir=s3://bucket/cache", "resources.storage_path=gs://b/runs"])
    assert (exp.data.cache_dir, exp.resources.storage_path) == ("s3://bucket/cache", "gs://b/runs")


def test_bad_override_names_key(tmp_path):
    path = write(tmp_path, BASE)
    msg = error_of(path, ["train.max_iters=lots"])
    assert "train.max_iters" in msg and "'lots'" in msg
    msg = error_of(path, ["train.nope=1"])
    assert "train.nope" in msg
    msg = error_of(path, ["max_iters=3"])
    assert "section.key=value" in msg


def test_overrides_are_yaml_typed(tmp_path):
    exp = load(write(tmp_path, BASE), ["train.max_iters=50", "train.learning_rate=1e-3", "model.bias=true",
                                       "train.eval_batch_size=null", "train.compile=false"])
    assert exp.train.max_iters == 50 and isinstance(exp.train.max_iters, int)
    assert exp.train.learning_rate == 1e-3 and isinstance(exp.train.learning_rate, float)
    assert exp.model.bias is True
    assert exp.train.eval_batch_size is None
    assert exp.train.compile is False


def test_override_paths_resolve_against_cwd(tmp_path, monkeypatch):
    path = write(tmp_path, BASE)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    exp = load(path, ["data.paths=[a.parquet,b.parquet]"])
    assert exp.data.paths == (str(cwd / "a.parquet"), str(cwd / "b.parquet"))
    exp = load(path, ["data.paths=/abs/c.parquet"])
    assert exp.data.paths == ("/abs/c.parquet",)


def test_smoke_and_derived_figures():
    exp = load(SMOKE)
    assert exp.tokens_per_step == 16 * 64 * 1 * 1
    resolved = config.resolve(exp.with_changes("train", max_iters=None, epochs=2.0), train_tokens=10_240)
    assert resolved.train.max_iters == 20 and resolved.train.lr_decay_iters == 20
    flat = config.flatten(exp)
    assert flat["model.n_layer"] == 2 and flat["train.batch_size"] == 16
    # the YAML written for MLflow loads back into the same experiment
    assert config.from_dict(__import__("yaml").safe_load(config.to_yaml(exp))) == exp


def test_cli_bad_key_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fwray.run", str(SMOKE), "train.max_itres=5"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "train.max_itres" in lines[0] and str(SMOKE) in lines[0]


def test_the_modern_recipe_defaults_its_training_and_a_file_overrides_it(tmp_path):
    modern = load(write(tmp_path, BASE), ["model.recipe=modern"])
    assert (modern.train.optimizer, modern.train.schedule, modern.data.sampling) == ("muon", "wsd", "epoch")
    assert modern.model.positions == "rotary" and not modern.model.tie_embeddings
    ablation = load(write(tmp_path, BASE), ["model.recipe=modern", "train.optimizer=adamw", "model.qk_norm=false"])
    assert ablation.train.optimizer == "adamw" and ablation.train.schedule == "wsd" and not ablation.model.qk_norm
    gpt2 = load(write(tmp_path, BASE))
    assert (gpt2.train.optimizer, gpt2.train.schedule, gpt2.data.sampling) == ("adamw", "cosine", "random")
    assert config.from_dict(yaml.safe_load(config.to_yaml(modern))) == modern  # the logged config loads back
