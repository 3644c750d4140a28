"""`lorakit eval`: a tuned model and its base on the run's eval data, side by side, with CI gates.

Targets: a run directory (base + adapter, the base loaded as in training: 4-bit for QLoRA), a merged
directory (`lorakit merge` output), a recipe plus `--adapter`, or several runs on one base (the base
loaded once, each adapter loaded beside the others and switched on in turn, one column each, evaluated
with the first run's data, template and settings; gates apply to every adapter). The loss uses `data.prepare`, the
function training used, so formatting and masks cannot drift; it is summed per batch and never keeps
logits beyond one batch. Generation uses the target's own chat template and stop tokens.

Writes EVAL_DIR/report.json, report.md, samples.jsonl and loss.png (when the run logged losses), through
lorakit.evaluate.report.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit import data as data_mod
from lorakit.errors import LorakitError, ModelError
from lorakit.evaluate import generation
from lorakit.evaluate import metrics as metrics_mod
from lorakit.evaluate import report as eval_report
from lorakit.model import base as model_mod
from lorakit.model import scoring
from lorakit.model import setup as setup_mod
from lorakit.recipe.schema import EvalConfig, Recipe
from lorakit.rundir.directory import MANIFEST, RECIPE, adapter_hashes, check_adapter, check_files, read_record
from lorakit.rundir.lock import hold_for_reading


@dataclass
class Target:
    """What is evaluated: where its files are, its recipe, and how to load it."""

    kind: str  # run | merged | adapter | runs
    path: Path  # run dir, merged dir or adapter dir: tokenizer, template, stop tokens and eval/ live here
    recipe: Recipe
    run_dir: Path | None  # the training run (metrics.jsonl), when known
    adapters: dict[str, Path] | None = None  # kind "runs": report name -> run dir, in the order given

    def tuned(self) -> list[str]:
        """The names of the tuned models in reports."""
        return list(self.adapters) if self.adapters else ["tuned"]

    @functools.cached_property
    def loading(self) -> setup_mod.Loading:
        """How the base loads, decided once per command: the recipe's precision here and its 4-bit base (the
        base as trained); a merged model and its base load in full precision."""
        cfg = self.recipe.model
        return setup_mod.for_loading(cfg, four_bit=False) if self.kind == "merged" else setup_mod.for_loading(cfg)

    def adapter_dirs(self) -> list[Path]:
        """The adapter directories loaded onto the base (none for a merged model)."""
        if self.adapters:
            return list(self.adapters.values())
        return [] if self.kind == "merged" else [self.path]


def resolve(target: str | Path, adapter: str | None = None, accept_changed_adapter: bool = False) -> Target:
    """Refuse, before loading anything, what cannot be evaluated."""
    from lorakit.recipe.loading import load_recipe

    path = Path(target).expanduser().resolve()
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser().resolve()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise LorakitError(f"--adapter {adapter}: no adapter_config.json there")
        return Target("adapter", adapter_dir, load_recipe(path), None)
    if path.is_file():
        raise LorakitError(f"{target} is a recipe; give the adapter to evaluate with --adapter")
    if (path / "merge_report.json").is_file():
        report = read_record(path / "merge_report.json")
        notice = check_files(
            path,
            report.get("files_sha256") or {},
            "merge_report.json",
            "the merged model that was verified",
            accept_changed_adapter,
        )
        if notice:
            print(notice, file=sys.stderr)
        run_dir = Path(report["run"])  # a combination's first run: its recipe, but not its loss curve
        recipe = load_recipe(run_dir / RECIPE)
        recipe.model.name_or_path = report["base"]
        return Target("merged", path, recipe, None if "combination" in report else run_dir)
    hold_for_reading(path)
    if not (path / RECIPE).is_file():
        raise LorakitError(f"{target} is neither a lorakit run, a merged model, nor a recipe")
    if not (path / "adapter_config.json").is_file():
        raise LorakitError(
            f"{target} holds no adapter (adapter_config.json): the run did not finish, so there is "
            "nothing tuned to evaluate"
        )
    if not (path / MANIFEST).is_file():
        raise LorakitError(f"{target} is an incomplete run (no {MANIFEST})")
    notice = check_adapter(path, read_record(path / MANIFEST), accept_changed_adapter)
    if notice:
        print(notice, file=sys.stderr)
    return Target("run", path, load_recipe(path / RECIPE), path)


def resolve_several(targets: list[str | Path], accept_changed_adapter: bool = False) -> Target:
    """Runs evaluated side by side on one loaded base: they must share the base, the way it is loaded, the
    chat template and the kind of adapter."""
    from lorakit.rundir import group as runset

    runs = runset.read(targets, accept_changed_adapter)
    runset.check_same_base(runs)
    runset.check_same_loading(runs)
    for run in runs[1:]:
        if run.adapter.get("peft_type") != runs[0].adapter.get("peft_type"):
            raise LorakitError(
                f"run {run.name} holds a {run.adapter.get('peft_type')} adapter, run {runs[0].name} a "
                f"{runs[0].adapter.get('peft_type')} one: adapters switched on one base must be of one kind"
            )
    return Target("runs", runs[0].path, runs[0].recipe, None, {r.name: r.path for r in runs})


def run(
    target: Target,
    *,
    settings: EvalConfig,
    compare_base: bool = True,
    split: str = "eval",
    gates: list | None = None,
    output: Path | None = None,
    console=None,
    lm_eval: dict | None = None,
) -> dict:
    """Evaluate; `lm_eval` ({"tasks": [...], "include": DIR, "limit": N}) adds lm-evaluation-harness tasks."""
    if lm_eval:
        _refuse_harness_on_prompt_learning(target)
    output = output or default_output(target)
    check_output(output)
    started = time.perf_counter()
    tokenizer = tokenizer_for(target)
    cfg = target.recipe.data.model_copy(update={"chat_template": None})  # the template saved with the target
    seed = target.recipe.train.seed
    prepared = data_mod.prepare(cfg, tokenizer, seed)
    scored = prepared.eval if split == "eval" else prepared.train
    if scored is None:
        raise LorakitError("the recipe has no eval data (data.eval or data.eval_fraction); use --split train")
    prompts = data_mod.prompts(cfg, tokenizer, seed, split)[: settings.max_examples]
    batch = settings.batch_size or target.recipe.train.per_device_eval_batch_size
    # the saved stop tokens, and the end-of-turn token the data ends turns with (a checkpoint's adapter
    # directory has no generation_config.json of its own)
    stops = sorted(set(generation.stop_ids(target.path, tokenizer)) | {prepared.end_of_turn_id})
    if lm_eval:
        from lorakit.evaluate import harness

        manager = harness.task_manager(lm_eval["tasks"], lm_eval.get("include"))

    # KTO's labelled completions: the loss is the desirable ones'; every completion is scored by its label
    desirable = scored.dataset["desirable"][:] if scored.kind == "unpaired" else None
    lossed = scored
    if desirable and any(desirable):
        lossed = data_mod.Split(scored.dataset.select([i for i, d in enumerate(desirable) if d]))
    results, samples, pair_logps, completion_logps = {}, {}, {}, {}
    for name, model in load_models(target, (*target.tuned(), "base") if compare_base else target.tuned()):
        if console:
            console.print(
                f"evaluating {name}: loss on {len(lossed.dataset)} examples, generation on {len(prompts)} prompts",
                highlight=False,
            )
        results[name], samples[name] = _score(model, tokenizer, lossed, prompts, stops, settings, batch, seed)
        if scored.pairs:
            pair_logps[name] = _pair_logps(model, tokenizer, scored, batch)
            results[name].update(metrics_mod.preference(*pair_logps[name]))
        if desirable:
            data = scored.dataset
            completion_logps[name] = scoring.sequence_logps(
                model, data["input_ids"], data["labels"], tokenizer.pad_token_id or 0, batch
            )
            results[name].update(metrics_mod.labelled(completion_logps[name], desirable))
        if lm_eval:
            results[name]["lm_eval"] = harness.run_tasks(
                model, tokenizer, lm_eval["tasks"], manager, limit=lm_eval.get("limit"), batch_size=batch
            )
    against = reward_references(target)
    for name, reference in against.items():
        if reference in pair_logps:
            results[name].update(metrics_mod.rewards(pair_logps[name], pair_logps[reference]))
        if reference in completion_logps:
            results[name].update(metrics_mod.reward_auc(completion_logps[name], completion_logps[reference], desirable))
    gate_results = check_gates(target, gates or [], results)
    report = _report(target, split, lossed, prompts, prepared, settings, batch, stops, results, gate_results)
    if pair_logps or completion_logps:
        report["rewards_against"] = {n: r for n, r in against.items() if r in results}
    if desirable:
        report["data"]["labelled_completions"] = {"desirable": sum(desirable), "undesirable": desirable.count(False)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    eval_report.write(report, prompts, samples, target.run_dir, output)
    return report


def _report(target, split, scored, prompts, prepared, settings, batch, stops, results, gate_results) -> dict:
    """report.json: what was evaluated, on which data, with which settings; the metrics and gates."""
    compare_base = "base" in results
    tuned = {n: str(p) for n, p in target.adapters.items()} if target.adapters else {"tuned": str(target.path)}
    return {
        "target": str(target.path),
        "kind": target.kind,
        "models": {**tuned, "base": target.recipe.model.name_or_path if compare_base else None},
        **measured(target),
        "data": {
            "split": split,
            "loss_examples": len(scored.dataset),
            "generation_prompts": len(prompts),
            "fingerprints": prepared.fingerprints,
            "chat_template": prepared.template,
        },
        "settings": {
            **settings.model_dump(),
            "batch_size": batch,
            "stop_token_ids": stops,
            "precision": target.loading.precision.dtype,
            "4bit_base": target.loading.four_bit,
        },
        "metrics": results,
        "gates": gate_results,
        "passed": all(g["passed"] for g in gate_results),
    }


def _refuse_harness_on_prompt_learning(target: Target) -> None:
    from lorakit.model import peft_methods as methods

    learned = [a for a in target.adapter_dirs() if methods.peft_type(a) in methods.NOT_MERGEABLE]
    if learned:
        raise LorakitError(
            f"--lm-eval-tasks: {learned[0]} is a prompt/prefix-tuning adapter; lm-evaluation-"
            "harness reads the continuation's logits at fixed positions and pads batches on the "
            "left, which the virtual tokens and peft's dropped position ids both shift, so its "
            "scores would be wrong. Evaluate it with lorakit's own loss and generation metrics"
        )


def _score(model, tokenizer, scored, prompts, stops, settings: EvalConfig, batch: int, seed: int):
    """One model's loss over the scored split and its generation metrics over the prompts."""
    data = scored.dataset
    loss, tokens = scoring.token_loss(model, data["input_ids"], data["labels"], tokenizer.pad_token_id or 0, batch)
    outs = generation.generate(model, tokenizer, [p.prompt_ids for p in prompts], stops, settings, batch, seed)
    texts = (
        [o.text for o in outs],
        [p.reference for p in prompts],
        [o.tokens for o in outs],
        [o.stopped for o in outs],
    )
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "loss_tokens": tokens, **metrics_mod.score(*texts)}
    return result, outs


def reward_references(target: Target) -> dict[str, str]:
    """Per tuned model, the model its reward is measured against: the base, or, when runs are compared side
    by side and one of them is the adapter a preference run started from (its training reference), that run."""
    if target.kind != "runs":
        return {name: "base" for name in target.tuned()}
    by_path = {path.resolve(): name for name, path in target.adapters.items()}
    against = {}
    for name, path in target.adapters.items():
        start = read_record(path / MANIFEST).get("start_adapter") or {}
        against[name] = by_path.get(Path(start["path"]).resolve(), "base") if start.get("path") else "base"
    return against


def _pair_logps(model, tokenizer, scored, batch: int) -> tuple[list[float], list[float]]:
    """Each held-out pair's summed log-probability of the chosen and of the rejected reply."""
    data, pad = scored.dataset, tokenizer.pad_token_id or 0
    chosen = scoring.sequence_logps(model, data["input_ids"], data["labels"], pad, batch)
    rejected = scoring.sequence_logps(model, data["rejected_input_ids"], data["rejected_labels"], pad, batch)
    return chosen, rejected


def check_gates(target: Target, gates: list, results: dict) -> list[dict]:
    """Every gate on the tuned model; with several adapters, every adapter must pass every gate."""
    if not target.adapters:
        return metrics_mod.check_gates(gates, results["tuned"])
    return [{"model": name, **g} for name in target.tuned() for g in metrics_mod.check_gates(gates, results[name])]


def default_output(target: Target) -> Path:
    return target.path / ("eval-compare" if target.kind == "runs" else "eval")


def measured(target: Target) -> dict[str, dict]:
    """What a report measured: each tuned model's adapter file hashes (`adapter_sha256`, by name), or a
    merged model's file hashes as its merge_report.json recorded them (`merged_sha256`)."""
    if target.kind == "merged":
        return {"merged_sha256": read_record(target.path / "merge_report.json").get("files_sha256") or {}}
    return {"adapter_sha256": {n: adapter_hashes(p) for n, p in zip(target.tuned(), target.adapter_dirs())}}


def check_measured(report: dict, target: Target, where: Path) -> None:
    """Refuse a report that measured other weights than the target holds now (the run trained again, an
    adapter or merged model replaced): its figures would be presented as this model's."""
    for key, now in measured(target).items():
        then = report.get(key)
        if then != now:
            held = target.path if target.kind != "runs" else ", ".join(map(str, target.adapters.values()))
            raise LorakitError(
                f"{where / 'report.json'}: measured other weights than {held} holds now ({key} differs): the "
                "report is stale; run `lorakit eval` again"
            )


def check_output(out: Path) -> None:
    """An eval directory is replaced whole, so it must be empty or an earlier lorakit report."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        raise LorakitError(f"--output {out} exists and is not a lorakit eval report; refusing to replace it")


def tokenizer_for(target: Target):
    """The target's own tokenizer (it carries the chat template used in training), else the base's."""
    from transformers import AutoTokenizer

    own = (target.path / "tokenizer_config.json").is_file() or (target.path / "tokenizer.json").is_file()
    return AutoTokenizer.from_pretrained(target.path if own else model_mod.source(target.recipe.model))


def load_models(target: Target, names: tuple[str, ...]):
    """(name, model) for each of `names` ("tuned", "base", or a "runs" target's adapter names), loading
    nothing that is not asked for: base + adapter shares one loaded base (the adapter is switched off for
    the base); a merged model's base is loaded on its own. Use each model before taking the next: several
    adapters are one model whose active adapter changes."""
    from transformers import AutoModelForCausalLM

    if target.kind == "merged":
        if "tuned" in names:
            yield (
                "tuned",
                AutoModelForCausalLM.from_pretrained(
                    target.path,
                    dtype=target.loading.precision.torch_dtype,
                    device_map=model_mod.device_map(target.loading.precision),
                ),
            )
        if "base" in names:
            yield "base", model_mod.load_base(target.recipe.model, target.loading)
        return
    from peft import PeftModel

    base = model_mod.load_base(target.recipe.model, target.loading)
    if target.adapters:
        yield from _switched(base, target, names)
        return
    if "tuned" not in names:
        yield "base", base
        return
    try:
        tuned = PeftModel.from_pretrained(base, target.path)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(
            f"the adapter in {target.path} does not fit {target.recipe.model.name_or_path}: "
            f"{str(exc).strip().splitlines()[-1].strip()}"
        ) from None
    yield "tuned", tuned
    if "base" in names:
        with tuned.disable_adapter():
            yield "base", tuned


def _switched(base, target: Target, names):
    """Each adapter loaded once beside the others (peft's load_adapter), then switched on in turn."""
    from peft import PeftModel

    model = None
    for i, (name, path) in enumerate(target.adapters.items()):
        key = f"adapter{i}"  # peft's adapter names cannot hold dots; run directory names can
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, path, adapter_name=key)
            else:
                model.load_adapter(path, adapter_name=key)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelError(
                f"the adapter of run {name} ({path}) does not fit {target.recipe.model.name_or_path}: "
                f"{str(exc).strip().splitlines()[-1].strip()}"
            ) from None
    for i, name in enumerate(target.adapters):
        if name in names:
            model.set_adapter(f"adapter{i}", inference_mode=True)
            yield name, model
    if "base" in names:
        with model.disable_adapter():
            yield "base", model


def replies(target: Target, conversations: list[list[dict]], *, settings: EvalConfig, names) -> dict:
    """{name: generations} for chat conversations, each model with the target's template and stop tokens
    (`lorakit generate`); `names` as for `load_models`."""
    tokenizer = tokenizer_for(target)
    prompts = [generation.prompt_ids(tokenizer, c) for c in conversations]
    stops = generation.stop_ids(target.path, tokenizer)
    batch = settings.batch_size or target.recipe.train.per_device_eval_batch_size
    return {
        name: generation.generate(model, tokenizer, prompts, stops, settings, batch, target.recipe.train.seed)
        for name, model in load_models(target, tuple(names))
    }


def reply(target: Target, conversations: list[list[dict]], *, settings: EvalConfig, base: bool = False):
    """One model's generations: the tuned model's, or the base's."""
    name = "base" if base else "tuned"
    return replies(target, conversations, settings=settings, names=(name,))[name]
