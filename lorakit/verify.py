"""Checking a merged model against base + adapter on real inputs: logits, side by side.

Owns: choosing the inputs (the run's eval examples, else its training examples, else a few chat
prompts), computing next-token logits one model at a time (so only one model is in memory), the
comparison figures and the tolerance per dtype. Does not load or write checkpoints (lorakit.merge).
"""

from __future__ import annotations

import gc

import torch

from lorakit import data as data_mod
from lorakit.config import Recipe
from lorakit.errors import LorakitError

# Largest |merged - reference| logit difference accepted, relative to the largest reference logit
# (at least 1): float32 merges differ only by summation order; half precision rounds every weight.
RTOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
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
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                         return_dict=False) for p in FALLBACK_PROMPTS]
    return [list(i) for i in ids], "built-in prompts (the run's data files are not readable)"


@torch.no_grad()
def logits(model, inputs: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits of every position, one example at a time (no padding to get wrong)."""
    device = next(p for p in model.parameters()).device
    model.eval()
    out = [model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu()
           for ids in inputs]
    del model
    gc.collect()
    return out


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    diffs = [(a - b).abs().max().item() for a, b in zip(reference, other)]
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other))
    positions = sum(a.shape[0] for a in reference)
    scale = max(1.0, max(a.abs().max().item() for a in reference))
    return {"max_abs_diff": max(diffs), "top1_agreement": round(agree / positions, 4), "positions": positions,
            "max_abs_logit": round(scale, 3)}


def passes(figures: dict, dtype: str) -> bool:
    return (figures["max_abs_diff"] <= RTOL[dtype] * figures["max_abs_logit"]
            and figures["top1_agreement"] >= MIN_TOP1[dtype])


def tolerance(figures: dict, dtype: str) -> str:
    return f"<= {RTOL[dtype] * figures['max_abs_logit']:.2g}, top-1 >= {MIN_TOP1[dtype]:.0%}"
