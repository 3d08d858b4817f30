"""The tokenizer, the token-shard format and the document split rule. Pure: numpy, tiktoken and hashlib only.

Shard format: a flat little-endian uint16 array of GPT-2 token ids (`*.bin`); every document is preceded by
`<|endoftext|>` (50256). A cache entry is a folder of shards plus `manifest.json`, written last: a folder
without a manifest is never taken for a prepared cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import FwrayError

EOT = 50256
VOCAB_SIZE = EOT + 1  # GPT-2's ids, EOT the last; fwray's models pad theirs to 50304 (model.vocab_size) for speed
TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50257 ids fit in 16 bits
MANIFEST = "manifest.json"
SPLIT_RULE = "val if blake2b-64(document id) / 2**64 < val_fraction; the row's file and position stand in for a missing id"


class TokenizerUnavailable(FwrayError):
    """The GPT-2 BPE files are neither cached nor downloadable."""

    exit_code = 2


def get_tokenizer(name: str = "gpt2"):
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises requests' errors when it cannot download
        where = os.environ.get("TIKTOKEN_CACHE_DIR", "unset")
        raise TokenizerUnavailable(
            f"tiktoken cannot load the {name} files (TIKTOKEN_CACHE_DIR={where}, no network: "
            f"{type(e).__name__}); set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's {name} cache "
            f"(e.g. ../shared/tiktoken) or allow the download once") from None


# GPT-2's BPE files as tiktoken_ext/openai_public.py names them (URL, sha256); tiktoken caches each under the sha1 of
# its URL. They are Hugging Face's GPT-2 tokenizer files too: encoder.json is vocab.json, vocab.bpe is merges.txt.
GPT2_BPE_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def gpt2_bpe_files() -> dict[str, bytes]:
    """{"vocab.json": ..., "merges.txt": ...} read from tiktoken's cache (where tiktoken looks: TIKTOKEN_CACHE_DIR,
    DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache) and checked against tiktoken's hashes. Never downloaded."""
    import tempfile

    cache = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
             or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    out = {}
    for name, (url, sha256) in GPT2_BPE_FILES.items():
        path = Path(cache) / hashlib.sha1(url.encode()).hexdigest()
        data = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != sha256:
            state = "damaged" if data else "missing"
            raise TokenizerUnavailable(
                f"{path}: tiktoken's cached copy of GPT-2's {url.rsplit('/', 1)[1]} is {state}; set "
                "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 cache (e.g. ../shared/tiktoken)")
        out[name] = data
    return out


def encode_documents(encoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of `texts` with EOT before each, as one uint16 array, and each document's length (EOT included).

    `encode_to_numpy` with no special tokens allowed is `encode_ordinary` (special-token text stays ordinary text)
    without building a Python int per token: ~25% faster than `encode_ordinary_batch` on one thread.
    """
    docs = [encoder.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]
    lengths = np.fromiter((d.size + 1 for d in docs), dtype=np.int64, count=len(docs))
    out = np.empty(int(lengths.sum()), dtype=TOKEN_DTYPE)
    pos = 0
    for doc in docs:
        out[pos] = EOT
        out[pos + 1: pos + 1 + doc.size] = doc  # GPT-2 ids < 2**16: the uint32 -> uint16 cast is exact
        pos += doc.size + 1
    return out, lengths


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """The split rule: a hash of the document id, so a document keeps its split when files are added."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2.0**64 < val_fraction


def fallback_id(file_key: str, row: int) -> str:
    """A stable id for a row without one: its file (by content fingerprint) and position."""
    return f"{file_key}#{row}"


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a complete cache entry, or None when the folder is missing or was never finished."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def split_files(folder: str | os.PathLike, manifest: dict, split: str) -> list[str]:
    """One split's shards as `folder/name`: the same join for a folder and an object-store URI (`s3://bucket/entry`,
    which a Path would fold to `s3:/`)."""
    return [f"{str(folder).rstrip('/')}/{f['name']}" for f in manifest["splits"][split]["files"]]


def shard_hashes(manifest: dict) -> dict[str, str]:
    """Each shard's sha256 as prepared: a node that fetches the shards from object storage checks its copies."""
    return {f["name"]: f["sha256"] for split in manifest["splits"].values() for f in split["files"]}


def fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries (a rename is durable once its folder is synced), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: a crash leaves the old file or none, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
