"""`lorakit data preview`: the recipe's data exactly as training sees it, without loading model weights.

Shows N examples from the prepared split (the same `data.prepare` the trainer uses, cache included) with
trained tokens highlighted, masked ones dimmed and special tokens (end-of-turn, eos) marked, and the
figures that say whether the data is right: examples kept, truncated and dropped (and why), malformed rows
skipped, tokens per example, the share of trained tokens, padding waste and packing fill.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lorakit import data as data_mod
from lorakit.console import quiet_libraries
from lorakit.data.encode import IGNORE
from lorakit.data.stats import split_stats
from lorakit.errors import DataError
from lorakit.model import base as model_mod
from lorakit.model import setup as setup_mod
from lorakit.recipe.schema import Recipe


def run(recipe: Recipe, *, split: str = "train", count: int = 3, use_cache: bool = True) -> dict:
    """The preview report: settings, figures and `count` rendered examples of `split`."""
    quiet_libraries()
    tokenizer = model_mod.load_tokenizer(recipe.model)
    prepared = data_mod.prepare(recipe.data, tokenizer, recipe.train.seed, use_cache=use_cache)
    chosen = prepared.train if split == "train" else prepared.eval
    if chosen is None:
        raise DataError("there is no eval split: set `data.eval` or `data.eval_fraction`")
    packing = _packing(recipe)
    stats = split_stats(
        chosen,
        max_length=recipe.data.max_length,
        seed=recipe.train.seed,
        batch_size=recipe.train.per_device_train_batch_size,
    )
    specials = set(tokenizer.all_special_ids) | {prepared.end_of_turn_id}

    def side(ids: list[int], labels: list[int]) -> dict:
        trained = sum(t != IGNORE for t in labels)
        return {"tokens": len(ids), "trained_tokens": trained, "segments": _segments(tokenizer, ids, labels, specials)}

    rows = chosen.dataset.select(range(min(count, len(chosen.dataset))))
    examples = [{"index": i, **side(row["input_ids"], row["labels"])} for i, row in enumerate(rows)]
    if chosen.pairs:  # a preference pair: the chosen side above, the rejected one beside it
        for example, row in zip(examples, rows):
            example["rejected"] = side(row["rejected_input_ids"], row["rejected_labels"])
    if chosen.kind == "unpaired":  # KTO's labelled completions
        for example, row in zip(examples, rows):
            example["label"] = "desirable" if row["desirable"] else "undesirable"
    return {
        "split": split,
        "formats": prepared.formats,
        "chat_template": prepared.template,
        "end_of_turn_token": tokenizer.convert_ids_to_tokens(prepared.end_of_turn_id),
        "train_on": recipe.data.train_on,
        "max_length": recipe.data.max_length,
        "on_overflow": recipe.data.on_overflow,
        "packing": packing,
        "cached": prepared.cached,
        "rows": prepared.rows,
        "bad_rows_skipped": len(prepared.bad_rows),
        "first_bad_row": prepared.bad_rows[0] if prepared.bad_rows else None,
        "sources": prepared.sources if split == "train" else None,
        "stats": stats,
        "examples": examples,
    }


def example_text(tokenizer, ids: list[int], labels: list[int], end_of_turn_id: int) -> str:
    """One example as plain text: trained runs in «», special tokens in ⟨⟩."""
    specials = set(tokenizer.all_special_ids) | {end_of_turn_id}
    return _rendered(_segments(tokenizer, ids, labels, specials), plain=True).plain


def _packing(recipe: Recipe) -> bool | None:
    """Whether training will pack, from the model's config alone; None when the config is unreachable."""
    try:
        model_class, model_type = model_mod.model_class_for(recipe.model)
    except OSError:
        return None
    return setup_mod.packing_for(recipe, model_class, model_type)


def _segments(tokenizer, ids: list[int], labels: list[int], specials: set[int]) -> list[dict]:
    """Runs of tokens with the same (trained, special) state, each decoded as a whole."""
    segments: list[dict] = []
    run: list[int] = []
    state = None
    for token, label in zip(ids, labels):
        now = (label != IGNORE, token in specials)
        if run and (now != state or now[1]):
            segments.append(_segment(tokenizer, run, state))
            run = []
        run.append(token)
        state = now
    if run:
        segments.append(_segment(tokenizer, run, state))
    return segments


def _segment(tokenizer, run: list[int], state: tuple[bool, bool]) -> dict:
    return {"text": tokenizer.decode(run), "trained": state[0], "special": state[1]}


def show(report: dict, console: Console) -> None:
    plain = console.no_color or console.color_system is None
    console.print(_settings(report), highlight=False)
    for example in report["examples"]:
        sides = [("chosen", example), ("rejected", example["rejected"])] if "rejected" in example else []
        sides = sides or [(example.get("label", ""), example)]
        for name, shown in sides:
            console.rule(
                f"{report['split']} example {example['index']}{f' ({name})' if name else ''}: {shown['tokens']} "
                f"tokens, {shown['trained_tokens']} trained",
                style="dim",
            )
            console.print(_rendered(shown["segments"], plain), highlight=False)
    console.rule(style="dim")
    legend = (
        "trained text is «marked»; special tokens in ⟨⟩"
        if plain
        else "[green]trained[/]  [dim]masked (context only)[/]  [reverse green]trained special[/]  "
        "[reverse]masked special[/]"
    )
    console.print(legend)
    console.print(_figures(report))


def _settings(report: dict) -> str:
    formats = ", ".join(sorted(set(report["formats"].values())))
    packing = {True: "on", False: "off", None: "unknown (model config unreachable)"}[report["packing"]]
    return (
        f"format {formats}; chat template: {report['chat_template']}; end-of-turn token "
        f"{report['end_of_turn_token']}\ntrain_on {report['train_on']}; max_length {report['max_length']} "
        f"(on_overflow {report['on_overflow']}); packing {packing}"
        f"{'; read from the preprocessing cache' if report['cached'] else ''}"
    )


def _rendered(segments: list[dict], plain: bool) -> Text:
    """Colours on a terminal; without colour, trained runs in «» and special tokens in ⟨⟩."""
    text = Text()
    trained = False
    for seg in segments:
        body = seg["text"]
        if plain:
            if seg["trained"] != trained:
                text.append("«" if seg["trained"] else "»")
                trained = seg["trained"]
            text.append(f"⟨{body}⟩" if seg["special"] else body)
        elif seg["special"]:
            text.append(body, style="reverse green" if seg["trained"] else "reverse")
        else:
            text.append(body, style="green" if seg["trained"] else "dim")
    if trained:
        text.append("»")
    return text


def _figures(report: dict) -> Table:
    stats = report["stats"]
    per = stats["tokens_per_example"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    dropped = ", ".join(f"{n} {why}" for why, n in stats["dropped"].items()) or "0"
    rows = [
        (
            "examples",
            f"{stats['examples']:,} in {report['split']}"
            + (f" ({report['rows']['eval']:,} in eval)" if report["split"] == "train" else ""),
        ),
        ("truncated", f"{stats['truncated']:,}"),
        ("dropped", dropped),
        (
            "malformed rows skipped",
            f"{report['bad_rows_skipped']:,}"
            + (f" (first: {report['first_bad_row']})" if report["first_bad_row"] else ""),
        ),
        ("tokens per example", f"min {per['min']}, median {per['median']:g}, mean {per['mean']}, max {per['max']}"),
        ("trained tokens", f"{stats['trained_tokens']:,} of {stats['tokens']:,} ({stats['trained_share']:.1%})"),
        (
            "padding",
            f"{stats['padded']['padding_share']:.1%} of positions in padded batches of {stats['padded']['batch_size']}",
        ),
        (
            "packing",
            f"{stats['packed']['rows']:,} rows of {stats['packed']['max_length']} tokens, "
            f"{stats['packed']['fill']:.1%} full (padding-free: no padding computed)",
        ),
    ]
    for source in report["sources"] or []:
        if len(report["sources"]) > 1:
            rows.append(
                (
                    f"source {source['source']}",
                    f"{source['used']:,} used of {source['examples']:,} (weight {source['weight']:g})",
                )
            )
    for name, value in rows:
        table.add_row(name, value)
    return table
