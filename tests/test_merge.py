"""`lorakit merge` on the tiny model: merged logits equal base + adapter (LoRA, QLoRA both ways, DoRA,
rsLoRA, added tokens), the merge changes the base, the output is a plain transformers checkpoint, and
what cannot be merged is refused with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import EXAMPLES, IDS, logits, lorakit, max_diff, tiny_recipe
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.errors import LorakitError, ModelError, RunFailed
from lorakit.merge import fold as merge_mod
from lorakit.model import base as model_mod
from lorakit.model.setup import for_loading
from lorakit.recipe.schema import ModelConfig, Recipe
from lorakit.train.trainer import run as train


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Short training runs whose adapters differ clearly from zero."""
    root = tmp_path_factory.mktemp("merge-runs")
    made = {}
    for name, four_bit, lora in (
        ("lora", False, {}),
        ("qlora", True, {}),
        ("dora", False, {"use_dora": True}),
        ("rslora", False, {"use_rslora": True}),
    ):
        recipe = tiny_recipe(tiny_model, root / name, four_bit=four_bit, steps=8)
        recipe["lora"].update(lora)
        made[name] = train(Recipe.model_validate(recipe)).run_dir
    return made


def reference(tiny_model, run_dir, four_bit=False):
    cfg = ModelConfig(name_or_path=str(tiny_model), load_in_4bit=four_bit)
    base = model_mod.load_base(cfg, for_loading(cfg, precision=model_mod.Precision("float32", "cpu")))
    return logits(PeftModel.from_pretrained(base, run_dir))


def merged_logits(path):
    return logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))


@pytest.mark.parametrize("name", ["lora", "dora", "rslora"])
def test_merged_equals_base_plus_adapter(runs, tiny_model, tmp_path, name):
    out = tmp_path / "merged"
    report = merge_mod.run(merge_mod.plan(runs[name], output=str(out)))
    check = report["verification"]
    assert check["passed"] and check["merged_vs_reference"]["max_abs_diff"] < 1e-4
    assert report["lora_layers_merged"] == 28 and report["merge_into"] == "original"
    # independently of the report: reload the folder with plain transformers
    ours = merged_logits(out)
    assert max_diff(ours, reference(tiny_model, runs[name])) < 1e-4
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
    assert max_diff(ours, base) > 1e-2  # the merge changed the model


def test_qlora_merges_into_nf4_weights_by_default_and_original_on_request(runs, tiny_model, tmp_path):
    nf4 = merge_mod.run(merge_mod.plan(runs["qlora"], output=str(tmp_path / "nf4")))
    assert nf4["merge_into"] == "nf4" and nf4["weights_nf4_round_tripped"] == 28
    assert max_diff(merged_logits(tmp_path / "nf4"), reference(tiny_model, runs["qlora"], four_bit=True)) < 1e-4
    original = merge_mod.run(merge_mod.plan(runs["qlora"], output=str(tmp_path / "orig"), merge_into="original"))
    assert original["weights_nf4_round_tripped"] == 0
    ours = merged_logits(tmp_path / "orig")
    assert max_diff(ours, reference(tiny_model, runs["qlora"])) < 1e-4
    trained = original["verification"]["merged_vs_training"]  # the trade-off is measured and reported
    assert trained["max_abs_diff"] > 1e-3
    assert "merged into: **original**" in (tmp_path / "orig" / "README.md").read_text().lower()


def test_merged_folder_is_a_standard_checkpoint_with_the_runs_template_and_stop_token(runs, tmp_path):
    out = lorakit("merge", str(runs["lora"]), "--output", str(tmp_path / "m"), "--dtype", "bfloat16", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["verification"]["passed"]
    assert "merge verification" in out.stderr and "bare base (must differ)" in out.stderr
    folder = tmp_path / "m"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and not hasattr(model, "peft_config")
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == (runs["lora"] / "chat_template.jinja").read_text()
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert json.loads((folder / "merge_report.json").read_text())["dtype"] == "bfloat16"


def test_many_shards_stream_into_as_many_shards(runs, tiny_model, tmp_path):
    sharded = tmp_path / "sharded-base"
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(sharded, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(sharded)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 5
    report = merge_mod.run(merge_mod.plan(runs["lora"], output=str(tmp_path / "m"), base=str(sharded)))
    assert report["shards"] == len(shards) and report["verification"]["passed"]
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert max_diff(merged_logits(tmp_path / "m"), reference(tiny_model, runs["lora"])) < 1e-4


def copy_run(run_dir, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints", "merged"))
    return target


def test_nan_adapter_is_refused(runs, tmp_path):
    broken = copy_run(runs["lora"], tmp_path)
    state = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in state if "lora_B" in k)
    state[key][0, 0] = float("nan")
    save_file(state, broken / "adapter_model.safetensors")
    out = lorakit("merge", str(broken), "--accept-changed-adapter")  # past the hash check, to the NaN one
    assert out.returncode == 2 and f"the adapter holds NaN or inf values (first: {key})" in out.stderr
    assert not (broken / "merged").exists()


def test_adapter_for_another_base_is_refused(runs, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    config = LlamaConfig(
        vocab_size=429,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(other)
    with pytest.raises(ModelError, match=r"the adapter does not fit .*other-base"):
        merge_mod.run(merge_mod.plan(runs["lora"], output=str(tmp_path / "m"), base=str(other)))
    assert not (tmp_path / "m").exists()


def test_an_adapter_that_changes_nothing_fails_verification_and_keeps_nothing(runs, tmp_path):
    zero = copy_run(runs["lora"], tmp_path)
    state = load_file(zero / "adapter_model.safetensors")
    save_file(
        {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}, zero / "adapter_model.safetensors"
    )
    with pytest.raises(RunFailed, match="the merged model equals the base"):
        merge_mod.run(merge_mod.plan(zero, accept_changed_adapter=True))  # past the hash check, to verification
    assert not (zero / "merged").exists() and not list(zero.glob(".merged.partial-*"))
    assert json.loads((zero / "merge_report.failed.json").read_text())["verification"]["passed"] is False


def test_existing_output_is_not_overwritten(runs, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LorakitError, match="exists; pass --overwrite"):
        merge_mod.plan(runs["lora"], output=str(out))
    with pytest.raises(LorakitError, match="is not a lorakit merge"):
        merge_mod.plan(runs["lora"], output=str(out), overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(LorakitError, match="--merge-into nf4 is for QLoRA runs"):
        merge_mod.plan(runs["lora"], output=str(tmp_path / "x"), merge_into="nf4")


def test_tokens_added_in_training_merge_with_the_resized_embeddings(tiny_model, tmp_path):
    """An adapter trained after adding tokens (embeddings resized, embed_tokens and lm_head saved)."""
    run_dir = tmp_path / "added-tokens"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|end_tool|>"]})
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    torch.manual_seed(0)
    model = get_peft_model(
        base,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["embed_tokens", "lm_head"],
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():  # trained rows for the new tokens
        model.base_model.model.model.embed_tokens.modules_to_save["default"].weight[-2:].normal_()
    model.save_pretrained(run_dir)
    tok.save_pretrained(run_dir)
    recipe = Recipe.model_validate(tiny_recipe(tiny_model, run_dir, four_bit=False))
    (run_dir / "recipe.yaml").write_text(json.dumps(recipe.to_saved_dict()))
    (run_dir / "manifest.json").write_text(json.dumps({"status": "complete", "precision": "float32"}))
    expected = logits(model, IDS + [[0, 1, 429, 430, 2]])
    report = merge_mod.run(merge_mod.plan(run_dir, output=str(tmp_path / "m")))
    assert report["tensors_replaced"] == 2 and report["verification"]["passed"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert merged.config.vocab_size == 431 and len(AutoTokenizer.from_pretrained(tmp_path / "m")) == 431
    assert max_diff(logits(merged, IDS + [[0, 1, 429, 430, 2]]), expected) < 1e-4


def test_cli_refuses_bad_options_before_loading(runs):
    out = lorakit("merge", str(runs["lora"]), "--merge-into", "fp8")
    assert out.returncode == 2 and "--merge-into: expected nf4 or original" in out.stderr
    out = lorakit("merge", str(EXAMPLES))
    assert out.returncode == 2 and "is not a lorakit run" in out.stderr


def handmade_run(tiny_model, tmp_path, base_dir, model, tokenizer_dir=None):
    """A run directory around an adapter made with peft directly (for layouts lorakit's train does not make)."""
    run_dir = tmp_path / "handmade"
    model.save_pretrained(run_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir or tiny_model).save_pretrained(run_dir)
    recipe = Recipe.model_validate(tiny_recipe(base_dir, run_dir, four_bit=False))
    (run_dir / "recipe.yaml").write_text(json.dumps(recipe.to_saved_dict()))
    (run_dir / "manifest.json").write_text(json.dumps({"status": "complete", "precision": "float32"}))
    return run_dir


def test_trained_biases_merge(tiny_model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_model)
    config.attention_bias = True
    torch.manual_seed(0)
    base_dir = tmp_path / "biased-base"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(r=8, target_modules=["q_proj", "v_proj"], bias="all", init_lora_weights=False),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.add_(0.5)  # trained biases
    expected = logits(model)
    run_dir = handmade_run(tiny_model, tmp_path, base_dir, model)
    report = merge_mod.run(merge_mod.plan(run_dir, output=str(tmp_path / "m")))
    assert report["tensors_replaced"] > 0 and report["verification"]["passed"]
    assert max_diff(merged_logits(tmp_path / "m"), expected) < 1e-4


def test_an_adapter_missing_a_tensor_is_refused(runs, tmp_path):
    broken = copy_run(runs["lora"], tmp_path)
    state = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in state if "lora_B" in k)
    del state[key]
    save_file(state, broken / "adapter_model.safetensors")
    with pytest.raises(ModelError, match="the adapter file has no .*lora_B"):
        merge_mod.run(merge_mod.plan(broken, output=str(tmp_path / "m"), accept_changed_adapter=True), check=False)
