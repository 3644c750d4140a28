"""Data: JSONL rows -> rendered text -> token ids with labels masked by lorakit itself.

Owns reading the recipe's `data:` files, detecting their format, rendering chat rows with the
tokenizer's chat template, and the loss mask: only assistant turns (messages) or the completion
(prompt/completion) are trained, and the token that ends each trained turn is always in the labels,
also when pad == eos. The mask is computed from character spans of the rendered text, so it does not
depend on `{% generation %}` markers in the template. Does not own tokenizer or model loading.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

from lorakit.config import DataConfig
from lorakit.errors import DataError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Split:
    """Tokenized examples of one split, and what happened on the way."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0

    def to_dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(sum(1 for t in lab if t != IGNORE) for lab in self.labels)


@dataclass
class PreparedData:
    train: Split
    eval: Split | None
    format: str
    end_of_turn_id: int
    fingerprints: dict[str, str]
    rows: dict[str, int]


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs; a malformed line is an error naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def detect_format(row: dict, where: str) -> str:
    if "messages" in row and not {"prompt", "completion"} & row.keys():
        return "messages"
    if {"prompt", "completion"} <= row.keys() and "messages" not in row:
        return "prompt_completion"
    raise DataError(f"{where}: cannot tell the data format from the keys {sorted(row)}; expected `messages` "
                    "or `prompt` + `completion` (set `data.format` to say which)")


def fingerprint(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read, split, render and tokenize the recipe's data; check every example trains something."""
    train_rows = read_jsonl(cfg.train)
    fmt = cfg.format if cfg.format != "auto" else detect_format(train_rows[0][1], f"{cfg.train}:{train_rows[0][0]}")
    eval_rows, eval_path = None, cfg.eval
    if cfg.eval is not None:
        eval_rows = read_jsonl(cfg.eval)
    elif cfg.eval_fraction is not None:
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * cfg.eval_fraction))
        if n_eval >= len(order):
            raise DataError(f"data.eval_fraction: {cfg.eval_fraction} leaves no training examples "
                            f"out of {len(order)}")
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(train_rows) if i in held]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
        eval_path = cfg.train
    encoder = _Encoder(tokenizer, fmt, cfg.max_length)
    train = encoder.encode_all(train_rows, cfg.train)
    evaluation = encoder.encode_all(eval_rows, eval_path) if eval_rows is not None else None
    files = [p for p in (cfg.train, cfg.eval) if p]
    return PreparedData(
        train=train, eval=evaluation, format=fmt, end_of_turn_id=encoder.end_of_turn_id,
        fingerprints={p: fingerprint(p) for p in files},
        rows={"train": len(train.input_ids), "eval": len(evaluation.input_ids) if evaluation else 0})


class _Encoder:
    """Renders and tokenizes rows of one format, with the loss mask, and checks the end-of-turn token."""

    def __init__(self, tokenizer, fmt: str, max_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("lorakit needs a fast tokenizer (offset mapping) to build loss masks")
        if fmt == "messages" and not tokenizer.chat_template:
            raise DataError("data in `messages` form needs a chat template, and the tokenizer has none; "
                            "use a tokenizer with a chat template or `prompt_completion` data")
        self.tokenizer, self.format, self.max_length = tokenizer, fmt, max_length
        self.end_of_turn_id: int | None = None

    def encode_all(self, rows: list[tuple[int, dict]], path: str) -> Split:
        split = Split()
        for number, row in rows:
            where = f"{path}:{number}"
            text, spans, special = self.render(row, where)
            ids, labels = self.tokenize(text, spans, special, where)
            if len(ids) > self.max_length:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                split.truncated += 1
                if all(t == IGNORE for t in labels):
                    split.dropped += 1
                    continue
            split.input_ids.append(ids)
            split.labels.append(labels)
        if not split.input_ids:
            raise DataError(f"{path}: every example is longer than data.max_length={self.max_length} before its "
                            "first trained token; raise data.max_length")
        return split

    def render(self, row: dict, where: str) -> tuple[str, list[tuple[int, int]], bool]:
        """(text, trained character spans, whether the text already holds its special tokens)."""
        if self.format == "messages":
            messages = _check_messages(row.get("messages"), "messages", where)
            return (*self._render_chat(messages, trained_from=0, where=where), False)
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
            head = _check_messages(prompt, "prompt", where, need_assistant=False)
            messages = head + _check_messages(completion, "completion", where)
            return (*self._render_chat(messages, trained_from=len(head), where=where), False)
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise DataError(f"{where}: `{key}` must be a string (or both lists of messages), "
                                f"got {type(value).__name__}")
        if not completion.strip():
            raise DataError(f"{where}: `completion` is empty; there is nothing to train on")
        eos = self.tokenizer.eos_token
        text = prompt + completion + ("" if completion.endswith(eos) else eos)
        return text, [(len(prompt), len(text))], True

    def _render_chat(self, messages: list[dict], trained_from: int, where: str) -> tuple[str, list[tuple[int, int]]]:
        render = self.tokenizer.apply_chat_template
        full = render(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < trained_from:
                continue
            before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            through = render(messages[: i + 1], tokenize=False)
            if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
                raise DataError(f"{where}: the chat template renders earlier turns differently once later turns "
                                "follow, so assistant turns cannot be located; lorakit cannot mask this template")
            end = len(through.rstrip())  # the end-of-turn token is trained; the newline after it is not
            spans.append((len(before), end))
        return full, spans

    def tokenize(self, text: str, spans: list[tuple[int, int]], special: bool, where: str):
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids, labels = enc["input_ids"], [IGNORE] * len(enc["input_ids"])
        last_trained = []
        for start, end in spans:
            inside = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end and b > a]
            for j in inside:
                labels[j] = ids[j]
            if inside:
                last_trained.append(ids[inside[-1]])
        self._check_end_of_turn(last_trained, text, where)
        return ids, labels

    def _check_end_of_turn(self, last_tokens: list[int], text: str, where: str) -> None:
        """Each trained turn must end in one special token, the same everywhere: the model learns to stop."""
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        for token in last_tokens:
            if token not in special:
                tail = text[-60:]
                raise DataError(f"{where}: a trained turn ends in {self.tokenizer.decode([token])!r}, not in an "
                                f"end-of-turn/eos token (rendered tail: {tail!r}); the tuned model would never "
                                "learn to stop. Use a chat template that closes assistant turns with a special token")
            if self.end_of_turn_id is None:
                self.end_of_turn_id = token
            elif token != self.end_of_turn_id:
                raise DataError(f"{where}: trained turns end in different tokens "
                                f"({self.tokenizer.decode([self.end_of_turn_id])!r} and "
                                f"{self.tokenizer.decode([token])!r})")


def _check_messages(messages, key: str, where: str, need_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `{key}` must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            got = message.get("role") if isinstance(message, dict) else message
            raise DataError(f"{where}: {key}[{i}].role must be one of {', '.join(ROLES)} (got {got!r})")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {key}[{i}].content must be a string")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: `{key}` has no assistant message; there is nothing to train on")
    return messages

