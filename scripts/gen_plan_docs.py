"""Generate docs/plan.md: `lorakit plan`'s breakdown for an 8B and a 70B model on 24, 48 and 80 GiB GPUs,
computed by the planner itself from the published configs in tests/fixtures/configs, and the plan against the
peak memory `make gpu-check` measured on a GPU (benchmarks/gpu-check/; a test fails when the committed page
differs from `render()`).

    python scripts/gen_plan_docs.py          # rewrite docs/plan.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOC = ROOT / "docs" / "plan.md"
MODELS = {"Llama 3 8B": "llama-3-8b", "Llama 2 70B": "llama-2-70b"}
MEMORIES = (24, 48, 80)

INTRO = """# lorakit plan

`lorakit plan RECIPE [--gpu-memory 24GiB] [--gpus N] [--suggest] [--json]` reads the model's config only
(a local directory, or the hub's `config.json`), builds the model on the meta device, attaches the recipe's
LoRA adapter there with peft, and prints the memory one GPU needs, whether it fits, and what would make it
fit, each change with its new estimate. `--suggest` also finds the largest micro-batch that fits. It then
estimates the training time from the token count of the recipe's data, at a measured tokens/s
(`--tokens-per-s`, e.g. from `benchmarks/gpu_train.py`) or at an assumed 35% of the GPU's bf16 peak
(`--gpu-kind H100`, trl's table of peaks). With `train.max_steps` the epochs are the rows the steps draw
(steps x global batch) over the rows there are: with packing, the rows trl's packing makes from the data
(several examples each, as the trainer will pack them), not the examples. It exits 3 when the plan does not fit, so a script can stop before
renting GPUs.

What is exact and what is estimated:

- **exact**: base weights as stored (NF4: packed 4-bit data, one absmax per 64 weights, with double
  quantization an 8-bit absmax plus one fp32 constant per 256 blocks and the codebooks; the layers
  bitsandbytes leaves unquantized in fp32, because the QLoRA preparation upcasts them, or in the training
  dtype under FSDP/ZeRO-3), LoRA parameters (peft's own target matching), their gradients and the
  optimizer state (AdamW 8 bytes per parameter, 8-bit AdamW 2). Tests check these against bitsandbytes'
  quantizer, against a 4-bit model actually loaded, and against the published parameter counts of Llama 3 8B,
  Llama 2 70B, Mistral 7B and Qwen2.5 7B.
- **estimated**: activations (per token and layer: the layer input when checkpointed, plus one layer's
  working set; flash/sdpa attention assumed, eager adds the s x s scores), the logits (bf16 logits, their
  fp32 copy for the loss and its gradient; with a fused loss a few chunks), and the framework overhead
  (0.75 GiB CUDA context + 10% allocator fragmentation, an assumption). The last section compares them with
  what a GPU measured, once `make gpu-check` has run on one.
- Engines divide what they shard: FSDP and ZeRO-3 the weights, gradients and optimizer state; ZeRO-2 the
  gradients and optimizer state; FSDP with CPU offload keeps about two layers on the GPU.

The tables below are `lorakit plan` on QLoRA recipes (NF4, double quantization, r=16 on all linear layers,
gradient checkpointing on, paged 8-bit AdamW, max_length 2048, micro-batch 1, bf16, no fused loss).
"""


def _recipe(name: str):
    from lorakit.recipe.schema import Recipe

    return Recipe.model_validate(
        {
            "model": {"name_or_path": str(ROOT / "tests" / "fixtures" / "configs" / name), "load_in_4bit": True},
            "lora": {"r": 16, "target_modules": "all-linear"},
            "data": {"train": str(ROOT / "examples" / "reverse" / "train.jsonl"), "max_length": 2048},
            "train": {"per_device_train_batch_size": 1},
        }
    )


def render() -> str:
    from lorakit.model import engines
    from lorakit.model.setup import for_plan
    from lorakit.preflight import plan as plan_mod

    out = [INTRO]
    for title, name in MODELS.items():
        recipe = _recipe(name)
        counts = plan_mod.count(recipe)
        planned = for_plan(recipe, engine=engines.Engine(), dtype="bfloat16", fused_loss=False)
        plan = plan_mod.estimate(recipe, counts, planned, processes=1)
        out.append(f"## {title} (QLoRA, one GPU)\n")
        out.append(f"{counts.total:,} parameters; LoRA adds {counts.lora:,}.\n")
        out.append("| memory | GiB | how |\n|---|---|---|")
        for line in plan.lines:
            out.append(
                f"| {line.name} | {line.bytes / plan_mod.GIB:.2f} | {'exact: ' if line.exact else ''}{line.note} |"
            )
        out.append(f"| **total** | **{plan.total / plan_mod.GIB:.2f}** | |\n")
        out.append("| GPU memory | verdict | largest micro-batch | what makes it fit |\n|---|---|---|---|")
        for memory in MEMORIES:
            plan.gpu_memory = memory * plan_mod.GIB
            found = plan_mod.suggest(recipe, counts, plan, planned, processes=1, largest_batch=True)
            largest = found[-1]["micro_batch"]
            fixes = "; ".join(f"{s['change']} ({s['total_gib']:.1f} GiB)" for s in found[:-1] if s["fits"])
            verdict = f"fits ({plan.total / plan.gpu_memory:.0%})" if plan.fits else "does not fit"
            out.append(f"| {memory} GiB | {verdict} | {largest or '-'} | {fixes if not plan.fits else '-'} |")
        out.append("")
    from scripts.gpu_check import record  # the figures `make gpu-check` measured, as recorded in benchmarks/

    out.append(record.plan_section(record.load(record.STORE)))
    return "\n".join(out)


def main() -> None:
    from lorakit.console import quiet_libraries

    quiet_libraries()
    DOC.write_text(render())
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
