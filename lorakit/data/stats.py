"""Figures about a prepared split: lengths, trained share, and what padding or packing would cost.

Packing is counted with trl's own `pack_dataset` (best-fit decreasing), the function the trainer packs
with, so the preview's row count is the trainer's. Padding is counted over seeded random batches of the
recipe's micro-batch size, as an unpacked trainer would draw them.
"""

from __future__ import annotations

import random

import numpy as np

from lorakit.data.encode import Split


def split_stats(split: Split, *, max_length: int, batch_size: int, seed: int) -> dict:
    lengths = split.lengths
    tokens = int(lengths.sum())
    return {
        "examples": int(len(lengths)),
        "tokens": tokens,
        "trained_tokens": split.trained_tokens,
        "trained_share": round(split.trained_tokens / tokens, 4) if tokens else 0.0,
        "tokens_per_example": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "mean": round(float(lengths.mean()), 1),
            "max": int(lengths.max()),
        },
        "truncated": split.truncated,
        "dropped": dict(split.drops),
        "padded": _padded(lengths, batch_size, seed),
        "packed": packed_rows(split, max_length),
    }


def packed_rows(split: Split, max_length: int) -> dict:
    """Rows of up to `max_length` tokens that trl's BFD packing makes, and how full they are."""
    from trl.data_utils import pack_dataset

    rows = len(pack_dataset(split.dataset.select_columns(["input_ids"]), max_length, strategy="bfd"))
    return {"rows": rows, "max_length": max_length, "fill": round(split.tokens / (rows * max_length), 4)}


def _padded(lengths: np.ndarray, batch_size: int, seed: int) -> dict:
    """Share of computed positions that are padding when batches are padded to their longest example."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    shuffled = lengths[order]
    positions = sum(
        int(chunk.max()) * len(chunk)
        for chunk in (shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size))
    )
    return {"batch_size": batch_size, "padding_share": round(1 - int(lengths.sum()) / positions, 4)}
