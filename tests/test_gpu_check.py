"""bench/gpu_check.py: its --cpu-smoke mode (the script runs here, so it cannot rot before a GPU runs it), its budget,
the child process that runs each section (killed at its limit), and the host-sync count."""
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.child import run_in_child  # noqa: E402  (standard library only: a child unpickling this module is quick)


def _gpu_check(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    """The script with ray and mlflow unimportable in it and in every section's process, as on the GPU machine."""
    out, guard = tmp_path / "gpu_check.json", tmp_path / "no_ray"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = sys.modules['mlflow'] = None\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
                           *args], cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(guard), str(ROOT)])})
    return proc, json.loads(out.read_text())


def test_gpu_check_cpu_smoke(tmp_path):
    proc, report = _gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = report["sections"]
    assert list(sections) == ["probe_tiny_b2", "probe_4070-tiny_b2", "throughput_tiny", "reference_tiny",
                              "throughput_4070-tiny", "reference_4070-tiny", "nonfinite_adamw", "nonfinite_muon",
                              "resume_adamw", "resume_muon"]
    assert not [name for name, s in sections.items() if {"error", "killed", "skipped"} & set(s)]
    assert report["mode"] == "cpu-smoke" and "CUDA only" in report["skipped"] and report["device"] is None
    assert len({s["pid"] for s in sections.values()}) == len(sections)  # a process of its own each
    for name in ("probe_tiny_b2", "probe_4070-tiny_b2"):
        assert sections[name]["verdict_as_expected"] and sections[name]["method"] == "cpu-estimate"
        assert sections[name]["cap_gb"] == 11.5
    assert sections["probe_4070-tiny_b2"]["probe_accumulation"] == 2  # experiments/4070.yaml accumulates
    # experiments/4070.yaml's recipe, read from the file: Muon under the speedrun recipe
    speedrun = sections["throughput_4070-tiny"]
    assert speedrun["optimizer"] == "muon" and speedrun["model"]["recipe"] == "speedrun"
    assert speedrun["tokens_per_s"] > 0
    assert speedrun["expected_host_syncs"] == 0 and speedrun["host_syncs"] is None  # counted on CUDA only
    assert sections["throughput_tiny"]["expected_host_syncs"] == 0
    assert sections["reference_tiny"]["fwray_over_reference"] > 0
    for optimizer in ("adamw", "muon"):
        nonfinite = sections["nonfinite_" + optimizer]
        assert nonfinite["flagged"] and nonfinite["weights_unchanged"] and nonfinite["moments_unchanged"]
        resume = sections["resume_" + optimizer]  # dropout on: equal losses need the generators restored
        assert resume["max_loss_difference"] == 0.0 and resume["state_on_cpu"]
    lines = proc.stdout.strip().splitlines()
    assert ["section", "figure", "goal", "held"] in [line.split() for line in lines]
    assert lines[-1].startswith("resume_muon") and lines[-1].split()[-1] == "yes"  # the table is printed last


def test_a_spent_budget_skips_sections_and_says_so(tmp_path):
    proc, report = _gpu_check(tmp_path, "--budget", "0")
    assert proc.returncode == 1  # not every figure came back
    assert report["sections"] and all("budget was spent" in s["skipped"] for s in report["sections"].values())
    last = proc.stdout.strip().splitlines()
    assert last[-1].startswith("resume_muon") and last[-1].split()[-1] == "skipped"


def test_only_the_named_sections_run(tmp_path):
    proc, report = _gpu_check(tmp_path, "--only", "nonfinite_adamw,resume_muon", "--budget", "0")  # none starts
    assert list(report["sections"]) == ["nonfinite_adamw", "resume_muon"]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--only", "nonsense"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "no section nonsense here; sections: probe_tiny_b2" in proc.stderr


def test_budget_gives_each_section_what_is_left_and_none_under_the_minimum():
    from bench.gpu_check import MIN_START_S, Budget

    now = [100.0]
    budget = Budget(60, clock=lambda: now[0])
    assert budget.limit(45) == 45  # its own limit while the budget lasts
    now[0] += 40
    assert budget.limit(45) == 20  # then what is left
    now[0] += 20 - MIN_START_S + 0.5
    assert budget.limit(45) is None and "budget was spent" in budget.skipped()["skipped"]


def _sleep_with_a_grandchild(pid_file: str) -> dict:
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(pid_file).write_text(f"{os.getpid()} {grandchild.pid}")
    time.sleep(600)
    return {}


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for its parent: it holds no memory (no GPU memory either)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_a_child_past_its_limit_is_killed_with_what_it_started(tmp_path):
    pid_file = tmp_path / "pids"
    result = run_in_child(_sleep_with_a_grandchild, (str(pid_file),), limit_s=4)
    assert "ran past its 4 s limit" in result["killed"]
    child, grandchild = map(int, pid_file.read_text().split())
    assert child == result["pid"]
    assert _gone(child)  # reaped before run_in_child returned
    deadline = time.monotonic() + 30  # the grandchild, killed with the group, is reaped by whoever adopted it
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild)


def test_a_child_that_raises_or_dies_is_an_error_not_a_crash():
    raised = run_in_child(int, ("not a number",), limit_s=60)
    assert raised["error"].startswith("ValueError") and "Traceback" in raised["traceback"]
    died = run_in_child(os._exit, (3,), limit_s=60)
    assert "exit code 3" in died["error"]
    assert run_in_child(dict, (), limit_s=60)["seconds"] >= 0


def test_host_syncs_are_counted_from_torchs_warning():
    from bench.gpu_sections import SYNC_WARNING, count_sync_warnings, counting_host_syncs

    # torch (c10/cuda/CUDAFunctions.cpp) warns through TORCH_WARN: Python sees a UserWarning with the C++ location
    # appended; every sync counts, even from one source line
    with counting_host_syncs(cuda=False) as syncs:
        for _ in range(3):
            warnings.warn(f"{SYNC_WARNING} (Triggered internally at CUDAFunctions.cpp:160.)", UserWarning)
    assert syncs.count == 3
    with warnings.catch_warnings(record=True) as passed_on:
        warnings.simplefilter("always")
        with counting_host_syncs(cuda=False) as syncs:
            warnings.warn("something else", UserWarning)
            warnings.warn(SYNC_WARNING, DeprecationWarning)  # another category: not torch's
    assert syncs.count == 0 and len(passed_on) == 2  # other warnings are not swallowed
    assert count_sync_warnings(passed_on) == 0
