"""Several processes on one machine through torchrun (gloo on CPU): the same recipe, one run directory
written by the main process, one log, the global batch in the summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import tiny_recipe


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
def test_two_processes_train_one_run(tiny_model, tmp_path, write_recipe, four_bit):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tiny_recipe(tiny_model, run_dir, four_bit=four_bit, steps=6, save_steps=3))
    out = subprocess.run([sys.executable, "-m", "lorakit", "train", str(recipe), "--nproc", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_batch"] == 16 and manifest["engine"] == "DDP"
    assert out.stderr.count("lorakit train: done") == 1  # only the main process speaks
    assert "16 (8 per device x 1 accumulation x 2 processes, DDP)" in " ".join(out.stderr.split())
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))  # one writer: no step logged twice
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run_dir)


def test_nproc_refuses_a_bad_recipe_before_starting_processes(tiny_model, tmp_path, write_recipe):
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    recipe["lora"]["rank"] = 8
    out = subprocess.run([sys.executable, "-m", "lorakit", "train", str(write_recipe(recipe)), "--nproc", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean 'lora.r'" in out.stderr and "torch.distributed" not in out.stderr
