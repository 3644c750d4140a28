"""LoRA variants as recipe settings: each trains, saves, reloads with plain peft onto the original base with
the logits training ended with, evaluates, and merges with verification."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch_logits, lorakit, tiny_recipe
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit.evaluate import compare as evaluate
from lorakit.recipe.loading import load_recipe
from lorakit.recipe.schema import Recipe
from lorakit.train.trainer import run as train

VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "gaussian": {"init_lora_weights": "gaussian"},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "patterns": {"rank_pattern": {r"mlp\..*": 4}, "alpha_pattern": {r"mlp\..*": 8}},
    "loraplus": {"loraplus_lr_ratio": 16},
}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    out = {}
    for name, lora in VARIANTS.items():
        recipe = tiny_recipe(tiny_model, tmp_path_factory.mktemp(name) / "run", four_bit=False, steps=6)
        recipe["lora"].update(lora)
        out[name] = train(Recipe.model_validate(recipe), console=Console(stderr=True, quiet=True))
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_reloads_on_the_original_base_evaluates_and_merges(runs, tiny_model, name):
    result = runs[name]
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    trained = batch_logits(result.model, ids)  # the model as training left it (PiSSA/OLoRA: on the moved base)
    reloaded = batch_logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result.run_dir), ids
    )
    base = batch_logits(AutoModelForCausalLM.from_pretrained(tiny_model), ids)
    assert (trained - base).abs().max() > 1e-2  # training moved the model
    assert (reloaded - trained).abs().max() < 1e-3, name
    assert not (result.run_dir / "initial-adapter").exists()
    report = evaluate.run(
        evaluate.resolve(result.run_dir),
        compare_base=False,
        settings=load_recipe(result.run_dir / "recipe.yaml").eval.model_copy(
            update={"max_examples": 4, "max_new_tokens": 8}
        ),
    )
    # the trainer's eval loss averages per batch of packed rows, lorakit's per token: close, not equal
    trained_eval = json.loads((result.run_dir / "manifest.json").read_text())["results"]["eval_loss"]
    assert report["metrics"]["tuned"]["loss"] == pytest.approx(trained_eval, rel=0.02)
    merged = lorakit("merge", str(result.run_dir), "--json", timeout=300)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads(merged.stdout)["verification"]["passed"]


def test_pissa_is_saved_in_its_converted_form(runs, tiny_model):
    """The saved PiSSA adapter is peft's conversion (twice the rank, a plain LoRA config); that it applies to
    the original base is shown by the reload test above."""
    config = json.loads((runs["pissa"].run_dir / "adapter_config.json").read_text())
    assert config["r"] == 2 * 16 and config["init_lora_weights"] is True


def test_rank_and_alpha_patterns_reach_the_adapter(runs):
    config = json.loads((runs["patterns"].run_dir / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r"mlp\..*": 4} and config["alpha_pattern"] == {r"mlp\..*": 8}
    tensors = load_file(runs["patterns"].run_dir / "adapter_model.safetensors")
    shapes = {k: v.shape for k, v in tensors.items() if "lora_A" in k}
    assert all(s[0] == 4 for k, s in shapes.items() if ".mlp." in k)
    assert all(s[0] == 16 for k, s in shapes.items() if ".self_attn." in k)


def test_loraplus_moves_b_faster(runs):
    def b_norm(name):
        tensors = load_file(runs[name].run_dir / "adapter_model.safetensors")
        return sum(v.norm() for k, v in tensors.items() if "lora_B" in k)

    assert b_norm("loraplus") > 2 * b_norm("lora")  # B learns 16x faster; A at the same rate


def test_a_pattern_that_matches_nothing_is_refused(tiny_model, tmp_path, write_recipe):
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    recipe["lora"]["rank_pattern"] = {"mlp": 4}  # names the container, which holds no LoRA layer itself
    out = lorakit("check", str(write_recipe(recipe)))
    assert out.returncode == 2 and "lora.rank_pattern: 'mlp' matches no module" in out.stdout


def test_pissa_on_a_4bit_base_is_refused_in_the_recipe(tiny_model, tmp_path):
    recipe = tiny_recipe(tiny_model, tmp_path / "run", four_bit=True)
    recipe["lora"]["init_lora_weights"] = "pissa_niter_4"
    with pytest.raises(ValueError, match="decomposes the full-precision base weights"):
        Recipe.model_validate(recipe)


def test_data_driven_initialisations_are_refused(tiny_model, tmp_path):
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    recipe["lora"]["init_lora_weights"] = "eva"
    with pytest.raises(ValueError, match="initialises the adapter from activations on the training data"):
        Recipe.model_validate(recipe)
