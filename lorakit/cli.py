"""The `lorakit` command line. Each command parses its options, calls one `run()`, and prints.

Heavy libraries (torch, transformers, ...) are imported inside the commands, so `lorakit --help` and a
rejected recipe answer in well under a second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lorakit import __version__

app = typer.Typer(
    name="lorakit", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="Fine-tune causal language models with LoRA and QLoRA from one strict YAML recipe.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


NO_CACHE_HELP = "Tokenize the data afresh instead of reading (and writing) the preprocessing cache."
_RECIPE = typer.Argument(help="The recipe YAML file.", show_default=False)
_SET_TOO = typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a recipe value (as for `lorakit train`).")
_GPU_MEMORY = typer.Option("--gpu-memory", help="Memory per GPU to plan for, e.g. 24GiB or 80GB (default: this "
                           "machine's GPU, if any).")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Fine-tune causal language models with LoRA and QLoRA from one strict YAML recipe."""


@app.command()
def train(
    recipe: Annotated[Path, _RECIPE],
    set_: Annotated[list[str], typer.Option(
        "--set", "-s", metavar="KEY=VALUE",
        help="Override a recipe value, e.g. --set train.learning_rate=1e-4 (repeatable; values are YAML).")] = [],
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an earlier run in train.output_dir (only a lorakit run is ever deleted).")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate the recipe and print it resolved, then stop before loading anything.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help=NO_CACHE_HELP)] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in train.output_dir from its newest complete checkpoint.")] = False,
    force_resume: Annotated[bool, typer.Option(
        "--force-resume", help="Resume even though the recipe or data changed (the changes are listed).")] = False,
    no_check: Annotated[bool, typer.Option(
        "--no-check", help="Skip the preflight (`lorakit check`) that runs before anything is loaded.")] = False,
    nproc: Annotated[Optional[int], typer.Option(
        "--nproc", min=1, help="Start this many processes on this machine, one per GPU: through torchrun (DDP), or "
        "`accelerate launch` when the recipe names distributed.accelerate_config. Overrides distributed.nproc. "
        "For several machines, run the launcher yourself (docs/distributed.md).")] = None,
) -> None:
    """Train a LoRA/QLoRA adapter from RECIPE and write a run directory."""
    from lorakit.recipe_file import load_recipe

    def work() -> None:
        resolved = load_recipe(recipe, set_)
        if dry_run:
            import yaml

            typer.echo(yaml.safe_dump(resolved.to_saved_dict(), sort_keys=False), nl=False)
            return
        from lorakit.errors import LorakitError

        from lorakit import distributed

        if (resume or force_resume) and overwrite:
            raise LorakitError("--resume and --overwrite contradict each other: one continues the run, the other "
                               "deletes it")
        if not distributed.launched():
            if not no_check:
                _preflight(resolved, not no_cache)
            _launch_if_asked(resolved, nproc, resume or force_resume, overwrite)
        if resume or force_resume:
            from lorakit.resume import run_to_resume

            run_to_resume(resolved.train.output_dir)
        elif distributed.is_main():  # the other processes of a launch find the directory claimed
            from lorakit.run_dir import check_free

            check_free(resolved.train.output_dir, overwrite)  # refuse before the slow imports
        from lorakit.console import quiet_libraries

        quiet_libraries()
        from lorakit.train import run

        again = " ".join(["lorakit", "train", str(recipe), *[f"--set {s}" for s in set_], "--resume"])
        run(resolved, overwrite=overwrite, use_cache=not no_cache, resume=resume or force_resume,
            force_resume=force_resume, resume_command=again)

    _guarded(work)


def _preflight(recipe, use_cache: bool) -> None:
    """`lorakit check` before training: errors stop the run (exit 2); warnings other than the data's (which
    the run reports itself) are shown."""
    from rich.console import Console

    from lorakit import check as check_mod
    from lorakit.console import quiet_libraries
    from lorakit.errors import LorakitError

    quiet_libraries()
    findings = check_mod.run(recipe, use_cache=use_cache)
    problems = check_mod.errors(findings)
    if problems:
        raise LorakitError("the preflight found problems (skip it with --no-check):\n  "
                           + "\n  ".join(f"{f.check}: {f.message}" for f in problems))
    check_mod.show([f for f in findings if f.level == "warning" and f.check != "data"], Console(stderr=True))


def _launch_if_asked(recipe, nproc: int | None, resuming: bool, overwrite: bool) -> None:
    """Start the launcher when the command line or the recipe asks for several processes (or an engine),
    once everything that can be refused here has been checked."""
    config = recipe.distributed.accelerate_config
    if not config and (nproc or recipe.distributed.nproc or 1) == 1:
        return
    import torch

    from lorakit import distributed, engines
    from lorakit.model import resolve_precision

    engine, config_processes = engines.from_accelerate_config(config) if config else (engines.Engine("ddp"), None)
    processes = nproc or recipe.distributed.nproc or config_processes or 1
    cuda = torch.cuda.is_available()
    engines.check(recipe, engine, cuda=cuda, dtype=resolve_precision(recipe.model).dtype, processes=processes,
                  gpus=torch.cuda.device_count() if cuda else None)
    if not resuming:
        from lorakit.run_dir import check_free

        check_free(recipe.train.output_dir, overwrite)
    distributed.launch(processes, _without_option(sys.argv[1:], "--nproc"), config)


@app.command()
def merge(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="The run directory written by `lorakit train`; several to combine their adapters.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        help="Where to write the merged model (default: RUN_DIR/merged; required with several runs).")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="Dtype of the merged weights: bfloat16, float16 or float32 (default: the base checkpoint's).")] = None,
    base: Annotated[Optional[str], typer.Option(
        help="Base model to merge into, instead of the recipe's model.name_or_path (e.g. a local copy).")] = None,
    merge_into: Annotated[Optional[str], typer.Option(
        "--merge-into", help="QLoRA runs: `nf4` (default) adds the update to the NF4-dequantized weights training "
        "saw; `original` to the published full-precision weights. See docs/merge.md.")] = None,
    combination: Annotated[Optional[str], typer.Option(
        help="Several runs: how peft's add_weighted_adapter combines them: cat (default; exact weighted sum, ranks "
        "add up), linear, svd, ties, dare_linear or dare_ties. See docs/merge.md.")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="Several runs: one weight per run, in order, e.g. 0.7,0.3 (default: equal weights summing to 1).")] = None,
    density: Annotated[Optional[float], typer.Option(
        help="ties, dare_linear, dare_ties: the share of each update kept, in (0, 1].")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Several runs: seed for DARE's random pruning (default: the first run's train.seed).")] = None,
    adapter_only: Annotated[bool, typer.Option(
        "--adapter-only", help="Several runs: write the combined PEFT adapter (loads with PeftModel.from_pretrained) "
        "instead of a merged model.")] = False,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip comparing the merged model with base + adapter (not recommended).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier merge in the output directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the merge report as JSON on stdout.")] = False,
) -> None:
    """Fold a run's adapter into its base and write a standard Hugging Face checkpoint, shard by shard,
    verified against base + adapter before it is kept. With several runs, their adapters are first combined
    (peft's add_weighted_adapter) into one, which is merged the same way or, with --adapter-only, kept."""

    def work() -> None:
        from lorakit.errors import LorakitError

        if merge_into not in (None, "nf4", "original"):
            raise LorakitError(f"--merge-into: expected nf4 or original, got {merge_into!r}")
        several = {"--combination": combination, "--weights": weights, "--density": density, "--seed": seed,
                   "--adapter-only": adapter_only or None}
        if len(run_dirs) == 1 and any(v is not None for v in several.values()):
            raise LorakitError(f"{', '.join(k for k, v in several.items() if v is not None)}: for combining several "
                               "runs; give two or more run directories")
        from lorakit.console import quiet_libraries

        quiet_libraries()
        from rich.console import Console

        from lorakit import merge as merge_mod

        console = Console(stderr=True)  # tables go to stderr, so --json keeps stdout clean
        if len(run_dirs) > 1:
            from lorakit import combine

            plan = combine.plan(run_dirs, combination=combination, weights=weights, density=density, seed=seed,
                                output=str(output) if output else None, adapter_only=adapter_only, dtype=dtype,
                                base=base, merge_into=merge_into, overwrite=overwrite)
            report = combine.run(plan, check=not no_verify, dtype=dtype, base=base, merge_into=merge_into,
                                 overwrite=overwrite, console=console)
            console.print(combine.report_table(report if adapter_only else report["combination"]))
        else:
            plan = merge_mod.plan(run_dirs[0], output=str(output) if output else None, dtype=dtype, base=base,
                                  merge_into=merge_into, overwrite=overwrite)
            report = merge_mod.run(plan, check=not no_verify)
        if "verification" in report and "merged_vs_reference" in report["verification"]:
            console.print(merge_mod.report_table(report))
        console.print(f"{'combined adapter' if adapter_only else 'merged model'}: {plan.output}", highlight=False)
        if as_json:
            import json

            typer.echo(json.dumps(report, indent=1))

    _guarded(work)


def _eval_settings(recipe_eval, max_new_tokens, batch_size, max_examples, do_sample, temperature, top_p):
    """The recipe's `eval:` section with command-line options on top, validated like the recipe."""
    updates = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                                 ("max_examples", max_examples), ("do_sample", do_sample),
                                 ("temperature", temperature), ("top_p", top_p)) if v is not None}
    return recipe_eval.model_validate({**recipe_eval.model_dump(), **updates})


_MAX_NEW = typer.Option("--max-new-tokens", help="Most tokens per generation (default: recipe eval.max_new_tokens).")
_BATCH = typer.Option("--batch-size", help="Batch size for loss and generation (default: recipe).")
_SAMPLE = typer.Option("--do-sample/--greedy", help="Sample instead of greedy decoding (default: recipe).",
                       show_default=False)
_TEMP = typer.Option("--temperature", help="Sampling temperature.")
_TOP_P = typer.Option("--top-p", help="Nucleus sampling mass.")


@app.command(name="eval")
def eval_(
    targets: Annotated[list[Path], typer.Argument(
        help="A run directory, a merged model directory (lorakit merge), or a recipe with --adapter; or several run "
        "directories on one base, evaluated side by side.", show_default=False)],
    adapter: Annotated[Optional[Path], typer.Option(help="With a recipe as TARGET: the adapter directory.")] = None,
    compare: Annotated[str, typer.Option(help="`base` evaluates the base model too, side by side; `none` skips it.")] = "base",
    split: Annotated[str, typer.Option(help="Which split to evaluate: eval or train.")] = "eval",
    fail_under: Annotated[list[str], typer.Option(
        "--fail-under", metavar="METRIC=VALUE", help="Gate: exit 3 unless the tuned model's METRIC >= VALUE "
        "(every adapter's, with several runs; repeatable; e.g. exact_match=0.8).")] = [],
    fail_over: Annotated[list[str], typer.Option(
        "--fail-over", metavar="METRIC=VALUE", help="Gate: exit 3 unless METRIC <= VALUE (e.g. loss=1.2).")] = [],
    max_loss: Annotated[Optional[float], typer.Option("--max-loss", help="Gate: shorthand for --fail-over loss=X.")] = None,
    max_new_tokens: Annotated[Optional[int], _MAX_NEW] = None,
    batch_size: Annotated[Optional[int], _BATCH] = None,
    max_examples: Annotated[Optional[int], typer.Option(
        "--max-examples", help="Generate for at most N eval examples (the loss uses all).")] = None,
    do_sample: Annotated[Optional[bool], _SAMPLE] = None,
    temperature: Annotated[Optional[float], _TEMP] = None,
    top_p: Annotated[Optional[float], _TOP_P] = None,
    lm_eval_tasks: Annotated[Optional[str], typer.Option(
        "--lm-eval-tasks", help="Also run lm-evaluation-harness tasks (comma-separated) on both models; needs "
        "the lm-eval extra.")] = None,
    lm_eval_include: Annotated[Optional[Path], typer.Option(
        "--lm-eval-include", help="A directory of your own lm-eval task YAML files.")] = None,
    lm_eval_limit: Annotated[Optional[int], typer.Option("--lm-eval-limit", help="At most N documents per task.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        help="Report directory (default: TARGET/eval; with several runs, FIRST_RUN/eval-compare).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Evaluate a tuned model and its base on the eval data: loss, perplexity, exact match, ROUGE-L, stop
    rate and more, side by side. Writes TARGET/eval/ (report.json, report.md, samples.jsonl, loss.png);
    exits 3 when a gate is missed. Several runs: one column per adapter, the base loaded once."""

    def work() -> None:
        from lorakit import metrics as metrics_mod
        from lorakit.errors import LorakitError

        if compare not in ("base", "none"):
            raise LorakitError(f"--compare: expected base or none, got {compare!r}")
        if split not in ("eval", "train"):
            raise LorakitError(f"--split: expected eval or train, got {split!r}")
        try:
            gates = metrics_mod.parse_gates(fail_under, fail_over + ([f"loss={max_loss}"] if max_loss is not None else []))
        except ValueError as exc:
            raise LorakitError(str(exc)) from None
        harness = None
        if lm_eval_tasks:
            from lorakit.harness import check_available

            check_available()
            harness = {"tasks": [t.strip() for t in lm_eval_tasks.split(",") if t.strip()],
                       "include": lm_eval_include, "limit": lm_eval_limit}
        from lorakit import evaluate

        if len(targets) > 1 and adapter is not None:
            raise LorakitError("--adapter goes with one recipe; several targets are run directories")
        resolved = (evaluate.resolve_several(targets) if len(targets) > 1
                    else evaluate.resolve(targets[0], str(adapter) if adapter else None))
        settings = _eval_settings(resolved.recipe.eval, max_new_tokens, batch_size, max_examples, do_sample,
                                  temperature, top_p)
        from lorakit.console import quiet_libraries

        quiet_libraries()
        from rich.console import Console

        console = Console(stderr=True)
        report = evaluate.run(resolved, settings=settings, compare_base=compare == "base", split=split,
                              gates=gates, output=output, console=console, lm_eval=harness)
        from lorakit import eval_report

        console.print(eval_report.table(report))
        if as_json:
            import json

            typer.echo(json.dumps(report, indent=1))
        missed = [g for g in report["gates"] if not g["passed"]]
        if missed:
            _error("gate missed: " + "; ".join(
                (f"{g['model']}: " if "model" in g else "") + f"{g['metric']} = {'not computed' if g['value'] is None else format(g['value'], '.4g')}, needs "
                f"{g['op']} {g['threshold']}" for g in missed))
            raise typer.Exit(3)

    _guarded(work)


@app.command()
def generate(
    targets: Annotated[list[Path], typer.Argument(
        help="A run directory or a merged model directory; or several run directories on one base.",
        show_default=False)],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A user message (repeatable).")] = [],
    file: Annotated[Optional[Path], typer.Option(
        "--file", help="JSONL of prompts: {\"prompt\": ...} or {\"messages\": [...]} per line.")] = None,
    base: Annotated[bool, typer.Option(
        "--base", help="Run the base model instead of the tuned one (with several runs: as well as each adapter).")] = False,
    system: Annotated[Optional[str], typer.Option(help="A system message put before each prompt.")] = None,
    max_new_tokens: Annotated[Optional[int], _MAX_NEW] = None,
    batch_size: Annotated[Optional[int], _BATCH] = None,
    do_sample: Annotated[Optional[bool], _SAMPLE] = None,
    temperature: Annotated[Optional[float], _TEMP] = None,
    top_p: Annotated[Optional[float], _TOP_P] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prompt on stdout.")] = False,
) -> None:
    """Generate replies with a tuned model (or its base), using the run's chat template and stop tokens.
    Several runs: each adapter's reply (and the base's with --base), the base loaded once."""

    def work() -> None:
        from lorakit import evaluate
        from lorakit.errors import LorakitError

        conversations = [[{"role": "user", "content": p}] for p in prompt]
        if file is not None:
            conversations += _read_prompts(file)
        if not conversations:
            raise LorakitError("nothing to generate: give --prompt or --file")
        if system:
            conversations = [[{"role": "system", "content": system}] + c for c in conversations]
        resolved = evaluate.resolve_several(targets) if len(targets) > 1 else evaluate.resolve(targets[0])
        settings = _eval_settings(resolved.recipe.eval, max_new_tokens, batch_size, None, do_sample, temperature,
                                  top_p)
        from lorakit.console import quiet_libraries

        quiet_libraries()
        if len(targets) > 1:
            names = resolved.tuned() + (["base"] if base else [])
            _print_side_by_side(conversations, evaluate.replies(resolved, conversations, settings=settings,
                                                                names=names), settings.max_new_tokens, as_json)
            return
        replies = evaluate.reply(resolved, conversations, settings=settings, base=base)
        for conversation, out in zip(conversations, replies):
            if as_json:
                import json

                typer.echo(json.dumps({"messages": conversation, "reply": out.text, "stopped": out.stopped,
                                       "tokens": out.tokens}, ensure_ascii=False))
            else:
                typer.echo(f"> {conversation[-1]['content']}\n{out.text}"
                           + ("" if out.stopped else f"\n[did not stop within {settings.max_new_tokens} tokens]") + "\n")

    _guarded(work)


def _print_side_by_side(conversations: list, replies: dict, max_new_tokens: int, as_json: bool) -> None:
    """Each prompt with every model's reply, named: text, or one JSON object per prompt."""
    import json

    for i, conversation in enumerate(conversations):
        if as_json:
            typer.echo(json.dumps({"messages": conversation, "replies": {
                name: {"reply": outs[i].text, "stopped": outs[i].stopped, "tokens": outs[i].tokens}
                for name, outs in replies.items()}}, ensure_ascii=False))
            continue
        typer.echo(f"> {conversation[-1]['content']}")
        for name, outs in replies.items():
            typer.echo(f"[{name}] {outs[i].text}"
                       + ("" if outs[i].stopped else f" [did not stop within {max_new_tokens} tokens]"))
        typer.echo("")


@app.command()
def chat(
    target: Annotated[Path, typer.Argument(help="A run directory or a merged model directory.", show_default=False)],
    base: Annotated[bool, typer.Option("--base", help="Start with the base model answering (/tuned switches).")] = False,
    system: Annotated[Optional[str], typer.Option(help="A system message at the start of the conversation.")] = None,
    max_new_tokens: Annotated[Optional[int], _MAX_NEW] = None,
    do_sample: Annotated[Optional[bool], _SAMPLE] = None,
    temperature: Annotated[Optional[float], _TEMP] = None,
    top_p: Annotated[Optional[float], _TOP_P] = None,
) -> None:
    """Chat with a tuned model in the terminal, with the run's template and stop tokens, replies streamed.
    /tuned, /base and /compare choose who answers; /reset, /save FILE (a `messages` JSONL line), /quit."""

    def work() -> None:
        from lorakit import evaluate

        resolved = evaluate.resolve(target)
        settings = _eval_settings(resolved.recipe.eval, max_new_tokens, None, None, do_sample, temperature, top_p)
        from lorakit.console import quiet_libraries

        quiet_libraries()
        from lorakit import chat as chat_mod

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        chat_mod.run(resolved, settings, read=input, write=write, system=system,
                     start_with="base" if base else "tuned")

    _guarded(work)


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv minus `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _read_prompts(path: Path) -> list[list[dict]]:
    import json

    from lorakit.errors import DataError

    conversations = []
    if not path.is_file():
        raise DataError(f"--file {path}: no such file")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            conversations.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            conversations.append(row["messages"])
        else:
            raise DataError(f"{path}:{number}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
    return conversations


data_app = typer.Typer(no_args_is_help=True, help="Look at a recipe's data as training sees it.")
app.add_typer(data_app, name="data")


@data_app.command()
def preview(
    recipe: Annotated[Path, _RECIPE],
    set_: Annotated[list[str], _SET_TOO] = [],
    count: Annotated[int, typer.Option("--count", "-n", min=0, help="Examples to render.")] = 3,
    split: Annotated[str, typer.Option(help="Which split to show: train or eval.")] = "train",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help=NO_CACHE_HELP)] = False,
) -> None:
    """Render examples exactly as training sees them (trained tokens highlighted, end-of-turn marked) with
    counts, lengths, trained share and packing fill. Loads the tokenizer only, never model weights."""
    from lorakit.recipe_file import load_recipe

    def work() -> None:
        from lorakit.errors import LorakitError

        if split not in ("train", "eval"):
            raise LorakitError(f"--split: expected train or eval, got {split!r}")
        resolved = load_recipe(recipe, set_)
        from rich.console import Console

        from lorakit.console import quiet_libraries

        quiet_libraries()
        from lorakit import preview as preview_mod

        report = preview_mod.run(resolved, split=split, count=count, use_cache=not no_cache)
        if as_json:
            import json

            typer.echo(json.dumps(report, indent=1, ensure_ascii=False))
        else:
            preview_mod.show(report, Console())

    _guarded(work)


@app.command()
def check(
    recipe: Annotated[Path, _RECIPE],
    set_: Annotated[list[str], _SET_TOO] = [],
    gpu_memory: Annotated[Optional[str], _GPU_MEMORY] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON on stdout.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help=NO_CACHE_HELP)] = False,
) -> None:
    """Preflight RECIPE without loading weights: precision, engine, optimizer, target modules (how many
    layers each), packing, data (bad rows, truncation, trained share, end-of-turn token trained), padding,
    and the memory plan on the GPUs present. Exit 2 on any error; warnings are listed. `lorakit train`
    runs the same checks first."""
    from lorakit.recipe_file import load_recipe

    def work() -> None:
        resolved = load_recipe(recipe, set_)
        memory = _gpu_memory(gpu_memory)
        from lorakit import check as check_mod

        findings = check_mod.run(resolved, gpu_memory=memory, use_cache=not no_cache)
        if as_json:
            import json

            typer.echo(json.dumps(check_mod.as_dicts(findings), indent=1))
        else:
            from rich.console import Console

            check_mod.show(findings, Console())
        if check_mod.errors(findings):
            raise typer.Exit(2)

    _guarded(work)


@app.command()
def plan(
    recipe: Annotated[Path, _RECIPE],
    set_: Annotated[list[str], _SET_TOO] = [],
    gpu_memory: Annotated[Optional[str], _GPU_MEMORY] = None,
    gpus: Annotated[Optional[int], typer.Option(
        "--gpus", min=1, help="GPUs (processes) the run uses (default: distributed.nproc, else 1).")] = None,
    largest_batch: Annotated[bool, typer.Option(
        "--suggest", help="Also find the largest micro-batch that fits.")] = False,
    gpu_kind: Annotated[Optional[str], typer.Option(
        "--gpu-kind", help="GPU name for the time estimate, e.g. H100 or A100 (default: this machine's).")] = None,
    tokens_per_s: Annotated[Optional[float], typer.Option(
        "--tokens-per-s", help="Measured tokens/s per GPU for the time estimate (e.g. from benchmarks/gpu_train.py).")] = None,
    no_time: Annotated[bool, typer.Option("--no-time", help="Skip the time estimate (it tokenizes the data).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON on stdout.")] = False,
) -> None:
    """Memory per GPU and training time for RECIPE, from the model's config alone (no weights): exact weight,
    LoRA, gradient and optimizer terms, estimated activations; whether it fits, and what would make it fit."""
    from lorakit.recipe_file import load_recipe

    def work() -> None:
        resolved = load_recipe(recipe, set_)
        memory = _gpu_memory(gpu_memory)
        from lorakit import plan as plan_mod

        result = plan_mod.run(resolved, gpu_memory=memory, gpus=gpus, largest_batch=largest_batch,
                              tokens_per_s=tokens_per_s, gpu_kind=gpu_kind, with_time=not no_time)
        if as_json:
            import json

            typer.echo(json.dumps(result.to_dict(), indent=1))
        else:
            from rich.console import Console

            plan_mod.show(result, Console())
        if result.fits is False:
            raise typer.Exit(3)  # like a missed eval gate: scripts can stop before renting the GPUs

    _guarded(work)


def _gpu_memory(text: str | None) -> int | None:
    """`--gpu-memory` in bytes (quieting the libraries the planner imports next)."""
    from lorakit.console import quiet_libraries
    from lorakit.errors import LorakitError
    from lorakit.plan import parse_size

    quiet_libraries()
    try:
        return parse_size(text) if text else None
    except ValueError as exc:
        raise LorakitError(f"--gpu-memory: {exc}") from None


def _guarded(work) -> None:
    """Run a command body; user mistakes become one message and their exit code, never a traceback."""
    from lorakit.errors import Interrupted, LorakitError, RunFailed

    debug = os.environ.get("LORAKIT_DEBUG") == "1"
    try:
        work()
    except typer.Exit:  # a command's own exit code (e.g. 3 for a missed gate)
        raise
    except (LorakitError, RunFailed, Interrupted) as exc:
        if debug:
            raise
        _error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _error("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # a failed run: say what, keep the traceback for LORAKIT_DEBUG=1
        if debug:
            raise
        _error(f"the run failed: {type(exc).__name__}: {exc}\n(set LORAKIT_DEBUG=1 for the traceback)")
        raise typer.Exit(1) from None


def _error(message: str) -> None:
    lines = message.splitlines() or [""]
    sys.stderr.write("error: " + "\n       ".join(lines) + "\n")


def main() -> None:
    app()


