"""Rendering and tokenizing examples with lorakit's own loss mask, and the length policy.

The mask comes from character spans of the rendered text, so it does not depend on `{% generation %}`
markers in the template. The token that ends each trained turn is always in the labels (also when
pad == eos), and it must be one special token, the same in every chat example: the model learns to stop.

Encoding runs batched (one tokenizer call per batch) through `datasets.map`, in `num_proc` processes.
Per-example problems travel back as a status and a message rather than as exceptions from worker
processes, so the first problem in data order is reported, whatever the number of processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

from lorakit.data.rows import Chat, Plain
from lorakit.errors import DataError

IGNORE = -100
KEPT, TRUNCATED, DROPPED_LONG, DROPPED_MASKED, FAILED = range(5)
DROP_REASONS = {DROPPED_LONG: "longer than max_length (on_overflow: drop)",
                DROPPED_MASKED: "nothing left to train on after truncation"}


@dataclass
class Split:
    """Tokenized examples of one split (a `datasets.Dataset` of input_ids, labels, source), and what
    happened on the way."""

    dataset: object
    truncated: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    @cached_property
    def input_ids(self) -> list[list[int]]:
        return self.dataset["input_ids"][:]

    @cached_property
    def labels(self) -> list[list[int]]:
        return self.dataset["labels"][:]

    def to_dataset(self):
        return self.dataset.select_columns(["input_ids", "labels"])

    def column(self, name: str):
        """One column as an Arrow array (through any row selection, unlike `Dataset.data`)."""
        return self.dataset.with_format("arrow")[name]

    @cached_property
    def lengths(self):
        import pyarrow.compute as pc

        return pc.list_value_length(self.column("input_ids")).to_numpy()

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @cached_property
    def trained_tokens(self) -> int:
        import pyarrow.compute as pc

        labels = pc.list_flatten(self.column("labels"))
        return int(pc.sum(pc.not_equal(labels, IGNORE)).as_py() or 0)


def example_record(where: str, example: Chat | Plain, source: int) -> dict:
    """A canonical example as one row of the table that `Encoder.encode_batch` maps over."""
    if isinstance(example, Chat):
        payload = {"messages": example.messages, "trained_from": example.trained_from}
    else:
        payload = {"prompt": example.prompt, "completion": example.completion}
    return {"where": where, "example": json.dumps(payload, ensure_ascii=False), "source": source}


def _from_record(payload: str) -> Chat | Plain:
    data = json.loads(payload)
    if "messages" in data:
        return Chat(data["messages"], data["trained_from"])
    return Plain(data["prompt"], data["completion"])


class Encoder:
    """Renders and tokenizes canonical examples (Chat / Plain) into input_ids + labels."""

    def __init__(self, tokenizer, *, max_length: int, train_on: str = "assistant", on_overflow: str = "truncate"):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("lorakit needs a fast tokenizer (offset mapping) to build loss masks")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.train_on, self.on_overflow = train_on, on_overflow
        self.special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)

    def encode_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """`datasets.map` function: columns where/example -> input_ids, labels, status, error, end_of_turn."""
        n = len(batch["where"])
        out = {"input_ids": [[] for _ in range(n)], "labels": [[] for _ in range(n)], "status": [KEPT] * n,
               "error": [""] * n, "end_of_turn": [-1] * n, "is_chat": [False] * n}
        rendered: dict[bool, list[tuple[int, str, list]]] = {True: [], False: []}
        for i, (where, payload) in enumerate(zip(batch["where"], batch["example"])):
            example = _from_record(payload)
            out["is_chat"][i] = isinstance(example, Chat)
            try:
                text, spans, special = self.render(example, where)
            except DataError as exc:
                out["status"][i], out["error"][i] = FAILED, str(exc)
                continue
            rendered[special].append((i, text, spans))
        for special, items in rendered.items():
            if items:
                texts = [text for _, text, _ in items]
                for (i, text, spans), (ids, offsets) in zip(items, self._tokenize(texts, special)):
                    labels, ends = _labels(ids, offsets, spans)
                    self._finish(out, i, batch["where"][i], text, ids, labels, [ids[j] for j in ends])
        return out

    def _tokenize(self, texts: list[str], special: bool):
        """(ids, offsets) per text, one batched call into the Rust tokenizer. The backend is called
        directly (transformers' per-example dict conversion costs as much as tokenizing) unless the
        tokenizer file configures truncation or padding, which transformers' own call switches off."""
        backend = self.tokenizer.backend_tokenizer
        if backend.truncation is None and backend.padding is None:
            return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=special)]
        encoded = self.tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True, verbose=False)
        return list(zip(encoded["input_ids"], encoded["offset_mapping"]))

    def _finish(self, out: dict, i: int, where: str, text: str, ids: list[int], labels: list[int],
                ends: list[int]) -> None:
        """Check the end-of-turn token and apply the length policy to one tokenized example."""
        for token in ends:
            if token not in self.special:
                out["status"][i] = FAILED
                out["error"][i] = (
                    f"{where}: a trained turn ends in {self.tokenizer.decode([token])!r}, not in an end-of-turn/eos "
                    f"token (rendered tail: {text[-60:]!r}); the tuned model would never learn to stop. Use a chat "
                    "template that closes assistant turns with a special token (data.chat_template)")
                return
            if token != ends[0]:
                out["status"][i] = FAILED
                out["error"][i] = (f"{where}: trained turns end in different tokens "
                                   f"({self.tokenizer.decode([ends[0]])!r} and {self.tokenizer.decode([token])!r})")
                return
        end_of_turn = ends[0] if ends else -1
        out["end_of_turn"][i] = end_of_turn
        if len(ids) > self.max_length:
            if self.on_overflow == "error":
                out["status"][i] = FAILED
                out["error"][i] = (f"{where}: {len(ids)} tokens, longer than data.max_length={self.max_length} "
                                   "(data.on_overflow: error)")
                return
            if self.on_overflow == "drop":
                out["status"][i] = DROPPED_LONG
                return
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if labels[-1] != IGNORE:  # the cut fell inside a trained turn: it still ends with end-of-turn
                ids[-1] = labels[-1] = end_of_turn
            out["status"][i] = TRUNCATED if any(t != IGNORE for t in labels) else DROPPED_MASKED
        out["input_ids"][i], out["labels"][i] = ids, labels

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
            through = full if i == len(messages) - 1 else render(messages[: i + 1], tokenize=False)
            if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
                raise DataError(f"{where}: the chat template renders earlier turns differently once later turns "
                                "follow, so assistant turns cannot be located; lorakit cannot mask this template")
            spans.append((len(before), len(through.rstrip())))  # the end-of-turn token is trained, not the newline
        if self.train_on == "all" and spans:
            spans = [(0, spans[-1][1])]
        return full, spans


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]):
    """Labels, and the index of each span's last token. Token j is trained when its characters overlap a
    trained span. Zero-width tokens (bos/eos added by the post-processor) lie before the first or after the
    last character, outside every span's bounds. Spans are ordered."""
    labels = [IGNORE] * len(ids)
    ends = []
    j = 0
    for start, stop in spans:
        j = _first_ending_after(offsets, start, j)
        first = j
        while j < len(ids) and offsets[j][0] < stop:
            j += 1
        labels[first:j] = ids[first:j]  # zero-width tokens sit at the ends, where the bounds leave them out
        if j > first:
            ends.append(j - 1)
    return labels, ends


def _first_ending_after(offsets: list[tuple[int, int]], start: int, lo: int) -> int:
    """Index of the first token from `lo` whose characters end after `start` (offsets ends never fall)."""
    hi = len(offsets)
    while lo < hi:
        mid = (lo + hi) // 2
        if offsets[mid][1] > start:
            hi = mid
        else:
            lo = mid + 1
    return lo


def encode(records: list[dict], encoder: Encoder, num_proc: int, source: str) -> Split:
    """Encode canonical example records into a Split; raises the first problem in data order."""
    from datasets import Dataset

    table = Dataset.from_list(records)
    mapped = table.map(encoder.encode_batch, batched=True, batch_size=256, remove_columns=["example"],
                       num_proc=num_proc if num_proc > 1 and len(records) >= 2 * num_proc else None)
    status = mapped["status"][:]
    if FAILED in status:
        raise DataError(mapped[status.index(FAILED)]["error"])
    _check_same_end_of_turn(mapped, status, encoder)
    drops = {reason: status.count(code) for code, reason in DROP_REASONS.items() if code in status}
    kept = [i for i, code in enumerate(status) if code in (KEPT, TRUNCATED)]
    if not kept:
        raise DataError(f"{source}: no example is left to train on after the length policy "
                        f"(data.max_length={encoder.max_length}, data.on_overflow={encoder.on_overflow})")
    dataset = mapped.select(kept).flatten_indices() if len(kept) < len(status) else mapped
    return Split(dataset.select_columns(["input_ids", "labels", "source", "end_of_turn", "is_chat"]),
                 truncated=status.count(TRUNCATED), drops=drops)


def _check_same_end_of_turn(mapped, status: list[int], encoder: Encoder) -> None:
    """Every chat example must stop on the same token (plain text ends with eos by construction)."""
    tokens = mapped["end_of_turn"][:]
    chats = mapped["is_chat"][:]
    first = next((i for i, t in enumerate(tokens) if t >= 0 and chats[i]), None)
    if first is None:
        return
    for i, token in enumerate(tokens):
        if chats[i] and token >= 0 and token != tokens[first] and status[i] != FAILED:
            decode = encoder.tokenizer.decode
            raise DataError(f"{mapped[i]['where']}: trained turns end in {decode([token])!r}, but in "
                            f"{decode([tokens[first]])!r} at {mapped[first]['where']}; every example must stop on "
                            "the same end-of-turn token")


def end_of_turn_id(split: Split, tokenizer) -> int:
    """The token chat turns end with (eos for plain text)."""
    import pyarrow.compute as pc

    chat_ends = pc.filter(split.column("end_of_turn"), split.column("is_chat")).to_pylist()
    return next((t for t in chat_ends if t >= 0), tokenizer.eos_token_id)
