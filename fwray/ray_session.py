"""One way to start Ray for every fwray command: quiet, no dashboard, workers that find the tokenizer files."""
from __future__ import annotations

import logging
import os


def tokenizer_env() -> dict[str, str]:
    """TIKTOKEN_CACHE_DIR made absolute: Ray workers run in other working directories than the driver."""
    where = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not where:
        return {}
    os.environ["TIKTOKEN_CACHE_DIR"] = where = os.path.abspath(where)
    return {"TIKTOKEN_CACHE_DIR": where}


def start(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """ray.init unless Ray is already up (a test session, or a cluster the caller connected to)."""
    import ray

    env = tokenizer_env()
    if ray.is_initialized():
        return
    # Ray's own INFO/WARNING chatter (report bookkeeping, state-API probes) would bury fwray's progress lines
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver, logging_level=logging.ERROR,
             logging_config=ray.LoggingConfig(log_level="ERROR"), runtime_env={"env_vars": env} if env else None)
