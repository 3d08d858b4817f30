"""Parquet inputs of prepare: find the files, check them, fingerprint them, cut them into tasks, read a task's rows.

No Ray here: the driver plans with these functions and each Ray task reads its rows with `read_task`.
"""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import DataConfig
from ..errors import FwrayError, first_line

MAGIC = b"PAR1"
TASK_TEXT_BYTES = 16 << 20  # text one task tokenizes (~2 s of one core): small enough to balance the workers
BATCH_TEXT_BYTES = 1 << 20  # text decoded at once inside a task: bounds a worker's memory


class PrepareError(FwrayError):
    """Inputs or outputs prepare cannot use: the message is one line naming the file and the fix."""

    exit_code = 2


@dataclass(frozen=True)
class InputFile:
    path: str  # resolved
    bytes: int
    mtime_ns: int
    rows: int
    fingerprint: str  # sha256 of size + footer: the content's identity, also names rows without an id
    has_token_count: bool

    def manifest_entry(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "rows": self.rows, "fingerprint": self.fingerprint}


# ---------------------------------------------------------------- finding and checking


def resolve_paths(patterns: tuple[str, ...]) -> list[Path]:
    """Files named by data.paths (files, globs, folders of *.parquet), in order, each once."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PrepareError(f"{pattern}: the glob matches no files; fix data.paths")
        elif os.path.isdir(pattern):
            matches = sorted(glob.glob(os.path.join(pattern, "*.parquet")))
            if not matches:
                raise PrepareError(f"{pattern}: the folder holds no *.parquet files; fix data.paths")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise PrepareError(f"{pattern}: file not found; fix data.paths (relative paths in a YAML file are "
                               "relative to that file)")
        found.update((Path(m).resolve(), None) for m in matches)
    return list(found)


def inspect_file(path: Path, data: DataConfig) -> InputFile:
    """Check that `path` is a whole parquet file with the columns `data` needs, and fingerprint it."""
    stat = path.stat()
    footer = _footer(path, stat.st_size)
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{path}: unreadable parquet footer ({first_line(e)}); re-download or rewrite the file")
    schema = meta.schema.to_arrow_schema()
    if data.text_column not in schema.names:
        raise PrepareError(f"{path}: no column {data.text_column!r} (columns: {', '.join(schema.names)}); "
                           "set data.text_column")
    text_type = schema.field(data.text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise PrepareError(f"{path}: column {data.text_column!r} holds {text_type}, not strings; "
                           "set data.text_column to the text column")
    if data.min_language_score is not None and "language_score" not in schema.names:
        raise PrepareError(f"{path}: data.min_language_score is set but the file has no language_score column; "
                           "unset data.min_language_score for this file")
    if meta.num_rows == 0:
        raise PrepareError(f"{path}: the file has no rows; remove it from data.paths")
    fingerprint = hashlib.sha256(stat.st_size.to_bytes(8, "little") + footer).hexdigest()
    return InputFile(str(path), stat.st_size, stat.st_mtime_ns, meta.num_rows, fingerprint,
                     has_token_count="token_count" in schema.names)


def _footer(path: Path, size: int) -> bytes:
    """The footer bytes; a file that does not start and end with PAR1 is not parquet or was cut short."""
    with open(path, "rb") as f:
        head = f.read(4)
        if size >= 12:
            f.seek(size - 8)
            tail = f.read(8)
        else:
            tail = b""
        length = int.from_bytes(tail[:4], "little") if tail else 0
        if head != MAGIC:
            raise PrepareError(f"{path}: not a parquet file; list only .parquet files in data.paths")
        if tail[4:] != MAGIC or length + 12 > size:
            raise PrepareError(f"{path}: truncated parquet file (no footer at the end); re-download or rewrite it")
        f.seek(size - 8 - length)
        return f.read(length)


def fingerprint(files: list[InputFile], settings: dict, version: int) -> str:
    """What the cache entry depends on: the inputs (where, when, what), the output settings, the format."""
    h = hashlib.sha256(f"fwray-prepare v{version}\n".encode())
    for f in files:
        h.update(f"{f.path}\0{f.bytes}\0{f.mtime_ns}\0{f.fingerprint}\n".encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


def output_settings(data: DataConfig) -> dict:
    """The data settings that change the shards (num_workers and cache_dir do not)."""
    keys = ("text_column", "id_column", "tokenizer", "val_fraction", "min_language_score", "min_chars",
            "rows_per_task")
    return {k: v for k, v in asdict(data).items() if k in keys}


# ---------------------------------------------------------------- tasks


def plan_tasks(files: list[InputFile], data: DataConfig) -> list[dict]:
    """Cut every file into tasks of at most `rows_per_task` rows and ~TASK_TEXT_BYTES of text.

    Small row groups are merged, big ones are cut into row ranges. A task: its file, the row groups it reads,
    the rows to skip in the first of them, the rows it takes, and its first row's position in the file.
    """
    tasks = []
    for file_index, f in enumerate(files):
        meta = pq.ParquetFile(f.path).metadata
        text = meta.schema.to_arrow_schema().get_field_index(data.text_column)
        current, first_row = None, 0
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            row_bytes = meta.row_group(rg).column(text).total_uncompressed_size / max(rows, 1)
            per_task = max(1, min(data.rows_per_task, int(TASK_TEXT_BYTES / max(row_bytes, 1))))
            fits = current is not None and current["rows"] + rows <= per_task
            if fits:
                current["row_groups"].append(rg)
                current["rows"] += rows
            else:
                for start in range(0, rows, per_task):
                    current = {"file": file_index, "path": f.path, "file_key": f.fingerprint, "row_groups": [rg],
                               "skip": start, "rows": min(per_task, rows - start), "first_row": first_row + start,
                               "row_bytes": row_bytes}
                    tasks.append(current)
                if rows > per_task:
                    current = None  # the last slice of a cut row group takes no other row groups
            first_row += rows
    for i, task in enumerate(tasks):
        task["index"] = i
    return tasks


def read_task(task: dict, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The task's rows, `columns` only, in batches of ~BATCH_TEXT_BYTES of text."""
    batch_rows = max(1, int(BATCH_TEXT_BYTES / max(task["row_bytes"], 1)))
    skip, left = task["skip"], task["rows"]
    pf = pq.ParquetFile(task["path"])
    present = [c for c in columns if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=task["row_groups"], columns=present,
                                 use_threads=False):
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        batch = batch.slice(skip, left)
        skip = 0
        left -= batch.num_rows
        yield batch
        if left <= 0:
            return


def column(batch: pa.RecordBatch, name: str) -> pa.Array | None:
    i = batch.schema.get_field_index(name)
    return batch.column(i) if i >= 0 else None


def keep_mask(texts: pa.Array, scores: pa.Array | None, data: DataConfig) -> tuple[pa.Array, dict]:
    """Rows to tokenize, and how many each filter dropped (a row counts under the first filter it fails)."""
    lengths = pc.fill_null(pc.utf8_length(texts), 0)
    keep = pc.greater(lengths, 0)
    skipped = {"null_or_empty": len(texts) - _count(keep)}
    if data.min_language_score is not None:
        ok = pc.fill_null(pc.greater_equal(scores, data.min_language_score), False)
        skipped["min_language_score"] = _count(pc.and_(keep, pc.invert(ok)))
        keep = pc.and_(keep, ok)
    else:
        skipped["min_language_score"] = 0
    ok = pc.greater_equal(lengths, data.min_chars)
    skipped["min_chars"] = _count(pc.and_(keep, pc.invert(ok)))
    return pc.and_(keep, ok), skipped


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)
