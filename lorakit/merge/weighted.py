"""The combined adapter itself: several runs' LoRA adapters loaded by peft onto one weightless (meta) copy
of the base, combined by peft's `add_weighted_adapter`, and the combined update measured against the
weighted sum of the runs' updates. The combination reads adapter weights only, so memory is the adapters'.

Owns: the skeleton with every adapter under its own name, the call to peft, the one correction peft needs
(rsLoRA scaling), the figures. Does not choose what may be combined (lorakit.merge.combine) nor write files.
"""

from __future__ import annotations

import math

import torch

from lorakit import upstream
from lorakit.errors import LorakitError, ModelError
from lorakit.merge import skeleton as adapter_mod

COMBINED = "combined"
RTOL = 1e-5  # float32 arithmetic: relative (Frobenius) difference of an update from its exact value


def combine(runs: list, weights: list[float], combination: str, density: float | None, seed: int, base_dir):
    """(state dict, LoraConfig, figures) of the combined adapter, ready for `save_file` / `save_pretrained`."""
    from peft.utils import get_peft_model_state_dict

    model, layers = _on_skeleton(runs, base_dir)
    keys = [f"run{i}" for i in range(len(runs))]
    torch.manual_seed(seed)  # DARE drops entries at random
    try:
        model.add_weighted_adapter(keys, weights, COMBINED, combination_type=combination, density=density)
    except (ValueError, TypeError) as exc:
        raise LorakitError(f"peft refused the combination: {str(exc).splitlines()[0]}") from None
    upstream.keep_rslora_scaling_one(model, layers, COMBINED)
    for name, layer in layers.items():
        if COMBINED not in layer.lora_A:
            adapted = next(r.name for k, r in zip(keys, runs) if k in layer.lora_A)
            raise ModelError(
                f"the combined adapter leaves out {name}, which run {adapted} adapts (peft takes the layer "
                "selection of the first run: layers_to_transform / exclude_modules differ); reorder the "
                "runs or combine runs that adapt the same layers"
            )
    figures = delta_figures(layers, keys, weights, combination)
    config = model.peft_config[COMBINED]
    figures["rank"] = config.r
    config.inference_mode = True
    config.base_model_name_or_path = runs[0].adapter.get("base_model_name_or_path")
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=COMBINED).items()}
    return state, config, figures


def _on_skeleton(runs: list, base_dir):
    """Every run's adapter loaded by peft, each under its own name, onto a weightless copy of the base."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora import Embedding, LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir), dtype=torch.float32)
    model = None
    for i, run in enumerate(runs):
        config = PeftConfig.from_pretrained(run.path)
        config.init_lora_weights = True  # the trained weights replace it; PiSSA-like inits would read the base
        try:
            if model is None:
                model = get_peft_model(skeleton, config, adapter_name=f"run{i}", low_cpu_mem_usage=True)
            else:
                model.add_adapter(f"run{i}", config, low_cpu_mem_usage=True)
        except ValueError as exc:
            raise ModelError(
                f"run {run.name}: the adapter does not fit {base_dir}: {str(exc).splitlines()[0]}"
            ) from None
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in layers.items():
        if isinstance(layer, Embedding):
            raise ModelError(f"an adapter puts LoRA on the embedding layer {name}; combining does not handle it yet")
        # an empty CPU placeholder: peft puts adapter weights on the base weight's device, and on meta they
        # would be dropped (the combination reads adapter weights only)
        layer.base_layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    for i, run in enumerate(runs):
        state = adapter_mod.finite_state(run.path, f"run {run.name}: the adapter")
        try:
            loaded = set_peft_model_state_dict(model, state, adapter_name=f"run{i}", low_cpu_mem_usage=True)
        except RuntimeError as exc:  # shape mismatches
            raise ModelError(
                f"run {run.name}: the adapter does not fit {base_dir}: {str(exc).strip().splitlines()[-1].strip()}"
            ) from None
        missing = [k for k in loaded.missing_keys if f".run{i}." in k]
        if loaded.unexpected_keys or missing:
            raise ModelError(
                f"run {run.name}: adapter weight {(loaded.unexpected_keys or missing)[0]} "
                + ("matches nothing in the base" if loaded.unexpected_keys else "is missing")
            )
    for layer in layers.values():
        for param_name, param in layer.named_parameters():
            if "lora_" in param_name:
                param.data = param.data.float()  # combination arithmetic in float32, whatever training stored
    return model, layers


@torch.no_grad()
def delta_figures(layers: dict, keys: list[str], weights: list[float], combination: str) -> dict:
    """The combined update against the weighted sum of the runs' updates, layer by layer (worst layer kept).
    `cat` must equal the sum; peft's `linear` adds lora_A and lora_B separately (each source scaled by
    sqrt(weight x scaling)), so it equals B_sum @ A_sum, which holds cross terms B_i A_j: it is checked
    against that rule, and its distance from the sum is reported."""
    to_sum, to_rule = [], []
    for layer in layers.values():
        present = [(k, w) for k, w in zip(keys, weights) if k in layer.lora_A]
        if not present:
            continue
        combined = layer.get_delta_weight(COMBINED)
        expected = sum(w * layer.get_delta_weight(k) for k, w in present)
        to_sum.append(_relative(combined, expected))
        if combination == "linear":
            factors = [(k, w * layer.scaling[k]) for k, w in present]
            a = sum(math.copysign(math.sqrt(abs(s)), s) * layer.lora_A[k].weight for k, s in factors)
            b = sum(math.sqrt(abs(s)) * layer.lora_B[k].weight for k, s in factors)
            rule = b @ a * layer.scaling[COMBINED]
            to_rule.append(_relative(combined, rule.T if layer.fan_in_fan_out else rule))
    figures = {
        "layers": len(to_sum),
        "vs_weighted_sum": {"max_rel_diff": max(to_sum), "mean_rel_diff": sum(to_sum) / len(to_sum)},
        "checks": [],
    }
    if combination == "cat":
        figures["checks"].append(
            {
                "what": "combined update = weighted sum of the runs' updates",
                "max_rel_diff": max(to_sum),
                "passed": max(to_sum) <= RTOL,
            }
        )
    if combination == "linear":
        figures["vs_peft_linear_rule"] = {"max_rel_diff": max(to_rule)}
        figures["checks"].append(
            {
                "what": "combined update = (sum of scaled lora_B) @ (sum of scaled lora_A)",
                "max_rel_diff": max(to_rule),
                "passed": max(to_rule) <= RTOL,
            }
        )
    return figures


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).norm().item() / max(expected.norm().item(), 1e-12)
