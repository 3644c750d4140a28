"""Merge memory: lorakit's shard-by-shard merge against the naive load-everything merge.

A Llama-shaped model (random weights, bfloat16, several safetensors shards) and a LoRA adapter on all
its linear layers (r 16, non-zero) are written to a temporary directory. Each merge runs in a fresh
process that reports its own peak resident memory (ru_maxrss):

  naive:   AutoModelForCausalLM.from_pretrained(base) + PeftModel.from_pretrained + merge_and_unload +
           save_pretrained, what the peft docs show;
  lorakit: `merge.stream_merge`, the merge step of `lorakit merge` (verification off: it loads whole models
           by design, one at a time, and is measured on its own line).

Each process imports everything first, then samples its memory on a thread while the merge runs; the
figures are the peaks minus the memory just before the merge: anonymous memory (what the merge really
holds) and all resident memory (which also counts the pages of memory-mapped shards that were read,
pages the kernel can drop at any time). Both merges are checked to write
the same tensors (max difference printed). Alternating runs, median of the repeats.

    .venv/bin/python benchmarks/merge_memory.py --layers 8 --hidden 1024 --shard-mb 50 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMPORTS = "import torch, transformers, peft, safetensors, lorakit.merge.fold"
# Resident memory sampled every 2 ms on a thread while the merge runs; what the merge adds is the peak
# minus the resident memory just before it (after every import), so import-time peaks do not count.
SAMPLER = """
import threading, time, json, os
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():  # (all resident, anonymous) in MiB; file-backed pages of memory-mapped checkpoints are the difference
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon"))
peak = [0.0, 0.0]; stop = threading.Event()
def sample():
    while not stop.is_set():
        now = rss(); peak[0] = max(peak[0], now[0]); peak[1] = max(peak[1], now[1]); time.sleep(0.002)
before = rss(); thread = threading.Thread(target=sample, daemon=True); thread.start(); t = time.perf_counter()
"""
REPORT = """
wall = time.perf_counter() - t; stop.set(); thread.join()
print(json.dumps({"wall": wall, "before_mib": before[0], "peak_mib": peak[0], "before_anon_mib": before[1],
                  "peak_anon_mib": peak[1]}))
"""
NAIVE = """{imports}
from transformers import AutoModelForCausalLM
from peft import PeftModel
{sampler}
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, {run!r}).merge_and_unload()
model.save_pretrained({out!r}, max_shard_size="{shard}MB")
{report}"""
STREAM = """{imports}
from pathlib import Path
from lorakit.merge import fold as merge
{sampler}
plan = merge.plan({run!r}, output={out!r}, dtype="bfloat16")
Path({out!r}).mkdir(parents=True)
merge.stream_merge(plan, Path({out!r}))
{report}"""


def build(work: Path, layers: int, hidden: int, shard_mb: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from scripts.tiny_model import build_tiny_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        tie_word_embeddings=False,
    )
    base = work / "base"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base, max_shard_size=f"{shard_mb}MB")
    tiny = build_tiny_model(ROOT / ".cache" / "tiny-llama")  # any tokenizer will do for the run directory
    run = work / "run"
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    )
    model.save_pretrained(run)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (run / name).write_bytes((tiny / name).read_bytes())
    recipe = {
        "model": {"name_or_path": str(base)},
        "data": {"train": str(ROOT / "examples/reverse/train.jsonl")},
        "train": {"output_dir": str(run)},
    }
    (run / "recipe.yaml").write_text(json.dumps(recipe))
    (run / "manifest.json").write_text(json.dumps({"status": "complete", "precision": "float32"}))
    return base, run


def measure(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left = {k: v for f in a.glob("*.safetensors") for k, v in load_file(f).items()}
    right = {k: v for f in b.glob("*.safetensors") for k, v in load_file(f).items()}
    if set(left) != set(right):
        raise SystemExit(f"different tensor names: {sorted(set(left) ^ set(right))[:5]}")
    return max((left[k].float() - right[k].float()).abs().max().item() for k in left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard-mb", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorakit-merge-bench-"))
    base, run = build(work, args.layers, args.hidden, args.shard_mb)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    shards = len(list(base.glob("*.safetensors")))
    fill = {
        "imports": IMPORTS,
        "sampler": SAMPLER,
        "report": REPORT,
        "base": str(base),
        "run": str(run),
        "shard": args.shard_mb,
    }
    results = {"naive": [], "lorakit": []}
    for _ in range(args.repeats):
        for out in ("naive", "streamed"):
            shutil.rmtree(work / out, ignore_errors=True)
        results["naive"].append(measure(NAIVE.format(**fill, out=str(work / "naive"))))
        results["lorakit"].append(measure(STREAM.format(**fill, out=str(work / "streamed"))))
    diff = same_tensors(work / "naive", work / "streamed")
    print(
        f"base: {size:.0f} MiB bfloat16 in {shards} shards of at most {args.shard_mb} MB ({args.layers} layers, "
        f"hidden {args.hidden}); adapter r 16 on all linear layers; median of {args.repeats}; "
        f"max tensor difference between the two outputs {diff:.3g}"
    )
    print("| merge | anonymous memory added (MiB) | x lorakit | resident memory added (MiB) | x lorakit | wall (s) |")
    print("|---|---|---|---|---|---|")
    anon = {k: statistics.median(r["peak_anon_mib"] - r["before_anon_mib"] for r in v) for k, v in results.items()}
    added = {k: statistics.median(r["peak_mib"] - r["before_mib"] for r in v) for k, v in results.items()}
    for name in ("naive", "lorakit"):
        wall = statistics.median(r["wall"] for r in results[name])
        print(
            f"| {name} | {anon[name]:,.0f} | {anon[name] / anon['lorakit']:.2f} | {added[name]:,.0f} | "
            f"{added[name] / added['lorakit']:.2f} | {wall:.1f} |"
        )


if __name__ == "__main__":
    main()
