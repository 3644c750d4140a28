"""The set-up of a training run, decided once: precision and dtype (from the hardware), the engine (from
the launch), the refusals that follow from them, the optimizer, Liger and packing (from the model's
config, before any weight is read). `lorakit train` resolves it at the start and hands it down: the
trainer's arguments, the base's loading and the manifest read it and never decide again.

Exports `Setup` and `for_training`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.model import engines
from lorakit.model.base import Precision, model_class_for, resolve_precision, use_liger, use_packing
from lorakit.recipe.schema import Recipe


@dataclass(frozen=True)
class Setup:
    precision: Precision
    engine: engines.Engine
    optimizer: str
    liger: bool
    packing: bool
    four_bit: bool = False  # QLoRA: the base is loaded in 4-bit NF4 (model.load_in_4bit)

    def describe_loading(self, name: str) -> str:
        weights = "4-bit NF4" if self.four_bit else self.precision.dtype
        return f"loading {name} ({weights}, {self.precision.device}, compute {self.precision.dtype})"


def for_training(recipe: Recipe, *, processes: int, engine: engines.Engine | None = None) -> Setup:
    """Resolve, refusing (with every reason at once) what would fail under the engine; `processes` are those
    the launch started on this machine."""
    import torch

    precision = resolve_precision(recipe.model)
    engine = engine or engines.from_environment()
    cuda = torch.cuda.is_available()
    engines.check(
        recipe,
        engine,
        cuda=cuda,
        dtype=precision.dtype,
        processes=processes,
        gpus=torch.cuda.device_count() if cuda else None,
    )
    optimizer = engines.default_optim(recipe, engine)
    engines.check_optim(optimizer)
    model_class, model_type = model_class_for(recipe.model)
    liger = recipe.train.use_liger_kernel is not False and use_liger(
        recipe.train.use_liger_kernel, precision, model_type
    )
    packing = use_packing(recipe.train.packing, model_class, model_type, recipe.method)
    return Setup(precision, engine, optimizer, liger, packing, recipe.model.load_in_4bit)
