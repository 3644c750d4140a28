"""The PEFT method of a run: its peft config, what training must add for it, and what it leaves behind.

Owns: building the peft config for `method:` (LoRA and its variants, AdaLoRA, IA3, prompt and prefix
tuning), the trainable-token indices of tokens added to the vocabulary, AdaLoRA's rank budget (a trainer
callback that sets the schedule from the real step count and runs peft's `update_and_allocate` after each
optimizer step, plus the orthogonality penalty), LoftQ initialisation of a 4-bit base, and whether an
adapter can be merged. Does not build the trainer (lorakit.train.trainer) or load models (lorakit.model.base).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorakit.errors import LorakitError, ModelError
from lorakit.recipe.schema import LoraSection, Recipe

# peft_type values (adapter_config.json) whose adapters cannot be folded into the weights, and why
NOT_MERGEABLE = {
    "PROMPT_TUNING": "a prompt-tuning adapter is a soft prompt put in front of the input; the model's weights are "
    "untouched, so there is nothing to merge. Serve the base with the adapter (PeftModel), or use "
    "`lorakit eval`/`generate`/`chat` on the run",
    "PREFIX_TUNING": "a prefix-tuning adapter is a set of key/value vectors put in front of every attention layer; the "
    "model's weights are untouched, so there is nothing to merge. Serve the base with the adapter "
    "(PeftModel), or use `lorakit eval`/`generate`/`chat` on the run",
    "P_TUNING": "a p-tuning adapter is a trained prompt encoder; there is nothing to merge into the weights",
}


def peft_config(recipe: Recipe, model=None, new_token_ids: list[int] | None = None):
    """The peft config of the recipe's method. `model` names the embedding layers for new tokens."""
    method = recipe.method
    if method == "lora":
        return lora_config(recipe.lora, model, new_token_ids)
    if method == "adalora":
        from peft import AdaLoraConfig

        lora, ada = recipe.lora, recipe.adalora
        # total_step, tinit and tfinal are placeholders until the trainer knows the step count (AdaLoraBudget)
        return AdaLoraConfig(
            task_type="CAUSAL_LM",
            target_modules=lora.target_modules,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            bias=lora.bias,
            modules_to_save=lora.modules_to_save,
            init_r=ada.init_r,
            target_r=ada.target_r,
            tinit=0,
            tfinal=0,
            total_step=1,
            deltaT=ada.deltaT,
            beta1=ada.beta1,
            beta2=ada.beta2,
            orth_reg_weight=ada.orth_reg_weight,
        )
    if method == "ia3":
        from peft import IA3Config

        ia3 = recipe.ia3
        return IA3Config(
            task_type="CAUSAL_LM",
            target_modules=ia3.target_modules,
            feedforward_modules=ia3.feedforward_modules,
            modules_to_save=ia3.modules_to_save,
        )
    if method == "prompt_tuning":
        from peft import PromptTuningConfig

        from lorakit.model.base import source as base_source

        pt = recipe.prompt_tuning
        text = pt.prompt_tuning_init == "TEXT"
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=pt.num_virtual_tokens,
            prompt_tuning_init=pt.prompt_tuning_init,
            prompt_tuning_init_text=pt.prompt_tuning_init_text if text else None,
            tokenizer_name_or_path=(recipe.model.tokenizer_name_or_path or base_source(recipe.model)) if text else None,
        )
    from peft import PrefixTuningConfig

    px = recipe.prefix_tuning
    extra = {"encoder_hidden_size": px.encoder_hidden_size} if px.encoder_hidden_size else {}
    return PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=px.num_virtual_tokens, prefix_projection=px.prefix_projection, **extra
    )


def lora_config(cfg: LoraSection, model=None, new_token_ids: list[int] | None = None):
    from peft import LoraConfig

    tokens, modules_to_save = None, cfg.modules_to_save
    if new_token_ids:
        tokens, output = new_token_training(model, new_token_ids)
        if output not in (modules_to_save or []):
            modules_to_save = [*(modules_to_save or []), output]
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=modules_to_save,
        # LoftQ on a 4-bit base is applied after the adapter exists (init_loftq); peft's own `loftq` path
        # would quantize a full-precision base itself
        init_lora_weights=True if cfg.init_lora_weights == "loftq" else cfg.init_lora_weights,
        rank_pattern=cfg.rank_pattern or {},
        alpha_pattern=cfg.alpha_pattern or {},
        trainable_token_indices=tokens,
    )


def new_token_training(model, ids: list[int]) -> tuple[dict, str]:
    """How tokens added to the vocabulary are trained: their input-embedding rows only (peft's trainable tokens),
    and the output layer in full (`modules_to_save`, as trl does for added tokens). trl computes the loss from
    `lm_head.weight` directly, so trainable-token rows on the output layer (or on embeddings tied to it) would
    be bypassed: refused for tied embeddings."""
    names = {id(m): n for n, m in model.named_modules()}
    inputs, output = model.get_input_embeddings(), model.get_output_embeddings()
    if output is None or output.weight is inputs.weight:
        raise ModelError(
            "model.new_special_tokens: this model ties its input and output embeddings; trl computes "
            "the loss from the output weight directly, which would bypass the new rows (train the "
            "embeddings in full with lora.modules_to_save: [embed_tokens] instead)"
        )
    return {names[id(inputs)].rsplit(".", 1)[-1]: list(ids)}, names[id(output)].rsplit(".", 1)[-1]


def init_loftq(model, base_dir: Path) -> None:
    """LoftQ for a 4-bit base (peft's `replace_lora_weights_loftq`): each adapter starts as the best rank-r
    approximation of what 4-bit quantization removed from the original weights, read from the safetensors files."""
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    if not torch.cuda.is_available():  # peft computes the decomposition on the GPU only
        raise ModelError("lora.init_lora_weights: loftq needs a CUDA GPU (peft computes it there)")
    files = list(base_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"lora.init_lora_weights: loftq reads the original weights from safetensors files; none in {base_dir}"
        )
    replace_lora_weights_loftq(model, model_path=str(base_dir))
    undo_scaling_in_loftq(model)


def undo_scaling_in_loftq(model) -> None:
    """Workaround (peft 0.21, huggingface/peft#1982, open): `replace_lora_weights_loftq` sets B @ A to the rank-r
    approximation R of the quantization error, but the layer adds scaling x B @ A (alpha / r, or alpha / sqrt(r)
    with rsLoRA). With any scaling but 1 the start is no better than the bare 4-bit base (scaling 2 undoes it
    exactly). Dividing A and B by sqrt(scaling) makes the layer add R. Remove once peft divides by the scaling."""
    from peft.tuners.lora import Linear4bit

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear4bit):
                root = module.scaling["default"] ** 0.5
                module.lora_A["default"].weight.div_(root)
                module.lora_B["default"].weight.div_(root)


class AdaLoraBudget:
    """AdaLoRA's rank budget, wired into the trainer: the schedule is set from the real number of optimizer
    steps when training starts, and peft's `update_and_allocate` runs after every optimizer step, while the
    gradients it scores the singular values with still exist (the trainer zeroes them after this hook)."""

    def __init__(self, model, section):
        from transformers import TrainerCallback

        self.model, self.section = model, section
        budget = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                budget.set_schedule(state.max_steps)

            def on_optimizer_step(self, args, state, control, **kwargs):
                budget.model.base_model.update_and_allocate(state.global_step)

        self.callback = _Callback()

    def set_schedule(self, total: int) -> None:
        config = self.model.peft_config["default"]
        tinit, tfinal = self.section.steps(total)
        if tinit >= total - tfinal:
            raise LorakitError(
                f"adalora: tinit ({tinit} steps) and tfinal ({tfinal} steps) leave no step of the "
                f"{total} for the rank budget to shrink; lower them or train longer"
            )
        config.total_step, config.tinit, config.tfinal = total, tinit, tfinal

    def penalty(self) -> torch.Tensor:
        """The orthogonality penalty peft's AdaLoRA adds to the model's loss. trl computes the loss from
        log-probabilities itself, so the model's own loss (and this term) never reaches it: added here."""
        weight = self.model.peft_config["default"].orth_reg_weight
        terms = []
        for name, p in self.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and "default" in name:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)))
        return weight * torch.stack(terms).mean() if terms else torch.zeros(())


def final_ranks(model) -> dict[str, int]:
    """AdaLoRA: the rank each adapted layer ended with (singular values left unmasked)."""
    config = model.peft_config["default"]
    pattern = config.rank_pattern or {}
    return {
        name.removeprefix("base_model.model.").removesuffix(".lora_E").removesuffix(".default"): int(
            sum(bool(v) for v in mask)
        )
        for name, mask in pattern.items()
    }


def adalora_trainer_class():
    """trl's SFTTrainer with AdaLoRA's orthogonality penalty (built by lorakit.train.trainer, like any trainer)."""
    from trl import SFTTrainer

    class AdaLoraSFTTrainer(SFTTrainer):
        """SFTTrainer plus AdaLoRA's orthogonality penalty: peft adds it to the model's own loss, which trl does
        not use (it computes the loss from log-probabilities), so it is added to trl's loss here."""

        budget = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if not model.training or self.budget is None:
                return result
            # once per optimizer step, whatever the accumulation (trl's loss is already a per-step share)
            penalty = self.budget.penalty() / self.current_gradient_accumulation_steps
            return (result[0] + penalty, result[1]) if return_outputs else result + penalty

    return AdaLoraSFTTrainer


def rank_summary(ranks: dict[str, int]) -> str:
    """AdaLoRA's allocation at a glance: the totals, then the mean rank per kind of module."""
    values = list(ranks.values())
    if not values:
        return "-"
    kinds: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(rank)
    by_kind = ", ".join(f"{kind} {sum(r) / len(r):.1f}" for kind, r in sorted(kinds.items()))
    return (
        f"{sum(values)} in {len(values)} layers (min {min(values)}, mean {sum(values) / len(values):.1f}, "
        f"max {max(values)}); mean by module: {by_kind}; per layer in manifest.json"
    )


def peft_type(adapter_dir: Path) -> str:
    """The adapter's method as peft records it (LORA, ADALORA, IA3, PROMPT_TUNING, ...)."""
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("peft_type", "LORA")
