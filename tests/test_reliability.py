"""Parts of the reliability guarantees that stand today: safe loading, secrets that never reach a file,
and bit-identical runs from the same recipe and seed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit import model as model_mod
from lorakit.config import ModelConfig, Recipe
from lorakit.errors import ModelError
from lorakit.train import run as train

from conftest import tiny_recipe


def test_pickled_weights_are_refused_unless_allowed(tiny_model, tmp_path):
    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    precision = model_mod.Precision("float32", "cpu")
    with pytest.raises(ModelError, match="has no safetensors weights, only pickle files"):
        model_mod.load_base(ModelConfig(name_or_path=str(pickled)), precision)
    allowed = model_mod.load_base(ModelConfig(name_or_path=str(pickled), allow_pickle_weights=True), precision)
    assert torch.equal(allowed.lm_head.weight, model.lm_head.weight)


def test_a_canary_secret_reaches_no_file_and_no_output(tiny_model, tmp_path, write_recipe):
    env_secret, recipe_secret = "hf_canaryENV1234567890", "hf_canaryRECIPE0987654321"
    recipe = tiny_recipe(tiny_model, tmp_path / "run", steps=4, save_steps=2, hub_token=recipe_secret)
    path = write_recipe(recipe)
    out = subprocess.run([sys.executable, "-m", "lorakit", "train", str(path)], capture_output=True, text=True,
                         env={**os.environ, "HF_TOKEN": env_secret, "WANDB_API_KEY": env_secret})
    assert out.returncode == 0, out.stderr
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any("checkpoint-" in str(p) for p in written)  # checkpoints (with pickled trainer state) are searched too
    for secret in (env_secret, recipe_secret):
        assert secret not in out.stdout + out.stderr
        for file in written:
            assert secret.encode() not in file.read_bytes(), file


def test_the_same_recipe_and_seed_give_bit_identical_adapters(tiny_model, tmp_path):
    adapters = []
    for name in ("first", "second"):
        recipe = Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / name, four_bit=False, steps=6))
        adapters.append(load_file(train(recipe).run_dir / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert any(v.abs().sum() > 0 for k, v in adapters[0].items() if "lora_B" in k)  # it did train


def test_output_dir_escaping_through_dotdot_or_a_symlink_is_refused(tmp_path, monkeypatch):
    from lorakit.errors import LorakitError
    from lorakit.run_dir import check_free

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "runs").symlink_to("/usr")
    with pytest.raises(LorakitError, match="resolves to /usr, a home or system directory"):
        check_free("runs", overwrite=False)
    with pytest.raises(LorakitError, match="is the current directory or one of its parents"):
        check_free("runs/../..", overwrite=True)
    with pytest.raises(LorakitError, match="a home or system directory"):
        check_free("~", overwrite=True)
    assert check_free(str(tmp_path / "fine" / "run"), overwrite=False) == tmp_path / "fine" / "run"
