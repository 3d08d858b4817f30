"""One way to start Ray for every fwray command: quiet, no dashboard, workers that find the tokenizer files."""
from __future__ import annotations

import logging
import os

# Ray reads these when it starts, so importing this module sets them (a user's own values win)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # a worker's print shows once, not again via its logger
# The controller polls its workers this often, and a worker's ray.train.report waits for the previous report to be
# polled: Ray's default of 2 s stalls every checkpoint for up to 2 s and every run's start and finish by more
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The spot-preemption watcher logs an error line on every run (ray-project/ray#53727); fwray's restarts come from
# resources.max_failures. Set it to 1 on a cluster of preemptible nodes.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


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
