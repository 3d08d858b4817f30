"""The GPU check: fwray's CUDA paths run and measured on one GPU, with torch alone (no Ray, no MLflow).

  python bench/gpu_check.py                 # on a GPU machine: every figure within 6 minutes on an H100/H200
  python bench/gpu_check.py --cpu-smoke     # tiny shapes on the CPU; CUDA-only figures are None and say so
  python bench/gpu_check.py --only throughput_4070,reference_4070   # those sections alone (names as in the table)

Each section runs in a fresh process of its own (bench/child.py) under its own time limit, so a crash or a hang
costs that section alone; this process never initialises CUDA, so each section's card memory is its own. Sections
run most valuable first and are skipped, said so, once the budget (--budget) is spent. The JSON report (--out) is
rewritten atomically after every section; a short table (section, figure, goal, held) is printed last.
  probe_*         fwray.probe.trial.measure as a probe trial runs it, under a 12 GB card's cap: the verdict, predicted
                  (CPU estimate) vs measured peak, reserved vs allocated, an OOM that is a verdict
  throughput_*    the 124M preset and experiments/4070.yaml's model (read from the file), bf16, compiled, each with
                  its own optimizer: compile seconds cold and warm, tokens/s, MFU, peak memory, host syncs counted
                  in the timed steps, no recompile after an evaluation, attention kernels and pinned copies
  reference_*     a plain loop over the same model and optimizer with nanoGPT's loss: fwray's tokens/s / its
  nonfinite_*, resume_*   AdamW and Muon: a non-finite step skipped on the device; a resumed run's losses exact
  probe_4070_b*_compiled  the probe trial compiled (last: it costs a compile)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import gpu_sections as sections  # noqa: E402
from bench.child import run_in_child  # noqa: E402
from fwray.core import hardware, tokens  # noqa: E402

GPU_BUDGET_S = 330  # the sections' share of 6 minutes (this process's start, a last kill's grace, the table)
CPU_BUDGET_S = 1800  # the smoke test on a slow shared CPU: nothing is meant to be skipped there
MIN_START_S = 5  # a section is not started with less left: it could not finish
GPU_LIMITS_S = {"probe": 60, "throughput": 150, "reference": 100, "check": 45, "probe_compiled": 120}
CPU_LIMIT_S = 600


@dataclass(frozen=True)
class Section:
    name: str
    fn: Callable[..., dict]
    args: tuple
    limit_s: float


def plan(cuda: bool, steps: int) -> list[Section]:
    """The sections, most valuable first: probe verdicts and peaks; throughput and its reference ratio for the 124M
    preset and experiments/4070.yaml's model; the non-finite and resume checks under AdamW and Muon; the rest."""
    if cuda:
        b4070 = sections.BATCH_4070
        probes = [("124m", 16, "fits"), ("124m", 32, "oom"), ("4070", b4070, "fits")]
        shapes = [("124m", 12), ("4070", b4070)]
    else:
        probes, shapes = [("tiny", 2, "fits"), ("4070-tiny", 2, "fits")], [("tiny", 4), ("4070-tiny", 4)]

    def limit(kind: str) -> float:
        return GPU_LIMITS_S[kind] if cuda else CPU_LIMIT_S

    out = [Section(f"probe_{shape}_b{b}", sections.probe_trial, (shape, b, False, expected, cuda), limit("probe"))
           for shape, b, expected in probes]
    for shape, b in shapes:
        out += [Section(f"throughput_{shape}", sections.throughput, (shape, b, steps, cuda), limit("throughput")),
                Section(f"reference_{shape}", sections.reference, (shape, b, steps, cuda), limit("reference"))]
    for check in (sections.nonfinite, sections.resume):
        out += [Section(f"{check.__name__}_{opt}", check, (opt, cuda), limit("check")) for opt in ("adamw", "muon")]
    if cuda:
        out.append(Section(f"probe_4070_b{sections.BATCH_4070}_compiled", sections.probe_trial,
                           ("4070", sections.BATCH_4070, True, "fits", cuda),
                           limit("probe_compiled")))
    return out


class Budget:
    """Seconds left for the sections: each runs under min(its own limit, what is left), none with under
    MIN_START_S left."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.deadline = clock() + seconds

    def left(self) -> float:
        return self.deadline - self.clock()

    def limit(self, section_limit_s: float) -> float | None:
        """The limit a section runs under now, or None: skip it."""
        left = self.left()
        return None if left < MIN_START_S else min(section_limit_s, left)

    def skipped(self) -> dict:
        return {"skipped": f"the {self.seconds:.0f} s budget was spent ({max(0.0, self.left()):.0f} s left; a "
                           f"section needs {MIN_START_S} s)"}


class Report:
    """The JSON report, rewritten whole (atomically) after every section."""

    def __init__(self, path: Path, mode: str, budget_s: float):
        self.path = path
        self.data = {"mode": mode, "torch": torch.__version__, "python": platform.python_version(),
                     "device": None,  # from the sections: this process never initialises CUDA
                     # as the sections' processes found them (torch's effective settings, not the environment):
                     # the allocator's configuration and the attention kernel the probe's capped trials ran
                     "allocator": None, "sdpa_backend": None,
                     "budget_s": budget_s, "compile_note": sections.COMPILE_NOTE, "sections": {}}

    def add(self, name: str, result: dict) -> None:
        self.data["sections"][name] = result
        if result.get("device") and result["device"] != "cpu":
            self.data["device"] = self.data["device"] or result["device"]
        for key in ("allocator", "sdpa_backend"):  # as the first section that records it found it
            self.data[key] = self.data[key] or result.get(key)
        shown = {k: v for k, v in result.items() if k not in ("checks", "traceback", "model")}
        print(json.dumps(shown, default=str)[:1500], flush=True)
        if "traceback" in result:
            print(result["traceback"], flush=True)
        self.write()

    def write(self) -> None:
        tokens.write_atomic(self.path, json.dumps(self.data, indent=1, default=str).encode())

    def failed(self) -> list[str]:
        return [n for n, s in self.data["sections"].items() if {"error", "killed", "skipped"} & set(s)]


def with_ratio(report: Report, name: str, ref: dict) -> dict:
    """A reference section's result with fwray's tokens/s over its own (its throughput section ran before it)."""
    ours = report.data["sections"].get(name.replace("reference_", "throughput_"), {}).get("tokens_per_s")
    if "tokens_per_s" not in ref:
        return ref
    ratio = ours / ref["tokens_per_s"] if ours else None
    row = sections.check(f"fwray / reference tokens/s {ratio:.3f}" if ratio else "fwray / reference: no fwray figure",
                         ratio, ">= 1.0", ratio >= 1.0 if ratio else False)
    return {**ref, "fwray_tokens_per_s": ours, "fwray_over_reference": ratio, "checks": [row]}


def table(report: Report) -> str:
    rows = [("section", "figure", "goal", "held")]
    for name, s in report.data["sections"].items():
        trouble = s.get("skipped") or s.get("killed") or s.get("error")
        if trouble:
            held = "skipped" if "skipped" in s else "no"
            rows.append((name, trouble.splitlines()[0][:70], "-", held))
        for c in s.get("checks", []):
            rows.append((name, c["figure"][:70], c["goal"][:40], {True: "yes", False: "no", None: "-"}[c["held"]]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU; CUDA-only figures are None")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on a GPU, 3 on the CPU)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for all sections (default {GPU_BUDGET_S} on a GPU, {CPU_BUDGET_S} on the CPU)")
    p.add_argument("--only", default=None, help="comma-separated section names: run those alone")
    args = p.parse_args(argv)
    hardware.configure_allocator()  # before any section starts: they inherit the allocator the probe and training use
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():  # asks the driver for a count: no CUDA context here
        print("gpu_check: no CUDA device here; run with --cpu-smoke on a machine without a GPU", file=sys.stderr)
        return 2
    steps = args.steps or (30 if cuda else 3)
    budget = Budget(args.budget if args.budget is not None else GPU_BUDGET_S if cuda else CPU_BUDGET_S)
    report = Report(Path(args.out), "cuda" if cuda else "cpu-smoke", budget.seconds)
    if not cuda:
        report.data["skipped"] = ("CUDA only: probe trials under a CUDA cap (the CPU estimate runs instead), "
                                  "compilation (cold and warm), MFU, host-sync counting, attention kernels and the "
                                  "pinned-copy profile, the compiled probe trial")
    sections_run = plan(cuda, steps)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in sections_run})
        if unknown:
            print(f"gpu_check: no section {', '.join(unknown)} here; sections: "
                  f"{', '.join(s.name for s in sections_run)}", file=sys.stderr)
            return 2
        sections_run = [s for s in sections_run if s.name in wanted]
    for section in sections_run:
        limit = budget.limit(section.limit_s)
        if limit is None:
            result = budget.skipped()
        else:
            print(f"== {section.name} (limit {limit:.0f} s)", flush=True)
            result = run_in_child(section.fn, section.args, limit)
            if section.name.startswith("reference_"):
                result = with_ratio(report, section.name, result)
        report.add(section.name, result)
    failed = report.failed()
    print(f"gpu_check: report in {args.out}; sections with errors, killed or skipped: {failed or 'none'}\n")
    print(table(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
