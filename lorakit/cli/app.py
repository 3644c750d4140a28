"""The typer app, the options several commands share (their help written once), and the one place where
errors become messages and exit codes."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated, Optional

import typer

from lorakit import __version__

app = typer.Typer(
    name="lorakit",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help="Fine-tune causal language models with LoRA and QLoRA from one strict YAML recipe.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

NO_CACHE = typer.Option(
    "--no-cache", help="Tokenize the data afresh instead of reading (and writing) the preprocessing cache."
)
RECIPE = typer.Argument(help="The recipe YAML file.", show_default=False)
SET_TOO = typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a recipe value (as for `lorakit train`).")
GPU_MEMORY = typer.Option(
    "--gpu-memory", help="Memory per GPU to plan for, e.g. 24GiB or 80GB (default: this machine's GPU, if any)."
)
MAX_NEW = typer.Option("--max-new-tokens", help="Most tokens per generation (default: recipe eval.max_new_tokens).")
BATCH = typer.Option("--batch-size", help="Batch size for loss and generation (default: recipe).")
SAMPLE = typer.Option(
    "--do-sample/--greedy", help="Sample instead of greedy decoding (default: recipe).", show_default=False
)
TEMP = typer.Option("--temperature", help="Sampling temperature.")
TOP_P = typer.Option("--top-p", help="Nucleus sampling mass.")
ACCEPT_CHANGED = typer.Option(
    "--accept-changed-adapter",
    help="Use an adapter (or a merged model) whose files no longer match the sha256 recorded when lorakit wrote "
    "them (manifest.json, merge_report.json); refused otherwise.",
)


def json_out(value, ensure_ascii: bool = True) -> None:
    """A report as JSON on stdout (the tables go to stderr, so stdout stays parseable)."""
    import json

    typer.echo(json.dumps(value, indent=1, ensure_ascii=ensure_ascii))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Fine-tune causal language models with LoRA and QLoRA from one strict YAML recipe."""


def guarded(work) -> None:
    """Run a command body; user mistakes become one message and their exit code, never a traceback."""
    from lorakit.errors import Interrupted, LorakitError, RunFailed

    debug = os.environ.get("LORAKIT_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _terminated)  # `finally` blocks run: no staging directory is left behind
    try:
        work()
    except typer.Exit:  # a command's own exit code (e.g. 3 for a missed gate)
        raise
    except (LorakitError, RunFailed, Interrupted) as exc:
        if debug:
            raise
        error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # a failed run: say what, keep the traceback for LORAKIT_DEBUG=1
        if debug:
            raise
        error(f"the run failed: {type(exc).__name__}: {exc}\n(set LORAKIT_DEBUG=1 for the traceback)")
        raise typer.Exit(1) from None


def _terminated(signum, frame) -> None:
    """SIGTERM outside training (which stops at a checkpoint instead: lorakit.train.resume) ends the command
    with 143 through the normal error path, so staging directories are removed and nothing half-written stays."""
    from lorakit.errors import Interrupted

    raise Interrupted("terminated by SIGTERM; nothing half-written was kept (outputs are moved into place whole)", 143)


def error(message: str) -> None:
    lines = message.splitlines() or [""]
    sys.stderr.write("error: " + "\n       ".join(lines) + "\n")
