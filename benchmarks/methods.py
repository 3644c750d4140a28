"""The PEFT methods compared on the quickstart task (reverse three words; tiny Llama, QLoRA, bundled data).

Each method is the quickstart recipe with one `lora:` setting changed (PiSSA and OLoRA also on the
full-precision base: they decompose the unquantized weights), trained for `--steps` steps in its own
process (`lorakit train`), then scored by `lorakit eval` on the 64 held-out prompts: eval loss, exact match,
trainable parameters and the trainer's train time. One run per method (the table is a comparison of methods
on one seed, not a timing benchmark: times are indicative).

    .venv/bin/python benchmarks/methods.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "LoRA (r=32)": [],
    "rsLoRA": ["lora.use_rslora=true"],
    "DoRA": ["lora.use_dora=true"],
    "PiSSA (16-bit base)": ["lora.init_lora_weights=pissa", "model.load_in_4bit=false"],
    "OLoRA (16-bit base)": ["lora.init_lora_weights=olora", "model.load_in_4bit=false"],
    "LoRA+ (ratio 16)": ["lora.loraplus_lr_ratio=16"],
    "LoRA r=8": ["lora.r=8", "lora.lora_alpha=8"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "tiny_model.py"), str(ROOT / ".cache" / "tiny-llama")],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="lorakit-methods-"))
    rows = []
    for index, (name, changes) in enumerate(METHODS.items()):
        out = work / f"method-{index}"
        sets = [f"train.output_dir={out}", f"train.max_steps={args.steps}", "train.eval_steps=100000", *changes]
        command = [sys.executable, "-m", "lorakit", "train", "configs/quickstart.yaml"]
        for item in sets:
            command += ["--set", item]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: training failed\n{done.stderr[-3000:]}")
        evaluated = subprocess.run([sys.executable, "-m", "lorakit", "eval", str(out), "--compare", "none", "--json"],
                                   cwd=ROOT, env=env, capture_output=True, text=True)
        if evaluated.returncode != 0:
            raise SystemExit(f"{name}: eval failed\n{evaluated.stderr[-3000:]}")
        metrics = json.loads(evaluated.stdout)["metrics"]["tuned"]
        manifest = json.loads((out / "manifest.json").read_text())
        rows.append((name, metrics["loss"], metrics["exact_match"], manifest["trainable_parameters"],
                     manifest["results"]["train_runtime_s"]))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"| method ({args.steps} steps) | eval loss | exact match | trainable parameters | train time (s) |")
    print("|---|---|---|---|---|")
    for name, loss, exact, params, seconds in rows:
        print(f"| {name} | {loss:.4f} | {exact:.3f} | {params:,} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
