"""How many training tokens the data holds, without preparing it: what fwray.plan plans with. No ray or mlflow.

Three ways, best first:
- a prepared cache of the same inputs and settings: its manifest's counts (exact);
- FineWeb's `token_count` column (GPT-2 tokens of each document, as prepare's tokenizer counts them): the id and
  token_count columns only, each document put in its split by prepare's rule (tokens.is_validation) and given its EOT;
  exact when the column is (FineWeb's is), nothing tokenized;
- otherwise a sample of documents tokenized, tokens per document scaled to the row count: an estimate, and the
  figure says so with its standard error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import DataConfig
from ..core import tokens
from .parquet_inputs import InputFile, keep_mask

SAMPLE_CHARS = 4_000_000  # text tokenized for an estimate: ~1M tokens, a second or two of one core
SAMPLE_BATCH = 64  # rows read at a time from each sampled row group


@dataclass(frozen=True)
class DataSize:
    train_tokens: int  # EOT included, as the loader reads them
    val_tokens: int
    documents: int
    source: str  # "cache", "token_count" or "sample"
    note: str  # one line: where the figure comes from, and how exact it is

    @property
    def exact(self) -> bool:
        return self.source != "sample"


def from_manifest(manifest: dict, where: str) -> DataSize:
    s = manifest["splits"]
    return DataSize(s["train"]["tokens"], s["val"]["tokens"], s["train"]["documents"] + s["val"]["documents"],
                    "cache", f"exact, from the prepared cache {where}")


def from_parquet(files: list[InputFile], data: DataConfig) -> DataSize:
    """Counts from the token_count column where every file has one, else a tokenized sample."""
    counted = [_counted(f, data) for f in files]
    if all(c is not None for c in counted):
        train, val, docs = (sum(c[i] for c in counted) for i in range(3))
        extra = "; data.min_chars read the text column" if data.min_chars else ""
        return DataSize(train, val, docs, "token_count", f"exact, from the parquet's token_count column{extra}")
    return _sampled(files, data)


def _counted(f: InputFile, data: DataConfig) -> tuple[int, int, int] | None:
    """(train tokens, val tokens, documents) from token_count; None when the file has no complete column."""
    if not f.has_token_count:
        return None
    pf = pq.ParquetFile(f.path)
    columns = [c for c in (data.id_column, "token_count", "language_score") if c in pf.schema_arrow.names]
    table = pf.read(columns=columns, use_threads=False)
    counts = table.column("token_count")
    if counts.null_count:
        return None
    counts = counts.to_numpy().astype(np.int64)
    keep = counts > 0  # prepare skips empty texts: they alone have no tokens
    if data.min_language_score is not None:
        scores = table.column("language_score")
        keep &= pc.fill_null(pc.greater_equal(scores, data.min_language_score), False).to_numpy(zero_copy_only=False)
    if data.min_chars:
        keep &= _long_enough(pf, data)
    ids = (table.column(data.id_column).cast(pa.string()).to_pylist() if data.id_column in table.column_names
           else [None] * len(counts))
    rows = np.flatnonzero(keep)
    is_val = np.fromiter((tokens.is_validation(ids[r] if ids[r] is not None else tokens.fallback_id(f.fingerprint, r),
                                               data.val_fraction) for r in rows.tolist()), bool, len(rows))
    lengths = counts[rows] + 1  # the EOT before each document
    return int(lengths[~is_val].sum()), int(lengths[is_val].sum()), len(rows)


def _long_enough(pf: pq.ParquetFile, data: DataConfig) -> np.ndarray:
    """data.min_chars needs the text's length: read the text column a batch at a time."""
    parts = [pc.greater_equal(pc.fill_null(pc.utf8_length(b.column(0)), 0), data.min_chars).to_numpy(False)
             for b in pf.iter_batches(batch_size=4096, columns=[data.text_column], use_threads=False)]
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def _sampled(files: list[InputFile], data: DataConfig) -> DataSize:
    """Tokens per kept document from a sample spread over the row groups, times the rows: an estimate."""
    enc = tokens.get_tokenizer(data.tokenizer)
    lengths: list[int] = []  # tokens of each sampled row, EOT included; 0 for a row prepare would skip
    for f in files:
        chars = 0
        for batch in _spread_batches(f.path, data):
            texts = batch.column(data.text_column)
            scores = batch.column("language_score") if "language_score" in batch.schema.names else None
            keep, _ = keep_mask(texts, scores, data)
            kept = texts.filter(keep).to_pylist()
            _, doc_lengths = tokens.encode_documents(enc, kept)
            lengths += doc_lengths.tolist() + [0] * (batch.num_rows - len(kept))
            chars += sum(map(len, kept))
            if chars >= SAMPLE_CHARS / len(files):
                break
    rows = sum(f.rows for f in files)
    mean = float(np.mean(lengths)) if lengths else 0.0
    error = float(np.std(lengths) / math.sqrt(len(lengths)) / mean) if mean and len(lengths) > 1 else 1.0
    total = int(mean * rows)
    val = int(total * data.val_fraction)  # the split rule sends about val_fraction of the documents there
    kept_share = sum(1 for n in lengths if n) / max(len(lengths), 1)
    return DataSize(total - val, val, int(rows * kept_share), "sample",
                    f"ESTIMATE: no token_count column; {len(lengths):,} of {rows:,} documents tokenized, "
                    f"+-{error:.0%} (one standard error)")


def _spread_batches(path: str, data: DataConfig):
    """Batches of SAMPLE_BATCH rows taken in turn from up to 16 row groups spread over the file."""
    pf = pq.ParquetFile(path)
    groups = pf.metadata.num_row_groups
    picked = sorted({i * groups // min(groups, 16) for i in range(min(groups, 16))})
    columns = [c for c in (data.text_column, "language_score") if c in pf.schema_arrow.names]
    readers = [pf.iter_batches(batch_size=SAMPLE_BATCH, row_groups=[rg], columns=columns, use_threads=False)
               for rg in picked]
    while readers:
        for reader in list(readers):
            batch = next(reader, None)
            if batch is None:
                readers.remove(reader)
            else:
                yield batch
