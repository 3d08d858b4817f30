"""The yardstick: llm.c's token files read exactly and refused in one line when they are not one, windows read as
llm.c reads them, the config section, the engine's yardstick_val_loss at every evaluation (pure core, no Ray), and a
parquet tokenized through the prepare cache."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from fwray import config
from fwray.config import ConfigError, ModelConfig, TrainConfig
from fwray.core import tokens
from fwray.core.engine import Engine, train
from fwray.core.loader import Batches
from fwray.core.yardstick import REFERENCE_TARGETS, Yardstick, YardstickError, read_llmc
from llmc import FIRST_UNSEEN_ROW, corpus_tokens, write_llmc

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def real_tokens(corpus) -> np.ndarray:
    return corpus_tokens(corpus, 5)[:3000]


def llmc_yardstick(path, targets=None) -> Yardstick:
    return Yardstick(path.stem, (str(path),), llmc=True, targets=targets)


def test_an_llmc_file_is_read_exactly_and_in_llmc_windows(tmp_path, real_tokens):
    path = write_llmc(tmp_path / "val.bin", real_tokens)
    assert path.stat().st_size == 256 * 4 + 2 * 3000
    read = read_llmc(path)
    assert read.dtype == np.uint16 and np.array_equal(read, real_tokens)
    batches = llmc_yardstick(path).open(block_size=32, batch_size=8)
    # stride block_size from the start, every token a target once: (3000 - 1) // 32 whole windows
    assert batches.num_windows == 93 and batches.num_batches == 12
    xs, ys = zip(*(batches.batch(i) for i in range(batches.num_batches)))
    assert len(xs[-1]) == 93 - 11 * 8  # the last batch holds what is left
    assert torch.equal(torch.cat(xs).flatten(), torch.from_numpy(real_tokens[:93 * 32].astype(np.int64)))
    assert torch.equal(torch.cat(ys).flatten(), torch.from_numpy(real_tokens[1:93 * 32 + 1].astype(np.int64)))
    # a budget of targets: whole windows only, from the start
    capped = llmc_yardstick(path, targets=1000).open(32, 8)
    assert capped.num_windows == 1000 // 32
    assert torch.equal(capped.batch(0)[0], xs[0])


def test_the_reference_budget_is_llmc_and_modded_nanogpts():
    assert REFERENCE_TARGETS == 10_485_760 == 10_240 * 1024
    assert config.YardstickConfig().tokens == REFERENCE_TARGETS


BAD_FILES = {  # what is written -> a phrase of its one line
    "bad magic": (dict(magic=20240801), "magic number 20240801, not llm.c's GPT-2 token file's 20240520"),
    "bad version": (dict(version=7), "llm.c token file version 7, fwray reads version 1"),
    "truncated": (dict(count=3001), "announces 3,001 tokens (7,026 bytes with the header) but the file has 7,024 "
                                    "bytes: truncated"),
    "too long": (dict(count=2999), "announces 2,999 tokens"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_file_that_is_no_llmc_token_file_is_one_line_naming_it(tmp_path, real_tokens, case):
    changes, phrase = BAD_FILES[case]
    path = write_llmc(tmp_path / "val.bin", real_tokens, **changes)
    for read in (lambda: read_llmc(path), lambda: llmc_yardstick(path).open(32, 8)):
        with pytest.raises(YardstickError) as e:
            read()
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ") and phrase in str(e.value)


def test_a_file_shorter_than_the_header_or_a_window_is_one_line(tmp_path, real_tokens):
    shard = tmp_path / "train-00000.bin"  # an fwray shard has no header
    real_tokens[:100].tofile(shard)
    with pytest.raises(YardstickError, match=r"train-00000.bin: 200 bytes, shorter than llm.c's 1024-byte header"):
        read_llmc(shard)
    short = write_llmc(tmp_path / "short.bin", real_tokens[:32])
    with pytest.raises(YardstickError, match=r"short.bin\): 32 tokens hold no window of block_size \+ 1 = 33 "
                                             r"tokens: give a longer file$"):
        llmc_yardstick(short).open(32, 8)
    with pytest.raises(YardstickError, match="3,000 tokens and a budget of 31 targets hold no window"):
        llmc_yardstick(write_llmc(tmp_path / "val.bin", real_tokens), targets=31).open(32, 8)


# ---------------------------------------------------------------- the experiment's section


def write_experiment(folder, yardstick: dict) -> str:
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump({"data": {"paths": ["x.parquet"]}, "train": {"max_iters": 10},
                                    "yardstick": yardstick}))
    return str(path)


def test_the_yardstick_path_is_relative_to_the_experiment_file_and_stored_absolute(tmp_path, real_tokens,
                                                                                 monkeypatch):
    (tmp_path / "data").mkdir()
    write_llmc(tmp_path / "data" / "fineweb_val_000000.bin", real_tokens)
    monkeypatch.chdir(tmp_path.parent)  # elsewhere: the path is the file's, not the working directory's
    exp = config.load(write_experiment(tmp_path, {"path": "data/fineweb_val_000000.bin"}))
    assert exp.yardstick.path == str(tmp_path / "data" / "fineweb_val_000000.bin")
    assert exp.yardstick.name == "fineweb_val_000000" and exp.yardstick.tokens == REFERENCE_TARGETS
    exp = config.load(write_experiment(tmp_path, {"path": "data/fineweb_val_000000.bin", "name": "fineweb",
                                                  "tokens": None}))
    assert exp.yardstick.name == "fineweb" and exp.yardstick.tokens is None
    monkeypatch.chdir(tmp_path / "data")  # on the command line: relative to where the command runs
    exp = config.load(tmp_path / "exp.yaml", ["yardstick.path=fineweb_val_000000.bin"])
    assert exp.yardstick.path == str(tmp_path / "data" / "fineweb_val_000000.bin")


@pytest.mark.parametrize("yardstick, phrase", [
    ({"path": "missing.bin"}, "missing.bin': no such file: the README's Yardstick section says where"),
    ({"path": "val.txt"}, "must be an llm.c token file (.bin) or a parquet of documents (.parquet)"),
    ({"path": "val.bin", "tokens": 0}, "yardstick.tokens = 0: must be at least 1"),
])
def test_a_bad_yardstick_setting_stops_on_load_in_one_line(tmp_path, real_tokens, yardstick, phrase):
    write_llmc(tmp_path / "val.bin", real_tokens)
    (tmp_path / "val.txt").write_text("text")
    path = write_experiment(tmp_path, yardstick)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: yardstick.") and phrase in str(e.value)


# ---------------------------------------------------------------- the engine


MODEL = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)


def test_the_engine_reports_the_yardstick_at_every_evaluation(tmp_path, corpus, real_tokens):
    train_ids = corpus_tokens(corpus, 40)[3000:]  # other documents' tokens than the yardstick's, as training data
    train_ids.tofile(tmp_path / "train.bin")
    t = TrainConfig(batch_size=8, max_iters=24, learning_rate=6e-3, min_lr=6e-4, warmup_iters=3, eval_interval=8,
                    eval_iters=2, log_interval=4, compile=False, lr_decay_iters=24)
    batches = Batches.from_files([tmp_path / "train.bin"], [tmp_path / "train.bin"], MODEL.block_size,
                                 batch_size=t.batch_size, seed=t.seed)
    yardstick = llmc_yardstick(write_llmc(tmp_path / "val.bin", real_tokens), targets=40 * 32).open(32, 16)
    seen = {}
    summary = train(MODEL, t, batches, lambda step, m, state: seen.update({step: m}) if "val_loss" in m else None,
                    device=CPU, yardstick=yardstick)
    assert sorted(seen) == [0, 8, 16, 24] and all("yardstick_val_loss" in m for m in seen.values())
    # the first figure, by hand: the untrained model (the seed's) over the 40 windows, every target counted once
    model = Engine.build(MODEL, t, CPU).raw_model.eval()
    windows = torch.from_numpy(real_tokens[:40 * 32 + 1].astype(np.int64))
    with torch.no_grad():
        by_hand = model(windows[:-1].view(40, 32), windows[1:].view(40, 32)).item()
    assert seen[0]["yardstick_val_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert seen[24]["yardstick_val_loss"] < seen[0]["yardstick_val_loss"] - 1.0  # it learnt python documentation
    assert all(m["yardstick_val_loss"] != m["val_loss"] for m in seen.values())
    assert summary["final_yardstick_val_loss"] == seen[24]["yardstick_val_loss"]


# ---------------------------------------------------------------- a parquet, through the prepare cache


def test_a_parquet_yardstick_is_tokenized_through_the_prepare_cache(ray_session, corpus, tmp_path):
    from fwray.data.yardstick import yardstick_of

    texts = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()[FIRST_UNSEEN_ROW:FIRST_UNSEEN_ROW + 12]
    path = tmp_path / "other-shard.parquet"
    pq.write_table(pa.table({"text": texts, "id": [f"doc-{i}" for i in range(len(texts))]}), path)
    data = config.DataConfig(paths=(str(corpus),), cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    wanted = config.YardstickConfig(path=str(path), tokens=None)
    with pytest.raises(YardstickError, match=r"not tokenized under .*cache: run `python -m fwray.prepare exp.yaml "
                                             r"data.paths=\["):
        yardstick_of(wanted, data, "exp.yaml", training=False)  # fwray.eval: no Ray, no tokenizing
    found = yardstick_of(wanted, data, "exp.yaml", training=True)
    assert not found.llmc and found.name == "other-shard" and len(found.files) == 2  # both splits of one task
    read = np.concatenate([np.fromfile(f, dtype=tokens.TOKEN_DTYPE) for f in found.files])
    want, lengths = tokens.encode_documents(tokens.get_tokenizer(), texts)
    # every document, as training data is tokenized (EOT first): the split rule only orders them
    split = np.split(read, np.flatnonzero(read == tokens.EOT)[1:])
    assert sorted(map(bytes, split)) == sorted(map(bytes, np.split(want, np.cumsum(lengths)[:-1])))
    assert yardstick_of(wanted, data, "exp.yaml", training=False) == found  # the cache, found again
    windows = found.open(block_size=64, batch_size=4).num_windows
    assert windows == sum((np.fromfile(f, dtype=tokens.TOKEN_DTYPE).size - 1) // 64 for f in found.files)
    with pytest.raises(YardstickError, match=r"exp.yaml: yardstick.path = .* is also in data.paths"):
        yardstick_of(wanted, config.DataConfig(paths=(str(tmp_path / "*.parquet"),)), "exp.yaml", training=True)
