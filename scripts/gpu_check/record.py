"""The GPU check's results in the docs. `python -m scripts.gpu_check record DIR` keeps a GPU run's stage results
under benchmarks/gpu-check/ and rewrites, from them, the section between the gpu-check markers of
benchmarks/README.md; docs/plan.md's measured section is rendered from the same files by
scripts/gen_plan_docs.py (`plan_section`), so that page stays generated and checked by the tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from scripts.gpu_check.runner import ROOT, summary_table

STORE = ROOT / "benchmarks" / "gpu-check"
README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
HOW = (
    "On the CPU machine `bash scripts/gpu_wheels.sh` (the wheels the GPU image lacks, size-checked), then on the "
    "GPU machine, in one call, `make gpu-check` (or `bash scripts/gpu_check.sh`: results in `$OUT`); then "
    "`python -m scripts.gpu_check record RESULTS_DIR` here."
)
NOT_YET = "No GPU run is recorded yet: no GPU machine has been lent to an issue since the check exists. " + HOW


def load(folder: Path) -> dict[str, dict]:
    """Stage key -> result, from the a-*.json ... f-*.json files of a check's output folder."""
    results = {}
    for path in sorted(Path(folder).glob("[a-f]-*.json")):
        result = json.loads(path.read_text())
        results[result["stage"]] = result
    return results


def _run_line(results: dict) -> str:
    env = results.get("a", {}).get("figures", {})
    date = max(r.get("finished_at", "") for r in results.values())[:10]
    return (
        f"Run {date} on {env.get('device', 'no GPU')} ({env.get('nvidia_smi', 'no nvidia-smi')}), torch "
        f"{env.get('torch', '?')} with CUDA {env.get('torch_cuda')}, bitsandbytes "
        f"{(env.get('libraries') or {}).get('bitsandbytes', {}) and env['libraries']['bitsandbytes']['version']}"
        f", flash-attn {'yes' if env.get('flash_attn') else 'no'}, Liger {'yes' if env.get('liger') else 'no'}."
    )


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return (
        f"{value:,.{digits}g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
    )


def benchmarks_section(results: dict) -> str:
    if not results:
        return NOT_YET
    lines = [_run_line(results), "", summary_table(list(results.values())).strip(), ""]
    speed = results.get("d", {}).get("figures", {})
    if speed.get("lorakit") and speed.get("baseline"):
        ours, theirs, ratios = speed["lorakit"], speed["baseline"], speed["ratios"]
        s = speed["settings"]
        lines += [
            f"Speed (stage d, `benchmarks/gpu_train.py --preset {speed['preset']}`): {speed['shape_note']}, "
            f"QLoRA r=16 on all linear layers, micro-batch {s['batch']} x {s['seq']} tokens, {s['steps']} timed "
            f"steps after {s['warmup']}.",
            "",
            "| | lorakit (defaults) | TRL baseline | lorakit / baseline |",
            "|---|---|---|---|",
            f"| tokens/s | {_fmt(ours['tokens_per_s'])} | {_fmt(theirs['tokens_per_s'])} | "
            f"{ratios['tokens_per_s']:.2f} |",
            f"| MFU | {_fmt(ours.get('mfu'), 3)} | {_fmt(theirs.get('mfu'), 3)} | |",
            f"| peak allocated GPU memory (GiB) | {_fmt(ours['peak_gib'])} | {_fmt(theirs['peak_gib'])} | "
            f"{ratios['peak_memory']:.2f} |",
            f"| mean loss (timed steps) | {_fmt(ours['mean_loss'])} | {_fmt(theirs['mean_loss'])} | "
            f"{ratios['mean_loss']:.3f} |",
            f"| gradient norm (min-max) | {_fmt(ours['grad_norm_min'], 3)}-{_fmt(ours['grad_norm_max'], 3)} | "
            f"{_fmt(theirs['grad_norm_min'], 3)}-{_fmt(theirs['grad_norm_max'], 3)} | |",
            f"| longest sequence at batch 1 | {_longest(ours)} | {_longest(theirs)} | |",
            "",
        ]
    qlora = results.get("c", {}).get("figures", {})
    if qlora.get("train"):
        train, resume = qlora["train"], qlora.get("resume", {})
        memory = train.get("memory") or {}
        lines += [
            f"QLoRA (stage c): {train['model'].rsplit('/', 1)[-1]}, {train['parameters']:,} parameters, "
            f"{train['precision']}, {train['optimizer']}, gradient checkpointing; loss "
            f"{train['first_losses_mean']:.3f} -> {train['last_losses_mean']:.3f} over {train['steps']} steps, "
            f"{_fmt(train['tokens_per_s'])} tokens/s, peak {memory.get('peak_allocated_gib', '-')} GiB "
            f"allocated; SIGTERM at step {resume.get('stopped_at', '-')} then --resume: largest loss "
            f"difference {_fmt(resume.get('max_abs_diff'))} (bit-exact: {resume.get('bit_exact', '-')}); "
            f"merge vs base + adapter: nf4 {_fmt(qlora.get('merge_nf4', {}).get('max_abs_diff'))}, original "
            f"{_fmt(qlora.get('merge_original', {}).get('max_abs_diff'))} (max logit difference).",
            "",
        ]
    distributed = results.get("f", {}).get("figures", {})
    for label in ("ddp-gloo", "fsdp-qlora"):
        if label in distributed:
            row = distributed[label]
            lines.append(
                f"- {label} (stage f): {row['engine']} x {row['world_size']}, loss {_fmt(row['first_loss'])}"
                f" -> {_fmt(row['last_loss'])}, {_fmt(row['tokens_per_s'])} tokens/s."
            )
    return "\n".join(lines).rstrip() + "\n"


def _longest(side: dict) -> str:
    found = side.get("longest_search")
    if not found:
        return "-"
    bound = f" (fails at {found['fails']:,})" if found.get("fails") else " (no probe failed: a lower bound)"
    return f"{found['fits']:,}{bound}, {len(found['probes'])} probes"


def plan_section(results: dict) -> str:
    """docs/plan.md's section: the plan against the peak memory measured on a GPU, per setting."""
    rows = [r for r in results.get("e", {}).get("figures", {}).get("rows", []) if "total_error" in r]
    head = "## Measured on a GPU (`make gpu-check`, stage e)\n\n"
    if not rows:
        return head + NOT_YET + "\n"
    lines = [
        head + _run_line(results) + " Measured total = the allocator's peak pool + what the device held "
        "outside it (CUDA context, library workspaces); error = plan / measured - 1.\n",
        "| run | micro-batch x tokens | plan tensors (GiB) | peak allocated (GiB) | error | plan total (GiB) | "
        "measured total (GiB) | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['micro_batch']} x {r['sequence']:,} | {r['plan_tensors_gib']:.2f} | "
            f"{r['measured_allocated_gib']:.2f} | {r['tensors_error']:+.0%} | {r['plan_total_gib']:.2f} | "
            f"{r['measured_total_gib']:.2f} | {r['total_error']:+.0%} |"
        )
    return "\n".join(lines) + "\n"


def replace_section(path: Path, body: str) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: the {BEGIN} ... {END} markers are missing")
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{BEGIN}\n{body.strip()}\n{END}{after}")


def record(source: Path, *, store: Path = STORE, readme: Path = README, allow_reduced: bool = False) -> dict:
    results = load(source)
    if not results:
        raise SystemExit(f"{source}: no stage results (a-environment.json ... f-distributed.json)")
    if any(r["reduced"] for r in results.values()) and not allow_reduced:
        raise SystemExit(f"{source}: a reduced rehearsal (no CUDA); only GPU runs are recorded")
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    for key, result in results.items():
        (store / f"{key}-{result['name']}.json").write_text(json.dumps(result, indent=1) + "\n")
    replace_section(readme, benchmarks_section(results))
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_check record", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the check's output folder (the device tool's files)")
    args = parser.parse_args(argv)
    record(args.results)
    from scripts import gen_plan_docs

    gen_plan_docs.DOC.write_text(gen_plan_docs.render())
    print(f"recorded {args.results} into {STORE.relative_to(ROOT)}, benchmarks/README.md and docs/plan.md")
    return 0
