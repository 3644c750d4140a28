"""Parts of the reliability guarantees that stand today: safe loading, secrets that never reach a file,
and bit-identical runs from the same recipe and seed."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import lorakit, tiny_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit.errors import ModelError
from lorakit.model import base as model_mod
from lorakit.model.setup import for_loading
from lorakit.recipe.schema import ModelConfig, Recipe
from lorakit.train.trainer import run as train


def test_pickled_weights_are_refused_unless_allowed(tiny_model, tmp_path):
    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    loading = for_loading(ModelConfig(name_or_path=str(pickled)))
    with pytest.raises(ModelError, match="has no safetensors weights, only pickle files"):
        model_mod.load_base(ModelConfig(name_or_path=str(pickled)), loading)
    allowed = model_mod.load_base(ModelConfig(name_or_path=str(pickled), allow_pickle_weights=True), loading)
    assert torch.equal(allowed.lm_head.weight, model.lm_head.weight)


def test_a_canary_secret_reaches_no_file_and_no_output(tiny_model, tmp_path, write_recipe):
    env_secret, recipe_secret = "hf_canaryENV1234567890", "hf_canaryRECIPE0987654321"
    recipe = tiny_recipe(tiny_model, tmp_path / "run", steps=4, save_steps=2, hub_token=recipe_secret)
    path = write_recipe(recipe)
    out = lorakit("train", str(path), env={**os.environ, "HF_TOKEN": env_secret, "WANDB_API_KEY": env_secret})
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
    from lorakit.rundir.directory import check_free

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


class PoisonGradients:
    """Test-side injection through the trainer's public callback hooks: NaN gradients at chosen steps,
    and a snapshot of the trainable weights around every optimizer step."""

    def __init__(self, steps):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                outer.before[state.global_step + 1] = {
                    n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                }
                if state.global_step + 1 in steps:
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.fill_(float("nan"))

            def on_optimizer_step(self, args, state, control, model=None, **kwargs):
                outer.after[state.global_step + 1] = {
                    n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                }

        self.before, self.after, self.callback = {}, {}, Callback()


def test_a_nan_step_is_skipped_and_too_many_stop_the_run(tiny_model, tmp_path, capsys):
    from lorakit.errors import RunFailed
    from lorakit.train.resume import MARKER

    poison = PoisonGradients({3})
    recipe = Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "one", four_bit=False, steps=5))
    result = train(recipe, callbacks=(poison.callback,))
    unchanged = all(torch.equal(poison.before[3][n], poison.after[3][n]) for n in poison.before[3])
    changed = any(not torch.equal(poison.before[4][n], poison.after[4][n]) for n in poison.before[4])
    assert unchanged and changed and (result.run_dir / "adapter_model.safetensors").is_file()
    assert "step 3: non-finite gradients, update skipped (1 in a row)" in " ".join(capsys.readouterr().err.split())

    poison = PoisonGradients({3, 4, 5})
    recipe = Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "three", four_bit=False, steps=8, save_steps=2))
    with pytest.raises(
        RunFailed,
        match=r"3 steps in a row ended with non-finite gradients \(the last at step 5\).*"
        r"checkpoint-4 is the last good checkpoint",
    ):
        train(recipe, callbacks=(poison.callback,))
    run_dir = tmp_path / "three"
    assert not (run_dir / "adapter_model.safetensors").exists() and not (run_dir / "manifest.json").exists()
    assert (run_dir / "checkpoints" / "checkpoint-4" / MARKER).is_file()
    assert not (run_dir / "checkpoints" / "checkpoint-6").exists()
