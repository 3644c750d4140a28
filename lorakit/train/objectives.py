"""The training objectives (`train.objective`) as trl trains them: SFT through `SFTTrainer` (or the PEFT method's
subclass), DPO through `DPOTrainer`, KTO through `KTOTrainer`, ORPO through `trl.experimental`'s `ORPOTrainer`
and SimPO through its `CPOTrainer` (`loss_type: simpo`); each one's config class, the settings of the recipe it
reads, and what `manifest.json` records of it.

lorakit's data arrive tokenized, masked and length-checked (lorakit.data): SFTTrainer takes pre-tokenized
input_ids/labels as they are; trl's preference trainers tokenize every dataset themselves (re-applying the
template, appending eos after the end-of-turn token), so each subclass here replaces that one step and reads
the columns lorakit.data.pairs lays out for it (`Objective.layout`). For KTO that step also adds what trl's
would: the mismatched completions its KL term is estimated from, in a seeded shuffled order (KTO trains
sequentially). With a PEFT adapter and no reference model, DPOTrainer and KTOTrainer take the reference from the
same model with the adapter switched off (a fresh adapter) or from a frozen copy of the adapter it starts from:
never a second copy of the base. ORPO and SimPO need no reference.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from lorakit.model.method_training import MethodTraining
from lorakit.recipe.schema import OBJECTIVE_FACTS, OBJECTIVE_KEYS, Recipe


@dataclass(frozen=True)
class Objective:
    """One objective as trl trains it."""

    trainer: str  # module:class of trl's trainer
    config: str  # module:class of its config
    layout: str  # the columns it reads: `examples` (SFT), or lorakit.data.pairs.LAYOUTS
    fixed: dict = field(default_factory=dict)  # set by the objective itself (SimPO is CPO's loss `simpo`)
    defaults: dict = field(default_factory=dict)  # lorakit's defaults where trl's are for another loss


OBJECTIVES = {
    "sft": Objective("trl:SFTTrainer", "trl:SFTConfig", "examples"),
    "dpo": Objective("trl:DPOTrainer", "trl:DPOConfig", "replies"),
    "kto": Objective("trl:KTOTrainer", "trl:KTOConfig", "unpaired", fixed={"train_sampling_strategy": "sequential"}),
    "orpo": Objective("trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig", "sequences"),
    "simpo": Objective(
        "trl.experimental.cpo:CPOTrainer",
        "trl.experimental.cpo:CPOConfig",
        "sequences",
        fixed={"loss_type": "simpo"},
        defaults={"beta": 2.0, "cpo_alpha": 0.0},  # the SimPO paper's scale, and its pure form (no SFT term)
    ),
}
PREFERENCE_FIGURES = {  # lorakit's name -> trl's logged metric, on held-out pairs
    "reward_accuracy": "rewards/accuracies",
    "margin": "rewards/margins",
    "chosen_reward": "rewards/chosen",
    "rejected_reward": "rewards/rejected",
    "chosen_logps": "logps/chosen",
    "rejected_logps": "logps/rejected",
}


def _load(path: str):
    module, name = path.split(":")
    import warnings

    with warnings.catch_warnings():  # trl.experimental says it is experimental on import; the docs say so once
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)


def config_class(objective: str):
    return _load(OBJECTIVES[objective].config)


def layout(objective: str) -> str:
    """The columns of lorakit's data the objective's trainer reads (`Split.to_dataset`)."""
    return OBJECTIVES[objective].layout


def trainer_class(objective: str, method: MethodTraining):
    """The trainer class of the run: the method's (SFT) or the objective's, taking lorakit's data as they are."""
    if objective == "sft":
        return method.trainer_class()
    base = _load(OBJECTIVES[objective].trainer)
    mixin = {"replies": _Replies, "sequences": _Sequences, "unpaired": _Unpaired}[OBJECTIVES[objective].layout]
    return type(f"Pretokenized{base.__name__}", (mixin, base), {})


class _Replies:
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # lorakit.data.pairs.reply_columns: already trl's columns, checked row by row


class _Sequences:
    def tokenize_row(self, feature, model=None) -> dict:
        return feature  # lorakit.data.pairs.sequence_columns: each side whole, with its mask and labels

    def _track_num_input_tokens(self, inputs):
        """Tokens seen: both sides of every pair (the Trainer looks for `input_ids`, which these batches name
        `chosen_input_ids` and `rejected_input_ids`, and would count none)."""
        import torch

        if self.args.include_num_input_tokens_seen == "no":
            return
        seen = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
        seen = torch.as_tensor(seen, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(seen).sum().item()


class _Unpaired:
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """lorakit.data.pairs.unpaired_columns, plus what KTO's own preparation adds: the training order
        shuffled once (seeded: KTO reads it sequentially, so a file sorted by label would give one-sided batches),
        and each example's mismatched completion for the KL term, the previous one's within its micro-batch."""
        if dataset_name == "train":
            dataset = dataset.shuffle(seed=args.seed).flatten_indices()
        if not self.calculate_KL:
            return dataset

        def mismatched(rows: dict) -> dict:
            return {"KL_completion_ids": [rows["completion_ids"][-1]] + rows["completion_ids"][:-1]}

        return dataset.map(mismatched, batched=True, batch_size=args.per_device_train_batch_size)


def wrap(objective: str, model, peft_config):
    """(model, the peft config left for the trainer). trl's experimental trainers (ORPO, CPO) prepare a
    4-bit model again and recast its norms and head when they apply the adapter; lorakit prepared the base
    once already (lorakit.model.base.prepare_for_training), so it applies the adapter itself for them."""
    if not OBJECTIVE_FACTS[objective].experimental or peft_config is None:
        return model, peft_config
    from peft import get_peft_model

    return get_peft_model(model, peft_config), None


def objective_values(recipe: Recipe) -> dict:
    """The objective's settings for its trl config: those the recipe sets (lorakit's or trl's defaults for
    the rest), and the length policy left to lorakit (sequences arrive within data.max_length)."""
    train = recipe.train
    if train.objective == "sft":
        return {"max_length": recipe.data.max_length}
    objective = OBJECTIVES[train.objective]
    values = {k: getattr(train, k) for k in OBJECTIVE_KEYS if train.objective in OBJECTIVE_KEYS[k]}
    values = {**objective.defaults, **{k: v for k, v in values.items() if v is not None}, **objective.fixed}
    if train.objective == "dpo":
        if "loss_type" in values:
            values["loss_type"] = [values["loss_type"]]  # DPOConfig takes a list (several losses combine)
        return {**values, "max_length": None}
    return {**values, "max_length": recipe.data.max_length}


def drop_reference(model) -> None:
    """trl's frozen copy of the adapter a preference run continues (the reference, adapter `ref`) is not part
    of what the run trained; removed before the adapter is saved."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def record(recipe: Recipe, args, continued: bool) -> dict:
    """The objective and the value of each of its settings the run used, for manifest.json."""
    objective = recipe.train.objective
    if objective == "sft":
        return {"name": "sft"}
    keys = [k for k in OBJECTIVE_KEYS if objective in OBJECTIVE_KEYS[k]] + list(OBJECTIVES[objective].fixed)
    values = {k: getattr(args, k) for k in dict.fromkeys(keys)}
    if isinstance(values.get("loss_type"), list) and len(values["loss_type"]) == 1:
        values["loss_type"] = values["loss_type"][0]
    if not OBJECTIVE_FACTS[objective].reference:
        reference = "none (reference-free)"
    else:
        reference = "a frozen copy of model.adapter" if continued else "the base with the adapter switched off"
    return {"name": objective, **values, "disable_dropout": args.disable_dropout, "reference": reference}
