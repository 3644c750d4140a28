"""Model loading checks that must fail before training: target modules, precision, optimizer names."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import LorakitError, ModelError
from lorakit.model import base as model_mod
from lorakit.model.engines import check_optim
from lorakit.model.setup import for_loading
from lorakit.recipe.schema import LoraSection, ModelConfig


@pytest.fixture(scope="module")
def base(tiny_model):
    cfg = ModelConfig(name_or_path=str(tiny_model))
    return model_mod.load_base(cfg, for_loading(cfg))


def test_unmatched_target_module_lists_linear_modules(base):
    with pytest.raises(ModelError) as info:
        model_mod.check_target_modules(base, LoraSection(target_modules=["q_proj", "query_key_value"]))
    assert str(info.value) == (
        "lora.target_modules: 'query_key_value' matches no module of the model; its linear "
        "modules are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )


def test_regex_target_must_match(base):
    with pytest.raises(ModelError, match="the regular expression"):
        model_mod.check_target_modules(base, LoraSection(target_modules=r".*\.attn\.c_attn"))
    model_mod.check_target_modules(base, LoraSection(target_modules=r".*\.(q_proj|v_proj)"))


def test_matching_targets_accepted(base):
    model_mod.check_target_modules(base, LoraSection(target_modules=["q_proj", "v_proj"]))
    model_mod.check_target_modules(base, LoraSection(target_modules="all-linear"))


def test_modules_to_save_must_exist(base):
    with pytest.raises(ModelError, match="'score' matches no module"):
        model_mod.check_target_modules(base, LoraSection(modules_to_save=["score"]))


def test_4bit_linear_layers_are_listed(tiny_model):
    cfg = ModelConfig(name_or_path=str(tiny_model), load_in_4bit=True)
    quantized = model_mod.load_base(cfg, for_loading(cfg))
    assert "q_proj" in model_mod.linear_module_names(quantized)
    assert quantized.is_loaded_in_4bit


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU precision rules")
def test_cpu_precision():
    assert model_mod.resolve_precision(ModelConfig(name_or_path="x")).dtype == "float32"
    with pytest.raises(ModelError, match="float16 training needs a CUDA GPU"):
        model_mod.resolve_precision(ModelConfig(name_or_path="x", dtype="float16"))


def test_quantization_config_follows_recipe_and_precision():
    cfg = ModelConfig(name_or_path="x", load_in_4bit=True)
    q = for_loading(cfg, precision=model_mod.Precision("bfloat16", "cuda")).quantization
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert not for_loading(ModelConfig(name_or_path="x"), precision=model_mod.Precision("float32", "cpu")).four_bit


def test_unknown_optimizer_refused_with_suggestion():
    with pytest.raises(LorakitError, match="did you mean paged_adamw_8bit"):
        check_optim("paged_adamw8bit")
    check_optim("paged_adamw_8bit")


class _OwnAttention(torch.nn.Module):
    """Stands in for remote model code that builds its own attention mask (this module imports no
    transformers mask builder), so packed examples would see each other."""


def test_packing_auto_where_masks_follow_positions(tiny_model):
    from transformers import JambaForCausalLM, LlamaForCausalLM, Qwen3NextForCausalLM

    cfg = ModelConfig(name_or_path=str(tiny_model))
    llama, model_type = model_mod.model_class_for(cfg)
    assert (llama.__name__, model_type) == ("LlamaForCausalLM", "llama")
    assert model_mod.packing_supported(llama, "llama") is True
    assert (
        model_mod.use_packing("auto", llama, "llama") is True and model_mod.use_packing(False, llama, "llama") is False
    )
    # code that builds its own masks, and hybrids whose recurrent layers carry state across packed examples
    for cls, kind in ((_OwnAttention, "own"), (JambaForCausalLM, "jamba"), (Qwen3NextForCausalLM, "qwen3_next")):
        assert model_mod.packing_supported(cls, kind) is False
        assert model_mod.use_packing("auto", cls, kind) is False
        with pytest.raises(ModelError, match=f"{cls.__name__} would let packed examples affect each other"):
            model_mod.use_packing(True, cls, kind)
    # an architecture lorakit does not know: auto does not guess, `true` is the user's call
    assert model_mod.packing_supported(LlamaForCausalLM, "some_new_llama") is None
    assert model_mod.use_packing("auto", LlamaForCausalLM, "some_new_llama") is False
    assert model_mod.use_packing(True, LlamaForCausalLM, "some_new_llama") is True
