"""One function run in a fresh process under a time limit, killed at the limit. Standard library only.

The GPU check runs each section this way: a crash (or an OOM, or a CUDA error that poisons the context) costs that
section alone, and a section that hangs is killed at its limit together with what it started (Inductor's compile
workers), so its GPU memory is free again before the next section starts. A fresh process also measures its own
CUDA context only: neither the caller nor the fork server that starts the processes initialises CUDA. The fork
server imports the function's module once (torch and fwray: seconds a section on a GPU machine), and each section's
process is forked from it.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import traceback

GRACE_S = 5  # after SIGTERM, before SIGKILL


def run_in_child(fn, args: tuple, limit_s: float) -> dict:
    """fn(*args) in a fresh process (forked from a server that imported fn's module once); its dict result, or
    {"error": ...} when it raised or died, or {"killed": ...} when it ran past `limit_s` (it and its process group are
    then killed and reaped). Every result carries the child's "pid" and "seconds"."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([fn.__module__])  # read when the server starts: the first call's module
    _let_the_server_import(fn.__module__)
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args))  # not daemonic: it may start processes of its own
    start = time.monotonic()
    proc.start()
    send.close()  # the child holds the only sending end: its death reads as end-of-file here
    try:
        result = _receive(receive, proc, max(0.0, limit_s - (time.monotonic() - start)))
    finally:  # on an interrupt too: a section never outlives this call
        kill(proc)
        receive.close()
    if result is None:
        result = {"killed": f"ran past its {limit_s:.0f} s limit: killed"}
    return {**result, "pid": proc.pid, "seconds": round(time.monotonic() - start, 1)}


def _receive(receive, proc, timeout_s: float) -> dict | None:
    """The child's result, an error if it died first, or None if the time ran out."""
    try:
        if not receive.poll(timeout_s):
            return None
        result = receive.recv()
    except EOFError:
        proc.join(GRACE_S)
        return {"error": f"the process died (exit code {proc.exitcode}) before returning a result"}
    proc.join(GRACE_S)  # it exits after sending
    return result


def kill(proc) -> None:
    """End `proc` (SIGTERM, then SIGKILL) and reap it, then whatever is left of its process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not proc.is_alive():
            break
        _signal(proc.pid, sig)
        proc.join(GRACE_S)
    _signal(proc.pid, signal.SIGKILL, group_only=True)  # what it started and left behind (compile workers)


def _signal(pid: int, sig: int, group_only: bool = False) -> None:
    try:
        os.killpg(pid, sig)  # the child leads its own group (see _child)
    except ProcessLookupError:  # no such group: it had not reached setpgid, or the group is gone
        if not group_only:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _child(send, fn, args) -> None:
    os.setpgid(0, 0)  # a group of its own: killing it reaches the processes it starts, not the caller's
    try:
        result = fn(*args)
    except BaseException as e:  # a section that raised is a finding: its message goes back
        result = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
    send.send(result)


def _let_the_server_import(module: str) -> None:
    """Python 3.11's fork server ignores the sys.path it is handed and imports the preloaded module through its own
    (its working folder first), silently giving up when that fails; every child then imports the module again
    (seconds: torch). The folder the module was found in goes on PYTHONPATH, which the server inherits."""
    top = sys.modules[module.partition(".")[0]]
    folders = [os.path.dirname(p) for p in getattr(top, "__path__", [])]  # a package: the folder above it
    if not folders and getattr(top, "__file__", None):  # a module (a built-in one has no file: nothing to find)
        folders = [os.path.dirname(top.__file__)]
    known = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*known, *folders]))
