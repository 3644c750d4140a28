"""The files and tables of an evaluation report: report.json, report.md, samples.jsonl, loss.png, and the
rich table `lorakit eval` prints; one column per evaluated model (tuned or each adapter, and base).

Owns: writing a report directory whole (staged, then swapped in for the previous one; report.json last,
with the sha256 of the other files), reading one back verified, and rendering the figures. Does not compute
them (lorakit.evaluate.compare).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.digest import folder_sha256
from lorakit.errors import LorakitError
from lorakit.evaluate import metrics as metrics_mod
from lorakit.rundir.directory import METRICS, check_files, read_record
from lorakit.staging import remove_staging, staging_for, staging_path, swap_into_place


def write(report: dict, prompts, samples: dict, run_dir: Path | None, out: Path) -> None:
    """All files into a fresh directory, then swapped in for the previous report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out)
    try:
        staging_for(out)
        with open(staging / "samples.jsonl", "w") as handle:
            for i, p in enumerate(prompts):
                row = {"where": p.where, "prompt": p.prompt, "reference": p.reference}
                for name, outs in samples.items():
                    row[name], row[f"{name}_stopped"] = outs[i].text, outs[i].stopped
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        (staging / "report.md").write_text(markdown(report, prompts, samples))
        if run_dir is not None and (run_dir / METRICS).is_file():
            loss_curve(run_dir / METRICS, staging / "loss.png")
        report["files_sha256"] = folder_sha256(staging)
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        swap_into_place(staging, out)
    finally:
        remove_staging(staging)


REPORT = "report.json"


def read(out: Path, accept_changed: bool = False) -> tuple[dict, str | None]:
    """A report lorakit wrote, and the notice to print when its files changed and `accept_changed` says to
    use it anyway; an error naming the file when it is missing, not JSON, or no longer as written."""
    if not (out / REPORT).is_file():
        raise LorakitError(f"{out}: no {REPORT} there; run `lorakit eval` first")
    report = read_record(out / REPORT)
    if not isinstance(report.get("metrics"), dict) or not report["metrics"]:
        raise LorakitError(f"{out / REPORT}: holds no metrics, so it is not a report lorakit wrote")
    notice = check_files(out, report.get("files_sha256") or {}, REPORT, "the report lorakit wrote", accept_changed)
    return report, notice


def markdown(report: dict, prompts, samples: dict, examples: int = 3) -> str:
    names = list(report["metrics"])
    title = f"adapters {', '.join(n for n in names if n != 'base')}" if report["kind"] == "runs" else report["target"]
    lines = [
        f"# Evaluation of {title}",
        "",
        f"{report['data']['loss_examples']} {report['data']['split']} examples for the loss, "
        f"{report['data']['generation_prompts']} prompts for generation "
        f"({'greedy' if not report['settings']['do_sample'] else 'sampling'}, "
        f"max_new_tokens {report['settings']['max_new_tokens']}).",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for metric in metrics_mod.ALL_METRICS:
        if metric in report["metrics"][names[0]]:
            lines.append(f"| {metric} | " + " | ".join(_figure(report, n, metric) for n in names) + " |")
    for label, values in _harness_rows(report, names):
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    if report.get("rewards_against"):
        lines.append(
            "\nRewards against: " + ", ".join(f"{n} vs {r}" for n, r in report["rewards_against"].items()) + "."
        )
    for gate in report["gates"]:
        got = "not computed" if gate["value"] is None else f"{gate['value']:.4g}"
        lines.append(
            f"\nGate {gate['metric']} {gate['op']} {gate['threshold']}"
            + (f" ({gate['model']})" if "model" in gate else "")
            + ": "
            f"{'passed' if gate['passed'] else 'FAILED'} ({got})"
        )
    lines += ["", "## Examples", ""]
    for i, p in enumerate(prompts[:examples]):
        lines += [f"**{p.where}**", "", "```", p.prompt.strip(), "```", f"- reference: {p.reference!r}"]
        lines += [f"- {n}: {samples[n][i].text!r}{'' if samples[n][i].stopped else ' (did not stop)'}" for n in names]
        lines.append("")
    return "\n".join(lines) + "\n"


def loss_curve(metrics_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "step" in r]
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for points, label in ((train, "train loss"), (evals, "eval loss")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "eval loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def table(report: dict):
    from rich.table import Table

    names = list(report["metrics"])
    out = Table(
        title=f"{report['data']['split']}: {report['data']['loss_examples']} examples (loss), "
        f"{report['data']['generation_prompts']} prompts (generation)"
    )
    out.add_column("metric")
    for name in names:
        out.add_column(name, justify="right")
    for metric in metrics_mod.ALL_METRICS:
        if metric in report["metrics"][names[0]]:
            out.add_row(metric, *(_figure(report, n, metric) for n in names))
    for label, values in _harness_rows(report, names):
        out.add_row(label, *values)
    return out


def _figure(report: dict, name: str, metric: str) -> str:
    """A model's figure, or a dash where the metric does not apply to it (the base has no reward against itself)."""
    value = report["metrics"][name].get(metric)
    return "-" if value is None else f"{value:.4g}"


def _harness_rows(report: dict, names: list[str]):
    first = report["metrics"][names[0]].get("lm_eval", {})
    for task, figures in first.items():
        for metric in figures:
            yield f"lm-eval {task} {metric}", [f"{report['metrics'][n]['lm_eval'][task][metric]:.4g}" for n in names]


def missed_gates(report: dict) -> str | None:
    """The gates a report missed, as one line for the command's error (None when every gate passed)."""
    missed = [g for g in report["gates"] if not g["passed"]]
    if not missed:
        return None
    return "gate missed: " + "; ".join(
        (f"{g['model']}: " if "model" in g else "")
        + f"{g['metric']} = {'not computed' if g['value'] is None else format(g['value'], '.4g')}, needs "
        f"{g['op']} {g['threshold']}"
        for g in missed
    )
