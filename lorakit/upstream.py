"""The one place where lorakit reaches past a library's public API or works around one of its bugs. Each
entry says why, the upstream issue where there is one, and when it can go; the README lists them.

Nothing here patches a library: each function reads a value or adjusts lorakit's own objects.
"""

from __future__ import annotations


def attention_implementation(model) -> str:
    """The attention kernel transformers chose for `model` (recorded in the manifest). transformers 5.x has
    a public setter (`set_attn_implementation`) but no getter; its models read `config._attn_implementation`.
    Remove when a public getter exists."""
    return model.config._attn_implementation


def liger_model_types() -> set[str]:
    """The model types Liger has kernels for. liger-kernel exports its per-architecture `apply_liger_kernel_to_*`
    functions but not the registry that maps model types to them (`monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN`,
    which its own `AutoLigerKernelForCausalLM` reads). Remove when it is exported."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def padding_collator(pad_token_id: int):
    """trl's SFT collator (right padding, labels padded with -100), so `lorakit eval`'s loss batches exactly as
    the trainer's evaluation does. trl 1.x does not export it at the top level (`trl.trainer.sft_trainer`).
    Remove the private path when trl exports it."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id)


def keep_cpu_4bit_weights_exact(model) -> None:
    """bitsandbytes 0.48-0.50, `Linear4bit.forward`: on CPUs with AVX512-BF16, a 4-bit layer run in eval mode
    without grad (every evaluation pass) is repacked for a faster CPU kernel, rounding its quantization scales
    to bfloat16 for good. A QLoRA run that evaluates then silently changes its base weights, and a reloaded
    base computes differently from the one trained on (tests/test_train.py catches both). Opting these
    instances out keeps the base exact. Remove once the repacking is lossless upstream."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def keep_rslora_scaling_one(model, layers: dict, adapter_name: str) -> None:
    """peft's add_weighted_adapter folds each run's scaling into the combined weights and sets lora_alpha = r
    so the combined scaling is 1, but it copies use_rslora from the first run, and rsLoRA's alpha / sqrt(r)
    then scales the combined update by sqrt(r) (huggingface/peft#3761, fixed upstream by PR #3449; a no-op
    with a peft that has the fix, and can go once lorakit requires one)."""
    config = model.peft_config[adapter_name]
    if not config.use_rslora:
        return
    config.use_rslora = False
    for layer in layers.values():
        if adapter_name in layer.scaling:
            layer.scaling[adapter_name] = config.lora_alpha / config.r
