"""The PEFT methods compared on the quickstart task (reverse three words; tiny Llama, QLoRA, bundled data).

Each method is the quickstart recipe with one setting changed (PiSSA and OLoRA also on the full-precision
base: they decompose the unquantized weights; IA3, prompt and prefix tuning at the higher learning rates
their papers and peft's examples use, since 2e-3 barely moves them), trained for `--steps` steps in its own
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
LR = 2e-3  # the quickstart's learning rate
# name: (--set overrides on the quickstart recipe, the `lora:` keys to drop, learning rate)
METHODS = {
    "LoRA (r=32)": ([], [], LR),
    "rsLoRA": (["lora.use_rslora=true"], [], LR),
    "DoRA": (["lora.use_dora=true"], [], LR),
    "PiSSA (16-bit base)": (["lora.init_lora_weights=pissa", "model.load_in_4bit=false"], [], LR),
    "OLoRA (16-bit base)": (["lora.init_lora_weights=olora", "model.load_in_4bit=false"], [], LR),
    "LoRA+ (ratio 16)": (["lora.loraplus_lr_ratio=16"], [], LR),
    "LoRA r=8": (["lora.r=8", "lora.lora_alpha=8"], [], LR),
    "AdaLoRA (r 32 -> 16)": (["method=adalora", "adalora.init_r=32", "adalora.target_r=16"], ["r"], LR),
    "IA3": (["method=ia3"], ["r", "lora_alpha", "lora_dropout", "target_modules"], 1e-2),
    "prompt tuning (20 tokens)": (
        ["method=prompt_tuning"],
        ["r", "lora_alpha", "lora_dropout", "target_modules"],
        3e-2,
    ),
    "prefix tuning (20 tokens)": (
        ["method=prefix_tuning"],
        ["r", "lora_alpha", "lora_dropout", "target_modules"],
        1e-2,
    ),
}


def recipe_for(work: Path, index: int, dropped: list[str]) -> Path:
    """The quickstart recipe without the `lora:` keys a method does not read (lorakit refuses them)."""
    import yaml

    recipe = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    for key in dropped:
        recipe["lora"].pop(key, None)
    if not recipe["lora"]:
        recipe.pop("lora")
    path = work / f"recipe-{index}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tiny_model.py"), str(ROOT / ".cache" / "tiny-llama")],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    work = Path(tempfile.mkdtemp(prefix="lorakit-methods-"))
    rows = []
    for index, (name, (changes, dropped, lr)) in enumerate(METHODS.items()):
        out = work / f"method-{index}"
        sets = [
            f"train.output_dir={out}",
            f"train.max_steps={args.steps}",
            "train.eval_steps=100000",
            f"train.learning_rate={lr}",
            *changes,
        ]
        command = [sys.executable, "-m", "lorakit", "train", str(recipe_for(work, index, dropped))]
        for item in sets:
            command += ["--set", item]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: training failed\n{done.stderr[-3000:]}")
        evaluated = subprocess.run(
            [sys.executable, "-m", "lorakit", "eval", str(out), "--compare", "none", "--json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if evaluated.returncode != 0:
            raise SystemExit(f"{name}: eval failed\n{evaluated.stderr[-3000:]}")
        metrics = json.loads(evaluated.stdout)["metrics"]["tuned"]
        manifest = json.loads((out / "manifest.json").read_text())
        rows.append(
            (
                name,
                lr,
                metrics["loss"],
                metrics["exact_match"],
                manifest["trainable_parameters"],
                manifest["results"]["train_runtime_s"],
            )
        )
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(
        f"| method ({args.steps} steps) | learning rate | eval loss | exact match | trainable parameters "
        "| train time (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name, lr, loss, exact, params, seconds in rows:
        print(f"| {name} | {lr:g} | {loss:.4f} | {exact:.3f} | {params:,} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
