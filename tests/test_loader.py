"""The loader's window orders on small synthetic shards (pure numpy + torch, no Ray): epoch sampling reads every
window once per epoch in a new order, for any split between workers and accumulation; documents align; random
sampling leaves ~e^-4 of the data unread after 4 epochs' worth of windows, epoch sampling none."""
import numpy as np
import pytest
import torch

from fwray.config import ConfigError, DataConfig
from fwray.core.loader import Batches, SplitTooSmall, TokenShards
from fwray.core.tokens import EOT

BLOCK = 16


def write_docs(path, rng, n_docs, max_len):
    """A shard in fwray's format: EOT, then the document's tokens (never EOT), for each document."""
    docs = []
    for length in rng.integers(1, max_len + 1, n_docs):
        docs += [[EOT], rng.integers(0, EOT, length - 1)]
    tokens = np.concatenate(docs).astype(np.uint16)
    tokens.tofile(path)
    return tokens


@pytest.fixture
def shards(tmp_path):
    """Two files of documents up to 3 windows long, a few hundred tokens each."""
    rng = np.random.default_rng(0)
    return [write_docs(tmp_path / f"{n}.bin", rng, docs, 40) for n, docs in (("a", 30), ("b", 20))], \
        [tmp_path / "a.bin", tmp_path / "b.bin"]


class Reader:
    """Maps every window read back to its (file, offset), by content: independent of the loader's indexing."""

    def __init__(self, tokens: list[np.ndarray]):
        self.tokens = tokens
        self.where = {t[o: o + BLOCK + 1].tobytes(): (f, o)
                      for f, t in enumerate(tokens) for o in range(len(t) - BLOCK)}

    def read(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, int]]:
        assert torch.equal(x[:, 1:], y[:, :-1])
        w = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(np.uint16)
        return [self.where[row.tobytes()] for row in w]

    def run(self, batches: Batches, samples: int) -> list[tuple[int, int]]:
        """The first `samples` windows of the run, in global order (one worker)."""
        out, step = [], 0
        while len(out) < samples:
            for m in range(batches.accumulation):
                out += self.read(*batches.train_batch(step, m))
            step += 1
        return out[:samples]

    def target_counts(self, seen) -> list[np.ndarray]:
        """How often each token position was a target."""
        counts = [np.zeros(len(t) + 1, dtype=np.int64) for t in self.tokens]
        for f, o in seen:
            counts[f][o + 1] += 1
            counts[f][o + 1 + BLOCK] -= 1
        return [np.cumsum(c)[:-1] for c in counts]


def stride_layout(tokens):
    return [(f, o) for f, t in enumerate(tokens) for o in range(0, len(t) - BLOCK, BLOCK)]


def document_layout(tokens):
    """The align rule, written plainly: a window at the first document start; the next at the last document start
    the window read, or, when it read none (a document longer than a window), BLOCK tokens on."""
    out = []
    for f, t in enumerate(tokens):
        starts = [int(p) for p in np.flatnonzero(t == EOT)]
        s = starts[0]
        while s + BLOCK + 1 <= len(t):
            out.append((f, s))
            read = [d for d in starts if s < d <= s + BLOCK]
            s = read[-1] if read else s + BLOCK
    return out


def epoch_batches(files, **kw):
    kw = {"batch_size": 3, "seed": 5, "sampling": "epoch", "accumulation": 2, **kw}
    return Batches.from_files(files, files, BLOCK, **kw)


def test_epoch_reads_every_window_once_in_a_new_order_each_epoch(shards):
    tokens, files = shards
    b = epoch_batches(files)
    layout = stride_layout(tokens)
    n = len(layout)
    assert b.num_windows == n and n % 6 != 0  # 6 samples per step: some batch straddles the epoch boundary
    seen = Reader(tokens).run(b, 3 * n)
    epochs = [seen[e * n: (e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e) == sorted(layout) and len(set(e)) == n
    assert epochs[0] != epochs[1] != epochs[2]
    # stride block_size: every token but each file's first and its unfitted tail is a target once per epoch
    for f, c in enumerate(Reader(tokens).target_counts(epochs[0])):
        end = max(o for g, o in layout if g == f) + BLOCK + 1
        assert c[0] == 0 and (c[1: end] == 1).all() and (c[end:] == 0).all()
    assert b.epochs_read(0) == 0 and b.epochs_read(6 * n) == pytest.approx(6.0)


def test_epoch_batches_are_a_pure_function(shards):
    _, files = shards
    a, b = epoch_batches(files), epoch_batches(files)
    for step, micro in [(40, 1), (0, 0), (7, 1), (1000, 0)]:  # any order: no state, the cache is only a cache
        assert all(torch.equal(u, v) for u, v in zip(a.train_batch(step, micro), b.train_batch(step, micro)))
    other = epoch_batches(files, seed=6)
    assert not torch.equal(a.train_batch(0, 0)[0], other.train_batch(0, 0)[0])
    assert torch.equal(a.val_batch(2)[0], Batches.from_files(files, files, BLOCK, batch_size=3, seed=5).val_batch(2)[0])
    with pytest.raises(ValueError, match="accumulation"):  # micro-step 2 of 2 would read step + 1's samples
        a.train_batch(0, 2)


@pytest.mark.parametrize("align", [False, True])
def test_the_run_reads_the_same_sequence_for_any_split(shards, align):
    """Global micro-batch k of the run is the same for any workers x accumulation, position by position (hence
    as sets per step: 1 worker x 2 micro-steps reads what 2 workers x 1 micro-step read). Rows count as samples,
    so a resume that splits a step's sequences into other micro-batch sizes also reads on where it stopped."""
    _, files = shards
    train = TokenShards(files, BLOCK)

    def sequence(world, accumulation, batch_size, steps):
        ranks = [Batches(train, train, batch_size, seed=5, rank=r, world_size=world, sampling="epoch",
                         align_to_documents=align, accumulation=accumulation) for r in range(world)]
        return torch.cat([ranks[r].train_batch(s, m)[0] for s in range(steps) for m in range(accumulation)
                          for r in range(world)])  # global order: step, then micro-step m * world + rank

    one_by_two = sequence(1, 2, 2, 40)  # 160 samples: past an epoch boundary
    for world, accumulation, batch_size, steps in [(2, 1, 2, 40), (4, 1, 2, 20), (1, 4, 2, 20), (2, 2, 2, 20),
                                                   (1, 1, 4, 40), (2, 1, 1, 80)]:
        assert torch.equal(one_by_two, sequence(world, accumulation, batch_size, steps))


def test_aligned_windows_start_documents(tmp_path):
    rng = np.random.default_rng(1)
    short = [write_docs(tmp_path / f"s{i}.bin", rng, 25, BLOCK) for i in range(2)]  # no document over a window
    files = [tmp_path / "s0.bin", tmp_path / "s1.bin"]
    b = epoch_batches(files, align_to_documents=True)
    layout = document_layout(short)
    assert b.num_windows == len(layout) > 20
    assert (b.train_batch(0, 0)[0][:, 0] == EOT).all()
    seen = Reader(short).run(b, b.num_windows)
    assert sorted(seen) == sorted(layout)
    assert all(short[f][o] == EOT for f, o in seen)


def test_aligned_windows_read_long_documents_to_their_end(shards):
    tokens, files = shards
    b = epoch_batches(files, align_to_documents=True)
    layout = document_layout(tokens)
    assert b.num_windows == len(layout) > len(stride_layout(tokens))  # cut documents are read again
    seen = Reader(tokens).run(b, len(layout))
    assert sorted(seen) == sorted(layout)
    for f, c in enumerate(Reader(tokens).target_counts(seen)):
        end = max(o for g, o in layout if g == f) + BLOCK + 1
        assert (c[1: end] >= 1).all()  # no token is skipped
    # every document is read from its start: whole inside one window, or, if longer, by a window starting there
    for f, t in enumerate(tokens):
        starts = list(np.flatnonzero(t == EOT)) + [len(t)]
        offsets = [o for g, o in seen if g == f]
        for d, e in zip(starts, starts[1:]):
            if e - d > BLOCK:
                assert d in offsets or d + BLOCK + 1 > len(t)
            elif e <= max(offsets) + BLOCK:
                assert any(o <= d and e <= o + BLOCK for o in offsets)
        # and a window starts mid-document only to continue a document longer than a window
        for o in offsets:
            d = max(p for p in starts if p <= o)
            assert o == d or ((o - d) % BLOCK == 0 and starts[starts.index(d) + 1] - d > BLOCK)
    # random sampling draws from the same aligned windows
    r = Batches.from_files(files, files, BLOCK, batch_size=64, seed=5, align_to_documents=True)
    assert set(Reader(tokens).read(*r.train_batch(0, 0))) <= set(layout)


def test_short_shards_are_skipped_and_nothing_fitting_is_an_error(tmp_path, shards):
    tokens, files = shards
    tiny = tmp_path / "tiny.bin"
    np.array([EOT] + [7] * BLOCK, dtype=np.uint16)[:BLOCK].tofile(tiny)  # BLOCK tokens: one short of a window
    with_tiny = epoch_batches([files[0], tiny, files[1]], align_to_documents=True)
    assert with_tiny.num_windows == epoch_batches(files, align_to_documents=True).num_windows
    with pytest.raises(SplitTooSmall, match="fewer than block_size"):
        epoch_batches([tiny])
    no_docs = tmp_path / "nodocs.bin"
    np.arange(100, dtype=np.uint16).tofile(no_docs)
    with pytest.raises(SplitTooSmall, match="no document start"):
        epoch_batches([no_docs], align_to_documents=True)
    assert epoch_batches([no_docs]).num_windows == len(range(0, 100 - BLOCK, BLOCK))


def test_random_sampling_misses_e_to_the_minus_4_after_4_epochs_and_epoch_sampling_none(tmp_path):
    """The motivation: 4 epochs' worth of random windows leave ~e^-4 = 1.8% of the tokens never a target and put
    21% (Poisson(4) >= 6) in 6+ windows; 4 epochs of epoch sampling read every token 4 times."""
    rng = np.random.default_rng(2)
    tokens = [rng.integers(0, EOT, n).astype(np.uint16) for n in (12_000, 8_000)]
    files = []
    for i, t in enumerate(tokens):
        t.tofile(tmp_path / f"{i}.bin")
        files.append(tmp_path / f"{i}.bin")
    reader = Reader(tokens)
    epoch = epoch_batches(files, batch_size=50, accumulation=1)
    n = epoch.num_windows

    def targets(batches):  # each file's first token is never a target, nor its last few in the stride layout
        return np.concatenate([c[1: len(c) - BLOCK] for c in reader.target_counts(reader.run(batches, 4 * n))])

    random = targets(Batches.from_files(files, files, BLOCK, batch_size=50, seed=5))
    assert 0.010 < (random == 0).mean() < 0.028 and 0.15 < (random >= 6).mean() < 0.28
    assert (targets(epoch) == 4).all()


def test_data_sampling_is_validated():
    assert DataConfig().sampling == "random" and DataConfig().align_to_documents is False
    assert DataConfig(sampling="epoch", align_to_documents=True).sampling == "epoch"
    with pytest.raises(ConfigError, match="data.sampling"):
        DataConfig(sampling="shuffle")
