"""End-to-end training of the tiny model on the real stack: QLoRA (4-bit NF4) and plain LoRA."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import lorakit, tiny_recipe
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.data import prepare
from lorakit.model import base as model_mod
from lorakit.model.setup import for_loading
from lorakit.recipe.loading import load_recipe
from lorakit.recipe.schema import Recipe
from lorakit.train.trainer import run

RUN_FILES = {
    "recipe.yaml",
    "manifest.json",
    "metrics.jsonl",
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
}


def train_tiny(tiny_model, tmp_path_factory, four_bit: bool):
    out = tmp_path_factory.mktemp("runs") / ("qlora" if four_bit else "lora")
    # the QLoRA run also exercises gradient checkpointing (the default for real models)
    recipe = Recipe.model_validate(
        tiny_recipe(tiny_model, out, four_bit=four_bit, steps=8, gradient_checkpointing=four_bit)
    )
    return recipe, run(recipe, console=Console(stderr=True, force_terminal=False))


@pytest.fixture(scope="module", params=[True, False], ids=["qlora", "lora"])
def trained(request, tiny_model, tmp_path_factory):
    recipe, result = train_tiny(tiny_model, tmp_path_factory, four_bit=request.param)
    return recipe, result


def sample_batch(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "reverse: cat dog sun"}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, add_special_tokens=False, return_tensors="pt")


def test_run_directory_complete(trained, tiny_model):
    recipe, result = trained
    names = {p.name for p in result.run_dir.iterdir()}
    assert RUN_FILES <= names, RUN_FILES - names
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["method"] == ("qlora" if recipe.model.load_in_4bit else "lora")
    assert manifest["precision"] == "float32"  # CPU
    assert set(manifest["data"]["fingerprints"]) == {recipe.data.train[0].path, recipe.data.eval[0].path}
    assert manifest["data"]["packing"] is True  # auto: Llama builds its masks from position ids
    # the speed settings the run took: on CPU no Liger (CUDA only) and transformers' sdpa
    assert manifest["kernels"] == {
        "attention": "sdpa",
        "liger": False,
        "packing": True,
        "gradient_checkpointing": recipe.train.gradient_checkpointing,
        "torch_compile": False,
    }
    assert manifest["libraries"]["transformers"] and manifest["libraries"]["peft"]
    from lorakit.model.setup import cpu_threads

    assert manifest["threads"] == {"torch": cpu_threads(1).count, "why": cpu_threads(1).why}
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert Recipe.model_validate(saved) == Recipe.model_validate(recipe.to_saved_dict())
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert (result.run_dir / "chat_template.jinja").read_text() == tok.chat_template
    generation = json.loads((result.run_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    adapter_config = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and adapter_config["base_model_name_or_path"] == str(tiny_model)


def test_terminal_progress_bar(tiny_model, tmp_path):
    """On a terminal: a live bar with loss, lr and tokens/s, then the summary table."""
    import io

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    recipe = Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "tty", steps=4, logging_steps=1))
    prepare(recipe.data, AutoTokenizer.from_pretrained(tiny_model), recipe.train.seed)  # fills the cache
    run(recipe, console=console)
    out = buffer.getvalue()
    assert "training" in out and "tok/s" in out and "4/4" in out
    assert "lorakit train: done" in out and "trainable params" in out
    assert "(preprocessing cache)" in out and "packing: 1600 examples in" in out


def test_a_slow_run_shows_a_heartbeat_between_log_lines(tiny_model, tmp_path, monkeypatch):
    """Off a terminal, a run that has printed nothing for HEARTBEAT_S prints one line with its step, elapsed
    time and ETA, at most one per HEARTBEAT_S (not one per step)."""
    import io
    import re
    import time as time_mod

    from transformers import TrainerCallback

    from lorakit.train import progress

    class Slow(TrainerCallback):  # a slow model's steps
        def on_step_end(self, args, state, control, **kwargs):
            time_mod.sleep(0.4)

    monkeypatch.setattr(progress, "HEARTBEAT_S", 1.0)
    buffer = io.StringIO()
    recipe = Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "slow", steps=8, logging_steps=1000))
    started = time_mod.perf_counter()
    run(recipe, console=Console(file=buffer, force_terminal=False, width=160), callbacks=(Slow(),))
    took = time_mod.perf_counter() - started
    beats = [int(b) for b in re.findall(r"step (\d+)/8  elapsed \d+:\d\d  eta \d+:\d\d", buffer.getvalue())]
    assert 1 <= len(beats) <= took / progress.HEARTBEAT_S, buffer.getvalue()  # at most one per HEARTBEAT_S
    assert beats == sorted(set(beats)) and len(beats) < 8  # not a line per step


def test_loss_goes_down(trained):
    _, result = trained
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert records[0]["step"] == 1 and len(losses) >= 3
    assert losses[-1] < losses[0] - 0.5, losses
    assert any("eval_loss" in r for r in records)
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every base weight as the model computes with it: 4-bit layers dequantized, others as they are.

    Raw 4-bit state_dict entries are not compared: bitsandbytes repacks a layer's quantization state
    for its CPU kernel on first use without changing the weights it represents.
    """
    import bitsandbytes as bnb

    weights = {}
    for name, module in model.named_modules():
        name = name.replace(".base_layer", "")
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            weights[name + ".weight"] = bnb.functional.dequantize_4bit(w.data, w.quant_state).float().cpu()
            continue
        for pname, param in module.named_parameters(recurse=False):
            if "lora_" not in name and "lora_" not in pname:
                weights[f"{name}.{pname}"] = param.detach().float().cpu()
    return weights


def test_base_weights_unchanged_and_adapter_changed(trained, tiny_model):
    recipe, result = trained
    fresh = base_weights(model_mod.load_base(recipe.model, for_loading(recipe.model)))
    after = base_weights(result.model.get_base_model())
    assert set(after) == set(fresh) and len(fresh) > 30
    for name, tensor in after.items():
        assert torch.equal(tensor, fresh[name]), f"base weight {name} changed"
    lora_b = [t for n, t in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: all were trained
    assert all(not p.requires_grad for n, p in result.model.named_parameters() if "lora_" not in n)
    assert all(p.dtype == torch.float32 for n, p in result.model.named_parameters() if p.requires_grad)  # fp32 run


def test_adapter_reloads_with_plain_peft_and_gives_same_logits(trained, tiny_model):
    recipe, result = trained
    batch = sample_batch(tiny_model)
    result.model.eval()
    with torch.no_grad():
        in_memory = result.model(**batch).logits
        base = model_mod.load_base(recipe.model, for_loading(recipe.model))
        base_logits = base(**batch).logits
        reloaded = PeftModel.from_pretrained(base, result.run_dir).eval()
        logits = reloaded(**batch).logits
    tol = 1e-4
    assert torch.allclose(logits, in_memory, atol=tol), (logits - in_memory).abs().max()
    assert (logits - base_logits).abs().max() > 10 * tol  # the adapter does something


def test_adapter_loads_with_automodel(trained):
    """Serving stacks load a PEFT directory directly; so must ours (full-precision base)."""
    _, result = trained
    model = AutoModelForCausalLM.from_pretrained(result.run_dir)
    assert any("lora_" in name for name, _ in model.named_parameters())


def test_non_empty_output_dir_refused(trained, tmp_path):
    recipe, result = trained
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(recipe.to_saved_dict()))
    out = lorakit("train", str(path))
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: train.output_dir: {result.run_dir} is not empty")
    assert (result.run_dir / "manifest.json").is_file()  # nothing lost


def test_overwrite_refuses_a_directory_that_is_not_a_run(tiny_model, tmp_path, write_recipe):
    out_dir = tmp_path / "precious"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    path = write_recipe(tiny_recipe(tiny_model, out_dir))
    out = lorakit("train", str(path), "--overwrite")
    assert out.returncode == 2
    assert "is not a lorakit run" in out.stderr
    assert (out_dir / "notes.txt").read_text() == "keep me"


def test_saved_recipe_is_loadable(trained):
    _, result = trained
    recipe = load_recipe(result.run_dir / "recipe.yaml")
    assert recipe.train.output_dir == str(result.run_dir)


def test_tuned_model_learns_to_stop(tiny_model, tmp_path):
    """A short chat fine-tune, then greedy generation on held-out prompts: generations end with the
    end-of-turn token registered in the run's generation_config (the "never stops" failure). 40 QLoRA steps
    (measured: 16 of 16 stop, as after 20 steps already; the untrained base: 2 of 16)."""
    from conftest import EXAMPLES
    from transformers import GenerationConfig

    recipe = Recipe.model_validate(
        tiny_recipe(
            tiny_model,
            tmp_path / "stop",
            steps=40,
            learning_rate=3e-3,
            logging_steps=10,
            per_device_train_batch_size=16,
        )
    )
    result = run(recipe, console=Console(stderr=True, force_terminal=False))
    tok = AutoTokenizer.from_pretrained(result.run_dir)
    generation = GenerationConfig.from_pretrained(result.run_dir)
    generation.max_new_tokens, generation.do_sample = 16, False
    rows = [json.loads(line) for line in (EXAMPLES / "eval.jsonl").read_text().splitlines()][:16]
    model = result.model.eval()
    stopped = 0
    for row in rows:
        batch = tok.apply_chat_template(
            row["messages"][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**batch, generation_config=generation)
        new = out[0, batch["input_ids"].shape[1] :].tolist()
        stopped += new[-1] in generation.eos_token_id and len(new) < 16
    assert stopped >= 14, f"only {stopped} of {len(rows)} generations stopped"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_liger_kernels_asked_for_without_a_gpu_are_refused_before_loading(tiny_model, tmp_path, write_recipe):
    run_dir = tmp_path / "run"
    path = write_recipe(tiny_recipe(tiny_model, run_dir, use_liger_kernel=True))
    out = lorakit("train", str(path))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train.use_liger_kernel: Liger's kernels are Triton kernels for CUDA GPUs" in out.stderr
    assert "loading" not in out.stderr and not run_dir.exists()  # refused before the run or the weights


@pytest.mark.gpu
def test_liger_fused_loss_matches_the_plain_loss(tiny_model, tmp_path):
    """Liger's fused linear cross-entropy never builds the logits; the losses it trains on must match."""
    pytest.importorskip("liger_kernel")
    losses = {}
    for liger in (False, True):
        recipe = Recipe.model_validate(
            tiny_recipe(tiny_model, tmp_path / f"liger-{liger}", four_bit=False, steps=6, use_liger_kernel=liger)
        )
        result = run(recipe, console=Console(stderr=True, force_terminal=False))
        assert result.details["kernels"]["liger"] is liger
        losses[liger] = [
            r["loss"]
            for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]
    assert len(losses[True]) == len(losses[False]) > 1
    for plain, fused in zip(losses[False], losses[True]):
        assert abs(plain - fused) <= 2e-2 * plain, losses  # bf16 kernels: a few parts per thousand
