"""`lorakit eval`, `generate` and `chat`: parse, then `evaluate.command`; print the report, replies or
conversation."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lorakit.cli.app import ACCEPT_CHANGED, BATCH, MAX_NEW, SAMPLE, TEMP, TOP_P, app, error, guarded, json_out


@app.command(name="eval")
def eval_(
    targets: Annotated[
        list[Path],
        typer.Argument(
            help="A run directory, a merged model directory (lorakit merge), or a recipe with --adapter; or several run "
            "directories on one base, evaluated side by side.",
            show_default=False,
        ),
    ],
    adapter: Annotated[Optional[Path], typer.Option(help="With a recipe as TARGET: the adapter directory.")] = None,
    compare: Annotated[
        str, typer.Option(help="`base` evaluates the base model too, side by side; `none` skips it.")
    ] = "base",
    split: Annotated[str, typer.Option(help="Which split to evaluate: eval or train.")] = "eval",
    fail_under: Annotated[
        list[str],
        typer.Option(
            "--fail-under",
            metavar="METRIC=VALUE",
            help="Gate: exit 3 unless the tuned model's METRIC >= VALUE "
            "(every adapter's, with several runs; repeatable; e.g. exact_match=0.8).",
        ),
    ] = [],
    fail_over: Annotated[
        list[str],
        typer.Option(
            "--fail-over", metavar="METRIC=VALUE", help="Gate: exit 3 unless METRIC <= VALUE (e.g. loss=1.2)."
        ),
    ] = [],
    max_loss: Annotated[
        Optional[float], typer.Option("--max-loss", help="Gate: shorthand for --fail-over loss=X.")
    ] = None,
    max_new_tokens: Annotated[Optional[int], MAX_NEW] = None,
    batch_size: Annotated[Optional[int], BATCH] = None,
    max_examples: Annotated[
        Optional[int], typer.Option("--max-examples", help="Generate for at most N eval examples (the loss uses all).")
    ] = None,
    do_sample: Annotated[Optional[bool], SAMPLE] = None,
    temperature: Annotated[Optional[float], TEMP] = None,
    top_p: Annotated[Optional[float], TOP_P] = None,
    lm_eval_tasks: Annotated[
        Optional[str],
        typer.Option(
            "--lm-eval-tasks",
            help="Also run lm-evaluation-harness tasks (comma-separated) on both models; needs the lm-eval extra.",
        ),
    ] = None,
    lm_eval_include: Annotated[
        Optional[Path], typer.Option("--lm-eval-include", help="A directory of your own lm-eval task YAML files.")
    ] = None,
    lm_eval_limit: Annotated[
        Optional[int], typer.Option("--lm-eval-limit", help="At most N documents per task.")
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(help="Report directory (default: TARGET/eval; with several runs, FIRST_RUN/eval-compare)."),
    ] = None,
    accept_changed_adapter: Annotated[bool, ACCEPT_CHANGED] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    show: Annotated[
        bool,
        typer.Option(
            "--show",
            help="Print the report an earlier `lorakit eval` wrote, without evaluating again: refused when its "
            "files changed or it measured other weights than TARGET holds now; gates given here are checked "
            "against it (exit 3).",
        ),
    ] = False,
) -> None:
    """Evaluate a tuned model and its base on the eval data: loss, perplexity, exact match, ROUGE-L, stop
    rate and more, side by side. Writes TARGET/eval/ (report.json, report.md, samples.jsonl, loss.png);
    exits 3 when a gate is missed. Several runs: one column per adapter, the base loaded once."""
    evaluation = dict(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_examples=max_examples,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
    )

    def work() -> None:
        from rich.console import Console

        from lorakit.evaluate import command
        from lorakit.evaluate import report as eval_report

        console = Console(stderr=True)
        if show:
            report = command.show(
                targets,
                adapter=adapter,
                evaluation={**evaluation, "compare": compare != "base" or None, "split": split != "eval" or None}
                | {"lm_eval_tasks": lm_eval_tasks},
                fail_under=fail_under,
                fail_over=fail_over,
                max_loss=max_loss,
                output=output,
                console=console,
                accept_changed_adapter=accept_changed_adapter,
            )
        else:
            report = command.evaluate(
                targets,
                adapter=adapter,
                compare_with=compare,
                split=split,
                fail_under=fail_under,
                fail_over=fail_over,
                max_loss=max_loss,
                settings=evaluation,
                lm_eval_tasks=lm_eval_tasks,
                lm_eval_include=lm_eval_include,
                lm_eval_limit=lm_eval_limit,
                accept_changed_adapter=accept_changed_adapter,
                output=output,
                console=console,
            )
        console.print(eval_report.table(report))
        if as_json:
            json_out(report)
        missed = eval_report.missed_gates(report)
        if missed:
            error(missed)
            raise typer.Exit(3)

    guarded(work)


@app.command()
def generate(
    targets: Annotated[
        list[Path],
        typer.Argument(
            help="A run directory or a merged model directory; or several run directories on one base.",
            show_default=False,
        ),
    ],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A user message (repeatable).")] = [],
    file: Annotated[
        Optional[Path],
        typer.Option("--file", help='JSONL of prompts: {"prompt": ...} or {"messages": [...]} per line.'),
    ] = None,
    base: Annotated[
        bool,
        typer.Option(
            "--base", help="Run the base model instead of the tuned one (with several runs: as well as each adapter)."
        ),
    ] = False,
    system: Annotated[Optional[str], typer.Option(help="A system message put before each prompt.")] = None,
    max_new_tokens: Annotated[Optional[int], MAX_NEW] = None,
    batch_size: Annotated[Optional[int], BATCH] = None,
    do_sample: Annotated[Optional[bool], SAMPLE] = None,
    temperature: Annotated[Optional[float], TEMP] = None,
    top_p: Annotated[Optional[float], TOP_P] = None,
    accept_changed_adapter: Annotated[bool, ACCEPT_CHANGED] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prompt on stdout.")] = False,
) -> None:
    """Generate replies with a tuned model (or its base), using the run's chat template and stop tokens.
    Several runs: each adapter's reply (and the base's with --base), the base loaded once."""

    def work() -> None:
        from lorakit.evaluate import command

        conversations = command.conversations(prompt, file, system)
        replies, settings = command.generate(
            targets,
            conversations,
            base=base,
            settings=dict(
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
            ),
            accept_changed_adapter=accept_changed_adapter,
        )
        if isinstance(replies, dict):
            _print_side_by_side(conversations, replies, settings.max_new_tokens, as_json)
        else:
            _print_replies(conversations, replies, settings.max_new_tokens, as_json)

    guarded(work)


def _said(out) -> dict:
    return {"reply": out.text, "stopped": out.stopped, "tokens": out.tokens}


def _print_replies(conversations: list, replies: list, max_new_tokens: int, as_json: bool) -> None:
    for conversation, out in zip(conversations, replies):
        if as_json:
            typer.echo(json.dumps({"messages": conversation, **_said(out)}, ensure_ascii=False))
        else:
            typer.echo(
                f"> {conversation[-1]['content']}\n{out.text}"
                + ("" if out.stopped else f"\n[did not stop within {max_new_tokens} tokens]")
                + "\n"
            )


def _print_side_by_side(conversations: list, replies: dict, max_new_tokens: int, as_json: bool) -> None:
    """Each prompt with every model's reply, named: text, or one JSON object per prompt."""
    for i, conversation in enumerate(conversations):
        if as_json:
            typer.echo(
                json.dumps(
                    {"messages": conversation, "replies": {name: _said(outs[i]) for name, outs in replies.items()}},
                    ensure_ascii=False,
                )
            )
            continue
        typer.echo(f"> {conversation[-1]['content']}")
        for name, outs in replies.items():
            typer.echo(
                f"[{name}] {outs[i].text}"
                + ("" if outs[i].stopped else f" [did not stop within {max_new_tokens} tokens]")
            )
        typer.echo("")


@app.command()
def chat(
    target: Annotated[Path, typer.Argument(help="A run directory or a merged model directory.", show_default=False)],
    base: Annotated[
        bool, typer.Option("--base", help="Start with the base model answering (/tuned switches).")
    ] = False,
    system: Annotated[Optional[str], typer.Option(help="A system message at the start of the conversation.")] = None,
    max_new_tokens: Annotated[Optional[int], MAX_NEW] = None,
    do_sample: Annotated[Optional[bool], SAMPLE] = None,
    temperature: Annotated[Optional[float], TEMP] = None,
    top_p: Annotated[Optional[float], TOP_P] = None,
    accept_changed_adapter: Annotated[bool, ACCEPT_CHANGED] = False,
) -> None:
    """Chat with a tuned model in the terminal, with the run's template and stop tokens, replies streamed.
    /tuned, /base and /compare choose who answers; /reset, /save FILE (a `messages` JSONL line), /quit."""

    def work() -> None:
        from lorakit.evaluate import command

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        command.chat(
            target,
            settings=dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p),
            system=system,
            start_with="base" if base else "tuned",
            read=input,
            write=write,
            accept_changed_adapter=accept_changed_adapter,
        )

    guarded(work)
