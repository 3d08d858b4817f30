"""The pure token module: shard format, split rule, atomic writes; and that it runs without Ray."""
import os
from pathlib import Path

import numpy as np

from fwray.core import tokens


def test_encode_documents_puts_eot_before_every_document():
    enc = tokens.get_tokenizer()
    texts = ["Hello world", "", "a <|endoftext|> b"]  # special-token text is ordinary text here
    out, lengths = tokens.encode_documents(enc, texts)
    assert out.dtype == tokens.TOKEN_DTYPE
    assert lengths.tolist() == [len(enc.encode_ordinary(t)) + 1 for t in texts]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    assert (out[starts] == tokens.EOT).all()
    assert (out == tokens.EOT).sum() == len(texts)  # ordinary encoding never yields EOT
    assert out[1:3].tolist() == enc.encode_ordinary("Hello world")


def test_split_rule_is_deterministic_and_near_the_fraction():
    ids = [f"doc-{i}" for i in range(20_000)]
    first = [tokens.is_validation(i, 0.05) for i in ids]
    assert first == [tokens.is_validation(i, 0.05) for i in ids]
    assert 0.04 < sum(first) / len(ids) < 0.06
    # a larger fraction only adds documents to val: none moves the other way
    assert all(tokens.is_validation(i, 0.2) for i, v in zip(ids, first) if v)


def test_fallback_id_names_file_and_row():
    assert tokens.fallback_id("abc", 7) == "abc#7" != tokens.fallback_id("abc", 8)


def test_manifest_and_split_files(tmp_path):
    assert tokens.read_manifest(tmp_path) is None
    manifest = {"splits": {"train": {"files": [{"name": "train-00000.bin"}]}, "val": {"files": []}}}
    tokens.write_atomic(tmp_path / tokens.MANIFEST, b'{"splits": {"train": {"files": [{"name": "train-00000.bin"}]}}}')
    assert tokens.read_manifest(tmp_path)["splits"]["train"]["files"][0]["name"] == "train-00000.bin"
    assert tokens.split_files(tmp_path, manifest, "train") == [str(tmp_path / "train-00000.bin")]
    assert not list(tmp_path.glob(".*tmp*"))


def test_tokenizer_cache_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    from fwray import ray_session

    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.relpath(cache, tmp_path))
    env = ray_session.tokenizer_env()
    assert env == {"TIKTOKEN_CACHE_DIR": str(cache)} and os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    assert ray_session.tokenizer_env() == {}
