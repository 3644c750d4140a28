"""Data: the recipe's `data:` files -> canonical examples -> token ids with lorakit's own labels.

Owns reading the files (`rows`), the chat template choice (`templates`), rendering, masking and the
length policy (`encode`), and the eval split. Does not own tokenizer or model loading.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from lorakit.config import DataConfig
from lorakit.data.encode import IGNORE, Encoder, Split
from lorakit.data.rows import Chat, detect_format, read_rows, rename_columns, to_example
from lorakit.data.templates import apply_chat_template_choice
from lorakit.errors import DataError

__all__ = ["IGNORE", "PreparedData", "Split", "fingerprint", "prepare"]


@dataclass
class PreparedData:
    train: Split
    eval: Split | None
    format: str
    template: str
    end_of_turn_id: int
    fingerprints: dict[str, str]
    rows: dict[str, int]
    bad_rows: list[str]


def fingerprint(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read, split, render and tokenize the recipe's data; every example must train something."""
    bad: list[str] | None = [] if cfg.on_bad_rows == "skip" else None
    train_rows = _rows(cfg.train, cfg, bad)
    if not train_rows:
        raise DataError(f"{cfg.train}: every row is malformed; first: {bad[0]}")
    fmt = cfg.format if cfg.format != "auto" else detect_format(train_rows[0][1], train_rows[0][0])
    eval_rows = _rows(cfg.eval, cfg, bad) if cfg.eval is not None else None
    if cfg.eval_fraction is not None:
        train_rows, eval_rows = _split(train_rows, cfg.eval_fraction, seed)
    train_examples = _examples(train_rows, fmt, bad)
    eval_examples = _examples(eval_rows, fmt, bad) if eval_rows else None
    if bad:
        total = len(train_rows) + len(eval_rows or []) + len(bad)
        if len(bad) > cfg.max_bad_fraction * total or not train_examples:
            raise DataError(f"{len(bad)} of {total} rows are malformed, more than data.max_bad_fraction="
                            f"{cfg.max_bad_fraction}; first: {bad[0]}")
    needs_template = any(isinstance(ex, Chat) for _, ex in train_examples)
    template = apply_chat_template_choice(tokenizer, cfg.chat_template, needs_template)

    encoder = Encoder(tokenizer, max_length=cfg.max_length, train_on=cfg.train_on, on_overflow=cfg.on_overflow)
    train = encoder.encode_all(train_examples, cfg.train)
    evaluation = encoder.encode_all(eval_examples, cfg.eval or cfg.train) if eval_examples else None
    files = [p for p in (cfg.train, cfg.eval) if p]
    return PreparedData(
        train=train, eval=evaluation, format=fmt, template=template, end_of_turn_id=encoder.end_of_turn_id,
        fingerprints={p: fingerprint(p) for p in files},
        rows={"train": len(train.input_ids), "eval": len(evaluation.input_ids) if evaluation else 0},
        bad_rows=bad or [])


def _rows(path: str, cfg: DataConfig, bad: list[str] | None) -> list[tuple[str, dict]]:
    return [(f"{path}:{position}", rename_columns(row, cfg.columns)) for position, row in read_rows(path, bad)]


def _examples(rows: list[tuple[str, dict]], fmt: str, bad: list[str] | None) -> list:
    """Canonical examples; with a `bad` list (on_bad_rows: skip) malformed rows are recorded, not raised."""
    examples = []
    for where, row in rows:
        try:
            examples.append((where, to_example(row, fmt, where)))
        except DataError as exc:
            if bad is None:
                raise
            bad.append(str(exc))
    return examples


def _split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * fraction))
    if n_eval >= len(order):
        raise DataError(f"data.eval_fraction: {fraction} leaves no training examples out of {len(order)}")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
