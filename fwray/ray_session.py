"""The one place fwray starts or joins Ray, and decides from the Ray cluster whether training uses GPUs.

- `RAY_ADDRESS` unset (or `local`): a private Ray for this command, `ray.init(address="local")`, its servers bound to
  127.0.0.1. A Ray that happens to run on this machine (or a stale /tmp/ray/ray_current_cluster) is never joined.
- `RAY_ADDRESS=host:port` (the head's GCS, `ray start --head --port=...`), `auto` (the cluster `ray start` started on
  this machine) or `ray://host:port` (Ray Client): join that cluster. Whether it answers is checked within seconds
  before `ray.init`; a dead one, or one that wants a token this command lacks, is a `RayUnavailable` with one line.
  A cluster with token authentication (`ray start --head` turns it on when a token exists) needs `RAY_AUTH_MODE=token`
  and its token in `~/.ray/auth_token` (or `RAY_AUTH_TOKEN_PATH` / `RAY_AUTH_TOKEN`) on the joining machine.

Worker processes get fwray's settings through the job's runtime_env: workers of a cluster started by `ray start` do
not inherit the driver's environment.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket

from .errors import FwrayError, first_line
from .storage.uri import endpoint_env

# Ray reads these when it starts, so importing this module sets them (a user's own values win); workers get them
# through the job's runtime_env (see worker_env)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # a worker's print shows once, not again via its logger
# The controller polls its workers this often, and a worker's ray.train.report waits for the previous report to be
# polled: Ray's default of 2 s stalls every checkpoint for up to 2 s and every run's start and finish by more
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The spot-preemption watcher logs an error line on every run (ray-project/ray#53727); fwray's restarts come from
# resources.max_failures. Set it to 1 on a cluster of preemptible nodes.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

ADDRESS_ENV = "RAY_ADDRESS"
CONNECT_TIMEOUT_S = 3.0
# What every Ray worker process needs from the driver's environment (those set here, or by the user, at ray.init),
# besides the CUDA allocator configuration (fwray.core.hardware.ALLOC_CONF_ENVS)
WORKER_ENV = ("RAY_TRAIN_V2_ENABLED", "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")


class RayUnavailable(FwrayError):
    """The Ray cluster fwray was asked to join does not answer, or refuses this command."""


class GpuUnavailable(FwrayError):
    """resources.use_gpu is true but the Ray cluster has no GPU."""


def tokenizer_env() -> dict[str, str]:
    """TIKTOKEN_CACHE_DIR made absolute: Ray workers run in other working directories than the driver."""
    where = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not where:
        return {}
    os.environ["TIKTOKEN_CACHE_DIR"] = where = os.path.abspath(where)
    return {"TIKTOKEN_CACHE_DIR": where}


def worker_env() -> dict[str, str]:
    """The environment every Ray worker gets through the job's runtime_env: fwray's Ray settings, the tokenizer
    files, the CUDA allocator configuration and where the object store is (its endpoint and region: never
    credentials, which each node takes from its own environment or profile), as the driver has them now."""
    from .core.hardware import ALLOC_CONF_ENVS, configure_allocator  # here: `fwray.prepare` need not import torch

    configure_allocator()  # the probe's trials and the training workers start CUDA with one allocator configuration
    env = {k: os.environ[k] for k in (*WORKER_ENV, *ALLOC_CONF_ENVS) if os.environ.get(k)}
    return {**env, **tokenizer_env(), **endpoint_env()}


# Ray Train starts a PlacementGroupCleaner beside every run, whose thread watches the controller through Ray's State
# API. That API needs the dashboard, which a private Ray here keeps off (and on a machine with several Rays it cannot
# tell which one to ask), so the thread dies at its first look and its traceback lands in the user's terminal though
# nothing failed: the run removes its placement groups itself, and a private Ray takes them down with it.
CLEANER_THREAD = "PlacementGroupCleanerMonitor"


def quiet_worker() -> None:
    """Each Ray worker process's setup (the runtime_env's worker_process_setup_hook): the cleaner thread's end is a
    debug line in the worker's log instead of a traceback on the driver's terminal; other threads' errors print."""
    import threading

    previous = threading.excepthook

    def excepthook(args) -> None:
        if args.thread is not None and args.thread.name == CLEANER_THREAD:
            logging.getLogger(__name__).debug("Ray Train's placement group cleaner stopped: %s", args.exc_value)
            return
        previous(args)

    threading.excepthook = excepthook


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: `address`, else $RAY_ADDRESS; None (or "local"): start a private Ray."""
    address = (address if address is not None else os.environ.get(ADDRESS_ENV, "")).strip()
    return None if address in ("", "local") else address


def start(num_cpus: int | None = None, log_to_driver: bool = True, address: str | None = None) -> None:
    """Start a private Ray, or join the cluster named by `address` / $RAY_ADDRESS; nothing if Ray is already up.

    num_cpus sizes a private Ray only (a cluster has the CPUs its nodes have). Raises RayUnavailable (one line)
    when the cluster does not answer or refuses this command.
    """
    import ray

    env = worker_env()
    if ray.is_initialized():
        return
    # Ray's own INFO/WARNING chatter (report bookkeeping, state-API probes) would bury fwray's progress lines
    common = dict(log_to_driver=log_to_driver, logging_level=logging.ERROR,
                  logging_config=ray.LoggingConfig(log_level="ERROR"),
                  runtime_env={"env_vars": env, "worker_process_setup_hook": f"{__name__}.{quiet_worker.__name__}"})
    target = cluster_address(address)
    if target is None:
        with _loopback_only():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **common)
        return
    source = "address" if address is not None else ADDRESS_ENV
    check_cluster(target, source)
    try:
        ray.init(address=target, **common)  # nothing local-only: a cluster refuses num_cpus and the like
    except (ConnectionError, ray.exceptions.RayError) as e:
        raise RayUnavailable(
            f"cannot join the Ray cluster at {target} ({source}): {first_line(e)}; check it with `ray status --address "
            f"{target}`, set RAY_AUTH_MODE=token if it uses token authentication, or `unset {ADDRESS_ENV}` to run "
            f"on a private local Ray") from None


@contextlib.contextmanager
def _loopback_only():
    """A private Ray on 127.0.0.1: Ray's servers bind to its node IP when that is a loopback address, else to all
    interfaces. Ray resolves 127.0.0.1 given as the node IP to the machine's address unless it runs in its
    single-machine mode (as on macOS and Windows), which this switches on while ray.init starts the node."""
    try:
        from ray._private import ray_constants
    except ImportError:  # another Ray layout: its default binding
        yield
        return
    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def check_cluster(address: str, source: str = ADDRESS_ENV) -> None:
    """Within seconds: does the cluster at `address` answer, and does it accept this command's token? Raises
    RayUnavailable with one line if not. "auto" checks the address `ray start` wrote on this machine."""
    client = address.startswith("ray://")
    where = address
    if address == "auto":
        where = _started_here()
        if where is None:
            raise RayUnavailable(f"{source}=auto but no Ray cluster was started on this machine (`ray start` writes "
                                 f"its address to /tmp/ray/ray_current_cluster); start one with `ray start --head` "
                                 f"or `unset {ADDRESS_ENV}` to run on a private local Ray")
    host, port = _host_port(where.removeprefix("ray://"), 10001 if client else None, source)
    start_it = f"`ray start --head --port={port}` there" if not client else "Ray's client server there"
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        stale = " (a stale address from an earlier `ray start`)" if address == "auto" else ""
        raise RayUnavailable(f"no Ray cluster answers at {where}{stale} ({source}={address}): {why} within "
                             f"{CONNECT_TIMEOUT_S:g} s; start it ({start_it}) or `unset {ADDRESS_ENV}` to run on a "
                             f"private local Ray") from None
    if not client and address != "auto":  # "auto" enables token auth on its own when a token is at hand
        _check_token(f"{host}:{port}", address, source)


def _started_here() -> str | None:
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:
        return None
    return find_bootstrap_address(None)


def _host_port(address: str, default_port: int | None, source: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        if default_port is None:
            raise RayUnavailable(f"{source}={address} has no port: write host:port, the head's GCS port "
                                 f"(`ray start --head --port=...`, 6379 by default)")
        host, port = address, str(default_port)
    return host.strip("[]"), int(port)


def _check_token(gcs: str, address: str, source: str) -> None:
    """A GCS with token authentication refuses a client without the right token at once; ray.init would retry for
    ~20 s and end with 'Failed to connect'. Anything else this probe meets is left to ray.init."""
    import ray.exceptions

    try:
        from ray._raylet import InnerGcsClient
    except ImportError:
        return
    try:
        with _stderr_silenced():  # Ray's C++ client logs each refusal to stderr
            InnerGcsClient.standalone(gcs, None, int(CONNECT_TIMEOUT_S * 1000))
    except ray.exceptions.AuthenticationError:
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            raise RayUnavailable(
                f"the Ray cluster at {address} ({source}) uses token authentication: set RAY_AUTH_MODE=token and "
                f"put the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN); "
                f"`ray get-auth-token` on the head node prints it") from None
        raise RayUnavailable(
            f"the Ray cluster at {address} ({source}) refused this machine's token (RAY_AUTH_MODE=token; "
            f"{os.environ.get('RAY_AUTH_TOKEN_PATH') or '~/.ray/auth_token'} or RAY_AUTH_TOKEN): use the cluster's "
            f"token, which `ray get-auth-token` prints on the head node") from None
    except Exception:  # not an answer about tokens: ray.init decides
        pass


@contextlib.contextmanager
def _stderr_silenced():
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------- GPUs: what the cluster has, not the driver


def gpu_decision(setting: bool | str, cluster_gpus: float, cluster: str = "") -> bool:
    """resources.use_gpu (true, false or "auto") against the GPUs the Ray cluster has. Pure.

    true without a GPU raises GpuUnavailable; cluster: what the cluster has, for that message."""
    if setting is True and cluster_gpus < 1:
        raise GpuUnavailable(f"resources.use_gpu is true but the Ray cluster has no GPU ({cluster or 'no GPU'}); "
                             f"set resources.use_gpu: auto or false, or add a GPU node")
    return setting is not False and cluster_gpus >= 1


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (Ray must be started)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def use_gpu(setting: bool | str) -> bool:
    """Whether Ray workers train on GPUs: from the cluster's resources, never from the driver's torch (on a
    cluster the driver usually has no GPU). Ray must be started."""
    import ray

    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    have = (f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs on {nodes} node"
            f"{'s' if nodes != 1 else ''}")
    return gpu_decision(setting, float(resources.get("GPU", 0)), have)


def device_label(gpu: bool) -> str:
    """The driver's `fwray.device` tag: what the cluster offers (rank 0 replaces it with its GPU's name)."""
    return f"cuda (cluster: {cluster_gpus():g} GPUs)" if gpu else "cpu"
