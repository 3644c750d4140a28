"""What training does for a PEFT method beyond its peft config, one object per method, in one place each:
AdaLoRA's rank budget, trainer and refusal to resume; LoftQ's initialisation from the original weights;
PiSSA/OLoRA's conversion of the trained adapter back to the original base. `train.trainer` calls the same
hooks for every run; the plain LoRA object does nothing at each.

Exports `MethodTraining` (the hooks, and the default) and `for_recipe`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.model import peft_methods
from lorakit.recipe.schema import Recipe

INITIAL_ADAPTER = "initial-adapter"  # PiSSA/OLoRA: the adapter as initialised, for converting the trained one


class MethodTraining:
    """The hooks, in the order the trainer calls them. Plain LoRA (and IA3, prompt and prefix tuning)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def check_resume(self) -> None:
        """Refuse `--resume` where the method's checkpoints cannot continue a run."""

    def trainer_class(self):
        from trl import SFTTrainer

        return SFTTrainer

    def built(self, trainer) -> None:
        """After the trainer (and its peft model) exist, before any step."""

    def before_training(self, trainer, run_dir: Path, main: bool) -> None:
        """Once per run, before the first step (on resume too)."""

    def saved(self, trainer, run_dir: Path) -> None:
        """After the main process saved the adapter into `run_dir`."""

    def details(self, trainer) -> dict:
        """Figures for manifest.json."""
        return {}

    def summary(self, details: dict) -> dict:
        """Rows for the closing summary."""
        return {}


class AdaLoraTraining(MethodTraining):
    def check_resume(self) -> None:
        raise LorakitError(
            "AdaLoRA runs cannot be resumed: peft writes each checkpoint's adapter cut to the ranks "
            "allocated so far, which no longer fit the full-rank layers training resumes with, and the "
            "importance estimates that drive the allocation are not saved. The checkpoints load with "
            "plain peft as adapters; start the run again to finish it"
        )

    def trainer_class(self):
        return peft_methods.adalora_trainer_class()

    def built(self, trainer) -> None:
        trainer.budget = peft_methods.AdaLoraBudget(trainer.model, self.recipe.adalora)
        trainer.add_callback(trainer.budget.callback)

    def details(self, trainer) -> dict:
        return {"adalora_final_ranks": peft_methods.final_ranks(trainer.model)}

    def summary(self, details: dict) -> dict:
        return {"final ranks": peft_methods.rank_summary(details["adalora_final_ranks"])}


class LoftQTraining(MethodTraining):
    def built(self, trainer) -> None:
        from lorakit.model import shards
        from lorakit.model.base import source

        model = self.recipe.model
        peft_methods.init_loftq(trainer.model, shards.locate(source(model), model.revision))


class MovedBaseTraining(MethodTraining):
    """PiSSA and OLoRA move the base's principal directions into the adapter: the adapter as initialised is
    kept (`initial-adapter/`), so the trained one is saved as an adapter for the original base."""

    def before_training(self, trainer, run_dir: Path, main: bool) -> None:
        initial = run_dir / INITIAL_ADAPTER
        if main and not initial.exists():
            _save_as_plain_lora(trainer.model, initial)

    def saved(self, trainer, run_dir: Path) -> None:
        initial = run_dir / INITIAL_ADAPTER
        trainer.model.save_pretrained(str(run_dir), path_initial_model_for_weight_conversion=str(initial))
        shutil.rmtree(initial)


def for_recipe(recipe: Recipe) -> MethodTraining:
    if recipe.method == "adalora":
        return AdaLoraTraining(recipe)
    if recipe.lora.init_lora_weights == "loftq":
        return LoftQTraining(recipe)
    if recipe.lora.moves_base_weights():
        return MovedBaseTraining(recipe)
    return MethodTraining(recipe)


def _save_as_plain_lora(model, path: Path) -> None:
    """The adapter before training, saved as a plain LoRA (peft's recipe for converting PiSSA/OLoRA)."""
    config = model.peft_config["default"]
    chosen = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(path))
    finally:
        config.init_lora_weights = chosen
