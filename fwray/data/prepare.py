"""`python -m fwray.prepare EXP.yaml [section.key=value ...]`: parquet → GPT-2 token shards, cached, with Ray Data.

The inputs are cut into tasks (row-group and row ranges, `parquet_inputs.plan_tasks`). Ray Data runs one task per
block with bounded concurrency; each task reads only its rows and columns, tokenizes them in batches and appends
uint16 tokens straight to its own train/val shard files. The driver only sees small per-task summaries.

Cache: `<data.cache_dir>/<fingerprint[:16]>`, built in `<entry>.tmp-<pid>` and renamed into place once every shard
and the manifest are fsynced, so an entry folder is always whole. A build that fails removes its temp folder; one
killed outright leaves it behind until the next build in that cache (a cache miss), which removes the temp folders
whose process no longer runs on this machine. An entry with its manifest or a shard gone is no hit: it is rebuilt and
replaced. Nothing is evicted: entries of other fingerprints stay until removed by hand.

A cache on object storage (`data.cache_dir: s3://...`) has no rename: each task uploads its own shards from its node
and the driver writes the manifest last, so an entry is complete exactly when its manifest is there. A rebuild deletes
the manifest first, so a reader never takes a half-rebuilt entry for a whole one.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.compute as pc

from .. import ray_session
from ..config import DataConfig, Experiment
from ..core import tokens
from ..errors import first_line
from ..storage import uri as locations
from ..storage.check import check, describe
from .parquet_inputs import (InputFile, PrepareError, column, fingerprint, inspect_file, keep_mask, output_settings,
                             plan_tasks, read_task, resolve_paths)

__all__ = ["PrepareError", "prepare"]

FORMAT_VERSION = 2  # 2: each split's UTF-8 bytes (bits per byte); an entry of version 1 is rebuilt
SPLITS = ("train", "val")
# Test hook: a shard writer fails with ENOSPC once it would pass this many bytes (read by the driver, sent to tasks)
FAIL_WRITE_ENV = "FWRAY_FAIL_WRITE_AFTER_BYTES"
PROGRESS_EVERY_S = 3.0


# ---------------------------------------------------------------- inside a Ray task


@lru_cache(maxsize=None)
def _encoder(name: str):
    """Once per worker process: the tokenizer, and Arrow on the system allocator (mimalloc keeps freed pages,
    ~30 MB a worker, and the memory budget counts every process)."""
    pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    return tokens.get_tokenizer(name)


class _ShardWriter:
    """Appends uint16 tokens to one shard file, hashing as it goes; an empty shard leaves no file."""

    def __init__(self, path: Path, fail_after: int | None):
        self.path, self.fail_after = path, fail_after
        self.file, self.bytes, self.sha = None, 0, hashlib.sha256()

    def write(self, array: np.ndarray) -> None:
        if array.size == 0:
            return
        data = memoryview(np.ascontiguousarray(array, dtype=tokens.TOKEN_DTYPE)).cast("B")
        if self.fail_after is not None and self.bytes + len(data) > self.fail_after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        if self.file is None:
            self.file = open(self.path, "wb")
        self.file.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def close(self) -> dict | None:
        if self.file is None:
            return None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"name": self.path.name, "tokens": self.bytes // tokens.TOKEN_DTYPE.itemsize,
                "sha256": self.sha.hexdigest()}


def _tokenize_rows(task: dict, out: Path) -> dict:
    """Read, filter, tokenize and write one task's rows into `out`; returns its counts (no tokens)."""
    data = DataConfig(**task["data"])
    enc = _encoder(data.tokenizer)
    writers = {s: _ShardWriter(out / f"{s}-{task['index']:05d}.bin", task["fail_after"]) for s in SPLITS}
    result = {"rows": 0, "chars": 0, "token_count": None, "documents": dict.fromkeys(SPLITS, 0),
              "bytes": dict.fromkeys(SPLITS, 0),
              "skipped": {"null_or_empty": 0, "min_language_score": 0, "min_chars": 0}}
    row = task["first_row"]
    try:
        for batch in read_task(task, [data.text_column, data.id_column, "language_score", "token_count"]):
            keep, skipped = keep_mask(column(batch, data.text_column), column(batch, "language_score"), data)
            for k, n in skipped.items():
                result["skipped"][k] += n
            kept = batch.filter(keep)
            text_column = kept.column(kept.schema.get_field_index(data.text_column))
            texts = text_column.to_pylist()
            positions = np.flatnonzero(np.asarray(keep)) + row
            ids = _doc_ids(column(kept, data.id_column), task["file_key"], positions)
            is_val = np.fromiter((tokens.is_validation(i, data.val_fraction) for i in ids), bool, len(ids))
            toks, lengths = tokens.encode_documents(enc, texts)
            val_tokens = np.repeat(is_val, lengths)
            writers["val"].write(toks[val_tokens])
            writers["train"].write(toks[~val_tokens])
            result["documents"]["val"] += int(is_val.sum())
            result["documents"]["train"] += int((~is_val).sum())
            text_bytes = pc.binary_length(text_column).to_numpy(zero_copy_only=False)  # Arrow holds text as UTF-8
            result["bytes"]["val"] += int(text_bytes[is_val].sum())
            result["bytes"]["train"] += int(text_bytes[~is_val].sum())
            result["chars"] += sum(map(len, texts))
            counts = column(kept, "token_count")
            if counts is not None:
                result["token_count"] = (result["token_count"] or 0) + int(np.nansum(counts.to_numpy(False)))
            result["rows"] += batch.num_rows
            row += batch.num_rows
    finally:
        result["files"] = {s: w.close() for s, w in writers.items()}
    return result


def _doc_ids(ids, file_key: str, positions: np.ndarray) -> list[str]:
    """Document ids as strings; a missing id (no column, or null) becomes the row's file and position."""
    values = ids.cast("string").to_pylist() if ids is not None else [None] * len(positions)
    return [v if v is not None else tokens.fallback_id(file_key, int(p)) for v, p in zip(values, positions)]


def _tokenize_task(task: dict) -> dict:
    """The task's shards written into its output folder, or on object storage uploaded from this node."""
    if not locations.is_uri(task["out"]):
        return _tokenize_rows(task, Path(task["out"]))
    with tempfile.TemporaryDirectory(prefix="fwray-shards-") as tmp:
        result = _tokenize_rows(task, Path(tmp))
        for f in filter(None, result["files"].values()):
            target = locations.join(task["out"], f["name"])
            try:
                locations.upload(Path(tmp) / f["name"], target)
            except OSError as e:
                raise PrepareError(describe(e, target, "data.cache_dir")) from None
    return result


def _run_task(row: dict) -> dict:
    """Ray Data map function. Errors come back as one-line messages, so the driver never shows a Ray traceback."""
    task = json.loads(row["task"])
    try:
        return {"index": task["index"], "error": "", "result": json.dumps(_tokenize_task(task))}
    except PrepareError as e:
        message = str(e)
    except OSError as e:
        where = e.filename or task["out"]
        fix = ("free disk space or point data.cache_dir at a bigger disk" if e.errno == errno.ENOSPC else
               "check that data.cache_dir is writable and the input is readable")
        message = f"{where}: {e.strerror or e} while preparing rows of {task['path']}; {fix}"
    except Exception as e:  # pyarrow decode errors and the like: the input is damaged
        message = (f"{task['path']}: cannot read rows {task['first_row']}..{task['first_row'] + task['rows'] - 1} "
                   f"({type(e).__name__}: {first_line(e)}); re-download or rewrite the file")
    return {"index": task["index"], "error": message, "result": ""}


# ---------------------------------------------------------------- the driver


def cache_entry(data: DataConfig, files: list[InputFile]) -> tuple[Path | str, str]:
    """The cache entry the inputs and settings map to (a folder, or a URI on object storage), and their
    fingerprint."""
    fp = fingerprint(files, output_settings(data), FORMAT_VERSION)
    if locations.is_uri(data.cache_dir):
        return locations.join(data.cache_dir, fp[:16]), fp
    return Path(data.cache_dir).expanduser().resolve() / fp[:16], fp


def cached(data: DataConfig, files: list[InputFile]) -> tuple[Path | str, dict] | None:
    """The whole cache entry of these inputs and settings, with its manifest, or None: nothing is prepared."""
    entry, fp = cache_entry(data, files)
    manifest = read_manifest(entry)
    return (entry, manifest) if manifest is not None and _entry_is_whole(entry, manifest, fp) else None


def read_manifest(entry: Path | str) -> dict | None:
    """The manifest of a complete entry, local or on object storage; None: the entry is absent or unfinished."""
    if not locations.is_uri(entry):
        return tokens.read_manifest(entry)
    where = locations.join(entry, tokens.MANIFEST)
    return json.loads(locations.read_bytes(where)) if locations.exists(where) else None


def prepare(exp: Experiment, progress: bool = True) -> tuple[Path | str, dict]:
    """Token shards + manifest for `exp.data`: from the cache when the inputs and settings are unchanged."""
    data = exp.data
    files = [inspect_file(p, data) for p in resolve_paths(data.paths)]
    tokens.get_tokenizer(data.tokenizer)  # fail here, in one line, rather than in every task
    check(data.cache_dir, "data.cache_dir")  # a bad bucket or a file in the way: one line before any tokenizing
    settings = output_settings(data)
    entry, fp = cache_entry(data, files)
    hit = cached(data, files)
    if hit is not None:
        _say(progress, f"prepare: cached {entry}")
        return hit
    if locations.is_uri(entry):
        return entry, _build_on_object_storage(entry, fp, files, data, settings, progress)
    cache = entry.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"{cache}: cannot create the cache folder ({e.strerror}); set data.cache_dir") from None
    _remove_stale(cache)
    tmp = cache / f"{entry.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _build(tmp, fp, files, data, settings, progress)
        tokens.write_atomic(tmp / tokens.MANIFEST, json.dumps(manifest, indent=1).encode())
        tokens.fsync(tmp)
        _publish(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry, tokens.read_manifest(entry)


def _build_on_object_storage(entry: str, fp: str, files: list[InputFile], data: DataConfig, settings: dict,
                             progress: bool) -> dict:
    """The entry's shards uploaded by the tasks, then its manifest: written last, it makes the entry whole."""
    manifest_uri = locations.join(entry, tokens.MANIFEST)
    try:
        locations.delete(manifest_uri)  # a broken entry reads as absent while it is rebuilt
        manifest = _build(entry, fp, files, data, settings, progress)
        locations.write_bytes(manifest_uri, json.dumps(manifest, indent=1).encode())
    except OSError as e:
        raise PrepareError(describe(e, entry, "data.cache_dir")) from None
    return manifest


def _build(out: Path | str, fp: str, files: list[InputFile], data: DataConfig, settings: dict, progress: bool) -> dict:
    """Every task's shards written to `out`; the manifest that describes them (not yet written)."""
    start = time.perf_counter()
    tasks = plan_tasks(files, data)
    results = _run_tasks(tasks, out, data, progress)
    manifest = _manifest(fp, files, data, settings, results, time.perf_counter() - start)
    _warn_on_count_mismatch(manifest, files)
    return manifest


def _run_tasks(tasks: list[dict], out: Path | str, data: DataConfig, progress: bool) -> list[dict]:
    """Run the tasks with Ray Data, print progress as they finish, and return their results in task order."""
    # Ray Data here, not at the top: a cache hit, --help and an input error answer without importing it
    import ray
    import ray.data  # configures its loggers on import: quiet them after

    _quiet_ray_data()
    # a private Ray gets data.num_workers CPUs; a cluster ($RAY_ADDRESS) has its own, and the pool below is bounded
    ray_session.start(num_cpus=data.num_workers or os.cpu_count(), log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    workers = data.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    fail_after = os.environ.get(FAIL_WRITE_ENV)
    shared = {"out": str(out), "data": _plain(data), "fail_after": int(fail_after) if fail_after else None}
    items = [{"task": json.dumps({**t, **shared})} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(_run_task, compute=ray.data.TaskPoolStrategy(size=min(workers, len(items))), num_cpus=1)
    meter = _Progress(tasks, progress)
    results = {}
    try:
        for row in ds.iter_rows():
            if row["error"]:
                raise PrepareError(row["error"])
            results[row["index"]] = json.loads(row["result"])
            meter.update(results[row["index"]])
    except ray.exceptions.RayError as e:  # a worker died (killed, out of memory): one line, not Ray's traceback
        raise PrepareError(f"{tasks[0]['path']}{' and others' if len(tasks) > 1 else ''}: a tokenizer task failed "
                           f"({first_line(e)}); if memory ran out lower data.num_workers, then rerun") from None
    meter.done()
    return [results[i] for i in range(len(tasks))]


def _quiet_ray_data() -> None:
    """Our progress lines replace Ray Data's: keep its warnings, drop its notices (execution started/finished)."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def _plain(data: DataConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.__dict__.items()}


class _Progress:
    """A line to stderr every few seconds: tasks, rows/s, tokens/s, ETA."""

    def __init__(self, tasks: list[dict], enabled: bool):
        self.enabled, self.total_tasks = enabled, len(tasks)
        self.total_rows = sum(t["rows"] for t in tasks)
        self.tasks = self.rows = self.tokens = 0
        self.start = self.last = time.perf_counter()

    def update(self, result: dict) -> None:
        self.tasks += 1
        self.rows += result["rows"]
        self.tokens += sum(f["tokens"] for f in result["files"].values() if f)
        if time.perf_counter() - self.last >= PROGRESS_EVERY_S:
            self.print()

    def print(self) -> None:
        self.last, self.printed = time.perf_counter(), (self.tasks, self.rows)
        elapsed = max(self.last - self.start, 1e-9)
        eta = (self.total_rows - self.rows) * elapsed / max(self.rows, 1)
        _say(self.enabled, f"prepare: {self.tasks}/{self.total_tasks} tasks, {self.rows:,}/{self.total_rows:,} rows, "
                           f"{self.rows / elapsed:,.0f} rows/s, {self.tokens / elapsed:,.0f} tokens/s, ETA {eta:.0f} s")

    def done(self) -> None:
        if self.last != self.start and self.printed == (self.tasks, self.rows):
            return  # the last progress line already says it
        self.print()


def _say(enabled: bool, line: str) -> None:
    if enabled:
        print(line, file=sys.stderr, flush=True)


def _manifest(fp: str, files: list[InputFile], data: DataConfig, settings: dict, results: list[dict],
              seconds: float) -> dict:
    splits = {}
    for s in SPLITS:
        shard_files = [r["files"][s] for r in results if r["files"][s]]
        splits[s] = {"documents": sum(r["documents"][s] for r in results),
                     "tokens": sum(f["tokens"] for f in shard_files),
                     "bytes": sum(r["bytes"][s] for r in results),  # UTF-8 bytes of the documents' text
                     "files": shard_files}
    skipped = {k: sum(r["skipped"][k] for r in results) for k in results[0]["skipped"]}
    documents = splits["train"]["documents"] + splits["val"]["documents"]
    if documents == 0:
        names = files[0].path if len(files) == 1 else f"{len(files)} files ({files[0].path}, ...)"
        raise PrepareError(f"{names}: every row was skipped ({', '.join(f'{k}: {v:,}' for k, v in skipped.items())}); "
                           "lower data.min_language_score / data.min_chars or check data.text_column")
    manifest = {"version": FORMAT_VERSION, "fingerprint": fp, "tokenizer": data.tokenizer, "eot": tokens.EOT,
                "dtype": "uint16", "split_rule": tokens.SPLIT_RULE, "val_fraction": data.val_fraction,
                "inputs": [f.manifest_entry() for f in files], "settings": settings, "splits": splits,
                "skipped": skipped, "chars": sum(r["chars"] for r in results), "seconds": round(seconds, 3)}
    if all(f.has_token_count for f in files):
        column_sum = sum(r["token_count"] or 0 for r in results)
        produced = splits["train"]["tokens"] + splits["val"]["tokens"] - documents
        manifest["token_count"] = {"column_sum": column_sum, "produced_without_eot": produced,
                                   "matches": column_sum == produced}
    return manifest


def _warn_on_count_mismatch(manifest: dict, files: list[InputFile]) -> None:
    check = manifest.get("token_count")
    if check and not check["matches"]:
        print(f"fwray: warning: {files[0].path}{' ...' if len(files) > 1 else ''}: the token_count column sums to "
              f"{check['column_sum']:,} but {check['produced_without_eot']:,} tokens were produced (without EOT): "
              "wrong tokenizer or corrupted text?", file=sys.stderr)


def _entry_is_whole(entry: Path | str, manifest: dict, fp: str) -> bool:
    """A cache hit: same fingerprint, and every shard there with its size (one listing of the entry, on object storage
    one request)."""
    if manifest.get("fingerprint") != fp:
        return False
    sizes = locations.file_sizes(entry)
    return all(sizes.get(f["name"]) == f["tokens"] * tokens.TOKEN_DTYPE.itemsize
               for s in SPLITS for f in manifest["splits"][s]["files"])


def _remove_stale(cache: Path) -> None:
    """Temp folders whose process no longer runs on this machine are removed. Entries are left alone: an incomplete
    one is rebuilt and replaced by `_publish` when its fingerprint is prepared again."""
    for path in cache.iterdir():
        m = re.fullmatch(r"[0-9a-f]{16}\.tmp-(\d+)", path.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, entry: Path) -> None:
    """Rename the finished temp folder to the entry; a broken entry (manifest or shard gone) is replaced."""
    if entry.exists():
        manifest = tokens.read_manifest(entry)
        if manifest is not None and _entry_is_whole(entry, manifest, manifest["fingerprint"]):
            return  # another run finished the same entry first
        shutil.rmtree(entry)
    os.replace(tmp, entry)
    tokens.fsync(entry.parent)
