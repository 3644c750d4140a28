"""`lorakit merge`: parse, then `merge.command.merge`; print its tables (stderr) and report (--json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorakit.cli.app import ACCEPT_CHANGED, app, guarded, json_out


@app.command()
def merge(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="The run directory written by `lorakit train`; several to combine their adapters.", show_default=False
        ),
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(help="Where to write the merged model (default: RUN_DIR/merged; required with several runs)."),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            help="Dtype of the merged weights: bfloat16, float16 or float32 (default: the base checkpoint's)."
        ),
    ] = None,
    base: Annotated[
        Optional[str],
        typer.Option(help="Base model to merge into, instead of the recipe's model.name_or_path (e.g. a local copy)."),
    ] = None,
    merge_into: Annotated[
        Optional[str],
        typer.Option(
            "--merge-into",
            help="QLoRA runs: `nf4` (default) adds the update to the NF4-dequantized weights training "
            "saw; `original` to the published full-precision weights. See docs/merge.md.",
        ),
    ] = None,
    combination: Annotated[
        Optional[str],
        typer.Option(
            help="Several runs: how peft's add_weighted_adapter combines them: cat (default; exact weighted sum, ranks "
            "add up), linear, svd, ties, dare_linear or dare_ties. See docs/merge.md."
        ),
    ] = None,
    weights: Annotated[
        Optional[str],
        typer.Option(
            help="Several runs: one weight per run, in order, e.g. 0.7,0.3 (default: equal weights summing to 1)."
        ),
    ] = None,
    density: Annotated[
        Optional[float], typer.Option(help="ties, dare_linear, dare_ties: the share of each update kept, in (0, 1].")
    ] = None,
    seed: Annotated[
        Optional[int],
        typer.Option(help="Several runs: seed for DARE's random pruning (default: the first run's train.seed)."),
    ] = None,
    adapter_only: Annotated[
        bool,
        typer.Option(
            "--adapter-only",
            help="Several runs: write the combined PEFT adapter (loads with PeftModel.from_pretrained) "
            "instead of a merged model.",
        ),
    ] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip comparing the merged model with base + adapter (not recommended).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier merge in the output directory.")
    ] = False,
    accept_changed_adapter: Annotated[bool, ACCEPT_CHANGED] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the merge report as JSON on stdout.")] = False,
) -> None:
    """Fold a run's adapter into its base and write a standard Hugging Face checkpoint, shard by shard,
    verified against base + adapter before it is kept. With several runs, their adapters are first combined
    (peft's add_weighted_adapter) into one, which is merged the same way or, with --adapter-only, kept."""

    def work() -> None:
        from rich.console import Console

        from lorakit.merge.command import merge as merge_runs

        console = Console(stderr=True)  # tables go to stderr, so --json keeps stdout clean
        merged = merge_runs(
            run_dirs,
            output=output,
            dtype=dtype,
            base=base,
            merge_into=merge_into,
            combination=combination,
            weights=weights,
            density=density,
            seed=seed,
            adapter_only=adapter_only,
            verify=not no_verify,
            overwrite=overwrite,
            console=console,
            accept_changed_adapter=accept_changed_adapter,
        )
        for table in merged.tables():
            console.print(table)
        console.print(f"{'combined adapter' if adapter_only else 'merged model'}: {merged.output}", highlight=False)
        if as_json:
            json_out(merged.report)

    guarded(work)
