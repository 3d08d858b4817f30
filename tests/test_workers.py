"""Two CPU workers (DDP over gloo) x 1 micro-step train like one worker x 2 micro-steps: the same global batches. The
two-worker run is the suite's run on the two-node cluster (tests/bucket.py: one of its workers is killed mid-run and
the run goes on from its last checkpoint), the one-worker run the local `tiny_run`: both read the same windows, from
shards cut the same way.

Worker `rank`'s micro-step m reads global micro-batch m * world_size + rank (fwray.core.loader.Batches), and evaluation
shares validation batches 0..eval_iters-1 out between the ranks, so both setups see exactly the same sequences and
differ only in float summation order (DDP averages the two ranks' gradients in one all-reduce; accumulation adds
loss/2 twice). One optimizer step is compared closely in tests/test_ddp.py; whole runs here by their validation
losses, which a missing all-reduce moves by ~0.1 or more and summation order by ~1e-3 over 24 steps. Whole runs'
weights are not compared entry by entry: over 24 steps AdamW turns an embedding entry whose gradient sits at float32
noise into a full-size step of either sign (observed: up to 0.27 apart in the untied embedding of rare tokens), while
the model they compute stays the same.
"""

import pytest
import torch

from fwray.core.loader import Batches, TokenShards


def test_global_batch_does_not_depend_on_the_split(tmp_path):
    """Unit level: rank r of 2 at micro-step 0 reads what the single worker reads at micro-step r."""
    import numpy as np

    data = tmp_path / "t.bin"
    np.random.default_rng(0).integers(0, 50257, 5_000, dtype=np.uint16).tofile(data)
    shards = TokenShards([data], 16)
    one = Batches(shards, shards, 4, seed=7)
    two = [Batches(shards, shards, 4, seed=7, rank=r, world_size=2) for r in range(2)]
    four = [Batches(shards, shards, 4, seed=7, rank=r, world_size=4) for r in range(4)]
    for step in (0, 5):
        for r in range(2):
            assert torch.equal(two[r].train_batch(step, 0)[0], one.train_batch(step, r)[0])
        # 2 workers x 2 micro-steps == 4 workers x 1 == 1 worker x 4, as sets of micro-batches
        seen2 = sorted(two[r].train_batch(step, m)[0].sum().item() for r in range(2) for m in range(2))
        seen4 = sorted(four[r].train_batch(step, 0)[0].sum().item() for r in range(4))
        seen1 = sorted(one.train_batch(step, m)[0].sum().item() for m in range(4))
        assert seen1 == seen2 == seen4
        assert not torch.equal(two[0].train_batch(step, 0)[0], two[1].train_batch(step, 0)[0])
    assert torch.equal(two[1].val_batch(3)[0], one.val_batch(3)[0])  # validation does not depend on the rank


def test_two_workers_match_one_worker_with_accumulation(cluster_run, tiny_run):
    two, one = cluster_run, tiny_run  # 2 workers x 1 micro-step (one on each node); 1 worker x 2 micro-steps
    assert two["run"].data.params["resources.num_workers"] == "2"
    assert one["run"].data.params["resources.num_workers"] == "1"
    assert two["run"].data.params["plan.tokens_per_step"] == one["run"].data.params["plan.tokens_per_step"] == "256"
    assert sorted(two["val"]) == sorted(one["val"]) == [0, 8, 16, 24]
    assert two["val"][0] == pytest.approx(one["val"][0], abs=1e-5)  # same initial weights, same validation batches
    assert two["val"][24] < two["val"][0] - 0.1  # it trained
    # summation order alone moved them <= 1.4e-3 by step 24 (AVX-512, AVX2 and plain kernels); without DDP's
    # all-reduce they are >= 0.14 apart at every evaluation
    for step in (8, 16, 24):
        assert abs(two["val"][step] - one["val"][step]) <= 1e-2, (two["val"], one["val"])


def test_two_workers_share_the_yardstick_and_report_it_at_every_evaluation(cluster_run, tiny_run):
    """The yardstick file reaches the Ray workers; its windows, shared out between the ranks, add up to the same
    figure as one worker's (the same tolerance as val_loss: only the trained weights differ in summation order)."""
    two, one = cluster_run, tiny_run
    assert sorted(two["yardstick"]) == sorted(one["yardstick"]) == [0, 8, 16, 24]
    assert two["yardstick"][0] == pytest.approx(one["yardstick"][0], abs=1e-5)  # the same initial weights
    for step in (8, 16, 24):
        assert abs(two["yardstick"][step] - one["yardstick"][step]) <= 1e-2, (two["yardstick"], one["yardstick"])
    assert one["yardstick"][24] < one["yardstick"][0] - 0.1  # python documentation the smoke run never read
    assert one["yardstick"] != one["val"]
    assert one["run"].data.tags["fwray.yardstick"] == ("python_docs_val: 124 windows x 32 = 3,968 targets from the "
                                                       f"start of {one['yardstick_file']} (llm.c token file)")
    assert one["run"].data.params["yardstick.path"] == str(one["yardstick_file"])
