"""`lorakit merge RUN1 RUN2 ... --combination C`: several runs' LoRA adapters combined into one by peft's
`add_weighted_adapter`, written as one adapter (`--adapter-only`) or folded into the base by lorakit.merge.fold.

Owns: refusing runs and options that cannot be combined (before any weight is read); the combined
directory, laid out like a run (adapter, the first run's tokenizer, chat template, generation config,
recipe and manifest, a card and combine_report.json), so `lorakit merge`, `eval` and `generate` take it as
they take a run; checking that the written adapter loads with plain peft and changes the base. Does not
combine (lorakit.merge.weighted, with peft), merge into the base or verify a merge (lorakit.merge.fold).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import LorakitError, RunFailed
from lorakit.merge import fold as merge_mod
from lorakit.merge import weighted as combination_mod
from lorakit.model import base as model_mod
from lorakit.model import shards as ckpt_mod
from lorakit.rundir import group as runset
from lorakit.staging import remove_stale_staging, swap_into_place

COMBINATIONS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties")
USES_DENSITY = ("ties", "dare_linear", "dare_ties")
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")  # peft combines lora_A and lora_B separately
REPORT = "combine_report.json"
# adapter_config.json fields whose training add_weighted_adapter does not carry into the combined adapter
# (it combines lora_A/lora_B only; huggingface/peft#3761 for DoRA, lora_bias and KaSA)
NOT_COMBINED = {
    "use_dora": "DoRA magnitude vectors",
    "lora_bias": "LoRA biases",
    "kasa_config": "KaSA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
    "trainable_token_indices": "trainable tokens (model.new_special_tokens)",
    "modules_to_save": "whole trained modules (modules_to_save)",
    "target_parameters": "LoRA on parameters",
}


@dataclass
class Combination:
    """What one combination does, settled before any weight is read."""

    runs: list[runset.Run]
    weights: list[float]
    combination: str
    density: float | None
    seed: int
    base_dir: Path
    output: Path
    adapter_only: bool
    figures: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {
            "runs": [
                {"name": r.name, "path": str(r.path), "weight": w, "r": r.adapter["r"]}
                for r, w in zip(self.runs, self.weights)
            ],
            "combination": self.combination,
            "density": self.density,
            "seed": self.seed,
            "peft_call": "add_weighted_adapter",
            **self.figures,
        }


def plan(
    paths: list,
    *,
    combination: str | None,
    weights: str | None,
    density: float | None,
    seed: int | None,
    output: str | None,
    adapter_only: bool,
    dtype: str | None = None,
    base: str | None = None,
    merge_into: str | None = None,
    overwrite: bool = False,
    accept_changed_adapter: bool = False,
) -> Combination:
    """Everything refused before a weight is read: the options, the runs, the output; what merge would refuse."""
    combination = combination or "cat"
    values = _check_options(combination, weights, density, len(paths))
    if not output:
        raise LorakitError(
            "several runs: give --output (where the combined " + ("adapter" if adapter_only else "model") + " goes)"
        )
    runs = runset.read(paths, accept_changed_adapter)
    runset.check_same_base(runs)
    for run in runs:
        _check_adapter(run, combination)
    _check_ranks(runs, combination)
    out = Path(output).expanduser().resolve()
    if adapter_only:
        if merge_into or dtype:
            raise LorakitError("--merge-into and --dtype are for merged models; --adapter-only writes an adapter")
        merge_mod.check_output(out, overwrite, REPORT, "combined adapter")
        first = runs[0].four_bit
        odd = next((r for r in runs if r.four_bit != first), None)
        if odd:
            raise LorakitError(
                f"run {odd.name} trained on a {_kind(odd)} base, run {runs[0].name} on a "
                f"{_kind(runs[0])} one: one combined adapter is served on one base; combine runs of "
                "one kind, or merge them (--merge-into original) instead"
            )
        base_dir = ckpt_mod.locate(base or model_mod.source(runs[0].recipe.model), runs[0].recipe.model.revision)
    else:  # everything merge would refuse, refused now (the first run stands in for the combined one)
        first = merge_mod.plan(
            runs[0].path, output=str(out), dtype=dtype, base=base, merge_into=merge_into, overwrite=overwrite
        )
        _check_merge_into(runs, first.merge_into, merge_into)
        base_dir = first.base_dir
    return Combination(
        runs,
        values,
        combination,
        density,
        seed if seed is not None else runs[0].recipe.train.seed,
        base_dir,
        out,
        adapter_only,
    )


def _check_options(combination: str, weights: str | None, density: float | None, count: int) -> list[float]:
    """The combination's options, refused by name; the weights, one per run."""
    if combination not in COMBINATIONS:
        raise LorakitError(f"--combination: expected one of {', '.join(COMBINATIONS)}, got {combination!r}")
    values = _weights(weights, count)
    if combination in USES_DENSITY and density is None:
        raise LorakitError(
            f"--combination {combination} needs --density (the share of each update kept, in (0, 1], e.g. 0.5)"
        )
    if density is not None and combination not in USES_DENSITY:
        raise LorakitError(f"--density is for {', '.join(USES_DENSITY)}; --combination {combination} does not prune")
    if density is not None and not 0 < density <= 1:
        raise LorakitError(f"--density: expected a value in (0, 1], got {density}")
    return values


def _weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [round(1 / count, 6)] * count
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise LorakitError(f"--weights {text}: expected numbers separated by commas, e.g. 0.7,0.3") from None
    if len(values) != count:
        raise LorakitError(f"--weights has {len(values)} values for {count} runs; give one weight per run, in order")
    if not all(math.isfinite(v) for v in values) or not any(values):
        raise LorakitError(f"--weights {text}: expected finite numbers, not all zero")
    return values


def _kind(run: runset.Run) -> str:
    return "4-bit (QLoRA)" if run.four_bit else "full-precision"


def _check_adapter(run: runset.Run, combination: str) -> None:
    config = run.adapter
    if config.get("peft_type") != "LORA":
        raise LorakitError(
            f"run {run.name} ({run.path}) holds a {config.get('peft_type')} adapter (adapter_config.json "
            "peft_type); combining is for LoRA adapters"
        )
    for key, what in NOT_COMBINED.items():
        if config.get(key):
            raise LorakitError(
                f"run {run.name} ({run.path}) trains {what} ({key} in adapter_config.json), which peft's "
                "add_weighted_adapter does not combine: the combined adapter would silently lose it. "
                "Combining is for plain LoRA adapters"
            )
    if config.get("bias", "none") != "none":
        raise LorakitError(
            f"run {run.name} ({run.path}) trains the base's biases (lora.bias: {config['bias']}), which "
            "the combined adapter would lose; combining is for plain LoRA adapters"
        )


def _check_ranks(runs: list[runset.Run], combination: str) -> None:
    if combination not in SAME_RANK:
        return
    ranks = [{r.adapter["r"], *(r.adapter.get("rank_pattern") or {}).values()} for r in runs]
    for run, mine in zip(runs, ranks):
        if len(mine) > 1 or mine != ranks[0]:
            raise LorakitError(
                f"--combination {combination} needs every adapter at one rank (peft combines lora_A and "
                f"lora_B separately): run {run.name} has r={sorted(mine)}, run {runs[0].name} "
                f"r={sorted(ranks[0])}; use --combination cat (exact) or svd"
            )


def _check_merge_into(runs: list[runset.Run], resolved: str, asked: str | None) -> None:
    """Every run's update goes into the same weights: nf4 needs QLoRA runs quantized alike; a LoftQ adapter
    corrects the NF4 weights, so it never goes into the published ones."""
    loftq = next((r for r in runs if r.recipe.lora.init_lora_weights == "loftq"), None)
    if loftq is not None and resolved == "original":
        raise LorakitError(
            f"run {loftq.name} is a LoftQ adapter: it starts as the correction of the 4-bit "
            "quantization error, so it only fits the NF4 weights; merge into nf4 (every run a QLoRA run "
            "quantized alike)"
        )
    for run in runs[1:]:
        default = "nf4" if run.four_bit else "original"
        if (asked or default) != resolved:
            raise LorakitError(
                f"run {run.name} trained on a {_kind(run)} base and run {runs[0].name} on a "
                f"{_kind(runs[0])} one, so they merge into different weights (nf4 / original); "
                "pass --merge-into original to add every update to the published weights"
            )
        if resolved == "nf4":
            for key in ("quantization", "precision"):
                if run.manifest.get(key) != runs[0].manifest.get(key):
                    raise LorakitError(
                        f"run {run.name} trained on a base quantized differently from run "
                        f"{runs[0].name} (manifest {key}); their NF4 weights differ, so pass "
                        "--merge-into original"
                    )


def run(
    c: Combination,
    *,
    check: bool = True,
    dtype: str | None = None,
    base: str | None = None,
    merge_into: str | None = None,
    overwrite: bool = False,
    console=None,
) -> dict:
    """Combine into a staging directory; keep it as the adapter (--adapter-only) or merge it through
    lorakit.merge.fold's single-run path. Nothing is left half-written either way."""
    from rich.console import Console

    console = console or Console(stderr=True)
    names = ", ".join(f"{r.name} ({w:g})" for r, w in zip(c.runs, c.weights))
    console.print(f"combining {names} with {c.combination}", highlight=False)
    suffix = "partial" if c.adapter_only else "combined"
    staging = c.output.parent / f".{c.output.name}.{suffix}-{os.getpid()}"
    remove_stale_staging(c.output)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        build(c, staging)
        if not c.adapter_only:
            p = merge_mod.plan(
                staging, output=str(c.output), dtype=dtype, base=base, merge_into=merge_into, overwrite=overwrite
            )
            p.origin, p.combination = c.runs[0].path, c.record()
            p.notes += _figure_lines(p.combination)
            return merge_mod.run(p, check=check, console=console)
        report = c.record()
        if check:
            report["verification"] = verify_adapter(c, staging)
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        _write_card(c, staging, report)
        if check and not report["verification"]["passed"]:
            raise RunFailed(
                f"the combined adapter changes nothing ({report['verification']['reason']}); nothing was "
                f"written to {c.output}"
            )
        swap_into_place(staging, c.output)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build(c: Combination, folder: Path) -> None:
    """The combined adapter and the first run's companions, written into `folder` like a run."""
    from lorakit.rundir.directory import MANIFEST, RECIPE, adapter_hashes

    state, config, c.figures = combination_mod.combine(c.runs, c.weights, c.combination, c.density, c.seed, c.base_dir)
    wrong = [f for f in c.figures["checks"] if not f["passed"]]
    if wrong:
        raise RunFailed(
            "the combined update is not what peft's combination should give: "
            + "; ".join(f"{f['what']}: {f['max_rel_diff']:.3g} > {combination_mod.RTOL}" for f in wrong)
        )
    from safetensors.torch import save_file

    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    first = c.runs[0].path
    for name in (*merge_mod.TOKENIZER_FILES, RECIPE):
        if (first / name).is_file():
            shutil.copy2(first / name, folder / name)
    manifest = {**c.runs[0].manifest, "combination": c.record()}
    manifest.pop("results", None)  # the first run's training figures are not this adapter's
    manifest["adapter_sha256"] = adapter_hashes(folder)  # this adapter's, checked like a run's
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify_adapter(c: Combination, folder: Path) -> dict:
    """The written adapter loaded with plain peft onto the real base (as training loaded it) must change the
    base's logits on the first run's examples."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lorakit.merge import verify
    from lorakit.model import setup as setup_mod

    inputs, source = verify.inputs_for(c.runs[0].recipe, AutoTokenizer.from_pretrained(folder))
    precision = model_mod.Precision("float32", "cuda" if torch.cuda.is_available() else "cpu")
    cfg = c.runs[0].recipe.model.model_copy(update={"name_or_path": str(c.base_dir), "revision": None})
    loading = setup_mod.for_loading(cfg, precision=precision, four_bit=c.runs[0].four_bit)
    model = PeftModel.from_pretrained(model_mod.load_base(cfg, loading), folder)
    combined = verify.logits(model, inputs)
    with model.disable_adapter():
        bare = verify.logits(model, inputs)
    to_base = verify.compare(bare, combined)
    changed = to_base["max_abs_diff"] > 10 * verify.RTOL["float32"] * to_base["max_abs_logit"]
    return {
        "inputs": f"{len(inputs)} of {source}",
        "reference": "the base, adapter switched off",
        "combined_vs_base": to_base,
        "passed": changed,
        "reason": "" if changed else "its logits equal the base's",
    }


def _write_card(c: Combination, folder: Path, report: dict) -> None:
    base = c.runs[0].recipe.model.name_or_path
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [lorakit, lora, combined]",
        "---",
        f"# {c.output.name} (combined adapter)",
        "",
        f"The LoRA adapters of {len(c.runs)} lorakit runs combined with peft's `add_weighted_adapter` "
        f"(`{c.combination}`), for `{base}`. Loads with `PeftModel.from_pretrained(base, this folder)`; the "
        f"tokenizer, chat template and generation config are those of run `{c.runs[0].name}`.",
        "",
        "| run | weight | rank | path |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['weight']:g} | {r['r']} | `{r['path']}` |" for r in report["runs"]]
    lines += [
        "",
        f"- combination: **{c.combination}**, rank {report['rank']}"
        + (f", density {c.density:g}" if c.density is not None else "")
        + f", seed {c.seed}",
    ]
    lines += [f"- {line}" for line in _figure_lines(report)]
    if "verification" in report:
        v = report["verification"]["combined_vs_base"]
        lines.append(
            f"- against the bare base on {report['verification']['inputs']}: max |logit difference| "
            f"{v['max_abs_diff']:.3g}, top-1 agreement {v['top1_agreement']:.2%}"
        )
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _figure_lines(record: dict) -> list[str]:
    lines = [
        f"combined update vs the weighted sum of the runs' updates: max relative difference "
        f"{record['vs_weighted_sum']['max_rel_diff']:.3g} over {record['layers']} layers"
    ]
    return lines + [
        f"{f['what']}: {f['max_rel_diff']:.3g} ({'passed' if f['passed'] else 'FAILED'})" for f in record["checks"]
    ]


def report_table(record: dict):
    from rich.table import Table

    table = Table(title=f"{record['combination']} of {', '.join(r['name'] for r in record['runs'])}")
    for column in ("combined update vs", "max relative difference", "check"):
        table.add_column(column)
    table.add_row(
        "weighted sum of the runs' updates",
        f"{record['vs_weighted_sum']['max_rel_diff']:.3g}",
        "must match" if record["combination"] == "cat" else "information",
    )
    if "vs_peft_linear_rule" in record:
        table.add_row(
            "B_sum @ A_sum (peft's linear rule)", f"{record['vs_peft_linear_rule']['max_rel_diff']:.3g}", "must match"
        )
    check = record.get("verification")
    if check:
        table.caption = (
            f"reloaded with plain peft, on {check['inputs']}: max |logit difference| to the bare base "
            f"{check['combined_vs_base']['max_abs_diff']:.3g} (must differ): "
            + ("passed" if check["passed"] else "FAILED")
        )
    return table
