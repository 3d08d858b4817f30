"""Evaluation: per-target losses, bits per byte against a hand count, HellaSwag scoring with a known answer, and
`python -m fwray.eval` on saved models (no Ray), its one-line errors and what it logs to an MLflow run."""
import math

import pytest
import torch
import torch.nn.functional as F

from fwray import bpb, config, engine, tokens
from fwray.model import GPT

TINY = config.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)


def test_loss_sums_leave_eot_targets_out_of_the_text_loss():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, 50257, (3, 16))
    y = torch.randint(0, 50257, (3, 16))
    y[0, 3] = y[1, 0] = y[2, 15] = tokens.EOT  # documents ending inside the windows
    with torch.no_grad():
        plain = F.cross_entropy(model.logits(model.hidden(x)).flatten(0, 1), y.flatten(), reduction="none")
        val = engine.ValLoss.of(engine.loss_sums(model, x, y))
        assert model(x, y).item() == pytest.approx(plain.mean().item(), rel=1e-6)  # the loss the engine trains on
    text = y.flatten() != tokens.EOT
    assert val.loss == pytest.approx(plain.mean().item(), rel=1e-6)
    assert val.text_loss == pytest.approx(plain[text].mean().item(), rel=1e-6)
    assert val.text_loss != pytest.approx(val.loss, rel=1e-6)


def test_bits_per_byte_is_nats_over_ln2_times_tokens_over_bytes():
    assert bpb.bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert bpb.bits_per_byte(2.0, 300, 1200) == pytest.approx(2.0 / math.log(2) / 4)
    manifest = {"splits": {"val": {"documents": 3, "tokens": 40, "bytes": 120}}}
    assert bpb.text_counts(manifest) == (37, 120)  # one EOT per document is no text
    manifest["splits"]["val"].pop("bytes")
    assert bpb.text_counts(manifest) is None  # a cache prepared before bytes were counted: no bpb


def test_progress_line_and_loss_curve_show_bpb():
    import struct

    from fwray.artifacts import loss_curve_png
    from fwray.trainer import progress_line

    assert progress_line(40, 40, {"val_loss": 3.21012, "val_bpb": 1.05123}) == "step 40/40 | val loss 3.2101 | bpb 1.0512"
    assert progress_line(40, 40, {"val_loss": 3.21012}) == "step 40/40 | val loss 3.2101"  # a cache without bytes

    def height(png: bytes) -> int:  # the IHDR chunk: width, height
        return struct.unpack(">II", png[16:24])[1]

    history = {"train_loss": {10: 9.0, 20: 8.0}, "val_loss": {0: 10.9, 20: 8.1}}
    one = loss_curve_png(history, 1024)
    two = loss_curve_png({**history, "val_bpb": {0: 3.9, 20: 2.9}}, 1024)
    assert height(two) > height(one)  # a second panel for bits per byte
