"""`make gpu-check` rehearsed on CPU: the same script runs every stage end to end in its reduced size (the
stages that need CUDA say so), writes each stage's result as it finishes, enforces its caps, and its results
fill the docs sections they are meant for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from conftest import ROOT

from scripts.gpu_check import record
from scripts.gpu_check.runner import Context, Stage, run_stages

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, `make gpu-check` runs at full size")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-check")
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(root / "out"), "--work", str(root / "work")],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
    )
    return root, out


def test_every_stage_runs_reduced_and_those_that_need_cuda_say_so(rehearsal):
    root, out = rehearsal
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = record.load(root / "out")
    assert sorted(results) == list("abcdef")
    for key in "ac":
        assert results[key]["status"] == "passed" and all(c["ok"] for c in results[key]["checks"]), results[key]
        assert results[key]["reduced"] is True
    assert [results[k]["status"] for k in "bf"] == ["skipped", "skipped"]
    assert {results[k]["reason"] for k in "bf"} == {"no CUDA"}
    assert results["e"]["status"] == "skipped" and results["e"]["reason"].startswith("no CUDA")
    summary = (root / "out" / "summary.md").read_text()
    assert summary.count("\n| ") == 7 and "a environment | passed" in summary  # header + one row per stage
    assert summary in out.stdout
    with tarfile.open(root / "out" / "logs.tar.gz") as tar:
        logs = [n for n in tar.getnames() if n.endswith(".log")]
    assert any(n.startswith("logs/c") and n.endswith("-train-interrupted.log") for n in logs)


def test_the_qlora_stage_checks_resume_merges_eval_and_generate(rehearsal):
    c = record.load(rehearsal[0] / "out")["c"]["figures"]
    assert c["train"]["last_losses_mean"] < c["train"]["first_losses_mean"]
    assert c["train"]["optimizer"] == "paged_adamw_8bit" and c["train"]["kernels"]["gradient_checkpointing"]
    assert c["resume"]["bit_exact"] and c["resume"]["adapter_max_abs_diff"] == 0  # CPU, MKL_CBWR: exact
    assert c["resume"]["steps_compared"] == 24 and 9 <= c["resume"]["stopped_at"] < 24
    for policy in ("nf4", "original"):
        merge = c[f"merge_{policy}"]
        assert merge["max_abs_diff"] < 1e-3 < merge["vs_base_max_abs_diff"], merge
    assert c["eval"]["tuned"]["loss"] < c["eval"]["base"]["loss"] and c["generate"]["agree"] == "4/4"


def test_the_speed_stage_runs_the_gpu_benchmark_program(rehearsal):
    d = record.load(rehearsal[0] / "out")["d"]
    assert d["status"] == "passed", d
    found = d["figures"]
    for side in ("lorakit", "baseline"):
        row = found[side]
        assert row["tokens_per_s"] > 0 and row["peak_gib"] > 0 and row["grad_norm_min"] > 0
        assert row["longest_seq_batch1"] >= found["settings"]["seq"]  # the search ran and the size trains
        assert 1 <= len(row["longest_search"]["probes"]) <= found["settings"]["max_probes"]
    assert abs(found["ratios"]["mean_loss"] - 1) < 0.05  # same random model, same kind of data


def test_the_plan_stage_plans_every_measured_run(rehearsal):
    rows = record.load(rehearsal[0] / "out")["e"]["figures"]["rows"]
    assert {r["run"] for r in rows} >= {"straight", "lorakit-run-0"}
    for row in rows:
        assert row["plan_total_gib"] > row["plan_tensors_gib"] > 0
        assert "total_error" not in row  # nothing measured on a GPU


def test_results_fill_the_benchmarks_section_and_reduced_runs_are_not_recorded(rehearsal, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# b\n\n{record.BEGIN}\nold\n{record.END}\n\ntail\n")
    with pytest.raises(SystemExit, match="reduced rehearsal"):
        record.record(rehearsal[0] / "out", store=tmp_path / "store", readme=readme)
    record.record(rehearsal[0] / "out", store=tmp_path / "store", readme=readme, allow_reduced=True)
    text = readme.read_text()
    assert "old" not in text and text.endswith("\ntail\n") and "| d speed | passed" in text
    assert "lorakit / baseline" in text and "QLoRA (stage c)" in text
    assert sorted(p.name for p in (tmp_path / "store").iterdir())[0] == "a-environment.json"
    assert "No GPU run is recorded yet" in record.plan_section(record.load(tmp_path / "store"))


def test_a_stage_past_its_cap_is_stopped_and_the_rest_still_report(tmp_path):
    def slow(ctx: Context) -> None:
        ctx.check("started", True)
        ctx.python("sleeper", "-c", "import time; time.sleep(60)")

    def quick(ctx: Context) -> None:
        ctx.figures["headline"] = {"ran": True}

    stages = [
        Stage("a", "slow", cap=1, reduced_cap=2, body=slow, minimum=0),
        Stage("b", "quick", cap=1, body=quick, minimum=0),
        Stage("c", "late", cap=1, body=quick, minimum=1e6),
    ]
    started = time.monotonic()
    results = run_stages(
        stages, tmp_path / "out", tmp_path / "work", reduced=True, cuda=False, budget=30, env=dict(os.environ)
    )
    assert time.monotonic() - started < 20  # the sleeper's process group was stopped at the cap
    assert [r["status"] for r in results] == ["timed out", "passed", "skipped"]
    assert "ran past" in results[0]["reason"] and results[2]["reason"].startswith("out of time")
    assert json.loads((tmp_path / "out" / "a-slow.json").read_text())["checks"][0]["name"] == "started"
