"""Preference pairs tokenized: both sides of each pair rendered, masked and length-checked exactly as an SFT
example with that reply (`encode`), kept or dropped together; and the pre-tokenized columns each of trl's
preference trainers reads (`LAYOUTS`), from pairs or from KTO's labelled completions.

A pair's split holds one row per pair: the chosen side as input_ids + labels (so every reader of SFT data
reads it the same way) and the rejected side as rejected_input_ids + rejected_labels. Both sides must share
the prompt token for token; the reply, through its end-of-turn token, is what the labels train.
"""

from __future__ import annotations

from lorakit.data.encode import (
    DROP_REASONS,
    DROPPED_LONG,
    DROPPED_MASKED,
    FAILED,
    IGNORE,
    REFUSED,
    TRUNCATED,
    Encoder,
    Split,
    check_same_end_of_turn,
    encode_records,
    example_record,
)
from lorakit.data.rows import Pair
from lorakit.errors import DataError


def encode_pairs(
    examples: list[tuple[str, Pair, int]], encoder: Encoder, num_proc: int, source: str, bad: list[str] | None = None
) -> Split:
    """Encode (where, Pair, source index) examples into a Split of pairs; raises the first problem in data order.
    A pair is kept only when both sides are, and refused when the template renders their prompts differently."""
    from datasets import Dataset

    records = [
        example_record(where, side, index) for where, pair, index in examples for side in (pair.chosen, pair.rejected)
    ]
    mapped = encode_records(records, encoder, num_proc)
    status, errors = mapped["status"][:], mapped["error"][:]
    ids, labels = mapped["input_ids"][:], mapped["labels"][:]
    fatal = (FAILED,) if bad is not None else (FAILED, REFUSED)
    rows, drops, truncated = [], {}, 0
    for k, (where, _, index) in enumerate(examples):
        c, r = 2 * k, 2 * k + 1
        problem = next((errors[j] for j in (c, r) if status[j] in fatal), None)
        if problem is not None:
            raise DataError(problem)
        refused = next((errors[j] for j in (c, r) if status[j] == REFUSED), None)
        if refused is not None:
            bad.append(refused)
            continue
        dropped = next((status[j] for j in (c, r) if status[j] in (DROPPED_LONG, DROPPED_MASKED)), None)
        if dropped is not None:
            drops[DROP_REASONS[dropped]] = drops.get(DROP_REASONS[dropped], 0) + 1
            continue
        if ids[c][: _first_trained(labels[c])] != ids[r][: _first_trained(labels[r])]:
            problem = (
                f"{where}: the chat template renders the prompt differently before the chosen and the "
                "rejected reply, so the two would not answer the same context"
            )
            if bad is None:
                raise DataError(problem)
            bad.append(problem)
            continue
        truncated += TRUNCATED in (status[c], status[r])
        rows.append((c, r, index))
    check_same_end_of_turn(mapped, status, encoder)
    if not rows:
        raise DataError(
            f"{source}: no pair is left to train on after the length policy "
            f"(data.max_length={encoder.max_length}, data.on_overflow={encoder.on_overflow})"
        )
    ends, chats = mapped["end_of_turn"][:], mapped["is_chat"][:]
    table = {
        "input_ids": [ids[c] for c, _, _ in rows],
        "labels": [labels[c] for c, _, _ in rows],
        "rejected_input_ids": [ids[r] for _, r, _ in rows],
        "rejected_labels": [labels[r] for _, r, _ in rows],
        "source": [index for *_, index in rows],
        "end_of_turn": [ends[c] for c, _, _ in rows],
        "is_chat": [chats[c] for c, _, _ in rows],
    }
    return Split(Dataset.from_dict(table), truncated=truncated, drops=drops)


def _first_trained(labels: list[int]) -> int:
    return next(j for j, label in enumerate(labels) if label != IGNORE)


def _reply(ids: list[int], labels: list[int]) -> tuple[int, int]:
    """(start, stop) of the trained reply: from its first trained token through the end-of-turn token."""
    start = _first_trained(labels)
    stop = len(labels) - next(j for j, label in enumerate(reversed(labels)) if label != IGNORE)
    return start, stop


def reply_columns(dataset):
    """DPOTrainer's pre-tokenized columns: prompt_ids, chosen_ids, rejected_ids (the replies only)."""

    def split(row: dict) -> dict:
        start, stop = _reply(row["input_ids"], row["labels"])
        r_start, r_stop = _reply(row["rejected_input_ids"], row["rejected_labels"])
        return {
            "prompt_ids": row["input_ids"][:start],
            "chosen_ids": row["input_ids"][start:stop],
            "rejected_ids": row["rejected_input_ids"][r_start:r_stop],
        }

    return dataset.map(split, remove_columns=dataset.column_names)


def sequence_columns(dataset):
    """The columns of trl's experimental pair trainers (ORPOTrainer, CPOTrainer): each side whole, with its
    attention mask and labels (the prompt at -100), as their own tokenizer would have left them."""

    def sides(row: dict) -> dict:
        return {
            "chosen_input_ids": row["input_ids"],
            "chosen_attention_mask": [1] * len(row["input_ids"]),
            "chosen_labels": row["labels"],
            "rejected_input_ids": row["rejected_input_ids"],
            "rejected_attention_mask": [1] * len(row["rejected_input_ids"]),
            "rejected_labels": row["rejected_labels"],
        }

    return dataset.map(sides, remove_columns=dataset.column_names)


def unpaired_columns(dataset):
    """KTOTrainer's pre-tokenized columns: prompt_ids, completion_ids (the reply through its end-of-turn token)
    and label; a pair gives two rows, its chosen reply desirable and its rejected one not, side by side."""

    def unpair(rows: dict) -> dict:
        out = {"prompt_ids": [], "completion_ids": [], "label": []}
        sides = [("input_ids", "labels", None)]
        if "rejected_input_ids" in rows:
            sides = [("input_ids", "labels", True), ("rejected_input_ids", "rejected_labels", False)]
        for k in range(len(rows["input_ids"])):
            for ids_key, labels_key, label in sides:
                ids, labels = rows[ids_key][k], rows[labels_key][k]
                start, stop = _reply(ids, labels)
                out["prompt_ids"].append(ids[:start])
                out["completion_ids"].append(ids[start:stop])
                out["label"].append(rows["desirable"][k] if label is None else label)
        return out

    return dataset.map(unpair, batched=True, remove_columns=dataset.column_names)


LAYOUTS = {"replies": reply_columns, "sequences": sequence_columns, "unpaired": unpaired_columns}
