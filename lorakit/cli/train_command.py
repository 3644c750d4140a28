"""`lorakit train`: parse, then `train.launch.train` (which checks, launches and trains)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorakit.cli.app import NO_CACHE, RECIPE, app, guarded


@app.command()
def train(
    recipe: Annotated[Path, RECIPE],
    set_: Annotated[
        list[str],
        typer.Option(
            "--set",
            "-s",
            metavar="KEY=VALUE",
            help="Override a recipe value, e.g. --set train.learning_rate=1e-4 (repeatable; values are YAML).",
        ),
    ] = [],
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an earlier run in train.output_dir (only a lorakit run is ever deleted)."
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Validate the recipe and print it resolved, then stop before loading anything."),
    ] = False,
    no_cache: Annotated[bool, NO_CACHE] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in train.output_dir from its newest complete checkpoint.")
    ] = False,
    force_resume: Annotated[
        bool,
        typer.Option("--force-resume", help="Resume even though the recipe or data changed (the changes are listed)."),
    ] = False,
    no_check: Annotated[
        bool,
        typer.Option("--no-check", help="Skip the preflight (`lorakit check`) that runs before anything is loaded."),
    ] = False,
    nproc: Annotated[
        Optional[int],
        typer.Option(
            "--nproc",
            min=1,
            help="Start this many processes on this machine, one per GPU: through torchrun (DDP), or "
            "`accelerate launch` when the recipe names distributed.accelerate_config. Overrides distributed.nproc. "
            "For several machines, run the launcher yourself (docs/distributed.md).",
        ),
    ] = None,
) -> None:
    """Train a LoRA/QLoRA adapter from RECIPE and write a run directory."""

    def work() -> None:
        from lorakit.recipe.loading import load_recipe

        resolved = load_recipe(recipe, set_)
        if dry_run:
            import yaml

            typer.echo(yaml.safe_dump(resolved.to_saved_dict(), sort_keys=False), nl=False)
            return
        from lorakit.train import launch

        again = " ".join(["lorakit", "train", str(recipe), *[f"--set {s}" for s in set_], "--resume"])
        launch.train(
            resolved,
            overwrite=overwrite,
            use_cache=not no_cache,
            resume=resume,
            force_resume=force_resume,
            nproc=nproc,
            preflight=not no_check,
            resume_command=again,
        )

    guarded(work)
