"""`lorakit plan`: the exact terms against bitsandbytes and against a really loaded 4-bit model, parameter
counts against published configs, the verdict and the suggestions, and the command."""

from __future__ import annotations

import json
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from conftest import EXAMPLES, ROOT, lorakit, tiny_recipe

from lorakit.model import base as model_mod
from lorakit.model import engines
from lorakit.model.setup import for_loading, for_plan
from lorakit.preflight import plan as plan_mod
from lorakit.recipe.schema import Recipe

FIXTURES = ROOT / "tests" / "fixtures" / "configs"
# published parameter counts, and LoRA r=16 on all linear layers computed from the shapes by hand
PUBLISHED = {
    "llama-3-8b": 8_030_261_248,
    "llama-2-70b": 68_976_648_192,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
}


def fixture_recipe(name: str, **model) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"name_or_path": str(FIXTURES / name), "load_in_4bit": True, **model},
            "lora": {"r": 16, "target_modules": "all-linear"},
            "data": {"train": str(EXAMPLES / "train.jsonl"), "max_length": 2048},
            "train": {"per_device_train_batch_size": 1},
        }
    )


def lora_by_hand(config: dict, r: int = 16) -> int:
    d, f = config["hidden_size"], config["intermediate_size"]
    kv = d * config["num_key_value_heads"] // config["num_attention_heads"]
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
    return config["num_hidden_layers"] * sum(r * (a + b) for a, b in shapes)


@pytest.mark.parametrize("shape", [(256, 512), (4096, 1024), (100, 33)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_match_bitsandbytes(shape, double_quant):
    packed, state = bnb_functional.quantize_4bit(
        torch.randn(shape, dtype=torch.bfloat16), blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    tensors = [packed, state.absmax, state.code]
    if double_quant:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    assert plan_mod.nf4_bytes(math.prod(shape), double_quant) == sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("double_quant", [True, False])
def test_weight_and_adapter_terms_equal_a_loaded_4bit_model(tiny_model, tmp_path, double_quant):
    recipe = Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "run"))
    recipe.model.quantization.bnb_4bit_use_double_quant = double_quant
    counts = plan_mod.count(recipe)
    planned = for_plan(recipe, engine=engines.Engine(), dtype="float32", fused_loss=False)
    plan = plan_mod.estimate(recipe, counts, planned, processes=1)
    lines = {line.name: line.bytes for line in plan.lines}
    cfg = recipe.model
    loading = for_loading(cfg)
    base = model_mod.prepare_for_training(model_mod.load_base(cfg, loading), loading, False)

    def size(t):
        return t.numel() * t.element_size()

    quantized = 0
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            quantized += size(module.weight.data) + size(state.absmax) + size(state.code)
            if state.nested:
                quantized += size(state.state2.absmax) + size(state.state2.code) + size(state.offset)
    other = sum(size(p) for p in base.parameters() if not isinstance(p, bnb.nn.Params4bit))
    assert lines["base weights (NF4)"] == quantized
    assert lines["base weights (unquantized)"] == other  # fp32 after the QLoRA preparation
    from peft import get_peft_model

    from lorakit.model import peft_methods as methods

    tuned = get_peft_model(base, methods.lora_config(recipe.lora))
    assert counts.lora == sum(p.numel() for p in tuned.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_match_published_configs(name):
    counts = plan_mod.count(fixture_recipe(name))
    assert counts.total == PUBLISHED[name]
    config = json.loads((FIXTURES / name / "config.json").read_text())
    assert counts.lora == lora_by_hand(config)
    assert counts.total - sum(counts.quantized) == 2 * config["vocab_size"] * config["hidden_size"] + (
        2 * config["num_hidden_layers"] + 1
    ) * config["hidden_size"] + (
        config["num_hidden_layers"]
        * (
            config["hidden_size"]
            + 2 * config["hidden_size"] * config["num_key_value_heads"] // config["num_attention_heads"]
        )
        if name == "qwen2.5-7b"
        else 0
    )  # q/k/v biases


def plan_for(name: str, memory_gib: float, **changes) -> plan_mod.MemoryPlan:
    recipe = fixture_recipe(name)
    for section, values in changes.items():
        for key, value in values.items():
            setattr(getattr(recipe, section), key, value)
    counts = plan_mod.count(recipe)
    planned = for_plan(recipe, engine=engines.Engine(), dtype="bfloat16", fused_loss=False)
    plan = plan_mod.estimate(recipe, counts, planned, processes=1, gpu_memory=int(memory_gib * plan_mod.GIB))
    plan.suggestions = plan_mod.suggest(recipe, counts, plan, planned, processes=1, largest_batch=True)
    return plan


def test_verdicts_and_suggestions():
    small = plan_for("llama-3-8b", 24)
    assert small.fits and small.suggestions[-1]["micro_batch"] >= 1
    full = plan_for("llama-3-8b", 24, model={"load_in_4bit": False}, train={"per_device_train_batch_size": 4})
    assert not full.fits  # 16 GB of bf16 weights plus the logits of 4 x 2048 tokens
    assert any(s["change"].startswith("model.load_in_4bit: true") and s["fits"] for s in full.suggestions)
    big = plan_for("llama-2-70b", 24)
    assert not big.fits  # 35 GiB of NF4 weights on one 24 GiB GPU
    offload = [s for s in big.suggestions if s["change"].startswith("FSDP with parameters offloaded")]
    assert offload and offload[0]["fits"]
    # the bigger the micro-batch, the more memory: the search stops where it stops fitting
    largest = small.suggestions[-1]["micro_batch"]
    assert plan_for("llama-3-8b", 24, train={"per_device_train_batch_size": largest * 2}).fits is False


def test_engines_divide_what_they_shard():
    recipe = fixture_recipe("llama-3-8b")
    counts = plan_mod.count(recipe)

    def lines(engine, processes):
        planned = for_plan(recipe, engine=engine, dtype="bfloat16", fused_loss=True)
        return {ln.name: ln.bytes for ln in plan_mod.estimate(recipe, counts, planned, processes=processes).lines}

    one = lines(engines.Engine(), 1)
    fsdp = lines(engines.Engine("fsdp", fsdp_version=2), 4)
    zero2 = lines(engines.Engine("deepspeed", zero_stage=2), 4)
    assert fsdp["base weights (NF4)"] == pytest.approx(one["base weights (NF4)"] / 4, rel=1e-6)
    assert fsdp["activations"] == one["activations"]  # activations are per process
    assert zero2["base weights (NF4)"] == one["base weights (NF4)"]
    assert zero2["optimizer state"] == pytest.approx(fsdp["optimizer state"], rel=1e-6)


def test_plan_command_json_and_exit_code(tiny_model, tmp_path, write_recipe):
    path = write_recipe(tiny_recipe(tiny_model, tmp_path / "run"))
    out = lorakit("plan", str(path), "--gpu-memory", "8GiB", "--json", "--tokens-per-s", "1000")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["fits"] is True and report["parameters"]["lora"] == 262_144
    assert report["time"]["seconds"] > 0 and "1,000 tokens/s per GPU (given)" in report["time"]["basis"]
    tight = lorakit("plan", str(path), "--gpu-memory", "1MiB", "--no-time")
    assert tight.returncode == 3 and "does not fit" in tight.stdout
    bad = lorakit("plan", str(path), "--gpu-memory", "24 parsecs")
    assert bad.returncode == 2 and "--gpu-memory" in bad.stderr
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_time_with_packing_and_max_steps_counts_the_packed_rows(tiny_model, tmp_path):
    """max_steps draw rows: with packing they are trl's packed rows (fewer than the examples), so the run
    covers more epochs of the same tokens than the example count says."""
    from lorakit.data import prepare, stats
    from lorakit.model.base import load_tokenizer

    recipe = Recipe.model_validate(
        tiny_recipe(tiny_model, tmp_path / "run", steps=150, per_device_train_batch_size=2, packing=True)
    )
    plan = plan_mod.run(recipe, gpu_memory=8 * plan_mod.GIB, tokens_per_s=1000)
    prepared = prepare(recipe.data, load_tokenizer(recipe.model), recipe.train.seed)
    packed = stats.packed_rows(prepared.train, recipe.data.max_length)["rows"]
    assert packed < prepared.rows["train"]  # several examples per row
    assert plan.time["rows"] == packed and plan.time["rows_are"] == "packed rows"
    assert plan.time["epochs"] == pytest.approx(150 * 2 / packed)
    assert plan.time["seconds"] == pytest.approx(prepared.train.tokens * 150 * 2 / packed / 1000, rel=1e-3)
    unpacked = plan_mod.run(recipe.model_copy(update={"train": recipe.train.updated(packing=False)}), tokens_per_s=1000)
    assert unpacked.time["rows_are"] == "examples" and unpacked.time["rows"] == prepared.rows["train"]
