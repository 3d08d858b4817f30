"""bench/gpu_check.py's --cpu-smoke mode: the GPU check script runs here, so it cannot rot before a GPU runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {"probe", "throughput_tiny", "throughput_tiny-modern", "reference", "nonfinite", "resume",
                             "nonfinite_muon", "resume_muon"}
    assert not [name for name, s in sections.items() if "error" in s]
    assert report["mode"] == "cpu-smoke" and "CUDA only" in report["skipped"]
    assert sections["probe"]["all_verdicts_as_expected"]
    assert all(t["method"] == "cpu-estimate" and t["cap_gb"] == 11.5 for t in sections["probe"]["trials"])
    assert sections["throughput_tiny"]["tokens_per_s"] > 0 and not sections["throughput_tiny"]["host_sync_in_step"]
    assert sections["reference"]["fwray_over_reference"] > 0
    assert sections["throughput_tiny-modern"]["tokens_per_s"] > 0  # Muon reads its skip flag once a step
    for optimizer in ("", "_muon"):
        nonfinite = sections["nonfinite" + optimizer]
        assert nonfinite["flagged"] and nonfinite["weights_unchanged"] and nonfinite["moments_unchanged"]
        # dropout is on in the resume check: equal losses need the checkpoint's random generator state
        resume = sections["resume" + optimizer]
        assert resume["max_loss_difference"] == 0.0 and resume["state_on_cpu"]
