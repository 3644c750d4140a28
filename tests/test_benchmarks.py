"""The GPU benchmark program runs end to end in a reduced size on any machine, so it is ready for a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_benchmark_program_runs_in_reduced_size(tmp_path):
    report = tmp_path / "gpu.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_train.py"), "--preset", "cpu-smoke",
                          "--work", str(tmp_path / "work"), "--json", str(report)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(report.read_text())
    for side in ("lorakit", "baseline"):
        row = result[side]
        assert row["tokens_per_s"] > 0 and row["peak_gib"] > 0
        assert row["longest_seq_batch1"] >= result["settings"]["seq"]  # the search ran and the size trains
    assert result["runs"]["lorakit"][0]["kernels"]["packing"] is True  # lorakit ran on its defaults
    assert result["runs"]["baseline"][0]["kernels"]["packing"] is False
    # same random model, same kind of data: the mean losses agree (they are ~ln(vocab) at this size)
    assert abs(result["ratios"]["mean_loss"] - 1) < 0.05, result["ratios"]
