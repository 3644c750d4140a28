"""Recipe sections of the PEFT methods other than LoRA: `adalora:`, `ia3:`, `prompt_tuning:`, `prefix_tuning:`.

Keys use peft's own names (`AdaLoraConfig`, `IA3Config`, `PromptTuningConfig`, `PrefixTuningConfig`). Which
section applies is chosen by the recipe's top-level `method:`; the rules tying them together live in
`MethodRules` below, which `lorakit.recipe.schema.Recipe` inherits. Nothing here imports torch or the HF stack.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lorakit.recipe.section import Section

Method = Literal["lora", "adalora", "ia3", "prompt_tuning", "prefix_tuning"]
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")  # virtual tokens in front of every example, nothing to merge
METHOD_NAMES = {
    "lora": "LoRA",
    "adalora": "AdaLoRA",
    "ia3": "IA3",
    "prompt_tuning": "prompt tuning",
    "prefix_tuning": "prefix tuning",
}  # as people write them


class AdaLoraSection(Section):
    """AdaLoRA (`method: adalora`, peft `AdaLoraConfig` names): LoRA whose ranks are reallocated during training,
    from the layers that matter least to those that matter most. Target modules, alpha, dropout, bias and
    `modules_to_save` come from the `lora:` section."""

    init_r: int = Field(12, gt=0, description="Rank every adapted layer starts with.")
    target_r: int = Field(
        8,
        gt=0,
        description="Average rank per layer at the end: the budget shrinks from "
        "`init_r` x layers to `target_r` x layers, moved to the layers whose singular values matter most.",
    )
    tinit: float = Field(
        0.1,
        ge=0,
        description="Steps trained at full rank before the budget starts to shrink: a "
        "number of steps, or a ratio of all steps when below 1.",
    )
    tfinal: float = Field(
        0.2,
        ge=0,
        description="Steps trained at the final ranks after the budget stops shrinking: "
        "a number of steps, or a ratio of all steps when below 1.",
    )
    deltaT: int = Field(1, gt=0, description="Steps between two reallocations of the budget.")
    beta1: float = Field(0.85, gt=0, lt=1, description="Smoothing of the importance (sensitivity) estimate.")
    beta2: float = Field(0.85, gt=0, lt=1, description="Smoothing of its uncertainty estimate.")
    orth_reg_weight: float = Field(
        0.5,
        ge=0,
        description="Weight of the penalty that keeps the singular vectors orthogonal (added to the training loss).",
    )

    @model_validator(mode="after")
    def _budget_shrinks(self) -> AdaLoraSection:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) is above init_r ({self.init_r}); AdaLoRA only removes rank")
        for key in ("tinit", "tfinal"):
            value = getattr(self, key)
            if value >= 1 and value != int(value):
                raise ValueError(f"{key}: a step count must be whole (or a ratio below 1), got {value}")
        if self.tinit < 1 and self.tfinal < 1 and self.tinit + self.tfinal >= 1:
            raise ValueError(f"tinit + tfinal ({self.tinit} + {self.tfinal}) leave no steps for the budget to shrink")
        return self

    def steps(self, total: int) -> tuple[int, int]:
        """(tinit, tfinal) in steps, for a run of `total` optimizer steps."""
        return tuple(int(v * total) if v < 1 else int(v) for v in (self.tinit, self.tfinal))


class IA3Section(Section):
    """IA3 (`method: ia3`, peft `IA3Config` names): learned vectors that rescale activations; about 0.01% of the
    parameters of LoRA's update, mergeable."""

    target_modules: list[str] | str | None = Field(
        None,
        description="Modules whose activations are rescaled: module names, one regular expression, or "
        "`all-linear`. Unset: peft's choice for the architecture (Llama: k_proj, v_proj, down_proj).",
    )
    feedforward_modules: list[str] | str | None = Field(
        None,
        description="Which of `target_modules` are feed-forward layers (their input is rescaled rather than "
        "their output); must be a subset of them. Unset: peft's choice (Llama: down_proj).",
    )
    modules_to_save: list[str] | None = Field(None, description="Modules trained in full and saved with the adapter.")

    @model_validator(mode="after")
    def _feedforward_needs_targets(self) -> IA3Section:
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ValueError("feedforward_modules needs target_modules (it names a subset of them)")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ValueError(f"feedforward_modules: {', '.join(extra)} not in target_modules")
        return self


class PromptTuningSection(Section):
    """Prompt tuning (`method: prompt_tuning`, peft `PromptTuningConfig` names): a soft prompt of trained
    embeddings put in front of every example; the model is untouched, so there is nothing to merge."""

    num_virtual_tokens: int = Field(20, gt=0, description="Length of the soft prompt, in tokens.")
    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] = Field(
        "RANDOM",
        description="Start from random vectors, from the embeddings of `prompt_tuning_init_text`, or from "
        "randomly sampled vocabulary embeddings.",
    )
    prompt_tuning_init_text: str | None = Field(
        None,
        description="With `prompt_tuning_init: TEXT`: the text whose token embeddings start the soft prompt "
        "(repeated or cut to `num_virtual_tokens`), e.g. a task instruction.",
    )

    @model_validator(mode="after")
    def _text_with_text_init(self) -> PromptTuningSection:
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init TEXT needs prompt_tuning_init_text")
        if self.prompt_tuning_init_text and self.prompt_tuning_init != "TEXT":
            raise ValueError(
                "prompt_tuning_init_text is given but prompt_tuning_init is not TEXT, so it would be "
                "ignored; set `prompt_tuning_init: TEXT` or remove the text"
            )
        return self


class PrefixTuningSection(Section):
    """Prefix tuning (`method: prefix_tuning`, peft `PrefixTuningConfig` names): trained key/value vectors in
    front of every attention layer; the model is untouched, so there is nothing to merge."""

    num_virtual_tokens: int = Field(20, gt=0, description="Length of the prefix, in positions.")
    prefix_projection: bool = Field(
        False,
        description="Produce the prefix through a two-layer MLP (the paper's "
        "reparameterisation, steadier training, more parameters).",
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Hidden size of that MLP (default: the model's hidden size)."
    )

    @model_validator(mode="after")
    def _hidden_size_needs_projection(self) -> PrefixTuningSection:
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise ValueError("encoder_hidden_size sizes the projection MLP; set prefix_projection: true")
        return self


# What each PEFT method reads from the `lora:` section (AdaLoRA is LoRA with a rank budget on top).
LORA_KEYS_FOR = {
    "lora": None,
    "adalora": {"target_modules", "lora_alpha", "lora_dropout", "bias", "modules_to_save"},
    "ia3": set(),
    "prompt_tuning": set(),
    "prefix_tuning": set(),
}
METHOD_SECTIONS = ("adalora", "ia3", "prompt_tuning", "prefix_tuning")


class MethodRules(Section):
    """The rules tying `method` to the recipe's other settings, for `lorakit.recipe.schema.Recipe` (which declares the
    fields). Fields validate in declaration order, so `method` is known when `lora`, the method sections and
    `train` are checked, and each error carries the key, and so the line, of the setting that does not fit."""

    @field_validator("method", check_fields=False)
    @classmethod
    def _new_tokens_need_lora(cls, value: str, info: ValidationInfo) -> str:
        model = info.data.get("model")
        if model is not None and model.new_special_tokens and value != "lora":
            raise ValueError(
                "model.new_special_tokens are trained through LoRA's trainable tokens; they need "
                f"`method: lora` (got {value})"
            )
        return value

    @field_validator("lora", check_fields=False)
    @classmethod
    def _lora_keys_the_method_reads(cls, value, info: ValidationInfo) -> object:
        method = info.data.get("method", "lora")
        allowed = LORA_KEYS_FOR[method]
        stray = sorted(value.model_fields_set - allowed) if allowed is not None else []
        if stray:
            uses = f"only {', '.join(sorted(allowed))} from `lora:`" if allowed else "no `lora:` settings"
            raise ValueError(
                f"`method: {method}` uses {uses}; lora.{stray[0]} would be ignored"
                + (
                    " (set the rank in adalora.init_r / adalora.target_r)"
                    if method == "adalora" and "r" in stray
                    else ""
                )
            )
        return value

    @field_validator(*METHOD_SECTIONS, check_fields=False)
    @classmethod
    def _section_of_the_method(cls, value, info: ValidationInfo):
        method = info.data.get("method", "lora")
        if value.model_fields_set and method != info.field_name:
            raise ValueError(
                f"`{info.field_name}:` settings are given but `method` is {method}; set "
                f"`method: {info.field_name}` or remove them"
            )
        return value

    @field_validator("train", check_fields=False)
    @classmethod
    def _prompt_learning_is_not_packed(cls, value, info: ValidationInfo) -> object:
        method = info.data.get("method", "lora")
        if method in PROMPT_LEARNING and value.packing is True:
            raise ValueError(
                f"packing: `{method}` puts virtual tokens in front of each row, so packed examples "
                "would share one prompt and attend to each other; set packing to auto or false"
            )
        return value
