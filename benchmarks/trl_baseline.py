"""The baseline of lorakit's training benchmarks: the plain QLoRA script a user writes from the TRL, peft
and bitsandbytes docs. `SFTTrainer` + peft `LoraConfig` + `BitsAndBytesConfig` (NF4, double
quantization), trl's defaults everywhere (padding to the longest example of each batch, no packing,
gradient checkpointing on, sdpa attention), except the values that must match the run it is compared
with: model, data, chat template, batch, epochs or steps, learning rate and schedule, optimizer, seed,
max length, LoRA settings and loss on assistant tokens only. The learning-rate schedule is lorakit's default
(cosine, where trl's is linear), so both runs follow the same schedule.

    python benchmarks/trl_baseline.py --model DIR --data train.jsonl --template t.jinja --output OUT \\
        --batch 8 --epochs 1 --result result.json

`run(...)` is the same script as a function, for benchmark programs that time steps with a callback.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build(
    model: str,
    data: str,
    template: str,
    output: str,
    *,
    batch: int,
    epochs: float = 1.0,
    max_steps: int = -1,
    learning_rate: float = 2e-4,
    scheduler: str = "cosine",
    warmup_steps: float = 0,
    optim: str = "paged_adamw_8bit",
    seed: int = 0,
    max_length: int = 1024,
    r: int = 16,
    alpha: int = 32,
    four_bit: bool = True,
    gradient_checkpointing: bool = True,
    logging_steps: int = 10,
    callbacks=(),
):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else (torch.float16 if cuda else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = Path(template).read_text()
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        if four_bit
        else None
    )
    base = AutoModelForCausalLM.from_pretrained(
        model, quantization_config=quantization, dtype=dtype, device_map={"": 0 if cuda else "cpu"}
    )
    args = SFTConfig(
        output_dir=output,
        per_device_train_batch_size=batch,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup_steps,
        optim=optim,
        seed=seed,
        max_length=max_length,
        assistant_only_loss=True,
        gradient_checkpointing=gradient_checkpointing,
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    dataset = load_dataset("json", data_files=data, split="train")
    return SFTTrainer(
        model=base,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )


def run(model: str, data: str, template: str, output: str, **settings) -> dict:
    trainer = build(model, data, template, output, **settings)
    result = trainer.train()
    trainer.save_model(output)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "train_runtime_s": result.metrics["train_runtime"],
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("model", "data", "template", "output", "result"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--optim", default="paged_adamw_8bit")
    parser.add_argument("--scheduler", default="cosine", help="lorakit's default; trl's is linear")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--logging-steps", type=int, default=10)
    args = parser.parse_args()
    result = run(
        args.model,
        args.data,
        args.template,
        args.output,
        batch=args.batch,
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        scheduler=args.scheduler,
        optim=args.optim,
        seed=args.seed,
        max_length=args.max_length,
        logging_steps=args.logging_steps,
    )
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
