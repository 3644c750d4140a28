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
import re
from dataclasses import dataclass, field
from functools import cached_property

from jinja2 import TemplateError

from lorakit.data.rows import Chat, Labeled, Plain
from lorakit.errors import DataError

IGNORE = -100


class RowError(DataError):
    """A problem with one row under this template (skipped with `on_bad_rows: skip`), not with the data."""


KEPT, TRUNCATED, DROPPED_LONG, DROPPED_MASKED, FAILED, REFUSED = range(6)  # REFUSED: a bad row
DROP_REASONS = {
    DROPPED_LONG: "longer than max_length (on_overflow: drop)",
    DROPPED_MASKED: "nothing left to train on after truncation",
}


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

    @property
    def pairs(self) -> bool:
        """Preference pairs: each row holds the chosen side (input_ids, labels) and the rejected one."""
        return "rejected_input_ids" in self.dataset.column_names

    @property
    def kind(self) -> str:
        """`pairs`, `unpaired` (KTO's completions, each `desirable` or not) or `examples` (SFT)."""
        if self.pairs:
            return "pairs"
        return "unpaired" if "desirable" in self.dataset.column_names else "examples"

    def to_dataset(self, layout: str = "examples"):
        """The columns a trainer reads (lorakit.data.pairs.LAYOUTS): input_ids + labels (`examples`), or trl's
        pre-tokenized preference columns."""
        if layout == "examples":
            return self.dataset.select_columns(["input_ids", "labels"])
        from lorakit.data.pairs import LAYOUTS

        return LAYOUTS[layout](self.dataset)

    def column(self, name: str):
        """One column as an Arrow array (through any row selection, unlike `Dataset.data`)."""
        return self.dataset.with_format("arrow")[name]

    @cached_property
    def lengths(self):
        import pyarrow.compute as pc

        return pc.list_value_length(self.column("input_ids")).to_numpy()

    @property
    def tokens(self) -> int:
        """Tokens of every sequence (both sides of a pair)."""
        import pyarrow.compute as pc

        rejected = (
            int(pc.sum(pc.list_value_length(self.column("rejected_input_ids"))).as_py() or 0) if self.pairs else 0
        )
        return int(self.lengths.sum()) + rejected

    @cached_property
    def trained_tokens(self) -> int:
        import pyarrow.compute as pc

        columns = ("labels", "rejected_labels") if self.pairs else ("labels",)
        return sum(int(pc.sum(pc.not_equal(pc.list_flatten(self.column(c)), IGNORE)).as_py() or 0) for c in columns)


def example_record(where: str, example: Chat | Plain | Labeled, source: int) -> dict:
    """A canonical example as one row of the table that `Encoder.encode_batch` maps over (a labelled one
    keeps its label in `desirable`)."""
    if isinstance(example, Labeled):
        return {**example_record(where, example.example, source), "desirable": example.desirable}
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
        self.prefix = _post_processor_prefix(tokenizer)
        self.closing = conversation_closing(tokenizer)
        self.controls = _structure_pattern(tokenizer)

    def encode_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """`datasets.map` function: columns where/example -> input_ids, labels, status, error, end_of_turn.
        Text is tokenized without the tokenizer's special tokens (so every token covers characters of the
        text); plain text gets the post-processor's prefix (bos) and an eos token id added here."""
        n = len(batch["where"])
        out = {
            "input_ids": [[] for _ in range(n)],
            "labels": [[] for _ in range(n)],
            "status": [KEPT] * n,
            "error": [""] * n,
            "end_of_turn": [-1] * n,
            "is_chat": [False] * n,
        }
        items = []
        for i, (where, payload) in enumerate(zip(batch["where"], batch["example"])):
            example = _from_record(payload)
            out["is_chat"][i] = isinstance(example, Chat)
            try:
                items.append((i, example, *self.render(example, where)))
            except RowError as exc:
                out["status"][i], out["error"][i] = REFUSED, str(exc)
            except DataError as exc:
                out["status"][i], out["error"][i] = FAILED, str(exc)
            except TemplateError as exc:  # the template's own raise_exception: this row, not the data, is bad
                out["status"][i] = REFUSED
                out["error"][i] = f"{where}: the chat template refuses this conversation: {exc}"
        if not items:
            return out
        tokenized = self._tokenize([text for _, _, text, _ in items])
        for (i, example, text, spans), (ids, offsets) in zip(items, tokenized):
            labels, ends = _labels(ids, offsets, spans)
            if isinstance(example, Plain):
                ids, labels, ends = self._frame_plain(example, ids, labels, ends)
            self._finish(out, i, batch["where"][i], text, ids, labels, [ids[j] for j in ends])
        return out

    def _frame_plain(self, example: Plain, ids: list[int], labels: list[int], ends: list[int]):
        """Plain text: the post-processor's prefix (bos) in front, the eos token id at the end (trained)."""
        ids, labels = self.prefix + ids, [IGNORE] * len(self.prefix) + labels
        ends = [j + len(self.prefix) for j in ends]
        if not example.completion.endswith(self.tokenizer.eos_token):
            ids, labels, ends = ids + [self.tokenizer.eos_token_id], labels + [self.tokenizer.eos_token_id], [len(ids)]
        return ids, labels, ends

    def _tokenize(self, texts: list[str]):
        """(ids, offsets) per text, one batched call into the Rust tokenizer. The backend is called
        directly (transformers' per-example dict conversion costs as much as tokenizing) unless the
        tokenizer file configures truncation or padding, which transformers' own call switches off."""
        backend = self.tokenizer.backend_tokenizer
        if backend.truncation is None and backend.padding is None:
            return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(zip(encoded["input_ids"], encoded["offset_mapping"]))

    def _finish(
        self, out: dict, i: int, where: str, text: str, ids: list[int], labels: list[int], ends: list[int]
    ) -> None:
        """Check the end-of-turn token and apply the length policy to one tokenized example."""
        for token in ends:
            if token not in self.special:
                out["status"][i] = FAILED
                out["error"][i] = (
                    f"{where}: a trained turn ends in {self.tokenizer.decode([token])!r}, not in an end-of-turn/eos "
                    f"token (rendered tail: {text[-60:]!r}); the tuned model would never learn to stop. Use a chat "
                    "template that closes assistant turns with a special token (data.chat_template)"
                )
                return
            if token != ends[0]:
                out["status"][i] = FAILED
                out["error"][i] = (
                    f"{where}: trained turns end in different tokens "
                    f"({self.tokenizer.decode([ends[0]])!r} and {self.tokenizer.decode([token])!r})"
                )
                return
        end_of_turn = ends[0] if ends else -1
        out["end_of_turn"][i] = end_of_turn
        if len(ids) > self.max_length:
            if self.on_overflow == "error":
                out["status"][i] = FAILED
                out["error"][i] = (
                    f"{where}: {len(ids)} tokens, longer than data.max_length={self.max_length} "
                    "(data.on_overflow: error)"
                )
                return
            if self.on_overflow == "drop":
                out["status"][i] = DROPPED_LONG
                return
            ids, labels = _truncate(ids, labels, self.max_length, end_of_turn)
            out["status"][i] = TRUNCATED if any(t != IGNORE for t in labels) else DROPPED_MASKED
        out["input_ids"][i], out["labels"][i] = ids, labels

    def render(self, example: Chat | Plain, where: str) -> tuple[str, list[tuple[int, int]]]:
        """(text, trained character spans)."""
        self._refuse_control_text(example, where)
        if isinstance(example, Chat):
            return self._render_chat(example, where)
        text = example.prompt + example.completion
        return text, [(0 if self.train_on == "all" else len(example.prompt), len(text))]

    def _refuse_control_text(self, example: Chat | Plain, where: str) -> None:
        """A special token's text inside content (`<|im_end|>` in a user message) would be tokenized as that
        control token and read as structure (a turn ending mid-message); the row is refused instead. Plain
        text may end with eos, which lorakit then does not add again."""
        if self.controls is None:
            return
        if isinstance(example, Chat):
            fields = [(f"messages[{i}].content", m["content"]) for i, m in enumerate(example.messages)]
        else:
            completion = example.completion
            eos = self.tokenizer.eos_token
            fields = [
                ("prompt", example.prompt),
                ("completion", completion[: -len(eos)] if eos and completion.endswith(eos) else completion),
            ]
        for name, text in fields:
            found = self.controls.search(text)
            if found:
                raise RowError(
                    f"{where}: {name} holds {found.group()!r}, the text of a special token: it would be read as "
                    "that control token, not as text; remove it from the data"
                )

    def _render_chat(self, example: Chat, where: str) -> tuple[str, list[tuple[int, int]]]:
        """Each trained assistant turn is the text between the generation prompt for it (the conversation
        before it, add_generation_prompt=True) and the end of the conversation rendered through it; both
        must be prefixes of the whole rendering, or the model would be trained on text that generation
        never shows it (`_unmaskable` says which way the template breaks that).

        Rendering those prefixes for every reply is quadratic in the number of turns, so it is done for the
        first two and the last trained reply; the others are found in one more rendering of the conversation
        (`_content_positions`) and must be framed exactly as those are, or they are rendered too, up to
        EXACT_REPLIES per conversation."""
        messages = example.messages
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        closing = self.closing if self.closing and full.endswith(self.closing) else ""
        body = full[: len(full) - len(closing)]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= example.trained_from]
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        exact = {i: self._exact_span(messages, i, body, closing, where) for i in sorted({*turns[:2], *turns[-1:]})}
        located = self._content_positions(messages, full) if len(turns) > len(exact) else None
        frames = _frames(full, exact, messages, located) if located else {}
        spans = []
        for i in turns:
            span = exact.get(i) or _framed_span(full, messages, i, located, frames)
            if span is None:
                if len(exact) >= EXACT_REPLIES:
                    raise RowError(
                        f"{where}: the chat template does not frame every reply the same way, so each reply's "
                        "mask must render the conversation before it; lorakit does that for up to "
                        f"{EXACT_REPLIES} replies per conversation and this one trains {len(turns):,}; split it"
                    )
                span = exact[i] = self._exact_span(messages, i, body, closing, where)
            spans.append(span)
        if self.train_on == "all" and spans:
            spans = [(0, spans[-1][1])]
        return full, spans

    def _exact_span(self, messages: list[dict], i: int, body: str, closing: str, where: str) -> tuple[int, int]:
        """The trained span of assistant turn `i`, from renderings of the conversation before and through it."""
        render = self.tokenizer.apply_chat_template
        through = body if i == len(messages) - 1 else render(messages[: i + 1], tokenize=False)
        if closing and through.endswith(closing) and i != len(messages) - 1:
            through = through[: -len(closing)]
        before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        problem = _unmaskable(messages, i, before, through, body)
        if problem:
            raise DataError(f"{where}: {problem}; lorakit cannot mask this conversation under this template")
        start = len(before) if i else through.find(messages[0]["content"])  # after bos and the turn's header
        if start < 0:
            raise RowError(
                f"{where}: the conversation opens with an assistant turn whose text the template "
                "changes, so where it starts cannot be found"
            )
        return start, len(through.rstrip())  # the end-of-turn token is trained, not the newline

    def _content_positions(self, messages: list[dict], full: str) -> list[int] | None:
        """Where each message's content starts in `full`: the conversation is rendered once more with each
        content replaced by a marker, and the markers' places count only if putting the contents back gives
        `full` exactly (so a template that rewrites or reads content gives None)."""
        if any(MARK in m["content"] for m in messages):
            return None
        marks = [f"{MARK}{i}{MARK}" for i in range(len(messages))]
        try:
            text = self.tokenizer.apply_chat_template(
                [dict(m, content=mark) for m, mark in zip(messages, marks)], tokenize=False
            )
        except (TemplateError, TypeError, ValueError):
            return None
        if text.count(MARK) != 2 * len(messages):
            return None
        pieces, positions, cursor, shift = [], [], 0, 0
        for message, mark in zip(messages, marks):
            at = text.find(mark, cursor)
            if at < 0:
                return None
            pieces += [text[cursor:at], message["content"]]
            positions.append(at + shift)
            cursor = at + len(mark)
            shift += len(message["content"]) - len(mark)
        pieces.append(text[cursor:])
        return positions if "".join(pieces) == full else None


EXACT_REPLIES = 512  # replies rendered one by one in a conversation whose template frames them unevenly
MARK = "\U000f0000"  # a private-use character, in no template: it marks where a message's content goes

Frame = tuple[str, int, str]  # text from the previous message's content to the reply's (the last n of it
# trained: a header the template writes after the generation prompt), and the trained text after the reply's


def _frames(full: str, exact: dict, messages: list[dict], located: list[int]) -> dict[str, Frame]:
    """How the template frames a reply, by the role of the message before it, learnt from the replies
    rendered exactly; a role whose replies disagree has no frame (its replies are rendered exactly too)."""
    seen: dict[str, set[Frame]] = {}
    for i, (start, stop) in exact.items():
        if i == 0:
            continue
        previous_end = located[i - 1] + len(messages[i - 1]["content"])
        content_end = located[i] + len(messages[i]["content"])
        if not previous_end <= start <= located[i] <= content_end <= stop:
            continue
        lead, tail = full[previous_end : located[i]], full[content_end:stop]
        seen.setdefault(messages[i - 1]["role"], set()).add((lead, located[i] - start, tail))
    return {role: found.pop() for role, found in seen.items() if len(found) == 1}


def _framed_span(full: str, messages: list[dict], i: int, located, frames: dict[str, Frame]):
    """The trained span of reply `i` found in the one rendering, if the template framed it as it framed the
    replies rendered exactly after a message of the same role; None otherwise."""
    frame = frames.get(messages[i - 1]["role"]) if located and i else None
    if frame is None:
        return None
    lead, trained_lead, tail = frame
    previous_end = located[i - 1] + len(messages[i - 1]["content"])
    content_end = located[i] + len(messages[i]["content"])
    if full[previous_end : located[i]] != lead or not full.startswith(tail, content_end):
        return None
    return located[i] - trained_lead, content_end + len(tail)


def _unmaskable(messages: list[dict], i: int, before: str, through: str, body: str) -> str | None:
    """Why assistant turn `i` cannot be trained as the model will generate it, or None."""
    if not through.startswith(before):
        lost = next(
            (
                m["role"]
                for m in messages[:i]
                if m["content"].strip() and m["content"] in before and m["content"] not in through
            ),
            None,
        )
        if lost:
            return (
                f"the chat template drops the {lost} message once an assistant reply follows it (it renders it "
                "only when the conversation ends with a user turn), so the reply would be trained without it; "
                f"move the {lost} text into the first user turn or use a template that keeps it (data.chat_template)"
            )
        common = len(_common_prefix(before, through))
        return (
            f"the generation prompt for assistant turn {i} ends in {before[common:]!r}, which the chat template does "
            "not render before that reply (a reasoning opener it adds only at generation, or a reply it rewrites, "
            "e.g. by dropping its <think> block), so training text and generation prompts would differ; use a "
            "template that renders replies as generated (data.chat_template)"
        )
    if not body.startswith(through):
        return (
            f"the chat template renders assistant turn {i} differently once later turns follow (it drops reasoning "
            "from the history or moves text between turns), so that turn cannot be trained as the model generates "
            "it; set data.train_on: last_assistant to train only each conversation's final reply"
        )
    return None


def _common_prefix(a: str, b: str) -> str:
    n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]


PROBE = [
    {"role": "user", "content": "ping"},
    {"role": "assistant", "content": "pong"},
    {"role": "user", "content": "ping again"},
    {"role": "assistant", "content": "pong again"},
]


def conversation_closing(tokenizer) -> str:
    """Text the chat template appends only after a conversation's last message, when no generation prompt
    follows (Phi-3 appends eos after `<|end|>`); it ends no turn, so turns end before it and it is not trained.
    Found by rendering a two-turn probe with and without its second turn; empty for most templates."""
    if not tokenizer.chat_template:
        return ""
    try:
        one = tokenizer.apply_chat_template(PROBE[:2], tokenize=False)
        two = tokenizer.apply_chat_template(PROBE, tokenize=False)
    except Exception:  # a template that refuses the probe has no closing lorakit can rely on
        return ""
    a, b = (tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) for text in (one, two))
    k = next((k for k, (x, y) in enumerate(zip(a["input_ids"], b["input_ids"])) if x != y), None)
    if k is None:  # compared by tokens: `<|endoftext|>` and `<|user|>` share their first characters
        return ""
    shared, tail = one[: a["offset_mapping"][k][0]], one[a["offset_mapping"][k][0] :]
    return tail if tail.strip() and two.endswith(tail) and "pong" in shared and "pong" not in tail else ""


def _structure_pattern(tokenizer):
    """The special tokens that are structure, not content: bos/eos/pad/unk and those the chat template writes
    (`<|im_start|>`, `<|eot_id|>`...). Special tokens a recipe adds for its data (model.new_special_tokens) are
    meant to appear in content and are left alone."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    named = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} - {None}
    added = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    structure = named | {t for t in {*tokenizer.all_special_tokens, *added} if t in template}
    return re.compile("|".join(map(re.escape, sorted(structure, key=len, reverse=True)))) if structure else None


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]):
    """Labels, and the index of each span's last token. Token j is trained when its characters overlap a
    trained span. Text is tokenized without post-processor tokens, so every token covers characters and
    offset ends never decrease. Spans are ordered."""
    labels = [IGNORE] * len(ids)
    ends = []
    j = 0
    for start, stop in spans:
        j = _first_ending_after(offsets, start, j)
        first = j
        while j < len(ids) and offsets[j][0] < stop:
            j += 1
        labels[first:j] = ids[first:j]
        if j > first:
            ends.append(j - 1)
    return labels, ends


def _first_ending_after(offsets: list[tuple[int, int]], start: int, lo: int) -> int:
    """Index of the first token from `lo` whose characters end after `start` (a binary search)."""
    hi = len(offsets)
    while lo < hi:
        mid = (lo + hi) // 2
        if offsets[mid][1] > start:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _truncate(ids: list[int], labels: list[int], max_length: int, end_of_turn: int):
    """Keep the start. A trained turn the cut runs through still ends with the end-of-turn token, if any
    of its text is left to precede it; a turn cut down to nothing is masked (it would teach an empty reply)."""
    ids, labels = ids[:max_length], labels[:max_length]
    if labels[-1] != IGNORE:
        if len(labels) >= 2 and labels[-2] != IGNORE:
            ids[-1] = labels[-1] = end_of_turn
        else:
            labels[-1] = IGNORE
    return ids, labels


def _post_processor_prefix(tokenizer) -> list[int]:
    """The token ids the tokenizer's post-processor puts before a text (usually bos; none for many)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    framed = tokenizer("x", add_special_tokens=True)["input_ids"]
    for k in range(len(framed) - len(plain) + 1):
        if framed[k : k + len(plain)] == plain:
            return framed[:k]
    return []


def encode_records(records: list[dict], encoder: Encoder, num_proc: int):
    """Every record tokenized, with its status and error (`Encoder.encode_batch`), in `num_proc` processes."""
    from datasets import Dataset

    return Dataset.from_list(records).map(
        encoder.encode_batch,
        batched=True,
        batch_size=256,
        remove_columns=["example"],
        num_proc=num_proc if num_proc > 1 and len(records) >= 2 * num_proc else None,
    )


def encode(records: list[dict], encoder: Encoder, num_proc: int, source: str, bad: list[str] | None = None) -> Split:
    """Encode canonical example records into a Split; raises the first problem in data order. With a
    `bad` list (on_bad_rows: skip), rows the chat template refuses are recorded there and left out."""
    mapped = encode_records(records, encoder, num_proc)
    status = mapped["status"][:]
    fatal = (FAILED,) if bad is not None else (FAILED, REFUSED)
    first = next((i for i, code in enumerate(status) if code in fatal), None)
    if first is not None:
        raise DataError(mapped[first]["error"])
    if REFUSED in status:
        bad.extend(mapped.select([i for i, code in enumerate(status) if code == REFUSED])["error"])
    check_same_end_of_turn(mapped, status, encoder)
    drops = {reason: status.count(code) for code, reason in DROP_REASONS.items() if code in status}
    kept = [i for i, code in enumerate(status) if code in (KEPT, TRUNCATED)]
    if not kept:
        raise DataError(
            f"{source}: no example is left to train on after the length policy "
            f"(data.max_length={encoder.max_length}, data.on_overflow={encoder.on_overflow})"
        )
    dataset = mapped.select(kept).flatten_indices() if len(kept) < len(status) else mapped
    columns = ["input_ids", "labels", "source", "end_of_turn", "is_chat"]
    return Split(
        dataset.select_columns(columns + (["desirable"] if "desirable" in dataset.column_names else [])),
        truncated=status.count(TRUNCATED),
        drops=drops,
    )


def check_same_end_of_turn(mapped, status: list[int], encoder: Encoder) -> None:
    """Every chat example must stop on the same token (plain text ends with eos by construction)."""
    tokens = mapped["end_of_turn"][:]
    chats = mapped["is_chat"][:]
    first = next((i for i, t in enumerate(tokens) if t >= 0 and chats[i]), None)
    if first is None:
        return
    for i, token in enumerate(tokens):
        if chats[i] and token >= 0 and token != tokens[first] and status[i] != FAILED:
            decode = encoder.tokenizer.decode
            raise DataError(
                f"{mapped[i]['where']}: trained turns end in {decode([token])!r}, but in "
                f"{decode([tokens[first]])!r} at {mapped[first]['where']}; every example must stop on "
                "the same end-of-turn token"
            )


def end_of_turn_id(split: Split, tokenizer) -> int:
    """The token chat turns end with (eos for plain text)."""
    import pyarrow.compute as pc

    chat_ends = pc.filter(split.column("end_of_turn"), split.column("is_chat")).to_pylist()
    return next((t for t in chat_ends if t >= 0), tokenizer.eos_token_id)
