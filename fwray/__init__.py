"""fwray: a GPT from a FineWeb shard on one GPU, with Ray around the work and MLflow keeping every run.

Heavy libraries are imported inside the functions that use them, so that --help, a bad input or a cache hit answers at
once: torch, Ray and MLflow together take ~3 s to import, transformers ~5 s, Ray Data ~0.8 s, matplotlib ~0.4 s.
"""

__version__ = "0.1.0"
