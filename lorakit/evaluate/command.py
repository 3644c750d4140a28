"""`lorakit eval`, `generate` and `chat` as one call each: the target(s) resolved, the recipe's `eval:`
settings with the command line's on top, the option rules, then `compare` (eval), `generation` (generate)
or `chat`. The commands print what these return."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError


def _target(targets: list[Path], adapter: Path | None = None, accept_changed_adapter: bool = False):
    from lorakit.evaluate import compare

    if len(targets) > 1 and adapter is not None:
        raise LorakitError("--adapter goes with one recipe; several targets are run directories")
    return (
        compare.resolve_several(targets, accept_changed_adapter)
        if len(targets) > 1
        else compare.resolve(targets[0], str(adapter) if adapter else None, accept_changed_adapter)
    )


def _gates(fail_under: list[str], fail_over: list[str], max_loss: float | None) -> list:
    from lorakit.evaluate import metrics

    try:
        return metrics.parse_gates(fail_under, fail_over + ([f"loss={max_loss}"] if max_loss is not None else []))
    except ValueError as exc:
        raise LorakitError(str(exc)) from None


def show(
    targets: list[Path],
    *,
    adapter: Path | None,
    evaluation: dict,
    fail_under: list[str],
    fail_over: list[str],
    max_loss: float | None,
    output: Path | None,
    console,
    accept_changed_adapter: bool = False,
) -> dict:
    """The report an earlier `lorakit eval` wrote for these targets, verified: its files as written, and
    measured on the weights the targets hold now. Gates given here replace the report's own; `evaluation`
    (options of a new evaluation, None when not given) must be empty."""
    from lorakit.evaluate import compare
    from lorakit.evaluate import report as eval_report

    given = next((name for name, value in evaluation.items() if value is not None), None)
    if given:
        raise LorakitError(
            f"--show prints the report as it was measured; --{given.replace('_', '-')} would need a new evaluation"
        )
    gates = _gates(fail_under, fail_over, max_loss)
    target = _target(targets, adapter, accept_changed_adapter)
    out = output or compare.default_output(target)
    report, notice = eval_report.read(out, accept_changed_adapter)
    if notice:
        console.print(notice, highlight=False)
    compare.check_measured(report, target, out)
    if gates:
        report["gates"] = compare.check_gates(target, gates, report["metrics"])
        report["passed"] = all(g["passed"] for g in report["gates"])
    return report


def evaluate(
    targets: list[Path],
    *,
    adapter: Path | None,
    compare_with: str,
    split: str,
    fail_under: list[str],
    fail_over: list[str],
    max_loss: float | None,
    settings: dict,
    lm_eval_tasks: str | None,
    lm_eval_include: Path | None,
    lm_eval_limit: int | None,
    output: Path | None,
    console,
    accept_changed_adapter: bool = False,
) -> dict:
    """The eval report (written under `output`); `settings` are eval: keys given on the command line."""
    if compare_with not in ("base", "none"):
        raise LorakitError(f"--compare: expected base or none, got {compare_with!r}")
    if split not in ("eval", "train"):
        raise LorakitError(f"--split: expected eval or train, got {split!r}")
    gates = _gates(fail_under, fail_over, max_loss)
    harness = None
    if lm_eval_tasks:
        from lorakit.evaluate.harness import check_available

        check_available()
        harness = {
            "tasks": [t.strip() for t in lm_eval_tasks.split(",") if t.strip()],
            "include": lm_eval_include,
            "limit": lm_eval_limit,
        }
    target = _target(targets, adapter, accept_changed_adapter)
    chosen = target.recipe.eval.updated(**settings)
    from lorakit.console import quiet_libraries

    quiet_libraries()
    from lorakit.evaluate import compare

    return compare.run(
        target,
        settings=chosen,
        compare_base=compare_with == "base",
        split=split,
        gates=gates,
        output=output,
        console=console,
        lm_eval=harness,
    )


def conversations(prompts: list[str], file: Path | None, system: str | None) -> list[list[dict]]:
    """`generate`'s prompts: each --prompt, then each line of --file, with the system message first."""
    from lorakit.data.rows import read_prompts

    out = [[{"role": "user", "content": p}] for p in prompts] + (read_prompts(file) if file is not None else [])
    if not out:
        raise LorakitError("nothing to generate: give --prompt or --file")
    return [[{"role": "system", "content": system}] + c for c in out] if system else out


def generate(
    targets: list[Path],
    conversations: list[list[dict]],
    *,
    base: bool,
    settings: dict,
    accept_changed_adapter: bool = False,
):
    """Replies: {model name: [Generated, ...]} with several runs (each adapter, and the base with `base`),
    else [Generated, ...] of the tuned model (or the base); and the settings used."""
    from lorakit.evaluate import compare

    target = _target(targets, accept_changed_adapter=accept_changed_adapter)
    chosen = target.recipe.eval.updated(**settings)
    from lorakit.console import quiet_libraries

    quiet_libraries()
    if len(targets) > 1:
        names = target.tuned() + (["base"] if base else [])
        return compare.replies(target, conversations, settings=chosen, names=names), chosen
    return compare.reply(target, conversations, settings=chosen, base=base), chosen


def chat(
    target: Path,
    *,
    settings: dict,
    system: str | None,
    start_with: str,
    read,
    write,
    accept_changed_adapter: bool = False,
) -> None:
    from lorakit.evaluate import compare

    resolved = compare.resolve(target, accept_changed_adapter=accept_changed_adapter)
    chosen = resolved.recipe.eval.updated(**settings)
    from lorakit.console import quiet_libraries

    quiet_libraries()
    from lorakit.evaluate import chat as chat_loop

    chat_loop.run(resolved, chosen, read=read, write=write, system=system, start_with=start_with)
