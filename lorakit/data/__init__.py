"""Data: the recipe's `data:` sources -> canonical examples -> token ids with lorakit's own labels.

Owns opening sources (`sources`), reading rows and formats (`rows`), the chat template choice
(`templates`), rendering, masking and the length policy (`encode`), the eval split, the training mix
(weights, caps) and the preprocessing cache (`cache`). Does not own tokenizer or model loading.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from lorakit.data import cache as cache_mod
from lorakit.data.encode import IGNORE, Encoder, Split, encode, end_of_turn_id, example_record
from lorakit.data.pairs import encode_pairs
from lorakit.data.rows import Chat, Labeled, Pair, detect_format, to_example
from lorakit.data.sources import Opened, open_source
from lorakit.data.templates import apply_chat_template_choice
from lorakit.errors import DataError
from lorakit.recipe.schema import OBJECTIVE_FACTS, DataConfig

__all__ = ["IGNORE", "PreparedData", "Prompt", "Split", "check_objective", "prepare", "prompts"]


@dataclass
class PreparedData:
    train: Split
    eval: Split | None
    formats: dict[str, str]  # source -> format
    template: str
    end_of_turn_id: int
    fingerprints: dict[str, str]
    rows: dict[str, int]
    bad_rows: list[str]
    sources: list[dict] = field(default_factory=list)  # per training source: rows read, examples used
    cached: bool = False

    @property
    def format(self) -> str:
        return ", ".join(dict.fromkeys(self.formats.values()))


KINDS = {
    "examples": "SFT examples",
    "pairs": "preference pairs (prompt/chosen/rejected)",
    "unpaired": "labelled completions (prompt/completion/label)",
}
ONE = {"examples": "an SFT example", "pairs": "a preference pair", "unpaired": "a labelled completion"}


def check_objective(prepared: PreparedData, objective: str) -> None:
    """Each objective trains the kind of data it is for (recipe.schema.OBJECTIVE_FACTS), and only that."""
    kind, accepted = prepared.train.kind, OBJECTIVE_FACTS[objective].data
    if kind not in accepted:
        wanted = " or ".join(KINDS[k] for k in accepted)
        fits = [o for o, facts in OBJECTIVE_FACTS.items() if kind in facts.data]
        raise DataError(
            f"train.objective: `{objective}` trains on {wanted}; data.train holds {KINDS[kind]} "
            f"({prepared.format}), which {' / '.join(fits)} train{'s' if len(fits) == 1 else ''}"
        )


def _reply_side(example):
    """What generation prompts and templates read from an example: a pair's chosen side, a labelled one's
    completion."""
    if isinstance(example, Pair):
        return example.chosen
    return example.example if isinstance(example, Labeled) else example


def _references(examples: list[tuple]) -> list[tuple]:
    """The examples whose reply is one to generate: not KTO's undesirable completions."""
    return [(w, _reply_side(ex), i) for w, ex, i in examples if not (isinstance(ex, Labeled) and not ex.desirable)]


def prepare(cfg: DataConfig, tokenizer, seed: int, *, use_cache: bool = True) -> PreparedData:
    """Read, split, mix, render and tokenize the recipe's data; every example must train something."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("lorakit needs a fast tokenizer (offset mapping) to build loss masks")
    opened = _open(cfg)
    fingerprints = {
        name: digest for source in opened["train"] + opened["eval"] for name, digest in source.fingerprints().items()
    }
    key = cache_mod.cache_key(cfg, fingerprints, tokenizer, seed) if use_cache else None
    hit = cache_mod.load(key) if key else None
    if hit is not None:
        meta, splits = hit
        apply_chat_template_choice(tokenizer, cfg.chat_template, meta["needs_template"])
        return _prepared(meta, splits, fingerprints, cached=True)
    meta, splits = _build(cfg, opened, tokenizer, seed)
    if key:
        cache_mod.store(key, meta, splits)
    return _prepared(meta, splits, fingerprints)


@dataclass
class Prompt:
    """One generation task from the data: the conversation up to its last assistant turn, and that turn."""

    where: str
    prompt: str  # as rendered (chat template applied) or the plain prompt
    prompt_ids: list[int]
    reference: str


def prompts(cfg: DataConfig, tokenizer, seed: int, split: str = "eval") -> list[Prompt]:
    """Generation prompts and references from the same rows, split and template as `prepare`. Plain text
    rows (continued pre-training) have no reference to generate and are left out."""
    train, evaluation, _, _ = _canonical(cfg, _open(cfg), seed)
    chosen = _references(evaluation if split == "eval" else train)
    apply_chat_template_choice(tokenizer, cfg.chat_template, any(isinstance(ex, Chat) for _, ex, _ in chosen))
    prefix = Encoder(tokenizer, max_length=cfg.max_length).prefix
    out = []
    for where, example, _ in chosen:
        if isinstance(example, Chat):
            last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
            text = tokenizer.apply_chat_template(example.messages[:last], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(Prompt(where, text, ids, example.messages[last]["content"]))
        elif example.prompt:
            ids = prefix + tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
            out.append(Prompt(where, example.prompt, ids, example.completion))
    return out


def conversations(cfg: DataConfig, seed: int, count: int = 8) -> list[list[dict]]:
    """Up to `count` chat conversations of the eval split (else train), each up to its last assistant turn:
    what a model is prompted with, as messages."""
    train, evaluation, _, _ = _canonical(cfg, _open(cfg), seed)
    chats = [example for _, example, _ in _references(evaluation or train) if isinstance(example, Chat)][:count]
    return [c.messages[: max(i for i, m in enumerate(c.messages) if m["role"] == "assistant")] for c in chats]


def _open(cfg: DataConfig) -> dict[str, list[Opened]]:
    return {
        key: [open_source(s, _label(key, i, sources)) for i, s in enumerate(sources)]
        for key, sources in (("train", cfg.train), ("eval", cfg.eval or []))
    }


def _canonical(cfg: DataConfig, opened: dict[str, list[Opened]], seed: int):
    """(train examples, eval examples, bad rows or None, formats): rows read, checked and split."""
    bad: list[str] | None = [] if cfg.on_bad_rows == "skip" else None
    formats: dict[str, str] = {}
    train = _examples(opened["train"], cfg, bad, formats)
    evaluation = _examples(opened["eval"], cfg, bad, formats) if opened["eval"] else []
    if cfg.eval_fraction is not None:
        train, evaluation = _split(train, cfg.eval_fraction, seed)
    return train, evaluation, bad, formats


def _build(cfg: DataConfig, opened: dict[str, list[Opened]], tokenizer, seed: int) -> tuple[dict, dict]:
    train, evaluation, bad, formats = _canonical(cfg, opened, seed)
    if bad:
        _check_bad_share(bad, len(train) + len(evaluation) + len(bad), cfg)
    pairs = _kind(train + evaluation) == "pairs"
    needs_template = any(isinstance(_reply_side(ex), Chat) for _, ex, _ in train + evaluation)
    template = apply_chat_template_choice(tokenizer, cfg.chat_template, needs_template)

    encoder = Encoder(tokenizer, max_length=cfg.max_length, train_on=cfg.train_on, on_overflow=cfg.on_overflow)
    read = len(train) + len(evaluation) + len(bad or [])
    num_proc = cfg.num_proc or (min(os.cpu_count() or 1, 8) if len(train) + len(evaluation) > 2000 else 1)

    def encoded(examples: list, source: str) -> Split:
        if pairs:
            return encode_pairs(examples, encoder, num_proc, source, bad)
        return encode([example_record(*e) for e in examples], encoder, num_proc, source, bad)

    splits = {"train": encoded(train, "data.train")}
    if evaluation:
        splits["eval"] = encoded(evaluation, "data.eval")
    if bad:
        _check_bad_share(bad, read, cfg)
    counts = [sum(1 for *_, s in train if s == i) for i in range(len(opened["train"]))]
    splits["train"], used = _mix(splits["train"], [s.source.weight for s in opened["train"]], seed)
    meta = {
        "needs_template": needs_template,
        "template": template,
        "formats": formats,
        "end_of_turn_id": end_of_turn_id(splits["train"], tokenizer),
        "bad_rows": bad or [],
        "truncated": {k: s.truncated for k, s in splits.items()},
        "drops": {k: s.drops for k, s in splits.items()},
        "sources": [
            {"source": o.name, "examples": counts[i], "used": used[i], "weight": o.source.weight}
            for i, o in enumerate(opened["train"])
        ],
    }
    return meta, {k: s.dataset for k, s in splits.items()}


def _kind(examples: list[tuple]) -> str:
    """`pairs`, `unpaired` or `examples`: one run trains one kind of data, never a mix."""

    def kind(example) -> str:
        return "pairs" if isinstance(example, Pair) else "unpaired" if isinstance(example, Labeled) else "examples"

    kinds = [kind(example) for _, example, _ in examples]
    first = next(((where, k) for (where, _, _), k in zip(examples, kinds) if k != kinds[0]), None)
    if first is not None:
        raise DataError(f"{first[0]}: {ONE[first[1]]} among {KINDS[kinds[0]]}; one run trains one kind of data")
    return kinds[0] if kinds else "examples"


def _check_bad_share(bad: list[str], total: int, cfg: DataConfig) -> None:
    if len(bad) > cfg.max_bad_fraction * total or len(bad) >= total:
        raise DataError(
            f"{len(bad)} of {total} rows are malformed, more than data.max_bad_fraction="
            f"{cfg.max_bad_fraction}; first: {bad[0]}"
        )


def _prepared(meta: dict, datasets: dict, fingerprints: dict, cached: bool = False) -> PreparedData:
    splits = {k: Split(d, truncated=meta["truncated"][k], drops=meta["drops"][k]) for k, d in datasets.items()}
    return PreparedData(
        train=splits["train"],
        eval=splits.get("eval"),
        formats=meta["formats"],
        template=meta["template"],
        end_of_turn_id=meta["end_of_turn_id"],
        fingerprints=fingerprints,
        rows={"train": len(datasets["train"]), "eval": len(datasets["eval"]) if "eval" in datasets else 0},
        bad_rows=meta["bad_rows"],
        sources=meta["sources"],
        cached=cached,
    )


def _label(key: str, index: int, sources: list) -> str:
    return f"data.{key}[{index}]" if len(sources) > 1 else f"data.{key}"


def _examples(opened: list[Opened], cfg: DataConfig, bad: list[str] | None, formats: dict) -> list[tuple]:
    """(where, example, source index) for every good row; with a `bad` list (on_bad_rows: skip) malformed
    rows are recorded there instead of raised."""
    examples = []
    for index, source in enumerate(opened):
        earlier = len(bad or [])
        rows = source.rows(cfg, bad)
        if not rows:  # read_rows refuses empty files, so every row was malformed and skipped
            raise DataError(f"{source.label}: {source.name}: every row is malformed; first: {bad[earlier]}")
        fmt = source.source.format or cfg.format
        if fmt == "auto":
            fmt = detect_format(rows[0][1], rows[0][0])
        formats[source.name] = fmt
        for where, row in rows:
            try:
                examples.append((where, to_example(row, fmt, where), index))
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


def _mix(split: Split, weights: list[float], seed: int) -> tuple[Split, list[int]]:
    """Apply source weights: each example is used `weight` times on average (whole repeats, then a
    seeded sample for the fraction). Returns the mixed split and the examples used per source."""
    sources = split.dataset["source"][:]
    if all(w == 1 for w in weights):
        return split, [sources.count(i) for i in range(len(weights))]
    rng = random.Random(seed)
    chosen: list[int] = []
    used = []
    for index, weight in enumerate(weights):
        mine = [i for i, s in enumerate(sources) if s == index]
        whole, fraction = divmod(weight, 1)
        picked = mine * int(whole) + sorted(rng.sample(mine, round(fraction * len(mine))))
        chosen += picked
        used.append(len(picked))
    if not chosen:
        raise DataError("data.train: the source weights leave no training example")
    return Split(split.dataset.select(chosen).flatten_indices(), truncated=split.truncated, drops=split.drops), used
