"""A run's adapter on a weightless copy of its base, so each layer can be merged as its weight is read.

Owns: loading the adapter with peft onto a meta-device model, refusing adapters that do not fit the base
(layers, shapes, stray keys, NaN/inf), the trained `modules_to_save` tensors, the vocabulary size training
ended with, and merging one layer with peft's own `merge()`. Does not read or write the base (lorakit.merge.fold).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import ModelError
from lorakit.model.shards import Checkpoint


@dataclass
class Skeleton:
    layers: dict  # module name -> peft LoRA layer (adapter weights real, base weight empty)
    saved: dict  # checkpoint tensor name -> trained replacement (modules_to_save)
    vocab_size: int | None  # the vocabulary after tokens were added in training, else None
    base_vocab_size: int


def on_skeleton(run_dir: Path, base_dir: Path, base: str, checkpoint: Checkpoint) -> Skeleton:
    """The run's adapter loaded by peft onto a weightless copy of the base. Refuses adapters that do not
    fit this base, and non-finite adapter weights. Long on purpose: the meta-device build, peft's load and
    the fit checks share the state they inspect, in the order peft needs it."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoConfig, AutoModelForCausalLM

    state = finite_state(run_dir)
    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    vocab = _trained_vocab(state)
    resized = vocab if vocab and vocab != config.vocab_size else None
    if resized:
        skeleton.resize_token_embeddings(resized, mean_resizing=False)  # the rows come from the adapter
    peft_config = PeftConfig.from_pretrained(run_dir)
    # AdaLoRA shrinks each layer to its final rank while loading, which needs real adapter tensors: those
    # layers get empty CPU base weights first, and peft creates their (small) adapter tensors for real
    adaptive = peft_config.peft_type == "ADALORA"
    if adaptive:  # (not whole trained modules: their copies come whole from the adapter file)
        kept = tuple(peft_config.modules_to_save or ())
        for name, module in skeleton.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(name == k or name.endswith("." + k) for k in kept):
                module.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    try:
        peft_model = get_peft_model(skeleton, peft_config, low_cpu_mem_usage=not adaptive)
    except ValueError as exc:
        raise ModelError(
            f"the adapter does not fit {base}: {str(exc).splitlines()[0]} (an adapter trained on another base?)"
        ) from None
    layers = mergeable_layers(peft_model)
    _refuse_unsupported(peft_model, layers, config, base)
    for name, layer in layers.items():
        if f"{name}.weight" not in checkpoint.weight_map:
            raise ModelError(
                f"adapter layer {name} has no weight `{name}.weight` in {base}'s checkpoint (the "
                "checkpoint names its tensors differently from the model's modules, or the adapter was "
                "trained on another base); lorakit's streaming merge cannot map them"
            )
        # an empty CPU placeholder: peft moves loaded adapter weights to the base weight's device, and on meta
        # they would be dropped; the real weight arrives shard by shard (merge_layer)
        layer.base_layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        originals = getattr(layer, "trainable_tokens_original", {})  # token rows before training: only unmerge
        for key in list(originals.keys()):  # reads them, and peft cannot move them off meta
            originals[key] = torch.zeros(originals[key].shape)
    # a resized embedding that peft saved under trainable tokens replaces the base's; its token rows merge on top
    resized_embeddings = {
        k.removeprefix("base_model.model.").replace(".token_adapter.base_layer.", "."): state.pop(k)
        for k in [k for k in state if ".token_adapter.base_layer." in k]
    }
    try:
        loaded = set_peft_model_state_dict(peft_model, state, low_cpu_mem_usage=True)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"the adapter does not fit {base}: {str(exc).strip().splitlines()[-1].strip()}") from None
    wrapped = {n for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    stray = [
        k
        for k in loaded.unexpected_keys  # peft saves resized embeddings' wrapper copies too; it skips them
        if not any(k.startswith(f"{w}.modules_to_save.") or k.startswith(f"{w}.original_module.") for w in wrapped)
    ]
    if stray:
        raise ModelError(f"adapter weight {stray[0]} matches nothing in {base}")
    missing = [k for k in loaded.missing_keys if any(part in k for part in ADAPTER_TENSORS)]
    if missing:
        raise ModelError(f"the adapter file has no {missing[0]}; it is incomplete")
    for name, layer in layers.items():
        _check_shapes(layer, checkpoint.shape(f"{name}.weight"), base)
        for param_name, param in layer.named_parameters():
            if not param_name.startswith("base_layer"):
                param.data = param.data.float()  # merge arithmetic in float32, whatever training stored
    saved = {**_trained_tensors(peft_model, checkpoint), **{k: v.float() for k, v in resized_embeddings.items()}}
    if getattr(config, "tie_word_embeddings", False) and any(
        k.startswith(("lm_head.", "model.embed_tokens.")) for k in saved
    ):
        raise ModelError(
            f"{base} ties its input and output embeddings and the adapter trained one of them; "
            "merging would have to untie them, which lorakit's merge does not do yet"
        )
    return Skeleton(layers, saved, resized, config.vocab_size)


def finite_state(adapter_dir: Path, who: str = "the adapter") -> dict:
    """An adapter's saved tensors; NaN or inf in any of them is refused (merging or combining them would
    spread it through the model)."""
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    bad = next((k for k, v in state.items() if not torch.isfinite(v.float()).all()), None)
    if bad:
        raise ModelError(f"{who} holds NaN or inf values (first: {bad}); refusing to merge it")
    return state


ADAPTER_TENSORS = ("lora_", "ia3_", "trainable_tokens_")  # names of the adapter's own tensors, by method


def mergeable_layers(peft_model) -> dict:
    """Module name -> peft layer whose `merge()` folds the adapter into that module's weight: LoRA (and its
    variants, AdaLoRA included), IA3, and trainable token rows (keyed by the embedding they live in)."""
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, (LoraLayer, IA3Layer, TrainableTokensLayer)):
            layers[name.removeprefix("base_model.model.").removesuffix(".token_adapter")] = module
    return layers


def _refuse_unsupported(peft_model, layers: dict, config, base: str) -> None:
    """What the streaming merge does not handle: refused by name rather than merged wrong."""
    from peft.tuners.lora import Embedding

    for name, layer in layers.items():
        if isinstance(layer, Embedding):
            raise ModelError(
                f"the adapter puts LoRA on the embedding layer {name}; lorakit's merge does not handle "
                "LoRA on embeddings yet (train them with lora.modules_to_save instead)"
            )
        if (
            hasattr(layer, "ia3_l")
            and not getattr(layer, "is_feedforward", True)
            and getattr(layer.get_base_layer(), "bias", None) is not None
        ):
            raise ModelError(
                f"the IA3 adapter scales the output of {name}, which has a bias that is scaled too; "
                "lorakit's streaming merge writes weights only, not biases, yet (serve the adapter "
                "with PeftModel instead)"
            )
        if any(getattr(layer, "lora_bias", {}).values()):
            raise ModelError(
                f"the adapter trains LoRA biases (lora_bias) in {name}; lorakit's merge does not handle them yet"
            )


def _trained_tensors(peft_model, checkpoint: Checkpoint) -> dict:
    """Base tensors the adapter replaces: `modules_to_save` copies and trained biases, by checkpoint name."""
    saved = {}
    for name, param in peft_model.named_parameters():
        if (
            param.device.type == "meta"
            or param.numel() == 0
            or ".original_module." in name
            or any(part in name for part in (*ADAPTER_TENSORS, "ranknum"))
        ):
            continue
        key = (
            name.removeprefix("base_model.model.")
            .replace(".base_layer.", ".")
            .replace(".modules_to_save.default.", ".")
        )
        saved[key] = param.detach().float()
    return saved


def _check_shapes(layer, base_shape: tuple, base: str) -> None:
    if not hasattr(layer, "lora_A"):  # IA3 vectors and token rows are checked by peft when loaded
        return
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    a, b = getattr(a, "weight", a), getattr(b, "weight", b)  # AdaLoRA keeps bare parameters
    update = (b.shape[0], a.shape[1])
    if getattr(layer, "fan_in_fan_out", False):  # Conv1D layers (GPT-2) store the weight transposed
        update = update[::-1]
    if update != tuple(base_shape):
        raise ModelError(
            f"the adapter does not fit {base}: a layer of shape {tuple(base_shape)} gets an update of "
            f"shape {update} (an adapter trained on another base?)"
        )


def _trained_vocab(state: dict) -> int | None:
    """The vocabulary size training ended with, from saved embedding rows (tokens added in training)."""
    for key, value in state.items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")) and "lora_" not in key:
            return value.shape[0]
    return None


def merge_layer(layer, weight: torch.Tensor) -> torch.Tensor:
    """peft's own merge of one layer, on the real weight just read; the layer is emptied again after."""
    layer.base_layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.merge(safe_merge=True)
    merged = layer.base_layer.weight.detach()
    layer.base_layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    layer.merged_adapters.clear()
    return merged
