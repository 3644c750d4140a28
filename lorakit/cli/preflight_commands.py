"""`lorakit data preview`, `check` and `plan`: parse, then `preflight.preview`, `preflight.check` or
`preflight.plan`; print the report (or JSON) and exit 2 (check errors) or 3 (a plan that does not fit)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorakit.cli.app import GPU_MEMORY, NO_CACHE, RECIPE, SET_TOO, app, guarded, json_out

data_app = typer.Typer(no_args_is_help=True, help="Look at a recipe's data as training sees it.")
app.add_typer(data_app, name="data")


@data_app.command()
def preview(
    recipe: Annotated[Path, RECIPE],
    set_: Annotated[list[str], SET_TOO] = [],
    count: Annotated[int, typer.Option("--count", "-n", min=0, help="Examples to render.")] = 3,
    split: Annotated[str, typer.Option(help="Which split to show: train or eval.")] = "train",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    no_cache: Annotated[bool, NO_CACHE] = False,
) -> None:
    """Render examples exactly as training sees them (trained tokens highlighted, end-of-turn marked) with
    counts, lengths, trained share and packing fill. Loads the tokenizer only, never model weights."""

    def work() -> None:
        from lorakit.console import quiet_libraries
        from lorakit.errors import LorakitError
        from lorakit.recipe.loading import load_recipe

        if split not in ("train", "eval"):
            raise LorakitError(f"--split: expected train or eval, got {split!r}")
        resolved = load_recipe(recipe, set_)
        quiet_libraries()
        from lorakit.preflight import preview as preview_mod

        report = preview_mod.run(resolved, split=split, count=count, use_cache=not no_cache)
        if as_json:
            json_out(report, ensure_ascii=False)
        else:
            from rich.console import Console

            preview_mod.show(report, Console())

    guarded(work)


@app.command()
def check(
    recipe: Annotated[Path, RECIPE],
    set_: Annotated[list[str], SET_TOO] = [],
    gpu_memory: Annotated[Optional[str], GPU_MEMORY] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON on stdout.")] = False,
    no_cache: Annotated[bool, NO_CACHE] = False,
) -> None:
    """Preflight RECIPE without loading weights: precision, engine, optimizer, target modules (how many
    layers each), packing, data (bad rows, truncation, trained share, end-of-turn token trained), padding,
    and the memory plan on the GPUs present. Exit 2 on any error; warnings are listed. `lorakit train`
    runs the same checks first."""

    def work() -> None:
        from lorakit.console import quiet_libraries
        from lorakit.recipe.loading import load_recipe

        resolved = load_recipe(recipe, set_)  # a bad recipe is refused before the slow imports
        quiet_libraries()  # before the planner's imports
        from lorakit.preflight import check as check_mod
        from lorakit.preflight.plan import gpu_memory_option

        findings = check_mod.run(resolved, gpu_memory=gpu_memory_option(gpu_memory), use_cache=not no_cache)
        if as_json:
            json_out(check_mod.as_dicts(findings))
        else:
            from rich.console import Console

            check_mod.show(findings, Console())
        if check_mod.errors(findings):
            raise typer.Exit(2)

    guarded(work)


@app.command()
def plan(
    recipe: Annotated[Path, RECIPE],
    set_: Annotated[list[str], SET_TOO] = [],
    gpu_memory: Annotated[Optional[str], GPU_MEMORY] = None,
    gpus: Annotated[
        Optional[int],
        typer.Option("--gpus", min=1, help="GPUs (processes) the run uses (default: distributed.nproc, else 1)."),
    ] = None,
    largest_batch: Annotated[
        bool, typer.Option("--suggest", help="Also find the largest micro-batch that fits.")
    ] = False,
    gpu_kind: Annotated[
        Optional[str],
        typer.Option("--gpu-kind", help="GPU name for the time estimate, e.g. H100 or A100 (default: this machine's)."),
    ] = None,
    tokens_per_s: Annotated[
        Optional[float],
        typer.Option(
            "--tokens-per-s",
            help="Measured tokens/s per GPU for the time estimate (e.g. from benchmarks/gpu_train.py).",
        ),
    ] = None,
    no_time: Annotated[bool, typer.Option("--no-time", help="Skip the time estimate (it tokenizes the data).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON on stdout.")] = False,
) -> None:
    """Memory per GPU and training time for RECIPE, from the model's config alone (no weights): exact weight,
    LoRA, gradient and optimizer terms, estimated activations; whether it fits, and what would make it fit."""

    def work() -> None:
        from lorakit.console import quiet_libraries
        from lorakit.recipe.loading import load_recipe

        resolved = load_recipe(recipe, set_)  # a bad recipe is refused before the slow imports
        quiet_libraries()  # before the planner's imports
        from lorakit.preflight import plan as plan_mod

        result = plan_mod.run(
            resolved,
            gpu_memory=plan_mod.gpu_memory_option(gpu_memory),
            gpus=gpus,
            largest_batch=largest_batch,
            tokens_per_s=tokens_per_s,
            gpu_kind=gpu_kind,
            with_time=not no_time,
        )
        if as_json:
            json_out(result.to_dict())
        else:
            from rich.console import Console

            plan_mod.show(result, Console())
        if result.fits is False:
            raise typer.Exit(3)  # like a missed eval gate: scripts can stop before renting the GPUs

    guarded(work)
