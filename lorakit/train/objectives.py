"""The training objectives (`train.objective`) as trl trains them: SFT through `SFTTrainer` (or the PEFT method's
subclass), DPO through `DPOTrainer`; each one's config class, the settings of the recipe it reads, and what
`manifest.json` records of it.

lorakit's data arrive tokenized, masked and length-checked (lorakit.data): SFTTrainer takes pre-tokenized
input_ids/labels as they are; trl's preference trainers tokenize every dataset themselves, so lorakit's
subclass hands them its prompt_ids/chosen_ids/rejected_ids unchanged (`_prepare_dataset`, the one step it
replaces: trl's own rendering would re-apply the template and append eos after the end-of-turn token).
With a PEFT adapter and no reference model, DPOTrainer takes the reference from the same model with the
adapter switched off (a fresh adapter) or from a frozen copy of the adapter it starts from: never a second
copy of the base.
"""

from __future__ import annotations

from lorakit.model.method_training import MethodTraining
from lorakit.recipe.schema import OBJECTIVE_KEYS, Recipe

TRAINERS = {"sft": "SFT", "dpo": "DPO"}  # trl's name for each objective's trainer and config
PREFERENCE_FIGURES = {  # lorakit's name -> trl's logged metric, on held-out pairs
    "reward_accuracy": "rewards/accuracies",
    "margin": "rewards/margins",
    "chosen_reward": "rewards/chosen",
    "rejected_reward": "rewards/rejected",
    "chosen_logps": "logps/chosen",
    "rejected_logps": "logps/rejected",
}


def config_class(objective: str):
    import trl

    return getattr(trl, f"{TRAINERS[objective]}Config")


def trainer_class(objective: str, method: MethodTraining):
    """The trainer class of the run: the method's (SFT) or the objective's, taking lorakit's data as they are."""
    if objective == "sft":
        return method.trainer_class()
    import trl

    base = getattr(trl, f"{TRAINERS[objective]}Trainer")
    return type(f"Pretokenized{base.__name__}", (_Pretokenized, base), {})


class _Pretokenized:
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # lorakit.data.pairs.trl_columns: already trl's columns, checked row by row


def objective_values(recipe: Recipe) -> dict:
    """The objective's settings for its trl config: those the recipe sets (trl's defaults for the rest), and
    the length policy left to lorakit (sequences arrive within data.max_length)."""
    train = recipe.train
    if train.objective == "sft":
        return {"max_length": recipe.data.max_length}
    values = {k: getattr(train, k) for k in OBJECTIVE_KEYS if train.objective in OBJECTIVE_KEYS[k]}
    values = {k: v for k, v in values.items() if v is not None}
    if "loss_type" in values:
        values["loss_type"] = [values["loss_type"]]  # DPOConfig takes a list (several losses combine)
    return {**values, "max_length": None}


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
    values = {k: getattr(args, k) for k in OBJECTIVE_KEYS if objective in OBJECTIVE_KEYS[k]}
    if isinstance(values.get("loss_type"), list) and len(values["loss_type"]) == 1:
        values["loss_type"] = values["loss_type"][0]
    reference = "a frozen copy of model.adapter" if continued else "the base with the adapter switched off"
    return {"name": objective, **values, "reference": reference}
