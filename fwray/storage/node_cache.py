"""A training worker's copy of a token cache on object storage: each shard fetched to this node's disk once, checked
against the sha256 its manifest recorded, then memory-mapped like any local shard.

`<node_cache_dir>/<entry>/<shard>`: the entry's folder name is its fingerprint, so the copy is reused by every later
run on this node that trains on the same data. The workers of one node fetch under one file lock
(`<node_cache_dir>/.lock`): the first fetches, the others find the files there. A shard appears under its name only once fetched whole and checked.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

from ..errors import FwrayError
from . import uri as locations

LOCK = ".lock"
HASH_CHUNK = 1 << 22


class ShardDamaged(FwrayError):
    """A fetched shard's sha256 is not the one its manifest recorded."""


def default_dir() -> Path:
    return locations.local_root() / "node-cache"


def local_files(files: tuple[str, ...], sha256: dict[str, str], node_cache_dir: str | None) -> list[str]:
    """`files` as local paths: object-store ones fetched into this node's cache (`sha256`: a file's name -> its
    manifest hash), local ones as they are."""
    if not any(locations.is_uri(f) for f in files):
        return list(files)
    base = Path(node_cache_dir or default_dir()).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    out = []
    with open(base / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        for f in files:
            if not locations.is_uri(f):
                out.append(f)
                continue
            entry, name = f.rsplit("/", 1)
            target = base / locations.name(entry) / name
            if not target.exists():
                target.parent.mkdir(exist_ok=True)
                _fetch(f, target, sha256[name])
            out.append(str(target))
    return out


def _fetch(uri: str, target: Path, expected: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        locations.download(uri, tmp)
        got = _sha256(tmp)
        if got != expected:
            raise ShardDamaged(f"{uri}: its sha256 is {got[:16]}..., the manifest recorded {expected[:16]}...: the "
                               "cache entry was changed after it was prepared; delete the entry and prepare again")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
