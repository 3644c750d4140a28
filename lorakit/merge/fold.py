"""`lorakit merge`: a run's adapter folded into its base, written as a standard checkpoint, verified.

Streams the base shard by shard: read a shard, fold in the LoRA updates of the weights it holds, write
it. Memory is one shard plus the adapter, never the whole model. The LoRA arithmetic (scaling, rsLoRA,
DoRA, rank and alpha patterns) is peft's own: the adapter is loaded by peft onto a weightless (meta)
copy of the model, and each layer's `merge()` runs as soon as its real base weight is read.

QLoRA runs choose what the update is added to (`--merge-into`): `nf4` (default) the base weights as
training saw them, i.e. every 4-bit layer's weight quantized to NF4 and back with the run's settings, so
the merged model computes what the adapter was trained and evaluated on; or `original`, the published
full-precision weights, which keeps the base free of quantization error but differs from what training
saw by that error.

Everything is written to a staging directory; only a merge that passes verification is renamed into
place. Verification compares merged logits with base + adapter (and with the base alone: the merge must
change something) on the run's own examples.
"""

from __future__ import annotations

import ctypes
import gc
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lorakit.digest import folder_sha256
from lorakit.errors import LorakitError, ModelError, RunFailed
from lorakit.merge import skeleton as adapter_mod
from lorakit.merge import verify
from lorakit.model import base as model_mod
from lorakit.model import peft_methods as methods
from lorakit.model import setup as setup_mod
from lorakit.model import shards as ckpt_mod
from lorakit.recipe.schema import Recipe
from lorakit.rundir.directory import (
    MANIFEST,
    RECIPE,
    check_adapter,
    read_record,
)
from lorakit.rundir.lock import hold_for_reading
from lorakit.staging import remove_staging, staging_for, staging_path, swap_into_place

REPORT = "merge_report.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "generation_config.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeJob:
    """What one merge does, settled before any weight is read."""

    run_dir: Path
    recipe: Recipe
    manifest: dict
    base: str
    base_dir: Path
    output: Path
    dtype: str
    merge_into: str
    quantization: dict | None = None
    vocab_size: int | None = None  # set when training added tokens
    notes: list[str] = field(default_factory=list)
    origin: Path | None = None  # a combination (lorakit.merge.combine): the first run; run_dir is then a staging copy
    combination: dict | None = None  # what was combined, and how (lorakit.merge.combine's record)


def plan(
    run_dir: str | Path,
    *,
    output: str | None = None,
    dtype: str | None = None,
    base: str | None = None,
    merge_into: str | None = None,
    overwrite: bool = False,
    accept_changed_adapter: bool = False,
) -> MergeJob:
    """Check everything that can be refused cheaply: the run, its adapter, the output directory, the options."""
    from lorakit.recipe.loading import load_recipe

    run_dir = Path(run_dir).expanduser().resolve()
    hold_for_reading(run_dir)
    if not (run_dir / RECIPE).is_file() or not (run_dir / "adapter_config.json").is_file():
        raise LorakitError(f"{run_dir} is not a lorakit run (no {RECIPE} or adapter_config.json)")
    if not (run_dir / MANIFEST).is_file():
        raise LorakitError(f"{run_dir} is an incomplete run (no {MANIFEST}: training did not finish)")
    reason = methods.NOT_MERGEABLE.get(methods.peft_type(run_dir))
    if reason:
        raise LorakitError(f"{run_dir}: {reason}")
    recipe = load_recipe(run_dir / RECIPE)
    manifest = read_record(run_dir / MANIFEST)
    notice = check_adapter(run_dir, manifest, accept_changed_adapter)
    if notice:
        print(notice, file=sys.stderr)
    four_bit = bool(manifest.get("load_in_4bit"))  # as the run was trained (lorakit.model.setup decided it)
    merge_into = merge_into or ("nf4" if four_bit else "original")
    if merge_into == "nf4" and not four_bit:
        raise LorakitError("--merge-into nf4 is for QLoRA runs; this run trained on a full-precision base")
    if merge_into == "original" and four_bit and recipe.lora.init_lora_weights == "loftq":
        raise LorakitError(
            "--merge-into original: this LoftQ adapter starts as the correction of the 4-bit "
            "quantization error, so adding it to the published weights would count that correction "
            "twice; merge into nf4 (the default)"
        )
    if merge_into == "nf4" and not manifest.get("quantization"):
        raise LorakitError(
            f"{run_dir}/{MANIFEST} does not record the 4-bit settings (a run from an older "
            "lorakit); use --merge-into original"
        )
    out = Path(output).expanduser().resolve() if output else run_dir / "merged"
    check_output(out, overwrite)
    base = base or model_mod.source(recipe.model)  # a GGUF base: the checkpoint converted from it
    base_dir = ckpt_mod.locate(base, recipe.model.revision)
    if not (base_dir / "config.json").is_file():
        raise ModelError(f"--base {base}: no config.json in {base_dir}")
    config = json.loads((base_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelError(f"{base} is a quantized checkpoint; merge needs the full-precision base (--base)")
    dtype = dtype or str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if dtype not in DTYPES:
        raise LorakitError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return MergeJob(
        run_dir,
        recipe,
        manifest,
        base,
        base_dir,
        out,
        dtype,
        merge_into,
        quantization=manifest.get("quantization") if merge_into == "nf4" else None,
    )


def check_output(out: Path, overwrite: bool, report: str = REPORT, what: str = "merge") -> None:
    """An output directory is replaced only with --overwrite, and only when lorakit wrote it (its `report`)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise LorakitError(f"{out} exists; pass --overwrite to replace it, or choose --output")
        if not (out / report).is_file():
            raise LorakitError(
                f"{out} is not a lorakit {what} (no {report}); refusing to delete it even with --overwrite"
            )


def run(p: MergeJob, *, check: bool = True, console: Console | None = None) -> dict:
    """Stream the merge into a staging directory, verify it, then move it into place."""
    console = console or Console(stderr=True)
    staging = staging_path(p.output)
    try:
        staging_for(p.output)
        what = "the combined adapter" if p.combination else p.run_dir.name
        console.print(f"merging {what} into {p.base} ({p.merge_into} weights, {p.dtype})", highlight=False)
        report = {
            "run": str(p.origin or p.run_dir),
            "base": p.base,
            "merge_into": p.merge_into,
            "dtype": p.dtype,
            **({"combination": p.combination} if p.combination else {}),
            **stream_merge(p, staging),
        }
        _write_companions(p, staging)
        if check:
            report["verification"] = _verify(p, staging)
        _write_card(p, staging, report)
        report["files_sha256"] = folder_sha256(staging)  # last: readers (eval, export) check the model against it
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if check and not report["verification"]["passed"]:
            failed = (
                p.output.parent / f"{p.output.name}.merge_report.failed.json"
                if p.combination
                else p.run_dir / "merge_report.failed.json"
            )
            failed.write_text(json.dumps(report, indent=2) + "\n")
            console.print(report_table(report))
            raise RunFailed(
                f"the merged model does not match base + adapter ({report['verification']['reason']}); "
                f"nothing was written to {p.output}; figures in {failed}"
            )
        swap_into_place(staging, p.output)
    finally:
        remove_staging(staging)
    return report


def stream_merge(p: MergeJob, staging: Path) -> dict:
    """Fold the adapter into the base, shard by shard; returns what changed."""
    checkpoint = ckpt_mod.Checkpoint.open(p.base_dir)
    skeleton = adapter_mod.on_skeleton(p.run_dir, p.base_dir, p.base, checkpoint)
    layers, saved = skeleton.layers, skeleton.saved
    if skeleton.vocab_size:
        p.vocab_size = skeleton.vocab_size
        p.notes.append(f"vocabulary {skeleton.base_vocab_size} -> {skeleton.vocab_size} (tokens added in training)")
    quantized = set(p.quantization["modules"]) if p.quantization else set()
    out_dtype = DTYPES[p.dtype]
    weight_map, total, merged, replaced, rounded = {}, 0, 0, 0, 0
    for shard in checkpoint.shards:
        tensors = checkpoint.read(shard)  # memory-mapped: what is written unchanged is never copied
        for name, tensor in list(tensors.items()):
            module = name.removesuffix(".weight") if name.endswith(".weight") else None
            if name in saved:  # a resized embedding saved with the adapter still gets its trained token rows below
                tensor = saved.pop(name)
                replaced += 1
            if module in quantized or module in layers:  # float32 arithmetic, one tensor at a time
                tensor = tensor.float()
                if module in quantized:
                    tensor = _nf4_round_trip(tensor, p)
                    rounded += 1
                if module in layers:
                    tensor = adapter_mod.merge_layer(layers[module], tensor)
                    merged += 1
            tensors[name] = tensor.to(out_dtype) if tensor.is_floating_point() else tensor  # integer buffers stay
            del tensor
            weight_map[name] = shard
        total += ckpt_mod.write_shard(staging / shard, tensors)
        del tensors
        _release_freed_memory()
    if saved:  # modules_to_save tensors the base checkpoint does not store (e.g. an untied lm_head)
        extra = "model-lorakit-extra.safetensors"
        total += ckpt_mod.write_shard(staging / extra, {k: v.to(out_dtype) for k, v in saved.items()})
        weight_map.update({k: extra for k in saved})
    ckpt_mod.write_index(staging, weight_map, total)
    return {
        "lora_layers_merged": merged,
        "tensors_replaced": replaced,
        "weights_nf4_round_tripped": rounded,
        "shards": len(checkpoint.shards),
    }


def _release_freed_memory() -> None:
    """Hand the previous shard's freed buffers back to the OS (glibc keeps large freed blocks otherwise,
    and resident memory would creep up shard after shard)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _nf4_round_trip(weight: torch.Tensor, p: MergeJob) -> torch.Tensor:
    """The weight as the 4-bit layer held it in training: cast to the training precision, quantized with
    the run's bitsandbytes settings, dequantized."""
    import bitsandbytes.functional as bnbf

    q = p.quantization
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = weight.to(device=device, dtype=DTYPES[p.manifest.get("precision", "float32")])
    packed, state = bnbf.quantize_4bit(
        source,
        blocksize=q["blocksize"],
        compress_statistics=q["double_quant"],
        quant_type=q["quant_type"],
        quant_storage=getattr(torch, q["quant_storage"]),
    )
    return bnbf.dequantize_4bit(packed, state).float().cpu()


def _write_companions(p: MergeJob, staging: Path) -> None:
    """config.json (dtype, vocabulary) and the run's tokenizer, chat template and generation config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(p.base_dir)
    config.dtype = p.dtype
    if p.vocab_size:
        config.vocab_size = p.vocab_size
    config.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (p.run_dir / name).is_file():
            shutil.copy2(p.run_dir / name, staging / name)


def _verify(p: MergeJob, staging: Path) -> dict:
    """Logits of base + adapter (as merged into), the merged model and the bare base, one at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(p.run_dir)
    inputs, source = verify.inputs_for(p.recipe, tokenizer)
    precision = model_mod.Precision("float32", "cuda" if torch.cuda.is_available() else "cpu")
    cfg = p.recipe.model.model_copy(update={"name_or_path": str(p.base_dir), "revision": None})

    def base(four_bit: bool):
        model = model_mod.load_base(cfg, setup_mod.for_loading(cfg, precision=precision, four_bit=four_bit))
        if p.vocab_size:
            model.resize_token_embeddings(p.vocab_size, mean_resizing=False)
        return model

    with_adapter = PeftModel.from_pretrained(base(p.merge_into == "nf4"), p.run_dir)
    reference = verify.logits(with_adapter, inputs)
    with with_adapter.disable_adapter():  # the base as merged into, same loaded weights: only the adapter differs
        bare = verify.logits(with_adapter, inputs)
    del with_adapter
    merged = verify.logits(AutoModelForCausalLM.from_pretrained(staging, dtype=DTYPES[p.dtype]), inputs)
    kind = "4-bit NF4" if p.merge_into == "nf4" else "full-precision"
    adapter = "combined adapter" if p.combination else "adapter"
    figures = {
        "inputs": f"{len(inputs)} of {source}",
        "reference": f"{kind} base + {adapter}",
        "merged_vs_reference": verify.compare(reference, merged),
        "merged_vs_base": verify.compare(bare, merged),
    }
    if p.manifest.get("load_in_4bit") and p.merge_into == "original":  # the trade-off, measured
        figures["merged_vs_training"] = verify.compare(
            verify.logits(PeftModel.from_pretrained(base(True), p.run_dir), inputs), merged
        )
    figures["tolerance"] = verify.tolerance(figures["merged_vs_reference"], p.dtype)
    figures["reason"] = verify.verdict(figures["merged_vs_reference"], figures["merged_vs_base"], p.dtype)
    figures["passed"] = not figures["reason"]
    return figures


def _write_card(p: MergeJob, staging: Path, report: dict) -> None:
    check = report.get("verification")
    if p.combination:
        c = p.combination
        what = (
            "The LoRA adapters of the lorakit runs "
            + ", ".join(f"`{r['path']}` ({r['weight']:g})" for r in c["runs"])
            + f", combined with peft's `add_weighted_adapter` (`{c['combination']}`"
            + (f", density {c['density']:g}" if c["density"] is not None else "")
            + f", seed {c['seed']}),"
        )
    else:
        what = f"The adapter of the lorakit run `{p.run_dir}`"
    title = p.output.name if p.combination else p.run_dir.name
    lines = [
        "---",
        f"base_model: {p.base}",
        "tags: [lorakit, merged]",
        "---",
        f"# {title} (merged)",
        "",
        f"{what} folded into `{p.base}`, saved in {p.dtype}. "
        "Loads with `AutoModelForCausalLM.from_pretrained`; the tokenizer carries the chat template used in "
        "training and `generation_config.json` stops on the end-of-turn token it trained.",
        "",
        f"- Merged into: **{p.merge_into}** weights"
        + (
            " (the NF4-dequantized weights training saw)"
            if p.merge_into == "nf4"
            else " (the published full-precision weights)"
        ),
        f"- adapter layers merged: {report['lora_layers_merged']}; tensors replaced (modules_to_save): "
        f"{report['tensors_replaced']}; weights NF4 round-tripped: {report['weights_nf4_round_tripped']}",
    ]
    lines += [f"- {note}" for note in p.notes]
    if check:
        m = check["merged_vs_reference"]
        lines += [
            "",
            "## Verification",
            "",
            f"On {check['inputs']}, against {check['reference']}: max |logit "
            f"difference| {m['max_abs_diff']:.3g} ({check['tolerance']}), top-1 agreement "
            f"{m['top1_agreement']:.2%}. Against the bare base: max difference "
            f"{check['merged_vs_base']['max_abs_diff']:.3g}, top-1 agreement "
            f"{check['merged_vs_base']['top1_agreement']:.2%}.",
        ]
    (staging / "README.md").write_text("\n".join(lines) + "\n")


def report_table(report: dict) -> Table:
    check = report["verification"]
    table = Table(title=f"merge verification ({check['inputs']})")
    for column in ("merged vs", "max |logit diff|", "top-1 agreement", "positions"):
        table.add_column(column)
    rows = [
        (check["reference"], "merged_vs_reference"),
        ("bare base (must differ)", "merged_vs_base"),
        ("4-bit base + adapter, as trained (information)", "merged_vs_training"),
    ]
    for label, key in rows:
        if key not in check:
            continue
        f = check[key]
        table.add_row(label, f"{f['max_abs_diff']:.3g}", f"{f['top1_agreement']:.2%}", str(f["positions"]))
    table.caption = f"tolerance {check['tolerance']}: {'passed' if check['passed'] else 'FAILED: ' + check['reason']}"
    return table
