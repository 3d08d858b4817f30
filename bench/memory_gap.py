"""experiments/4070.yaml's model at its micro-batch x 2 micro-steps: the CUDA peak of two training steps and of one
evaluation forward against fwray.core.memory's CPU estimate of the same, for the model as written and variants of the
ops whose dtype CUDA autocast and CPU autocast choose differently (CUDA runs pow/square and rms_norm in fp32, CPU in
bf16): ReLU^2 as fwray writes it (r * r, bf16 under either) and as square() (fp32 on CUDA only), the queries' and
keys' RMSNorm in bf16 outside autocast; the model with value embeddings on (their tables' weights, gradients and
AdamW moments, which decide whether speedrun can turn them on at 12 x 768); GPT-2 124M is the baseline the estimate
was tuned on.
GPU, torch only:  python bench/memory_gap.py   (about 50 s on an H200; JSON in $OUT or .)"""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch
from fwray import config
from fwray.core import hardware, memory
from fwray.core.engine import Engine
from fwray.core import layers
from fwray.core.loader import random_batch
import torch.nn.functional as F

hardware.configure_allocator()
exp = config.load(ROOT / "experiments" / "4070.yaml")
B, ACC = exp.train.batch_size, 2
GIB = 2**30
# value_embeds_3: modded-nanogpt's 3 tables, off in the file for memory (the estimate: +1.9 GB at this micro-batch)
variants = {"default": ({}, {}), "square": ({}, {}), "qk_bf16": ({}, {}), "value_embeds_3": ({"value_embeds": 3}, {}),
            "gpt2-124m": ("gpt2", {"optimizer": "adamw"})}
relu_forward, rms_forward = layers.ReLUSquared.forward, torch.nn.RMSNorm.forward


def square(self, x):
    return F.relu(x).square()


def rms_bf16(self, x):
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, self.normalized_shape, None, self.eps)


def patch(name):
    layers.ReLUSquared.forward = square if name == "square" else relu_forward
    torch.nn.RMSNorm.forward = rms_bf16 if name == "qk_bf16" else rms_forward


out = {}
dev = torch.device("cuda", 0)
torch.zeros(1, device=dev)  # CUDA initialised before its memory statistics are read
for name, (mchg, tchg) in variants.items():
    patch(name)
    if mchg == "gpt2":
        model = config.ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    else:
        model = dataclasses.replace(exp.model, **mchg)
    train = dataclasses.replace(exp.train, batch_size=B, gradient_accumulation_steps=ACC, compile=False, **tchg)
    t0 = time.time()
    est = memory.estimate_peak_bytes(model, train, B, accumulation=ACC)
    t_est = time.time() - t0
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)
    eng = Engine.build(model, train, dev, compile=False)
    x, y = random_batch(B, model.block_size)
    for s in range(2):
        eng.step(s, lambda m: (x, y))
    torch.cuda.synchronize()
    train_peak = torch.cuda.max_memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    eng.evaluate(lambda i: (x, y), 1)
    eval_peak = torch.cuda.max_memory_allocated(dev)
    params = sum(p.numel() * p.element_size() for p in eng.raw_model.parameters())
    out[name] = {"est_train_gb": est["train_peak"] / GIB, "est_eval_gb": est["eval_peak"] / GIB, "est_params_gb": est["params"] / GIB,
                 "cuda_train_gb": train_peak / GIB, "cuda_eval_gb": eval_peak / GIB, "params_gb": params / GIB,
                 "train_err": est["train_peak"] / train_peak - 1, "est_s": t_est}
    print(name, json.dumps({k: round(v, 3) for k, v in out[name].items()}), flush=True)
    del eng; torch.cuda.empty_cache()
Path(os.environ.get("OUT", "."), "memory_gap.json").write_text(json.dumps(out, indent=1))
