"""Several processes on one machine through torchrun (gloo on CPU): the same recipe, one run directory
written by the main process, one log, the global batch in the summary."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lorakit, losses, preference_recipe, tiny_recipe
from peft import PeftModel
from transformers import AutoModelForCausalLM


def _logits(model_dir, adapter_dir, ids):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir else base
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
def test_two_processes_train_one_run_that_matches_one_process(tiny_model, tmp_path, write_recipe, four_bit):
    """2 processes x 4 examples and 1 process x 8 examples: the same global batch, seed and data order.
    Tolerance: per-step losses within 1e-4 and eval loss within 1e-3 (relative); the two adapters' logits
    differ by less than 5% of how far training moved the logits from the base (measured: 1.4% LoRA,
    0.1% QLoRA; Adam turns reduction-order noise in near-zero gradients into full-size first steps)."""
    run_dir, single_dir = tmp_path / "run", tmp_path / "single"
    # the QLoRA case names its backend (gloo, the CPU default): the process group is then built with it first
    recipe = write_recipe(
        tiny_recipe(
            tiny_model,
            run_dir,
            four_bit=four_bit,
            steps=6,
            save_steps=3,
            per_device_train_batch_size=4,
            **({"ddp_backend": "gloo"} if four_bit else {}),
        )
    )
    single = write_recipe(
        tiny_recipe(tiny_model, single_dir, four_bit=four_bit, steps=6, per_device_train_batch_size=8), name="single"
    )
    out = lorakit("train", str(recipe), "--nproc", "2", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_batch"] == 8 and manifest["engine"] == "DDP"
    assert out.stderr.count("lorakit train: done") == 1  # only the main process speaks
    assert "8 (4 per device x 1 accumulation x 2 processes, DDP)" in " ".join(out.stderr.split())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps))  # one writer: no step logged twice
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    solo = lorakit("train", str(single), timeout=600)
    assert solo.returncode == 0, solo.stderr[-3000:]
    ddp, solo_losses = losses(run_dir), losses(single_dir)
    assert ddp.keys() == solo_losses.keys()
    assert all(abs(ddp[s] - solo_losses[s]) <= 1e-4 * abs(solo_losses[s]) for s in ddp), (ddp, solo_losses)
    solo_eval = json.loads((single_dir / "manifest.json").read_text())["results"]["eval_loss"]
    assert abs(manifest["results"]["eval_loss"] - solo_eval) <= 1e-3 * solo_eval

    ids = torch.randint(3, 200, (4, 40), generator=torch.Generator().manual_seed(0))
    base, two, one = (_logits(tiny_model, d, ids) for d in (None, run_dir, single_dir))
    moved = (one - base).abs().max().item()
    assert moved > 0.1  # training changed the model, so the comparison means something
    assert (two - one).abs().max().item() < 0.05 * moved


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_preference_objectives_train_under_ddp(tiny_model, tmp_path, write_recipe, objective):
    """DPO under DDP (2 processes x 2 pairs) matches one process x 4 pairs step for step (losses within 1e-4,
    relative): each pair's loss is its own, the reference is each process's own model with the adapter off.
    KTO's loss is not a sum over examples (its KL baseline and the desirable/undesirable means are taken over
    the micro-batch), so under DDP it trains a close relative of the one-process run: it runs, one writer,
    its losses finite and moving off the reference's, the manifest says DDP."""
    unpaired = objective == "kto"
    train = {"steps": 6, "logging_steps": 1, "learning_rate": 1e-3}
    two = preference_recipe(tiny_model, tmp_path / "two", objective, unpaired=unpaired, **train)
    two["train"]["per_device_train_batch_size"] = 2
    out = lorakit("train", str(write_recipe(two)), "--nproc", "2", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_batch"] == 4 and manifest["engine"] == "DDP"
    assert manifest["objective"]["name"] == objective and out.stderr.count("lorakit train: done") == 1
    logged = losses(tmp_path / "two")
    assert sorted(logged) == list(range(1, 7)) and all(torch.isfinite(torch.tensor(list(logged.values()))))
    assert abs(logged[6] - logged[1]) > 1e-3, logged  # the adapter moved off the reference
    if objective == "kto":
        return
    # the one-process run evaluates only at its end, by lorakit itself (no evaluation of the trainer's to read)
    one = preference_recipe(tiny_model, tmp_path / "one", objective, eval_strategy="no", **train)
    one["train"]["per_device_train_batch_size"] = 4
    solo = lorakit("train", str(write_recipe(one, name="one")), timeout=600)
    assert solo.returncode == 0, solo.stderr[-3000:]
    alone = losses(tmp_path / "one")
    assert all(abs(logged[s] - alone[s]) <= 1e-4 * abs(alone[s]) for s in logged), (logged, alone)
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_loss" in r]
    results = json.loads((tmp_path / "one" / "manifest.json").read_text())["results"]
    assert [r["step"] for r in evaluations] == [6] and 0 <= results["eval_reward_accuracy"] <= 1


def test_nproc_refuses_a_bad_recipe_before_starting_processes(tiny_model, tmp_path, write_recipe):
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    recipe["lora"]["rank"] = 8
    out = lorakit("train", str(write_recipe(recipe)), "--nproc", "2")
    assert out.returncode == 2 and "did you mean 'lora.r'" in out.stderr and "torch.distributed" not in out.stderr


def test_nccl_without_gpus_is_refused_before_starting_processes(tiny_model, tmp_path, write_recipe):
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without GPUs")
    recipe = write_recipe(tiny_recipe(tiny_model, tmp_path / "run"))
    out = lorakit("train", str(recipe), "--nproc", "2", "--set", "train.ddp_backend=nccl")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train.ddp_backend: nccl needs CUDA GPUs" in out.stderr and "torch.distributed" not in out.stderr
    assert not (tmp_path / "run").exists()
