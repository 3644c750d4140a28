"""GPU training benchmark: lorakit on its defaults against the plain TRL baseline (benchmarks/trl_baseline.py)
on a Llama-3-8B-shaped model.

The model is built from a Llama 3 8B config with random weights (no download), saved once in bf16, and
reloaded in 4-bit NF4 (double quantization) by both sides; LoRA r=16, alpha 32 on all linear layers; every
example is about `--seq` tokens (synthetic chat, the tiny model's tokenizer: its ids are valid for any
vocabulary), micro-batch `--batch`, `--warmup` steps, then `--steps` timed steps. Each side runs in its own
process. lorakit runs its defaults (packing, Liger kernels when installed, flash attention when installed,
non-reentrant gradient checkpointing); the baseline runs trl's (sdpa, gradient checkpointing, padding).

Reported per side: tokens/s over the timed steps (CUDA-synchronised step times), MFU, peak allocated GPU
memory, mean loss over the timed steps (the two must agree: same model, same kind of data), and the longest
sequence that trains at batch 1 (doubling from the preset's start until out of memory, then halving the gap,
within a bounded number of probes).

MFU = tokens/s x (4 N + 6 N_lora + 6 L s d) / peak, with N the base's parameters (forward and input-gradient
matmuls; frozen weights get no weight gradient), N_lora the adapter's, L layers, s the sequence, d the hidden
size (causal attention scores and values, forward and backward), and peak the GPU's dense bf16 FLOP/s
from trl's table (H100/H200 SXM: 989e12). Recomputation by gradient checkpointing is not counted as useful work.

    python benchmarks/gpu_train.py --json gpu.json                 # H100/H200: the full size
    python benchmarks/gpu_train.py --preset h200-check --json x.json  # 8 of the 32 layers (make gpu-check, stage d)
    python benchmarks/gpu_train.py --preset cpu-smoke --json x.json  # reduced, runs anywhere (the rehearsal runs it)

Both sides must report finite, non-zero gradient norms (an adapter that does not learn would time nothing
useful); the report is rewritten after each phase, so a run stopped during the longest-sequence search keeps
its speed figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks.synthetic import TEMPLATE, chat_rows, word_list, write_jsonl  # noqa: E402

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# longest_*: the batch-1 search starts at longest_start, doubles up to longest_limit, then halves the gap, and
# stops after max_probes runs per side (each probe is a fresh process that loads the model).
PRESETS = {
    "h100": {
        "shape": LLAMA3_8B,
        "note": "Llama-3-8B shape, all 32 layers",
        "seq": 2048,
        "batch": 4,
        "warmup": 10,
        "steps": 30,
        "longest_start": 4096,
        "longest_limit": 131072,
        "max_probes": 8,
    },
    # `make gpu-check` (stage d): the full 8B width, a quarter of its depth, to fit the stage's cap on one H200
    "h200-check": {
        "shape": {**LLAMA3_8B, "num_hidden_layers": 8},
        "note": "Llama-3-8B shape, 8 of its 32 layers",
        "seq": 2048,
        "batch": 4,
        "warmup": 5,
        "steps": 15,
        "longest_start": 32768,
        "longest_limit": 131072,
        "max_probes": 2,
    },
    "cpu-smoke": {
        "shape": {
            **LLAMA3_8B,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1024,
        },
        "note": "reduced to 2 layers of width 128 (CPU smoke test)",
        "seq": 128,
        "batch": 2,
        "warmup": 1,
        "steps": 2,
        "longest_start": 256,
        "longest_limit": 256,
        "max_probes": 3,
    },
}
SIDES = ("lorakit", "baseline")


def build_model(shape: dict, out: Path) -> Path:
    """Random weights from the config, saved once (bf16 safetensors) with the tiny model's tokenizer."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from scripts.tiny_model import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(ROOT / ".cache" / "tiny-llama"))
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return out


class StepTimer:
    """Trainer callback: wall time of every optimizer step, CUDA work included."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer._sync()
                outer.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                outer._sync()
                outer.times.append(time.perf_counter() - outer.started)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    outer.losses.append(logs["loss"])
                if logs and "grad_norm" in logs:
                    outer.grad_norms.append(float(logs["grad_norm"]))

        self.callback, self.times, self.losses, self.grad_norms, self.started = _Callback(), [], [], [], 0.0

    @staticmethod
    def _sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def worker(side: str, model: Path, data: Path, template: Path, out: Path, seq: int, batch: int, steps: int) -> dict:
    """One side's run in this process; returns its step times, losses and peak memory."""
    import torch

    timer = StepTimer()
    if side == "lorakit":
        from lorakit.recipe.loading import load_recipe
        from lorakit.train.trainer import run

        recipe = {
            "model": {"name_or_path": str(model), "load_in_4bit": True},
            "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
            "data": {"train": str(data), "chat_template": str(template), "max_length": seq},
            "train": {
                "output_dir": str(out),
                "per_device_train_batch_size": batch,
                "max_steps": steps,
                "learning_rate": 2e-4,
                "warmup_steps": 0,
                "logging_steps": 1,
                "save_steps": 10**6,
                "seed": 0,
            },
        }
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(recipe))
        details = run(load_recipe(path), use_cache=False, callbacks=(timer.callback,)).details
        kernels = details.get("kernels", {})
    else:
        from benchmarks.trl_baseline import build
        from lorakit import upstream

        trainer = build(
            str(model),
            str(data),
            str(template),
            str(out),
            batch=batch,
            max_steps=steps,
            max_length=seq,
            learning_rate=2e-4,
            logging_steps=1,
            callbacks=[timer.callback],
        )
        trainer.train()
        kernels = {
            "attention": upstream.attention_implementation(trainer.model),
            "liger": False,
            "packing": False,
            "gradient_checkpointing": True,
        }
    from lorakit.train.trainer import memory_record

    memory = memory_record("cuda" if torch.cuda.is_available() else "cpu")
    peak = memory.get("peak_allocated_gib", memory.get("peak_rss_gib"))
    return {
        "times": timer.times,
        "losses": timer.losses,
        "grad_norms": timer.grad_norms,
        "peak_gib": peak,
        "memory": memory,
        "kernels": kernels,
    }


def launch(
    side: str, model: Path, data: Path, template: Path, work: Path, seq: int, batch: int, steps: int, tag: str
) -> dict | None:
    """Run `worker` in a fresh process (fresh GPU memory statistics); None when it ran out of memory."""
    out = work / f"{side}-{tag}"
    result = out.with_suffix(".json")
    command = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--model",
        str(model),
        "--data",
        str(data),
        "--template",
        str(template),
        "--out",
        str(out),
        "--seq",
        str(seq),
        "--batch",
        str(batch),
        "--steps",
        str(steps),
        "--result",
        str(result),
    ]
    log = out.with_suffix(".log")
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    text = log.read_text()
    if code != 0:
        if "OutOfMemoryError" in text or "out of memory" in text:
            return None
        raise SystemExit(f"{side} ({tag}) failed with {code}; see {log}:\n{text[-3000:]}")
    return json.loads(result.read_text())


def data_for(seq: int, examples: int, work: Path, words: list[str]) -> Path:
    path = work / f"data-{seq}.jsonl"
    if not path.exists():
        write_jsonl(chat_rows(examples, words, seed=0, median_tokens=int(seq * 0.9), max_tokens=seq, spread=0.0), path)
    return path


def mfu(tokens_per_s: float, shape: dict, trainable: int, total: int, seq: int) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from trl.trainer.utils import get_peak_flops  # trl's (TorchTitan's) dense bf16 peak by device name

    peak = get_peak_flops(torch.cuda.get_device_name(), "bfloat16")
    if peak is None:
        return None
    per_token = 4 * total + 6 * trainable + 6 * shape["num_hidden_layers"] * seq * shape["hidden_size"]
    return tokens_per_s * per_token / peak


def parameters(model: Path, shape: dict) -> tuple[int, int]:
    """(LoRA r=16 parameters on all linear layers, base parameters), from the shape alone."""
    d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    linears = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    lora = layers * sum(16 * (a + b) for a, b in linears)
    base = layers * (sum(a * b for a, b in linears) + 2 * d) + 2 * shape["vocab_size"] * d + d
    return lora, base


def longest(
    side: str,
    settings: dict,
    model: Path,
    work: Path,
    words: list[str],
    template: Path,
    found: dict,
    saved=lambda: None,
) -> dict:
    """The longest sequence (tokens) that trains 2 steps at batch 1, within `max_probes` runs: doubling from
    `longest_start` up to `longest_limit`, then halving the gap. Fills `found` (calling `saved` after each
    probe): the longest that fit, the shortest that did not (None when none failed), each probe's peak."""
    fits, failed, seq, probes = 0, None, settings["longest_start"], []
    found.update(fits=0, fails=None, probes=probes)

    def probe(length: int) -> bool:
        ok = launch(side, model, data_for(length, 8, work, words), template, work, length, 1, 2, f"longest-{length}")
        probes.append({"seq": length, "fits": ok is not None, "peak_gib": ok["peak_gib"] if ok else None})
        if ok is not None:
            found["fits"] = max(found["fits"], length)
        else:
            found["fails"] = min(found["fails"] or length, length)
        saved()
        return ok is not None

    while seq <= settings["longest_limit"] and len(probes) < settings["max_probes"]:
        if not probe(seq):
            failed = seq
            break
        fits, seq = seq, seq * 2
    while failed and failed - fits > max(256, fits // 8) and len(probes) < settings["max_probes"]:
        middle = (fits + failed) // 2
        fits, failed = (middle, failed) if probe(middle) else (fits, middle)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    parser.add_argument("--skip-longest", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="where the model and runs go (default: a temporary directory)")
    for name in ("worker", "model", "data", "template", "out", "result"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("seq", "batch", "steps"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from lorakit.console import quiet_libraries

    quiet_libraries()
    if args.worker:
        result = worker(
            args.worker,
            Path(args.model),
            Path(args.data),
            Path(args.template),
            Path(args.out),
            args.seq,
            args.batch,
            args.steps,
        )
        Path(args.result).write_text(json.dumps(result))
        return

    from transformers import AutoTokenizer

    settings = PRESETS[args.preset]
    work = args.work or Path(tempfile.mkdtemp(prefix="lorakit-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(settings["shape"], work / f"model-{args.preset}")
    words = word_list(AutoTokenizer.from_pretrained(model))
    template = work / "chatml-generation.jinja"
    template.write_text(TEMPLATE)
    seq, batch = settings["seq"], settings["batch"]
    total_steps = settings["warmup"] + settings["steps"]
    data = data_for(seq, batch * total_steps * 2, work, words)
    from lorakit.data import prepare
    from lorakit.recipe.schema import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(model)
    split = prepare(
        DataConfig(train=str(data), chat_template=str(template), max_length=seq), tokenizer, 0, use_cache=False
    ).train
    tokens_per_example = split.tokens / len(split.dataset)
    trainable, total = parameters(model, settings["shape"])

    rows = {side: [] for side in SIDES}
    report = {
        "preset": args.preset,
        "shape_note": settings["note"],
        "settings": {k: v for k, v in settings.items() if k not in ("shape", "note")},
        "shape": settings["shape"],
        "tokens_per_example": tokens_per_example,
        "runs": rows,
    }
    for repeat in range(args.repeats):
        for side in SIDES:
            run = launch(side, model, data, template, work, seq, batch, total_steps, f"run-{repeat}")
            if run is None:
                raise SystemExit(f"{side} ran out of memory at sequence {seq}, batch {batch}")
            if not run["grad_norms"] or min(run["grad_norms"]) <= 0 or not all(map(math.isfinite, run["grad_norms"])):
                raise SystemExit(f"{side}: gradient norms {run['grad_norms']}: the adapter is not learning")
            timed = run["times"][settings["warmup"] :]
            tokens_per_s = len(timed) * batch * tokens_per_example / sum(timed)
            rows[side].append(
                {
                    "tokens_per_s": tokens_per_s,
                    "peak_gib": run["peak_gib"],
                    "memory": run["memory"],
                    "mean_loss": statistics.mean(run["losses"][settings["warmup"] :]),
                    "grad_norm_min": min(run["grad_norms"]),
                    "grad_norm_max": max(run["grad_norms"]),
                    "mfu": mfu(tokens_per_s, settings["shape"], trainable, total, seq),
                    "kernels": run["kernels"],
                }
            )
            print(
                f"{side} {repeat}: {tokens_per_s:,.0f} tok/s, peak {run['peak_gib']:.2f} GiB, kernels {run['kernels']}",
                flush=True,
            )
    for side in SIDES:
        report[side] = {
            key: statistics.median(r[key] for r in rows[side])
            for key in ("tokens_per_s", "peak_gib", "mean_loss", "grad_norm_min", "grad_norm_max")
        }
        mfus = [r["mfu"] for r in rows[side] if r["mfu"] is not None]
        report[side]["mfu"] = statistics.median(mfus) if mfus else None
    ours, theirs = report["lorakit"], report["baseline"]
    report["ratios"] = {
        "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "peak_memory": ours["peak_gib"] / theirs["peak_gib"],
        "mean_loss": ours["mean_loss"] / theirs["mean_loss"],
    }
    _write(args.json, report)
    if not args.skip_longest:
        for side in SIDES:  # the speed figures are on disk first: a run stopped during the search keeps them
            found = report[side]["longest_search"] = {}

            def saved(side=side, found=found):
                report[side]["longest_seq_batch1"] = found["fits"]
                _write(args.json, report)

            longest(side, settings, model, work, words, template, found, saved)
    print(json.dumps({k: report[k] for k in ("lorakit", "baseline", "ratios")}, indent=1))


def _write(path: Path | None, report: dict) -> None:
    if path:
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(report, indent=1))
        partial.replace(path)


if __name__ == "__main__":
    main()
