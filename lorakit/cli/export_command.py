"""`lorakit export`: parse, then `export.command.export`; print what was written (stderr) and its report (--json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorakit.cli.app import ACCEPT_CHANGED, app, guarded, json_out


@app.command()
def export(
    source: Annotated[
        Path,
        typer.Argument(
            help="A run directory (its verified merge is exported; it is merged first when it has none) or a "
            "directory written by `lorakit merge`.",
            show_default=False,
        ),
    ],
    fmt: Annotated[str, typer.Option("--format", help="The format to write: gguf (llama.cpp, Ollama).")] = "gguf",
    outtype: Annotated[
        str,
        typer.Option(
            help="GGUF weight type: f16, bf16 or q8_0; a K-quant (q4_k_m, q5_k_m, ...) is made from the f16 file "
            "by llama.cpp's llama-quantize when it is on PATH."
        ),
    ] = "f16",
    output: Annotated[
        Optional[Path],
        typer.Option(help="Directory for the GGUF file and Modelfile (default: RUN/gguf, or MERGED-gguf)."),
    ] = None,
    no_verify: Annotated[
        bool,
        typer.Option("--no-verify", help="Skip reading the file back and comparing it with the merged model."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier export in the output directory.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the export report as JSON on stdout.")] = False,
    accept_changed_adapter: Annotated[bool, ACCEPT_CHANGED] = False,
) -> None:
    """Write a run's merged model as one GGUF file (weights, tokenizer, chat template, end-of-turn token) and an
    Ollama Modelfile whose TEMPLATE and stop tokens match the run, verified by reading the file back through
    transformers and comparing logits with the merged model on the run's own examples before it is kept."""

    def work() -> None:
        from rich.console import Console

        from lorakit.export.command import export as export_model

        console = Console(stderr=True)
        done = export_model(
            source,
            fmt=fmt,
            outtype=outtype,
            output=output,
            overwrite=overwrite,
            verify=not no_verify,
            console=console,
            accept_changed_adapter=accept_changed_adapter,
        )
        check = done.report.get("verification")
        if check:
            figures, greedy = check["gguf_vs_merged"], check["greedy_replies"]
            console.print(
                f"read back: max |logit diff| {figures['max_abs_diff']:.3g} ({check['tolerance']}), top-1 agreement "
                f"{figures['top1_agreement']:.1%}, tokenizer and chat template identical, greedy replies identical "
                f"{greedy['identical']}/{greedy['prompts']}",
                highlight=False,
            )
        console.print(f"gguf: {done.output / done.report['file']}", highlight=False)
        if done.report["modelfile"]:
            console.print(f"ollama: ollama create NAME -f {done.output / 'Modelfile'}", highlight=False)
        else:
            console.print(f"no Modelfile: {done.report['no_modelfile']}", highlight=False)
        if as_json:
            json_out(done.report)

    guarded(work)
