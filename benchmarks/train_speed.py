"""Training speed on CPU: `lorakit train` on its defaults against the plain TRL baseline
(benchmarks/trl_baseline.py), QLoRA on the same model, data, examples, seed and optimizer.

Model: the tiny Llama (4 layers, hidden 256, GQA), 4-bit NF4 with double quantization, LoRA r=16 on all
linear layers. Data: synthetic chat (`synthetic.py`: lognormal lengths, median about 100 tokens, max 1024;
30% multi-turn), loss on assistant tokens only, max_length 1024, one epoch. lorakit packs whole examples
into rows of max_length (its default, padding-free); the baseline pads each batch to its longest example
(trl's default). The batch sizes give both about the same real tokens per optimizer step (lorakit: 1 packed
row of up to 1024 tokens, about 6-7 examples; baseline: 8 examples), and the table shows both step counts.

Measured, for each run in its own process: train time (the trainer's `train_runtime`: the training loop,
not loading or preprocessing), effective tokens/s (the non-padding tokens of the epoch / train time), peak
resident memory of the process (ru_maxrss). Runs alternate lorakit, baseline, lorakit, ...; medians, and
min-max over the repetitions. Loss parity: both adapters of the first repetition are scored by one
evaluator (lorakit's token loss over held-out examples, 4-bit base + adapter).

    .venv/bin/python benchmarks/train_speed.py --examples 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks.synthetic import TEMPLATE, chat_rows, word_list, write_jsonl  # noqa: E402

SETTINGS = {"learning_rate": 2e-4, "seed": 0, "r": 16, "alpha": 32}


THREADS = {"count": 1}  # torch threads of both sides (OMP_NUM_THREADS), set from --threads in main


def measured(command: list[str], log: Path) -> dict:
    """Run `command` in a fresh process with THREADS torch threads; its exit status and peak resident memory."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS["count"])}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024}


def lorakit_run(model: Path, data: Path, template: Path, out: Path, batch: int, max_length: int) -> dict:
    recipe = {
        "model": {"name_or_path": str(model), "load_in_4bit": True},
        "lora": {
            "r": SETTINGS["r"],
            "lora_alpha": SETTINGS["alpha"],
            "lora_dropout": 0.0,
            "target_modules": "all-linear",
        },
        "data": {"train": str(data), "chat_template": str(template), "max_length": max_length},
        "train": {
            "output_dir": str(out),
            "per_device_train_batch_size": batch,
            "num_train_epochs": 1,
            "learning_rate": SETTINGS["learning_rate"],
            "seed": SETTINGS["seed"],
            "warmup_steps": 0,
            "lr_scheduler_type": "cosine",
            "logging_steps": 10,
            "save_steps": 100000,
        },
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    usage = measured(
        [sys.executable, "-m", "lorakit", "train", str(path), "--no-cache"], out.parent / f"{out.name}.log"
    )
    results = json.loads((out / "manifest.json").read_text())["results"]
    return {**usage, "train_runtime_s": results["train_runtime_s"], "steps": results["steps"]}


def baseline_run(model: Path, data: Path, template: Path, out: Path, batch: int, max_length: int) -> dict:
    result = out.parent / f"{out.name}.json"
    usage = measured(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "trl_baseline.py"),
            "--model",
            str(model),
            "--data",
            str(data),
            "--template",
            str(template),
            "--output",
            str(out),
            "--result",
            str(result),
            "--batch",
            str(batch),
            "--epochs",
            "1",
            "--max-length",
            str(max_length),
            "--learning-rate",
            str(SETTINGS["learning_rate"]),
            "--seed",
            str(SETTINGS["seed"]),
        ],
        out.parent / f"{out.name}.log",
    )
    return {**usage, **json.loads(result.read_text())}


def held_out_loss(model: Path, adapter: Path, eval_split, tokenizer) -> float:
    from peft import PeftModel

    from lorakit.model import base as model_mod
    from lorakit.model.scoring import token_loss
    from lorakit.model.setup import for_loading
    from lorakit.recipe.schema import ModelConfig

    cfg = ModelConfig(name_or_path=str(model), load_in_4bit=True)
    tuned = PeftModel.from_pretrained(model_mod.load_base(cfg, for_loading(cfg)), adapter)
    data = eval_split.dataset
    return token_loss(tuned, data["input_ids"], data["labels"], tokenizer.pad_token_id or 0, batch_size=8)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lorakit-batch", type=int, default=1, help="packed rows per step")
    parser.add_argument("--baseline-batch", type=int, default=8, help="examples per step")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--threads", type=int, help="torch threads of both sides (default: what lorakit chooses on this machine)"
    )
    args = parser.parse_args()
    from lorakit.model.setup import cpu_threads

    THREADS["count"] = args.threads or cpu_threads(1, {}).count

    from transformers import AutoTokenizer

    from lorakit.console import quiet_libraries
    from lorakit.data import prepare
    from lorakit.recipe.schema import DataConfig
    from scripts.tiny_model import build_tiny_model

    quiet_libraries()
    model = build_tiny_model(ROOT / ".cache" / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(model)
    work = Path(tempfile.mkdtemp(prefix="lorakit-speed-"))
    template = work / "chatml-generation.jinja"
    template.write_text(TEMPLATE)
    words = word_list(tokenizer)
    train = write_jsonl(chat_rows(args.examples, words, seed=0, max_tokens=args.max_length), work / "train.jsonl")
    held = write_jsonl(chat_rows(args.eval_examples, words, seed=1, max_tokens=args.max_length), work / "eval.jsonl")
    prepared = prepare(
        DataConfig(train=str(train), eval=str(held), chat_template=str(template), max_length=args.max_length),
        tokenizer,
        0,
        use_cache=False,
    )
    tokens = prepared.train.tokens  # the non-padding tokens of one epoch, the same for both

    runs = {"lorakit": [], "baseline": []}
    for repeat in range(args.repeats):
        for name in ("lorakit", "baseline"):
            out = work / f"{name}-{repeat}"
            run = (lorakit_run if name == "lorakit" else baseline_run)(
                model,
                train,
                template,
                out,
                args.lorakit_batch if name == "lorakit" else args.baseline_batch,
                args.max_length,
            )
            run["tokens_per_s"] = tokens / run["train_runtime_s"]
            runs[name].append(run)
            print(
                f"{name} {repeat}: {run['train_runtime_s']:.1f} s, {run['tokens_per_s']:.0f} tok/s, "
                f"{run['peak_rss_mib']:.0f} MiB, {run['steps']} steps",
                flush=True,
            )
    losses = {name: held_out_loss(model, work / f"{name}-0", prepared.eval, tokenizer) for name in runs}

    speed = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["lorakit"], runs["baseline"])]
    memory = [a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in zip(runs["lorakit"], runs["baseline"])]
    table = {
        "examples": args.examples,
        "tokens": tokens,
        "cpus": os.cpu_count(),
        "threads": THREADS["count"],
        "speed_ratio": {"median": statistics.median(speed), "min": min(speed), "max": max(speed)},
        "memory_ratio": {"median": statistics.median(memory), "min": min(memory), "max": max(memory)},
        "held_out_loss": losses,
        "runs": runs,
    }
    print(
        f"\n{args.examples} examples, {tokens:,} non-padding tokens, one epoch, {os.cpu_count()} CPUs, "
        f"{THREADS['count']} torch threads on both sides, "
        f"median of {args.repeats} alternating runs (min-max)\n"
    )
    print("| | lorakit (defaults) | TRL baseline | lorakit / baseline |")
    print("|---|---|---|---|")
    for key, label, fmt in (
        ("tokens_per_s", "effective tokens/s", "{:,.0f}"),
        ("train_runtime_s", "train time (s)", "{:.1f}"),
        ("peak_rss_mib", "peak RSS (MiB)", "{:,.0f}"),
        ("steps", "optimizer steps", "{:.0f}"),
    ):
        ours = statistics.median(r[key] for r in runs["lorakit"])
        theirs = statistics.median(r[key] for r in runs["baseline"])
        ratio = {"tokens_per_s": speed, "peak_rss_mib": memory}.get(key)
        spread = f" ({min(ratio):.2f}-{max(ratio):.2f})" if ratio else ""
        print(f"| {label} | {fmt.format(ours)} | {fmt.format(theirs)} | {ours / theirs:.2f}{spread} |")
    print(
        f"| held-out loss (same evaluator) | {losses['lorakit']:.4f} | {losses['baseline']:.4f} | "
        f"{losses['lorakit'] / losses['baseline']:.3f} |"
    )
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
