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
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False)],
    set_: Annotated[list[str], typer.Option(
        "--set", "-s", metavar="KEY=VALUE",
        help="Override a recipe value, e.g. --set train.learning_rate=1e-4 (repeatable; values are YAML).")] = [],
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an earlier run in train.output_dir (only a lorakit run is ever deleted).")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate the recipe and print it resolved, then stop before loading anything.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help=NO_CACHE_HELP)] = False,
) -> None:
    """Train a LoRA/QLoRA adapter from RECIPE and write a run directory."""
    from lorakit.recipe_file import load_recipe

    def work() -> None:
        resolved = load_recipe(recipe, set_)
        if dry_run:
            import yaml

            typer.echo(yaml.safe_dump(resolved.to_saved_dict(), sort_keys=False), nl=False)
            return
        from lorakit.run_dir import check_free

        check_free(resolved.train.output_dir, overwrite)  # refuse before the slow imports
        from lorakit.console import quiet_libraries

        quiet_libraries()
        from lorakit.train import run

        run(resolved, overwrite=overwrite, use_cache=not no_cache)

    _guarded(work)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="The run directory written by `lorakit train`.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(help="Where to write the merged model (default: RUN_DIR/merged).")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="Dtype of the merged weights: bfloat16, float16 or float32 (default: the base checkpoint's).")] = None,
    base: Annotated[Optional[str], typer.Option(
        help="Base model to merge into, instead of the recipe's model.name_or_path (e.g. a local copy).")] = None,
    merge_into: Annotated[Optional[str], typer.Option(
        "--merge-into", help="QLoRA runs: `nf4` (default) adds the update to the NF4-dequantized weights training "
        "saw; `original` to the published full-precision weights. See docs/merge.md.")] = None,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip comparing the merged model with base + adapter (not recommended).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier merge in the output directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the merge report as JSON on stdout.")] = False,
) -> None:
    """Fold a run's adapter into its base and write a standard Hugging Face checkpoint, shard by shard,
    verified against base + adapter before it is kept."""

    def work() -> None:
        from lorakit.errors import LorakitError

        if merge_into not in (None, "nf4", "original"):
            raise LorakitError(f"--merge-into: expected nf4 or original, got {merge_into!r}")
        from lorakit.console import quiet_libraries

        quiet_libraries()
        from rich.console import Console

        from lorakit import merge as merge_mod

        plan = merge_mod.plan(run_dir, output=str(output) if output else None, dtype=dtype, base=base,
                              merge_into=merge_into, overwrite=overwrite)
        report = merge_mod.run(plan, check=not no_verify)
        console = Console(stderr=True)  # the table goes to stderr, so --json keeps stdout clean
        if "verification" in report:
            console.print(merge_mod.report_table(report))
        console.print(f"merged model: {plan.output}", highlight=False)
        if as_json:
            import json

            typer.echo(json.dumps(report, indent=1))

    _guarded(work)


data_app = typer.Typer(no_args_is_help=True, help="Look at a recipe's data as training sees it.")
app.add_typer(data_app, name="data")


@data_app.command()
def preview(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False)],
    set_: Annotated[list[str], typer.Option(
        "--set", "-s", metavar="KEY=VALUE", help="Override a recipe value (as for `lorakit train`).")] = [],
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


def _guarded(work) -> None:
    """Run a command body; user mistakes become one message and their exit code, never a traceback."""
    from lorakit.errors import LorakitError, RunFailed

    debug = os.environ.get("LORAKIT_DEBUG") == "1"
    try:
        work()
    except (LorakitError, RunFailed) as exc:
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


