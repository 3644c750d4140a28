"""Checking a merged model against base + adapter on real inputs: logits, side by side.

Owns: choosing the inputs (the run's eval examples, else its training examples, else a few chat
prompts), computing next-token logits one model at a time (so only one model is in memory), the
comparison figures and the tolerance per dtype. Does not load or write checkpoints (lorakit.merge.fold).
"""

from __future__ import annotations

import gc

import torch

from lorakit import data as data_mod
from lorakit.errors import LorakitError
from lorakit.recipe.schema import Recipe

# Largest |merged - reference| logit difference accepted, relative to the largest reference logit
# (at least 1). A float32 merge differs from base + adapter only by summation order. A half-precision
# merge rounds every merged weight (8 or 11 significant bits), and the rounding adds up over the layers,
# so its bound is loose; what separates a right half-precision merge from a wrong one is also that the
# merged model must be much closer to base + adapter than to the base alone (see `passes`).
RTOL = {"float32": 1e-5, "bfloat16": 1e-1, "float16": 2e-2}
MIN_TOP1 = {"float32": 0.99, "bfloat16": 0.9, "float16": 0.95}
FALLBACK_PROMPTS = ["Say hello.", "What is two plus two?", "Name a colour.", "Write one short sentence."]


def inputs_for(recipe: Recipe, tokenizer, count: int = 8, max_tokens: int = 128) -> tuple[list[list[int]], str]:
    """Token ids to compare on, and where they came from."""
    try:
        prepared = data_mod.prepare(recipe.data, tokenizer, recipe.train.seed)
    except (LorakitError, OSError):
        prepared = None
    if prepared is not None:
        split, name = (prepared.eval, "eval") if prepared.eval is not None else (prepared.train, "train")
        return [ids[:max_tokens] for ids in split.dataset["input_ids"][:count]], f"the run's {name} examples"
    if tokenizer.chat_template:
        ids = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            for p in FALLBACK_PROMPTS
        ]
    else:
        ids = [tokenizer(p)["input_ids"] for p in FALLBACK_PROMPTS]
    return [list(i) for i in ids], "built-in prompts (the run's data files are not readable)"


@torch.no_grad()
def logits(model, inputs: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits of every position, one example at a time (no padding to get wrong)."""
    device = next(p for p in model.parameters()).device
    model.eval()
    out = [
        model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu() for ids in inputs
    ]
    del model
    gc.collect()
    return out


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    diffs = [(a - b).abs().max().item() for a, b in zip(reference, other)]
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other))
    positions = sum(a.shape[0] for a in reference)
    scale = max(1.0, max(a.abs().max().item() for a in reference))
    return {
        "max_abs_diff": max(diffs),
        "top1_agreement": round(agree / positions, 4),
        "positions": positions,
        "max_abs_logit": round(scale, 3),
    }


def verdict(to_reference: dict, to_base: dict, dtype: str) -> str:
    """Empty when the merged model matches base + adapter and differs from the base; else the reason."""
    if to_reference["max_abs_diff"] > RTOL[dtype] * to_reference["max_abs_logit"]:
        return "outside tolerance"
    if to_reference["top1_agreement"] < MIN_TOP1[dtype]:
        return "top-1 agreement too low"
    if to_base["max_abs_diff"] <= max(
        10 * RTOL[dtype] * to_reference["max_abs_logit"] if dtype == "float32" else 0, 2 * to_reference["max_abs_diff"]
    ):
        return "the merged model equals the base: the adapter changed nothing"
    return ""


def tolerance(figures: dict, dtype: str) -> str:
    return (
        f"<= {RTOL[dtype] * figures['max_abs_logit']:.2g}, top-1 >= {MIN_TOP1[dtype]:.0%}, and at most half "
        "the distance to the bare base"
    )
