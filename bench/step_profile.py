"""Where a step of experiments/4070.yaml's model goes on a GPU: forward + backward, the loss, the optimizers, each
against its baseline in the same run. GPU, torch only:  python bench/step_profile.py  (about 90 s on an H200; JSON in
$OUT or .)

  step_*          fwray's Engine.step (compiled, bf16), at the file's micro-batch, at 1 and 4 micro-steps per step
  fwd_bwd         forward + backward alone: fwray's chunked loss / plain (full logits, one cross-entropy)
  optimizer_*     fwray's Muon + AdamW step; fwray's Muon alone / torch.optim.Muon on the same matrices; AdamW alone
                  for every parameter
  kernels         the profile of one fwray step: CUDA time by kernel, largest first
"""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fwray import config  # noqa: E402
from fwray.core import hardware, optim  # noqa: E402
from fwray.core.engine import Engine  # noqa: E402
from fwray.core.loader import random_batch  # noqa: E402

STEPS = 15
hardware.configure_allocator()
dev = torch.device("cuda", 0)
exp = config.load(ROOT / "experiments" / "4070.yaml")
B = exp.train.batch_size
out: dict = {}
x, y = random_batch(B, exp.model.block_size)
batch = lambda m: (x, y)  # noqa: E731


def timed(fn, n: int = STEPS) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def record(name: str, seconds: float, tokens: int) -> None:
    out[name] = {"ms": seconds * 1e3, "tokens_per_s": tokens / seconds}
    print(name, json.dumps({k: round(v, 2) for k, v in out[name].items()}), flush=True)


train = dataclasses.replace(exp.train, batch_size=B, gradient_accumulation_steps=1, compile=True)
t0 = time.perf_counter()
eng = Engine.build(exp.model, train, dev)
step = [0]


def one():
    step[0] += 1
    eng.step(step[0], batch)


one()
torch.cuda.synchronize()
out["compile_s"] = time.perf_counter() - t0
record("step_accum1", timed(one), B * 1024)
eng.train = dataclasses.replace(train, gradient_accumulation_steps=4)
record("step_accum4", timed(one, 6), 4 * B * 1024)
eng.train = train


def fwd_bwd():
    xd, yd = eng.to_device(x), eng.to_device(y)
    with eng.autocast():
        loss = eng.model(xd, yd)
    loss.backward()


record("fwd_bwd_fwray", timed(fwd_bwd), B * 1024)
raw = eng.raw_model


def plain_loss(xd, yd):
    logits = raw.logits(raw.hidden(xd))
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), yd.reshape(-1))


plain = torch.compile(plain_loss)


def fwd_bwd_plain():
    xd, yd = eng.to_device(x), eng.to_device(y)
    with eng.autocast():
        loss = plain(xd, yd)
    loss.backward()


record("fwd_bwd_plain", timed(fwd_bwd_plain), B * 1024)
flag = torch.zeros((), device=dev)
record("optimizer_muon_adamw", timed(lambda: eng.optimizer.step(1.0, flag, 0.95)), B * 1024)
adamw = optim.make_optimizer(raw, dataclasses.replace(train, optimizer="adamw"))
record("optimizer_adamw_all", timed(lambda: adamw.step(1.0, flag)), B * 1024)
muon = eng.optimizer.optimizers["muon"]
record("optimizer_muon_only", timed(lambda: muon.step()), B * 1024)
torch_muon = torch.optim.Muon(muon.param_groups[0]["params"], lr=optim.MUON_LR, adjust_lr_fn=optim.MUON_ADJUST_LR)
record("optimizer_torch_muon", timed(lambda: torch_muon.step()), B * 1024)
out["muon_speedup_over_torch"] = out["optimizer_torch_muon"]["ms"] / out["optimizer_muon_only"]["ms"]
out["fwd_bwd_fwray_over_plain"] = out["fwd_bwd_plain"]["ms"] / out["fwd_bwd_fwray"]["ms"]
print("muon speed-up over torch's", round(out["muon_speedup_over_torch"], 2),
      "fwray fwd+bwd speed / plain", round(out["fwd_bwd_fwray_over_plain"], 3), flush=True)
del adamw

from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    one()
    torch.cuda.synchronize()
rows = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
total = sum(e.device_time_total for e in rows if not e.key.startswith(("aten::", "Torch-Compiled", "CompiledFunction",
                                                                          "autograd::", "Optimizer", "cuda")))
out["kernels"] = [{"name": e.key[:90], "ms": e.device_time_total / 1e3, "count": e.count} for e in rows[:25]]
out["kernel_ms_total"] = total / 1e3
print(prof.key_averages().table(sort_by="device_time_total", row_limit=25, max_name_column_width=60), flush=True)
Path(os.environ.get("OUT", "."), "step_profile.json").write_text(json.dumps(out, indent=1))
