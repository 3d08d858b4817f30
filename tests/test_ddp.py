"""DDP over gloo in two spawned processes, looked at one optimizer step at a time: two ranks take the step one rank
takes accumulating (tests/steps.py), and gradient accumulation all-reduces once per optimizer step into DDP's own
buckets, compiled or not."""
import dataclasses

import pytest
import torch

from fwray import config
from steps import assert_same_grads, assert_same_update, fixed_batch, look_at_step, optimizer_of, update_mismatch


# the 2-rank tests' engine: one layer, 4 micro-steps an optimizer step
TINY_MODEL = config.ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
ACCUMULATING = config.TrainConfig(batch_size=2, gradient_accumulation_steps=4, max_iters=3)


def run_two_ranks(target, *args, timeout=240) -> list:
    """`target(rank, *args)` in each of 2 spawned processes joined in one gloo group on 127.0.0.1; what each returned,
    by rank."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_in_gloo_group, args=(target, r, 2, port, results, args)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        # read before joining: a process exits only once what it put on the queue has been taken
        returned = dict(results.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [returned[r] for r in range(2)]


def _in_gloo_group(target, rank: int, world: int, port: int, results, args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results.put((rank, target(rank, *args)))
    finally:
        dist.destroy_process_group()


STEP_MODEL = config.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, recipe="modern")
STEP_TRAIN = config.TrainConfig(batch_size=4, max_iters=1, warmup_iters=0, optimizer="muon", schedule="wsd",
                                compile=False)


def _one_ddp_step(rank: int, all_reduce: bool, model: config.ModelConfig = STEP_MODEL) -> dict:
    """Rank `rank`'s half of a batch of 8, one optimizer step through a DDP-wrapped engine; with all_reduce False,
    DDP's all-reduce replaced by a hook that keeps each rank's own gradients (the bug the comparison must catch)."""
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    from fwray.core.engine import Engine

    engine = Engine.build(model, STEP_TRAIN, torch.device("cpu"))
    if not all_reduce:
        engine.model.register_comm_hook(None, noop_hook)  # each rank's bucket handed back as it is
    x, y = fixed_batch()
    loss, _, grads, updates = look_at_step(engine, lambda micro: (x[4 * rank: 4 * rank + 4], y[4 * rank: 4 * rank + 4]))
    return {"loss": loss.item(), "grads": {n: g.numpy() for n, g in grads.items()},
            "updates": {n: u.numpy() for n, u in updates.items()}}


# the speedrun recipe with value embeddings and U-net skips: a table two layers read, skip and mixing weights
SKIPPING_MODEL = config.ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, recipe="speedrun", value_embeds=1,
                                    unet_skips=True)


TWO_RANK_MODELS = {"modern": STEP_MODEL, "skipping": SKIPPING_MODEL}


def _all_two_rank_checks(rank: int) -> dict:
    """Every 2-rank check of this module in one gloo group (spawning the two processes costs more than the checks):
    each recipe's DDP step with and without the all-reduce, then the uncompiled and the compiled accumulation."""
    steps = {(name, reduced): _one_ddp_step(rank, reduced, model)
             for name, model in TWO_RANK_MODELS.items() for reduced in (True, False)}
    return {"steps": steps, "storages": _gradient_storages(rank), "allreduces": _count_allreduces(rank)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_two_ranks(_all_two_rank_checks)


@pytest.mark.parametrize("name", list(TWO_RANK_MODELS))
def test_two_ranks_take_the_step_of_one_rank_accumulating(two_ranks, name):
    """One optimizer step, 2 ranks x 4 sequences (DDP) vs 1 process x 2 micro-batches of 4: the same gradients (to
    float32 rounding) and the same update (to the optimizer's rounding), under Muon. Without the all-reduce the same
    comparison fails."""
    from fwray.core.engine import Engine

    x, y = fixed_batch()
    single = Engine.build(TWO_RANK_MODELS[name], dataclasses.replace(STEP_TRAIN, gradient_accumulation_steps=2),
                          torch.device("cpu"))
    owners = optimizer_of(single)
    _, _, grads, updates = look_at_step(single, lambda micro: (x[4 * micro: 4 * micro + 4], y[4 * micro: 4 * micro + 4]))

    ranks = [r["steps"][name, True] for r in two_ranks]
    as_torch = lambda arrays: {n: torch.from_numpy(a) for n, a in arrays.items()}  # noqa: E731
    for r in ranks:
        assert_same_grads(as_torch(r["grads"]), grads)
        assert_same_update(as_torch(r["updates"]), updates, owners)
    # every rank holds the same weights after the step: two ranks' gradients summed in either order are equal
    for n in updates:
        assert (ranks[0]["updates"][n] == ranks[1]["updates"][n]).all(), n

    unreduced = two_ranks[0]["steps"][name, False]
    mismatch = update_mismatch(as_torch(unreduced["updates"]), updates, owners)
    assert max(mismatch.values()) > 1, mismatch


def _count_allreduces(rank: int) -> tuple[bool, list[list[int]]]:
    """3 optimizer steps of 4 micro-steps through a compiled, DDP-wrapped engine: whether it compiled, and the
    buckets DDP all-reduced in each step."""
    import functools

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from fwray.core.engine import Engine

    # the same dynamo tracing as inductor, without its minute of C++ compilation on 2 cores
    torch.compile = functools.partial(torch.compile, backend="aot_eager")
    engine = Engine.build(TINY_MODEL, ACCUMULATING, torch.device("cpu"), compile=True)
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(dist.group.WORLD, bucket)

    engine.model.register_comm_hook(None, counting_hook)
    x = torch.randint(0, 50257, (2, 17))
    per_step = []
    for step in range(3):
        calls.clear()
        engine.step(step, lambda micro: (x[:, :-1], x[:, 1:]))
        per_step.append(list(calls))
    return engine.compiled, per_step


def test_compiled_ddp_all_reduces_once_per_optimizer_step(two_ranks):
    """Gradient accumulation under DDP skips the all-reduce on all but the last micro-step, with torch.compile too."""
    for rank, (compiled, per_step) in enumerate(r["allreduces"] for r in two_ranks):
        assert compiled
        for calls in per_step:  # each bucket all-reduced once a step, not once a micro-step (4 here)
            assert calls and len(calls) == len(set(calls)), (rank, per_step)


def _gradient_storages(rank: int) -> list[tuple[set[int], list[list[int | None]]]]:
    """3 optimizer steps of 4 micro-steps through a DDP-wrapped engine. For each step: the storages of the buckets
    DDP all-reduced, and of every parameter's .grad as micro-steps 1..3 begin (after no_sync backward passes)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from fwray.core.engine import Engine

    engine = Engine.build(TINY_MODEL, ACCUMULATING, torch.device("cpu"), compile=False)
    buckets, grads = set(), []

    def recording_hook(state, bucket):
        buckets.add(bucket.buffer().untyped_storage().data_ptr())
        return allreduce_hook(dist.group.WORLD, bucket)

    def batch(micro):
        if micro:
            grads.append([None if p.grad is None else p.grad.untyped_storage().data_ptr()
                          for p in engine.raw_model.parameters()])
        return x[:, :-1], x[:, 1:]

    engine.model.register_comm_hook(None, recording_hook)
    x = torch.randint(0, 50257, (2, 17))
    per_step = []
    for step in range(3):
        engine.step(step, batch)
        per_step.append((set(buckets), list(grads)))
        buckets.clear()
        grads.clear()
    return per_step


def test_ddp_accumulates_into_its_buckets(two_ranks):
    """Under DDP every micro-step's gradients are views of the all-reduce buckets, on every optimizer step: no
    second, full-size copy of them beside the buckets (which the single-process probe's peak would not include)."""
    for rank, per_step in enumerate(r["storages"] for r in two_ranks):
        for step, (buckets, grads) in enumerate(per_step):
            assert buckets and len(grads) == ACCUMULATING.gradient_accumulation_steps - 1
            for storages in grads:
                assert set(storages) <= buckets, (rank, step, storages, buckets)
