"""Preprocessing speed: lorakit's `data.prepare` against trl's own SFTTrainer preprocessing.

Both turn the same JSONL file of synthetic chat examples into input_ids and assistant-only labels, with
the same tokenizer and chat template (ChatML with `{% generation %}` markers, which trl needs for
`assistant_only_loss` and lorakit ignores), the same max_length and the same number of processes.

  lorakit: `lorakit.data.prepare` (read + validate + render + tokenize + mask), cache off.
  trl:     `datasets.load_dataset("json")` + `SFTTrainer._prepare_dataset`, the function trl's constructor
           runs on a raw dataset (timed on its own, after the trainer was built on a one-row dataset),
           with `assistant_only_loss=True` and `dataset_num_proc` = the same process count. datasets'
           caching is off and each load gets a fresh cache directory, so no run reuses another's work
           (lorakit's time also includes hashing the file, which it does for its manifest).

Runs alternate (lorakit, trl, lorakit, ...), each setting is repeated, the median is reported, and
the outputs are compared token for token before any time is reported.

    .venv/bin/python benchmarks/preprocess.py --examples 50000 --repeats 3 --num-proc 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks.synthetic import TEMPLATE, chat_rows, word_list, write_jsonl  # noqa: E402


def lorakit_prepare(path: Path, template: Path, tokenizer, num_proc: int, max_length: int):
    from lorakit.data import prepare
    from lorakit.recipe.schema import DataConfig

    cfg = DataConfig(train=str(path), chat_template=str(template), max_length=max_length, num_proc=num_proc)
    split = prepare(cfg, tokenizer, seed=0, use_cache=False).train
    return split.input_ids, split.labels


def trl_trainer(model_dir: Path, tokenizer, num_proc: int, max_length: int):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        assistant_only_loss=True,
        max_length=max_length,
        dataset_num_proc=num_proc if num_proc > 1 else None,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    one = Dataset.from_list([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    return SFTTrainer(model=model, args=args, train_dataset=one, processing_class=tokenizer)


def trl_prepare(path: Path, trainer):
    from datasets import load_dataset

    # a fresh cache directory each run: load_dataset's own build cache would skip parsing the JSON
    raw = load_dataset(
        "json",
        data_files=str(path),
        split="train",
        keep_in_memory=True,
        cache_dir=tempfile.mkdtemp(prefix="lorakit-bench-ds-"),
    )
    out = trainer._prepare_dataset(raw, trainer.processing_class, trainer.args, False, None, "train")
    return out["input_ids"][:], out["labels"][:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer

    from lorakit.console import quiet_libraries
    from scripts.tiny_model import build_tiny_model

    quiet_libraries()
    datasets.disable_caching()
    model_dir = build_tiny_model(ROOT / ".cache" / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TEMPLATE
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    template = work / "chatml-generation.jinja"
    template.write_text(TEMPLATE)
    rows = chat_rows(args.examples, word_list(tokenizer), seed=0, max_tokens=args.max_length)
    path = write_jsonl(rows, work / "chat.jsonl")

    print(
        f"{args.examples} synthetic chat examples, max_length {args.max_length}, {os.cpu_count()} CPUs, "
        f"median of {args.repeats} alternating runs"
    )
    print("| processes | lorakit (examples/s) | trl (examples/s) | lorakit / trl |")
    print("|---|---|---|---|")
    for num_proc in args.num_proc:
        trainer = trl_trainer(model_dir, tokenizer, num_proc, args.max_length)
        times = {"lorakit": [], "trl": []}
        outputs = {}
        for _ in range(args.repeats):
            for name in ("lorakit", "trl"):
                started = time.perf_counter()
                if name == "lorakit":
                    result = lorakit_prepare(path, template, tokenizer, num_proc, args.max_length)
                else:
                    result = trl_prepare(path, trainer)
                times[name].append(time.perf_counter() - started)
                outputs.setdefault(name, result)
        _check_same(outputs["lorakit"], outputs["trl"], args.max_length)
        rate = {k: args.examples / statistics.median(v) for k, v in times.items()}
        print(
            f"| {num_proc} | {rate['lorakit']:,.0f} | {rate['trl']:,.0f} | {rate['lorakit'] / rate['trl']:.2f} |",
            flush=True,
        )


def _check_same(ours, theirs, max_length: int) -> None:
    """Same tokens and labels for every example that fits (truncation differs on purpose: lorakit keeps
    the end-of-turn token at the cut)."""
    (ids, labels), (trl_ids, trl_labels) = ours, theirs
    if len(ids) != len(trl_ids):
        raise SystemExit(f"different example counts: lorakit {len(ids)}, trl {len(trl_ids)}")
    compared = 0
    for a, b, la, lb in zip(ids, trl_ids, labels, trl_labels):
        if len(a) < max_length:
            if a != b or la != lb:
                raise SystemExit("lorakit and trl disagree on an example's tokens or labels")
            compared += 1
    print(f"(outputs identical on all {compared} examples shorter than max_length)", file=sys.stderr)


if __name__ == "__main__":
    main()
