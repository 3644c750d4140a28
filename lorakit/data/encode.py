"""Rendering and tokenizing examples with lorakit's own loss mask, and the length policy.

The mask comes from character spans of the rendered text, so it does not depend on `{% generation %}`
markers in the template. The token that ends each trained turn is always in the labels (also when
pad == eos), and it must be one special token, the same in every example: the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.data.rows import Chat, Plain
from lorakit.errors import DataError

IGNORE = -100


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


class Encoder:
    """Renders and tokenizes canonical examples (Chat / Plain) into input_ids + labels."""

    def __init__(self, tokenizer, *, max_length: int, train_on: str = "assistant", on_overflow: str = "truncate"):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("lorakit needs a fast tokenizer (offset mapping) to build loss masks")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.train_on, self.on_overflow = train_on, on_overflow
        self.end_of_turn_id: int | None = None

    def encode_all(self, examples: list[tuple[str, Chat | Plain]], source: str) -> Split:
        split = Split()
        for where, example in examples:
            text, spans, special = self.render(example, where)
            ids, labels = self.tokenize(text, spans, special, where)
            if len(ids) > self.max_length:
                if self.on_overflow == "error":
                    raise DataError(f"{where}: {len(ids)} tokens, longer than data.max_length={self.max_length} "
                                    "(data.on_overflow: error)")
                split.truncated += 1
                if self.on_overflow == "drop":
                    split.dropped += 1
                    continue
                ids, labels = self._truncate(ids, labels)
                if all(t == IGNORE for t in labels):
                    split.dropped += 1
                    continue
            split.input_ids.append(ids)
            split.labels.append(labels)
        if not split.input_ids:
            raise DataError(f"{source}: no example is left to train on after the length policy "
                            f"(data.max_length={self.max_length}, data.on_overflow={self.on_overflow})")
        return split

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Keep the start; if the cut falls in a trained turn, end it with the end-of-turn token."""
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if labels[-1] != IGNORE and self.end_of_turn_id is not None:
            ids[-1] = labels[-1] = self.end_of_turn_id
        return ids, labels

    def render(self, example: Chat | Plain, where: str) -> tuple[str, list[tuple[int, int]], bool]:
        """(text, trained character spans, whether tokenizing should add the tokenizer's special tokens)."""
        if isinstance(example, Chat):
            return (*self._render_chat(example, where), False)
        eos = self.tokenizer.eos_token
        text = example.prompt + example.completion + ("" if example.completion.endswith(eos) else eos)
        start = 0 if self.train_on == "all" else len(example.prompt)
        return text, [(start, len(text))], True

    def _render_chat(self, example: Chat, where: str) -> tuple[str, list[tuple[int, int]]]:
        render = self.tokenizer.apply_chat_template
        messages = example.messages
        full = render(messages, tokenize=False)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= example.trained_from]
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        spans = []
        for i in turns:
            before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            through = render(messages[: i + 1], tokenize=False)
            if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
                raise DataError(f"{where}: the chat template renders earlier turns differently once later turns "
                                "follow, so assistant turns cannot be located; lorakit cannot mask this template")
            spans.append((len(before), len(through.rstrip())))  # the end-of-turn token is trained, not the newline
        if self.train_on == "all" and spans:
            spans = [(0, spans[-1][1])]
        return full, spans

    def tokenize(self, text: str, spans: list[tuple[int, int]], special: bool, where: str):
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids, labels = enc["input_ids"], [IGNORE] * len(enc["input_ids"])
        turn_ends = []
        for start, end in spans:
            inside = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end and b > a]
            for j in inside:
                labels[j] = ids[j]
            if inside:
                turn_ends.append(ids[inside[-1]])
        self._check_end_of_turn(turn_ends, text, where)
        return ids, labels

    def _check_end_of_turn(self, last_tokens: list[int], text: str, where: str) -> None:
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        for token in last_tokens:
            if token not in special:
                raise DataError(f"{where}: a trained turn ends in {self.tokenizer.decode([token])!r}, not in an "
                                f"end-of-turn/eos token (rendered tail: {text[-60:]!r}); the tuned model would "
                                "never learn to stop. Use a chat template that closes assistant turns with a "
                                "special token (data.chat_template)")
            if self.end_of_turn_id is None:
                self.end_of_turn_id = token
            elif token != self.end_of_turn_id:
                raise DataError(f"{where}: trained turns end in different tokens "
                                f"({self.tokenizer.decode([self.end_of_turn_id])!r} and "
                                f"{self.tokenizer.decode([token])!r})")
