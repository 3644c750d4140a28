"""`lorakit check`: a preflight that asserts, from the recipe, the tokenizer, the model's config and the data
(never the weights), that the run will start and train what it should. `lorakit train` runs it first.

Each check gives one finding: ok, warning (listed, the run goes on) or error (exit 2). The data checks read
the same prepared data the trainer uses (`data.prepare`, its cache included), so they cost nothing twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lorakit import data as data_mod
from lorakit.errors import LorakitError
from lorakit.model import base as model_mod
from lorakit.model import setup as setup_mod
from lorakit.preflight import plan as plan_mod
from lorakit.preflight import preview
from lorakit.recipe.peft_sections import METHOD_NAMES, PROMPT_LEARNING
from lorakit.recipe.schema import Recipe
from lorakit.rundir.directory import unwritable


@dataclass
class Finding:
    check: str
    level: str  # ok | warning | error
    message: str


def run(
    recipe: Recipe,
    *,
    gpu_memory: int | None = None,
    use_cache: bool = True,
    memory: bool = True,
    resolution: setup_mod.Resolution | None = None,
) -> list[Finding]:
    """Every check, in the order a run would meet them; a failing check never hides the others. The
    set-up's decisions are `resolution`'s (`lorakit train` resolves it once for the check and the run),
    else resolved here for one process as the recipe's launch would start it."""
    findings: list[Finding] = []

    def attempt(name: str, body) -> object:
        try:
            return body()
        except LorakitError as exc:
            findings.append(Finding(name, "error", str(exc)))
        except OSError as exc:  # an unreachable model or tokenizer
            findings.append(Finding(name, "error", f"{recipe.model.name_or_path}: {exc}"))
        return None

    decided = resolution or setup_mod.resolve(recipe)
    _decisions(recipe, decided, findings, attempt)
    counts = attempt("target modules", lambda: plan_mod.count(recipe))
    if counts is not None:
        listed = ", ".join(f"{name} x{n}" for name, n in sorted(counts.targets.items()))
        where = (
            f"{getattr(recipe, recipe.method).num_virtual_tokens} virtual tokens ({recipe.method})"
            if recipe.method in PROMPT_LEARNING
            else f"{METHOD_NAMES[recipe.method]} on {sum(counts.targets.values())} layers ({listed})"
        )
        findings.append(Finding("target modules", "ok", f"{where}; {counts.lora:,} trainable parameters"))
    _packing(recipe, decided, findings)
    problem = unwritable(recipe.train.output_dir)
    findings.append(
        Finding("output directory", "error", f"train.output_dir: {problem}")
        if problem
        else Finding("output directory", "ok", str(Path(recipe.train.output_dir).expanduser().resolve()))
    )
    attempt("data", lambda: _data(recipe, findings, use_cache))
    if memory:
        attempt("memory", lambda: _memory(recipe, gpu_memory, findings, counts))
    return findings


def _decisions(recipe: Recipe, decided: setup_mod.Resolution, findings: list[Finding], attempt) -> None:
    """The set-up's findings, in the order it decides: each decision as made, or why it cannot be."""
    problems = decided.problems
    precision, engine = decided.precision, decided.engine
    if "precision" in problems:
        findings.append(Finding("precision", "error", str(problems["precision"])))
    elif precision is not None:
        findings.append(Finding("precision", "ok", f"{precision.dtype} on {precision.device}"))
        attempt("precision", lambda: _model_dtype(recipe, findings))
    if "engine" in problems:
        findings.append(Finding("engine", "error", str(problems["engine"])))
    elif engine is not None:
        findings.append(
            Finding(
                "engine",
                "ok",
                f"{engine.name}; each process loads its own copy on its own device (never device_map=auto)"
                if engine.kind in ("single", "ddp")
                else f"{engine.name}: the engine places and shards the weights",
            )
        )
    if "optimizer" in problems:
        findings.append(Finding("optimizer", "error", str(problems["optimizer"])))
    elif decided.optimizer is not None:
        findings.append(Finding("optimizer", "ok", decided.optimizer))
    if "liger" in problems:
        findings.append(Finding("liger", "error", str(problems["liger"])))
    elif decided.liger is not None and recipe.train.use_liger_kernel is not False:
        on = "Liger kernels on (fused loss)" if decided.liger else "Liger kernels off (needs CUDA and liger-kernel)"
        findings.append(Finding("liger", "ok", on))


def _packing(recipe: Recipe, decided: setup_mod.Resolution, findings: list[Finding]) -> None:
    problem = decided.problems.get("model") or decided.problems.get("packing")
    if problem is not None:
        findings.append(Finding("packing", "error", str(problem)))
    elif decided.packing is not None:
        why = (
            f": {recipe.method} puts its virtual tokens in front of every row"
            if recipe.method in PROMPT_LEARNING
            else ""
        )
        findings.append(
            Finding("packing", "ok", "padding-free packing" if decided.packing else f"padding (no packing){why}")
        )


def _model_dtype(recipe: Recipe, findings: list[Finding]) -> None:
    from transformers import AutoConfig

    cfg = recipe.model
    config = AutoConfig.from_pretrained(
        model_mod.source(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    trained = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "").replace("torch.", "")
    if cfg.dtype == "float16" and trained == "bfloat16":
        findings.append(
            Finding(
                "precision",
                "warning",
                "model.dtype is float16 but the model was trained in bfloat16: "
                "activations may overflow float16's range; prefer bfloat16 where the GPU has it",
            )
        )


def _data(recipe: Recipe, findings: list[Finding], use_cache: bool) -> None:
    """The data's findings (bad rows, truncation, trained share, end-of-turn token trained, padding), from
    the same `data.prepare` training uses. Long on purpose: a flat list of checks over one prepared split,
    each a few lines of wording."""
    tokenizer = model_mod.load_tokenizer(recipe.model)
    prepared = data_mod.prepare(recipe.data, tokenizer, recipe.train.seed, use_cache=use_cache)
    data_mod.check_objective(prepared, recipe.train.objective)
    split = prepared.train
    trained = split.trained_tokens
    findings.append(
        Finding(
            "data",
            "ok",
            f"{prepared.rows['train']} train / {prepared.rows['eval']} eval examples "
            f"({prepared.format}, template {prepared.template}); {trained:,} of {split.tokens:,} "
            f"tokens trained ({trained / max(split.tokens, 1):.0%})",
        )
    )
    first = preview.example_text(tokenizer, split.input_ids[0], split.labels[0], prepared.end_of_turn_id)
    findings.append(Finding("first example", "ok", f"as trained («trained», ⟨special⟩):\n{first}"))
    if prepared.bad_rows:
        findings.append(
            Finding(
                "data",
                "warning",
                f"{len(prepared.bad_rows)} malformed rows skipped "
                f"(data.on_bad_rows: skip); first: {prepared.bad_rows[0]}",
            )
        )
    if split.truncated or split.dropped:
        why = ", ".join(f"{n} {reason}" for reason, n in split.drops.items())
        findings.append(
            Finding(
                "data",
                "warning",
                f"data.max_length={recipe.data.max_length}: {split.truncated} "
                f"examples truncated, {split.dropped} dropped{f' ({why})' if why else ''}",
            )
        )
    eot = prepared.end_of_turn_id
    name = tokenizer.convert_ids_to_tokens(eot)
    with_eot = sum(1 for labels in split.labels if eot in labels)
    share = with_eot / max(len(split.labels), 1)
    if with_eot == 0:
        findings.append(
            Finding(
                "end of turn",
                "error",
                f"the end-of-turn token {name} is in no example's labels: "
                "the model would never learn to stop; check data.train_on and the chat template",
            )
        )
    elif share < 1:
        findings.append(
            Finding(
                "end of turn",
                "warning",
                f"the end-of-turn token {name} is trained in {share:.0%} "
                "of the examples (truncation cuts it from the others)",
            )
        )
    else:
        findings.append(
            Finding(
                "end of turn",
                "ok",
                f"{name} is trained in every example, and the run's generation_config.json lists it as a stop token",
            )
        )
    pad = tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id)
    findings.append(
        Finding(
            "padding",
            "ok",
            f"pad token {pad}{' (= eos)' if tokenizer.pad_token_id == tokenizer.eos_token_id else ''}"
            ": labels are built before padding, so the eos stays trained; padded positions are "
            "masked by the collator",
        )
    )


def _memory(recipe: Recipe, gpu_memory: int | None, findings: list[Finding], counts) -> None:
    import torch

    if gpu_memory is None and not torch.cuda.is_available():
        findings.append(Finding("memory", "ok", "no GPU here: skipped (`lorakit plan --gpu-memory` plans for one)"))
        return
    result = plan_mod.run(recipe, gpu_memory=gpu_memory, with_time=False, counts=counts)
    total, limit = result.total / plan_mod.GIB, result.gpu_memory / plan_mod.GIB
    if result.fits:
        findings.append(Finding("memory", "ok", f"about {total:.1f} of {limit:.1f} GiB per GPU"))
        return
    fixes = "; ".join(s["change"] for s in result.suggestions if s["fits"]) or "see `lorakit plan`"
    findings.append(
        Finding(
            "memory",
            "error",
            f"needs about {total:.1f} GiB per GPU, {limit:.1f} GiB available; would fit with: {fixes}",
        )
    )


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]


def as_dicts(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]


def show(findings: list[Finding], console) -> None:
    """One line per finding, never folded by rich (soft wrap): a path in a message stays whole in a narrow
    terminal, a CI log or a pipe (rich assumes 80 columns there), so it can be copied or grepped."""
    marks = {"ok": "[green]ok[/]     ", "warning": "[yellow]warning[/]", "error": "[red]error[/]  "}
    for finding in findings:
        console.print(f"{marks[finding.level]} {finding.check}: {finding.message}", highlight=False, soft_wrap=True)


def before_training(recipe: Recipe, use_cache: bool, resolution: setup_mod.Resolution) -> None:
    """`lorakit check` as `lorakit train` runs it first, on the run's own set-up: errors stop the run
    (exit 2); warnings other than the data's (which the run reports itself) are shown."""
    from rich.console import Console

    from lorakit.console import quiet_libraries

    quiet_libraries()
    findings = run(recipe, use_cache=use_cache, resolution=resolution)
    problems = errors(findings)
    if problems:
        raise LorakitError(
            "the preflight found problems (skip it with --no-check):\n  "
            + "\n  ".join(f"{f.check}: {f.message}" for f in problems)
        )
    show([f for f in findings if f.level == "warning" and f.check != "data"], Console(stderr=True))
