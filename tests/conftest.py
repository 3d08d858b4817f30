"""Shared fixtures: one local Ray per test session (ray.init costs ~10 s here), the corpus, tiktoken's cache."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpus" / "python-docs.parquet"
SMOKE = ROOT / "experiments" / "smoke.yaml"

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
# absolute: tests start fwray in other working directories, and the README's command sets a relative path
os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])
import fwray.ray_session  # noqa: E402,F401  (Ray's environment, as fwray sets it, before the session's Ray starts)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # fwray's own start: a private Ray (never one that happens to run here) unless RAY_ADDRESS names a cluster
    fwray.ray_session.start(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus() -> Path:
    assert CORPUS.is_file(), f"the shared corpus is missing at {CORPUS}"
    return CORPUS
