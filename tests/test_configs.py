"""Every shipped recipe validates; the real-model ones say what their comments promise."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT

from lorakit.recipe.loading import load_recipe

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
REAL = {
    "llama-3.1-8b-qlora.yaml": ("meta-llama/Llama-3.1-8B-Instruct", True),
    "qwen2.5-7b-qlora.yaml": ("Qwen/Qwen2.5-7B-Instruct", True),
    "mistral-7b-lora.yaml": ("mistralai/Mistral-7B-Instruct-v0.3", False),
    "llama-3.1-70b-qlora.yaml": ("meta-llama/Llama-3.1-70B-Instruct", True),
    "llama-3.1-70b-qlora-fsdp.yaml": ("meta-llama/Llama-3.1-70B-Instruct", True),
    "llama-3.1-8b-lora-ddp8.yaml": ("meta-llama/Llama-3.1-8B-Instruct", False),
}
# The real-model recipes point at the user's data/; validate them against the bundled data instead.
DATA = [f"data.train={EXAMPLES / 'train.jsonl'}"]


def load_shipped(path: Path):
    overrides = list(DATA)
    if "eval:" in path.read_text():
        overrides.append(f"data.eval={EXAMPLES / 'eval.jsonl'}")
    return load_recipe(path, overrides if path.name in REAL else [])


def test_real_model_recipes_are_shipped():
    assert set(REAL) <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipe_validates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # recipes use paths relative to the repository root, like `make quickstart`
    if "adapter:" in path.read_text():  # the run it continues (runs/quickstart) exists after `make quickstart`
        (tmp_path / "adapter_config.json").write_text("{}")
        monkeypatch.chdir(tmp_path)
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "quickstart").symlink_to(tmp_path)
        for name in (".cache", "examples"):
            (tmp_path / name).symlink_to(ROOT / name)
    recipe = load_shipped(path)
    assert recipe.train.output_dir
    if path.name in REAL:
        name, four_bit = REAL[path.name]
        assert recipe.model.name_or_path == name
        assert recipe.model.load_in_4bit is four_bit
        assert recipe.train.gradient_checkpointing
        assert recipe.lora.r >= 8


def test_quickstart_is_a_qlora_run_on_bundled_data(monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(ROOT / "configs" / "quickstart.yaml")
    assert recipe.model.load_in_4bit and recipe.model.quantization.bnb_4bit_quant_type == "nf4"
    assert recipe.model.quantization.bnb_4bit_use_double_quant
    assert Path(recipe.data.train[0].path) == (EXAMPLES / "train.jsonl").resolve()
