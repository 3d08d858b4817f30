"""Prepare throughput and memory against tiktoken's limit on the same texts.

    python bench/prepare_bench.py --copies 40            # the shared corpus x 40 in one parquet (one row group a copy)
    python bench/prepare_bench.py --parquet FILE --workers 2

Prints fwray's tokens/s (Ray started and its workers warm before timing), the tiktoken baseline
(`encode_ordinary_batch`, num_threads = cores, one process, texts already in memory), their ratio, one-thread tiktoken
times the cores (the ideal no parallel tokenizer beats), and the peak
summed RSS of this process and every Ray process (sampled every 0.2 s while preparing).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray  # also puts its bundled psutil on sys.path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
CORPUS = ROOT.parent / "shared" / "corpus" / "python-docs.parquet"
BASELINE_TEXT_BYTES = 400 << 20  # the baseline holds its texts in memory: a sample of big files


def build_parquet(copies: int, out: Path) -> Path:
    """The corpus `copies` times in one file, a row group per copy, ids made unique per copy."""
    table = pq.read_table(CORPUS)
    ids = table.column("id").to_pylist()
    with pq.ParquetWriter(out, table.schema, compression="snappy") as w:
        for c in range(copies):
            w.write_table(table.set_column(table.schema.get_field_index("id"), "id",
                                           pa.array([f"{i}/{c}" for i in ids])))
    return out


class RssSampler(threading.Thread):
    """Peak of the summed RSS of this process and all its descendants (raylet, GCS, workers)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.at_peak, self.stop = 0, [], threading.Event()

    def run(self):
        me, procs, ticks = psutil.Process(), [], 0
        while not self.stop.wait(0.2):
            if ticks % 5 == 0:  # walking the process tree scans /proc: once a second is enough
                procs = [me, *me.children(recursive=True)]
            ticks += 1
            sizes = []
            for p in procs:
                try:
                    sizes.append((p.memory_info().rss, p.name()))
                except psutil.Error:
                    pass
            total = sum(rss for rss, _ in sizes)
            if total > self.peak:
                self.peak, self.at_peak = total, sorted(sizes, reverse=True)


def run_fwray(parquet: Path, workers: int, cache: Path) -> tuple[float, int, int]:
    from fwray import config
    from fwray.data.prepare import prepare

    def exp(path, where):
        return config.from_dict({"train": {"max_iters": 1}, "data": {
            "paths": [str(path)], "cache_dir": str(where), "num_workers": workers}})

    prepare(exp(CORPUS, cache / "warmup"), progress=False)  # workers started, tiktoken loaded in them
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    _, manifest = prepare(exp(parquet, cache / "timed"), progress=True)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    n = sum(manifest["splits"][s]["tokens"] - manifest["splits"][s]["documents"] for s in ("train", "val"))
    return seconds, n, sampler


def read_texts(parquet: Path, max_chars: int) -> list[str]:
    """The first non-empty texts of `parquet`, about `max_chars` characters of them."""
    texts, size = [], 0
    for batch in pq.ParquetFile(parquet).iter_batches(columns=["text"], batch_size=1024):
        texts += [t for t in batch.column(0).to_pylist() if t]
        size = sum(map(len, texts))
        if size >= max_chars:
            break
    return texts


def run_baseline(parquet: Path, threads: int) -> tuple[float, int, int]:
    """tiktoken alone: encode_ordinary_batch over (a sample of) the same texts; returns seconds, tokens, chars."""
    import tiktoken

    texts = read_texts(parquet, BASELINE_TEXT_BYTES)
    size = sum(map(len, texts))
    enc = tiktoken.get_encoding("gpt2")
    enc.encode_ordinary_batch(texts[:8], num_threads=threads)  # warm up
    start = time.perf_counter()
    ids = enc.encode_ordinary_batch(texts, num_threads=threads)
    seconds = time.perf_counter() - start
    return seconds, sum(map(len, ids)), size


def run_single_thread(parquet: Path, max_chars: int = 50 << 20) -> float:
    """tiktoken on one thread, with the call fwray makes (encode_to_numpy: no Python int per token), in tokens/s:
    cores x this is the ideal that no parallel tokenizer reaches."""
    import tiktoken

    texts = read_texts(parquet, max_chars)
    enc = tiktoken.get_encoding("gpt2")
    start = time.perf_counter()
    n = sum(enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()).size for t in texts)
    return n / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parquet", type=Path, help="a FineWeb-schema parquet (default: build one from the corpus)")
    ap.add_argument("--copies", type=int, default=40, help="corpus copies in the built parquet")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer workers (= Ray CPUs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fwray-bench-") as tmp:
        tmp = Path(tmp)
        parquet = args.parquet or build_parquet(args.copies, tmp / f"corpus-x{args.copies}.parquet")
        meta = pq.ParquetFile(parquet).metadata
        print(f"input: {parquet} {parquet.stat().st_size / 1e9:.2f} GB, {meta.num_rows:,} rows, "
              f"{meta.num_row_groups} row groups; workers {args.workers}", flush=True)
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        seconds, n, rss = run_fwray(parquet, args.workers, tmp / "cache")
        ray.shutdown()
        b_seconds, b_tokens, b_chars = run_baseline(parquet, os.cpu_count())
        single = run_single_thread(parquet)
    ours, base = n / seconds, b_tokens / b_seconds
    print(f"fwray prepare : {n:,} tokens in {seconds:.1f} s = {ours:,.0f} tokens/s (read + tokenize + write)")
    print(f"tiktoken limit: {b_tokens:,} tokens ({b_chars / 1e6:.0f}M chars) in {b_seconds:.1f} s = {base:,.0f} tokens/s "
          f"(encode_ordinary_batch, {os.cpu_count()} threads, one process)")
    print(f"ratio         : {ours / base:.2f}x the limit")
    print(f"one thread    : {single:,.0f} tokens/s (encode_to_numpy, as fwray calls it); x {os.cpu_count()} cores = "
          f"{single * os.cpu_count():,.0f} (perfect scaling, no I/O): fwray is {ours / (single * os.cpu_count()):.2f}x "
          f"of that")
    print(f"peak RSS      : {rss.peak / 2**30:.2f} GiB summed over this process and all Ray processes:")
    print("                " + ", ".join(f"{name} {size / 2**20:.0f}M" for size, name in rss.at_peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
