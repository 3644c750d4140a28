"""Tokenizer, base model (4-bit or not) and precision, from the recipe's `model:` section.

Owns: choosing precision from the hardware, `from_pretrained` calls, bitsandbytes 4-bit settings,
`prepare_model_for_kbit_training`, checking that LoRA target modules match the model. Does not own the
trainer (lorakit.train.trainer), the data (lorakit.data), the PEFT config (lorakit.model.peft_methods) or
the run's decisions (lorakit.model.setup, which calls the choosers here once per run).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass

import torch

from lorakit import upstream
from lorakit.errors import ModelError
from lorakit.model import engines, gguf
from lorakit.model.engines import Engine
from lorakit.recipe.peft_sections import PROMPT_LEARNING
from lorakit.recipe.schema import LoraSection, ModelConfig, QuantizationConfig

SINGLE = Engine()

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """The numeric precision of a run, picked from the recipe and the hardware."""

    dtype: str  # bfloat16 | float16 | float32
    device: str  # cuda | cpu

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def fp16(self) -> bool:
        return self.dtype == "float16"


def resolve_precision(cfg: ModelConfig) -> Precision:
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU; refuse what the hardware cannot do."""
    if torch.cuda.is_available():
        bf16_ok = torch.cuda.is_bf16_supported()
        if cfg.dtype == "auto":
            return Precision("bfloat16" if bf16_ok else "float16", "cuda")
        if cfg.dtype == "bfloat16" and not bf16_ok:
            name = torch.cuda.get_device_name()
            raise ModelError(f"model.dtype: bfloat16 is not supported on this GPU ({name}); use float16 or auto")
        return Precision(cfg.dtype, "cuda")
    if cfg.dtype == "float16":
        raise ModelError(
            "model.dtype: float16 training needs a CUDA GPU and none was found; use auto or float32 on CPU"
        )
    return Precision("float32" if cfg.dtype == "auto" else cfg.dtype, "cpu")


def source(cfg: ModelConfig) -> str:
    """Where `from_pretrained` reads the base: `name_or_path`, or for a GGUF base the checkpoint converted
    from it (lorakit.model.gguf, converted the first time)."""
    if not gguf.is_gguf(cfg):
        return cfg.name_or_path
    return str(gguf.materialize(cfg).directory)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        cfg.tokenizer_name_or_path or source(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:  # labels are built by lorakit, so pad == eos cannot hide the eos from the loss
        tokenizer.pad_token = tokenizer.eos_token
    add_new_tokens(tokenizer, cfg.new_special_tokens)
    return tokenizer


def add_new_tokens(tokenizer, tokens: list[str] | None) -> None:
    """Add the recipe's new special tokens to the base's tokenizer. A token it already knows is refused: its
    row has a meaning training would overwrite."""
    if not tokens:
        return
    vocab = tokenizer.get_vocab()
    known = [t for t in tokens if t in vocab]
    if known:
        raise ModelError(
            f"model.new_special_tokens: {', '.join(known)} already in the tokenizer (id "
            f"{vocab[known[0]]}); list only new tokens"
        )
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)


def grow_embeddings(model, vocab_size: int, mean_resizing: bool = False) -> None:
    """Room for added tokens: the embeddings only ever grow (a vocabulary padded beyond the tokenizer, as
    Qwen's, already has rows for them)."""
    if vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size, mean_resizing=mean_resizing)


def quantization_config(q: QuantizationConfig, precision: Precision, engine: Engine = SINGLE):
    """The bitsandbytes 4-bit config of a QLoRA base from the recipe's `model.quantization` settings."""
    from transformers import BitsAndBytesConfig

    compute = precision.dtype if q.bnb_4bit_compute_dtype == "auto" else q.bnb_4bit_compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=_DTYPES[compute],
        bnb_4bit_quant_storage=getattr(torch, engines.quant_storage(q, engine, compute)),
    )


def device_map(precision: Precision, engine: Engine = SINGLE) -> dict | None:
    """Each process loads the whole model on its own device; never `auto` (it silently uses one GPU under DDP).
    Under FSDP and ZeRO-3 none: the engine places (and shards) the weights itself."""
    if engine.shards_parameters:
        return None
    if precision.device == "cuda":  # as accelerate places the process (gloo DDP may put several on one GPU)
        return {"": int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1)}
    return {"": "cpu"}


def load_base(cfg: ModelConfig, loading, tokenizer=None):
    """The base model through `from_pretrained` as `loading` (lorakit.model.setup.Loading) decided: its
    precision, its placement, in 4-bit with its BitsAndBytesConfig for QLoRA. Under FSDP and
    ZeRO-3 a 4-bit base is loaded in the dtype its packed weights are stored in, so every parameter has one
    dtype and the engine can flatten them. With `model.new_special_tokens` the embeddings grow to the
    tokenizer's length (`tokenizer`, when the caller has it, else the recipe's loaded again)."""
    from transformers import AutoModelForCausalLM

    precision, engine, quantization = loading.precision, loading.engine, loading.quantization
    dtype = precision.torch_dtype
    if quantization is not None and engine.shards_parameters and quantization.bnb_4bit_quant_storage.is_floating_point:
        dtype = quantization.bnb_4bit_quant_storage
    kwargs = {}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    elif precision.device == "cuda" and precision.dtype != "float32" and importlib.util.find_spec("flash_attn"):
        kwargs["attn_implementation"] = "flash_attention_2"  # varlen kernels: packed rows cost no padding
    if not cfg.allow_pickle_weights:
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source(cfg),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
            quantization_config=quantization,
            device_map=device_map(precision, engine),
            **kwargs,
        )
    except OSError as exc:
        if cfg.allow_pickle_weights or "safetensors" not in str(exc):
            raise
        raise ModelError(
            f"model.name_or_path: {cfg.name_or_path} has no safetensors weights, only pickle files, "
            "which can run code when loaded; convert them, or set `model.allow_pickle_weights: true` "
            "if you trust them"
        ) from None
    # Training needs no KV cache, and packing must not have one: with a cache, transformers does not look
    # for packed examples in the position ids and lets them attend to each other. Generation turns it on.
    model.config.use_cache = False
    upstream.keep_cpu_4bit_weights_exact(model)
    if cfg.new_special_tokens:  # rows for the added tokens; their trained values come with the adapter
        grow_embeddings(model, len(tokenizer if tokenizer is not None else load_tokenizer(cfg)))
    return model


def prepare_for_training(model, loading, gradient_checkpointing: bool):
    """QLoRA preparation (norms in fp32, input grads for checkpointing); a no-op for full-precision bases.
    Skipped under FSDP and ZeRO-3: upcasting the norms would give the engine two dtypes to flatten; the
    trainer turns on checkpointing and input gradients itself."""
    if not loading.four_bit or loading.engine.shards_parameters:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def match_adapter_precision(model, precision: Precision) -> None:
    """trl keeps QLoRA adapters in bf16 (the QLoRA paper's choice for bf16 GPUs). In an fp32 run (CPU) that
    only loses precision and makes the saved adapter compute differently once reloaded in fp32; keep fp32."""
    if precision.dtype != "float32":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def linear_module_names(model) -> list[str]:
    """Distinct last-name parts of the model's linear layers (4-bit ones included), lm_head excluded."""
    names = set()
    for name, module in model.named_modules():
        if name and _is_linear(module) and not name.endswith("lm_head"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model, cfg: LoraSection) -> None:
    """Every listed target must match a module (peft alone only fails when none match)."""
    module_names = [name for name, _ in model.named_modules() if name]

    def matches(key: str) -> bool:
        return any(n == key or n.endswith("." + key) for n in module_names)

    for extra in cfg.modules_to_save or []:
        if not matches(extra):
            raise ModelError(f"lora.modules_to_save: {extra!r} matches no module of the model")
    linear_names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for key, pattern in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        for item in pattern or {}:  # peft's rule: the pattern matches the end of an adapted layer's full name
            if not any(re.match(rf"(.*\.)?{item}$", name) for name in linear_names):
                raise ModelError(
                    f"lora.{key}: {item!r} matches no module of the model (patterns match the end "
                    f"of full module names, e.g. 'down_proj' or 'mlp\\..*')"
                )
    targets = cfg.target_modules
    linear = ", ".join(linear_module_names(model))
    if targets == "all-linear":
        return
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in module_names):
            raise ModelError(
                f"lora.target_modules: the regular expression {targets!r} matches no module of "
                f"the model; its linear modules are: {linear}"
            )
        return
    unmatched = [t for t in targets if not matches(t)]
    if unmatched:
        raise ModelError(
            f"lora.target_modules: {', '.join(repr(t) for t in unmatched)} "
            f"{'matches' if len(unmatched) == 1 else 'match'} no module of the model; "
            f"its linear modules are: {linear}"
        )


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted as their unpacked size."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)


def _is_linear(module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


# Architectures whose layers are all attention with masks built from position ids: padding-free packing
# is exact for them. Others may be too, but `auto` does not guess.
PACKING_EXACT = {
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "granite",
    "granitemoe",
    "olmo",
    "olmo2",
    "olmo3",
    "cohere",
    "cohere2",
    "starcoder2",
    "glm",
    "glm4",
    "stablelm",
    "smollm3",
    "deepseek_v3",
    "ministral",
    "seed_oss",
    "exaone4",
    "arcee",
    "hunyuan_v1_dense",
}
# Layers that carry state along the sequence (convolutions, state spaces, linear attention, recurrence):
# packed examples would leak into each other whatever the attention mask says.
PACKING_NEVER = {
    "mamba",
    "mamba2",
    "jamba",
    "falcon_h1",
    "falcon_mamba",
    "lfm2",
    "lfm2_moe",
    "qwen3_next",
    "recurrent_gemma",
    "zamba",
    "zamba2",
    "bamba",
    "granitemoehybrid",
    "nemotron_h",
    "rwkv",
    "xlstm",
    "minimax",
    "plamo2",
}


def packing_supported(model_class: type, model_type: str | None = None) -> bool | None:
    """True: packing is exact (known attention-only architecture whose code builds masks from position
    ids). False: it would leak across examples. None: the code builds such masks, but the architecture is
    not known to be attention-only."""
    module = sys.modules.get(model_class.__module__)
    builds_masks = module is not None and (
        hasattr(module, "create_causal_mask") or hasattr(module, "create_sliding_window_causal_mask")
    )
    if not builds_masks or model_type in PACKING_NEVER:
        return False
    return True if model_type in PACKING_EXACT else None


def use_packing(setting: bool | str, model_class: type, model_type: str | None = None, method: str = "lora") -> bool:
    """`train.packing`: auto packs where known exact; true is refused where packing would leak across
    examples, and allowed for architectures lorakit does not know, on the user's word. Prompt and prefix
    tuning never pack: their virtual tokens go in front of each row, so packed examples would share them
    (the recipe refuses `true` for them)."""
    if method in PROMPT_LEARNING:
        return False
    supported = packing_supported(model_class, model_type)
    if setting is True and supported is False:
        raise ModelError(
            f"train.packing: {model_class.__name__} would let packed examples affect each other "
            "(its attention mask is not built from position ids, or it has layers that carry state "
            "along the sequence); set `train.packing: auto` or false"
        )
    return supported is True if setting == "auto" else bool(setting)


def use_liger(setting: bool | str, precision: Precision, model_type: str) -> bool:
    """`train.use_liger_kernel`: Liger's kernels need a CUDA GPU, the package, and an architecture it patches."""
    if setting is False:
        return False
    problem = None
    if precision.device != "cuda":
        problem = "Liger's kernels are Triton kernels for CUDA GPUs, and none was found"
    elif importlib.util.find_spec("liger_kernel") is None:
        problem = "the liger-kernel package is not installed (pip install 'lorakit[gpu]')"
    else:
        if model_type not in upstream.liger_model_types():
            problem = f"liger-kernel has no kernels for {model_type} models"
    if problem and setting is True:
        raise ModelError(f"train.use_liger_kernel: {problem}; set it to auto or false")
    return problem is None


def model_class_for(cfg: ModelConfig) -> tuple[type, str]:
    """The causal-LM class `from_pretrained` would build, and the model type, from the config alone."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(source(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    auto_map = getattr(config, "auto_map", None) or {}
    if cfg.trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return get_class_from_dynamic_module(
            auto_map["AutoModelForCausalLM"], source(cfg), revision=cfg.revision
        ), config.model_type
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], config.model_type
    except KeyError:
        raise ModelError(
            f"model.name_or_path: {cfg.name_or_path} ({type(config).__name__}) is not a causal "
            "language model that transformers knows"
        ) from None


def quantization_record(model) -> dict | None:
    """What 4-bit loading did, as the merge needs it to reproduce the weights training saw: the modules
    that were quantized and the bitsandbytes settings read back from their weights."""
    import bitsandbytes as bnb

    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if not layers:
        return None
    weight = next(iter(layers.values())).weight
    return {
        "modules": sorted(layers),
        "quant_type": weight.quant_type,
        "blocksize": weight.blocksize,
        "double_quant": bool(weight.compress_statistics),
        "quant_storage": str(weight.quant_storage).split(".")[-1],
    }
