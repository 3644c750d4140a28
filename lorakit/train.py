"""`lorakit train`: the only module that builds the trainer. Recipe in, complete run directory out.

Order matters: everything that can be refused cheaply (output directory, precision, optimizer name,
data) is checked before the base model's weights are loaded.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from lorakit import checkpoint as checkpoint_mod
from lorakit import data as data_mod
from lorakit import distributed, engines, methods
from lorakit import model as model_mod
from lorakit import resume as resume_mod
from lorakit import run_dir as run_files
from lorakit.config import Recipe, TrainConfig
from lorakit.console import quiet_libraries
from lorakit.errors import Interrupted, LorakitError, RunFailed
from lorakit.progress import RunProgress, summary_table

# Recipe keys that are not passed to SFTConfig as they are.
_NOT_SFT = {"output_dir", "eval_strategy", "eval_steps", "optim", "hub_token", "run_name", "gradient_checkpointing",
            "packing", "save_total_limit", "use_liger_kernel", "ddp_backend", *TrainConfig.LORAKIT_ONLY}


def sft_config(recipe: Recipe, run_dir: Path, precision: model_mod.Precision, packing: bool,
               engine: engines.Engine = model_mod.SINGLE, liger: bool = False):
    """trl SFTConfig from the recipe's `train:` section, with precision picked from the hardware."""
    from trl import SFTConfig

    train = recipe.train
    values = train.model_dump(exclude=_NOT_SFT)
    eval_strategy = train.eval_strategy
    if eval_strategy == "auto":
        eval_strategy = "steps" if recipe.has_eval() else "no"
    # transformers 5.2x renamed gradient_checkpointing -> activation_checkpointing; recipes keep the known name.
    field_names = {f.name for f in dataclasses.fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in field_names else "gradient_checkpointing"
    values[checkpointing] = train.gradient_checkpointing
    return SFTConfig(
        **values,
        output_dir=str(run_dir / "checkpoints" / resume_mod.INCOMING),  # moved up a level once complete
        run_name=train.run_name or run_dir.name,
        optim=engines.default_optim(recipe, engine),
        eval_strategy=eval_strategy,
        eval_steps=train.eval_steps or train.logging_steps * 5,
        max_length=recipe.data.max_length,
        packing=packing,
        use_liger_kernel=liger,
        packing_strategy="bfd",  # whole examples only (they already fit max_length): padding-free, exact
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device == "cpu",
        logging_first_step=True,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        save_only_model=False,
        save_total_limit=None,  # lorakit rotates, and only after a newer checkpoint is complete (resume.py)
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in every forward pass
        # one process: no process group (transformers would try to use one for any backend named)
        ddp_backend=train.ddp_backend if distributed.world_size() > 1 else None,
    )


@dataclass
class TrainResult:
    """What a finished run leaves: its directory, the trained model in memory, and the summary figures."""

    run_dir: Path
    model: object
    details: dict = field(default_factory=dict)


def run(recipe: Recipe, *, overwrite: bool = False, use_cache: bool = True, resume: bool = False,
        force_resume: bool = False, resume_command: str | None = None, console: Console | None = None,
        callbacks: tuple = ()) -> TrainResult:
    """Train the recipe and write the complete run directory; with `resume`, continue the run in
    `train.output_dir` from its newest complete checkpoint."""
    console = console or Console(stderr=True, quiet=not distributed.is_main())  # one voice: the main process
    started = time.perf_counter()
    quiet_libraries()
    precision = model_mod.resolve_precision(recipe.model)
    engine = engines.from_environment()
    cuda = torch.cuda.is_available()
    engines.check(recipe, engine, cuda=cuda, dtype=precision.dtype, processes=distributed.local_processes(),
                  gpus=torch.cuda.device_count() if cuda else None)
    optim = engines.default_optim(recipe, engine)
    engines.check_optim(optim)
    liger = recipe.train.use_liger_kernel is not False and model_mod.use_liger(
        recipe.train.use_liger_kernel, precision, model_mod.model_class_for(recipe.model)[1])
    if recipe.train.hub_token is not None:  # reaches the hub client without entering args, checkpoints or logs
        os.environ.setdefault("HF_TOKEN", recipe.train.hub_token.get_secret_value())
    if resume and recipe.method == "adalora":
        raise LorakitError("AdaLoRA runs cannot be resumed: peft writes each checkpoint's adapter cut to the ranks "
                           "allocated so far, which no longer fit the full-rank layers training resumes with, and the "
                           "importance estimates that drive the allocation are not saved. The checkpoints load with "
                           "plain peft as adapters; start the run again to finish it")
    if resume:
        run_dir = resume_mod.run_to_resume(recipe.train.output_dir)
    elif distributed.is_main():
        run_dir = run_files.claim(recipe.train.output_dir, overwrite)
        run_files.write_recipe(run_dir, recipe)
    else:
        run_dir = Path(recipe.train.output_dir).expanduser().resolve()
    distributed.start(recipe.train.ddp_backend)
    distributed.barrier()  # the others go on once the main process has claimed the directory
    torch.manual_seed(recipe.train.seed)

    tokenizer = model_mod.load_tokenizer(recipe.model)  # with the recipe's new special tokens, if any
    new_token_ids = tokenizer.convert_tokens_to_ids(recipe.model.new_special_tokens or [])
    with distributed.main_first():  # the main process tokenizes and fills the cache; the others read it
        prepared = data_mod.prepare(recipe.data, tokenizer, recipe.train.seed, use_cache=use_cache)
    _report_data(console, prepared, recipe)
    checkpoint = None
    if resume:
        checkpoint = resume_mod.check_resumable(run_dir, recipe.to_saved_dict(), prepared.fingerprints, force_resume,
                                                warn=console.print)
        if distributed.is_main():
            run_files.write_recipe(run_dir, recipe)
        console.print(f"resuming from {checkpoint.name}", highlight=False)

    console.print(f"loading {recipe.model.name_or_path} ({'4-bit NF4' if recipe.model.load_in_4bit else precision.dtype},"
                  f" {precision.device}, compute {precision.dtype})", highlight=False)
    if precision.device == "cpu" and "paged" in optim:
        console.print(f"note: {optim} pages optimizer state between GPU and CPU memory; on a CPU "
                      "bitsandbytes keeps it in RAM (the 8-bit state is the same)", highlight=False)
    base = model_mod.load_base(recipe.model, precision, engine, tokenizer)  # grown for new tokens (their rows train)
    if recipe.method in ("lora", "adalora"):
        model_mod.check_target_modules(base, recipe.lora)
    packing = model_mod.use_packing(recipe.train.packing, type(base), base.config.model_type, recipe.method)
    quantized = model_mod.quantization_record(base) if recipe.model.load_in_4bit else None
    base = model_mod.prepare_for_training(base, recipe.model, recipe.train.gradient_checkpointing, engine)

    attention = base.config._attn_implementation
    trainer, progress = _build_trainer(recipe, run_dir, precision, packing, base, tokenizer, prepared, console,
                                       engine, liger, new_token_ids)
    if recipe.lora.init_lora_weights == "loftq":
        methods.init_loftq(trainer.model, checkpoint_mod.locate(recipe.model.name_or_path,
                                                                          recipe.model.revision))
    parameters = model_mod.trainable_parameters(trainer.model)  # counted before the engine shards them
    initial = run_dir / INITIAL_ADAPTER
    if recipe.lora.moves_base_weights() and distributed.is_main() and not initial.exists():
        _save_initial_adapter(trainer.model, initial)
    for callback in callbacks:
        trainer.add_callback(callback)
    nonfinite = resume_mod.NonFiniteGuard(recipe.train.max_nonfinite_steps, console)
    guard = resume_mod.CheckpointGuard(prepared.fingerprints, recipe.train.save_total_limit)
    trainer.add_callback(nonfinite)
    trainer.add_callback(guard)
    guard.install()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        if not _disk_full(exc, run_dir):
            raise
        saved = next(iter(resume_mod.complete_checkpoints(run_dir / "checkpoints")), None)
        raise RunFailed(f"the disk is full ({run_dir}); "
                        f"{saved.name + ' is the last complete checkpoint' if saved else 'no checkpoint is complete'}"
                        f". Free space and resume with:\n  {resume_command or 'lorakit train RECIPE --resume'}") from None
    finally:
        guard.uninstall()
    if nonfinite.stopped_at is not None:
        saved = next(iter(resume_mod.complete_checkpoints(run_dir / "checkpoints")), None)
        raise RunFailed(f"{recipe.train.max_nonfinite_steps} steps in a row ended with non-finite gradients (the last "
                        f"at step {nonfinite.stopped_at}); the run stopped. "
                        f"{saved.name + ' is the last good checkpoint' if saved else 'No checkpoint was written'}; "
                        "lower train.learning_rate or check the data before resuming")
    if guard.exit_code is not None:
        saved = next(iter(resume_mod.complete_checkpoints(run_dir / "checkpoints")), None)
        raise Interrupted(f"interrupted by {'SIGTERM' if guard.exit_code == 143 else 'SIGINT'} at step "
                          f"{trainer.state.global_step}; {saved.name if saved else 'no checkpoint'} is complete. "
                          f"Resume with:\n  {resume_command or 'lorakit train RECIPE --resume'}", guard.exit_code)
    eval_loss = None
    if prepared.eval:
        # the trainer's own log (kept on every process) decides, so all processes make the same collective calls
        last = [r for r in trainer.state.log_history if "eval_loss" in r and r.get("step") == trainer.state.global_step]
        eval_loss = last[-1]["eval_loss"] if last else trainer.evaluate()["eval_loss"]
    if engine.kind == "fsdp":  # gather the adapter whole, as a standard PEFT adapter (not per-process shards)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    # every process takes part (FSDP and ZeRO-3 gather the shards); only the main one writes:
    # adapter + tokenizer with the chat template used (chat_template.jinja)
    trainer.save_model(str(run_dir))
    if not trainer.is_world_process_zero():
        return TrainResult(run_dir, trainer.model)
    if recipe.lora.moves_base_weights():  # PiSSA/OLoRA: an adapter for the original base, not the moved one
        trainer.model.save_pretrained(str(run_dir), path_initial_model_for_weight_conversion=str(initial))
        shutil.rmtree(initial)
    eos_ids = run_files.write_generation_config(run_dir, trainer.model, tokenizer, prepared.end_of_turn_id)
    ranks = methods.final_ranks(trainer.model) if recipe.method == "adalora" else None

    details = _details(trainer, output, progress, prepared, tokenizer, precision, packing, eval_loss, eos_ids,
                       parameters, recipe.model.trust_remote_code)
    details["quantization"] = quantized
    details["optimizer"] = optim
    if ranks is not None:
        details["adalora_final_ranks"] = ranks
    details["kernels"] = {"attention": attention, "liger": liger, "packing": packing,
                          "gradient_checkpointing": recipe.train.gradient_checkpointing,
                          "torch_compile": recipe.train.torch_compile}
    run_files.write_model_card(run_dir, recipe, details)
    run_files.write_manifest(run_dir, recipe, details)
    results, params = details["results"], details["trainable_parameters"]
    console.print(summary_table({
        "steps": results["steps"], "wall time": f"{time.perf_counter() - started:.1f} s",
        "tokens/s": results["tokens_per_s"],
        "train loss": f"{_fmt(results['first_loss'])} -> {_fmt(results['last_loss'])}",
        "eval loss": _fmt(results["eval_loss"]),
        "global batch": f"{details['global_batch']} ({recipe.train.per_device_train_batch_size} per device x "
                        f"{recipe.train.gradient_accumulation_steps} accumulation x {details['world_size']} processes"
                        f"{', ' + details['engine'] if details['world_size'] > 1 else ''})",
        "trainable params": f"{params:,} ({100 * params / details['total_parameters']:.3f}%)",
        **({"final ranks": methods.rank_summary(ranks)} if ranks is not None else {}),
        "peak memory": details["peak_memory"], "adapter": str(run_dir),
        **({"remote code": "ran (model.trust_remote_code)"} if recipe.model.trust_remote_code else {}),
    }))
    return TrainResult(run_dir, trainer.model, details)


INITIAL_ADAPTER = "initial-adapter"  # PiSSA/OLoRA: the adapter as initialised, for converting the trained one


def _save_initial_adapter(model, path: Path) -> None:
    """The adapter before training, saved as a plain LoRA (peft's recipe for converting PiSSA/OLoRA)."""
    config = model.peft_config["default"]
    chosen = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(path))
    finally:
        config.init_lora_weights = chosen


def _build_trainer(recipe: Recipe, run_dir: Path, precision, packing: bool, base, tokenizer, prepared,
                   console: Console, engine: engines.Engine, liger: bool, new_token_ids: list[int]):
    """SFTTrainer over lorakit's pre-tokenized data, with lorakit's progress in place of the trainer's."""
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    progress = RunProgress(run_dir / run_files.METRICS, console)
    trainer = (methods.adalora_trainer_class() if recipe.method == "adalora" else SFTTrainer)(
        model=base, args=sft_config(recipe, run_dir, precision, packing, engine, liger), processing_class=tokenizer,
        train_dataset=prepared.train.to_dataset(),
        eval_dataset=prepared.eval.to_dataset() if prepared.eval else None,
        peft_config=methods.peft_config(recipe, base, new_token_ids), callbacks=[progress])
    trainer.remove_callback(PrinterCallback)
    if recipe.method == "adalora":
        trainer.budget = methods.AdaLoraBudget(trainer.model, recipe.adalora)
        trainer.add_callback(trainer.budget.callback)
    model_mod.match_adapter_precision(trainer.model, precision)
    if recipe.lora.loraplus_lr_ratio:  # LoRA+: B matrices at ratio x the learning rate, through peft's helper
        from peft.optimizers import create_loraplus_optimizer

        optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
        kwargs.pop("lr", None)
        trainer.optimizer = create_loraplus_optimizer(trainer.model, optimizer_cls, lr=trainer.args.learning_rate,
                                                      loraplus_lr_ratio=recipe.lora.loraplus_lr_ratio, **kwargs)
    trainable, total = model_mod.trainable_parameters(trainer.model)
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
                  highlight=False)
    if packing:
        rows = len(trainer.train_dataset)
        console.print(f"packing: {prepared.rows['train']} examples in {rows} rows of up to "
                      f"{recipe.data.max_length} tokens ({prepared.train.tokens / (rows * recipe.data.max_length):.0%}"
                      " full; padding-free, positions restart per example)", highlight=False)
    return trainer, progress


def _details(trainer, output, progress, prepared, tokenizer, precision, packing, eval_loss, eos_ids,
             parameters: tuple[int, int], trust_remote_code: bool = False) -> dict:
    """The figures that go into manifest.json, the model card and the summary."""
    losses = progress.losses()
    memory = memory_record(precision.device)
    runtime = output.metrics["train_runtime"]
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    trainable, total = parameters
    return {
        "precision": precision.dtype, "device": _device_name(precision),
        "trust_remote_code": trust_remote_code,
        "world_size": trainer.args.world_size,
        "engine": _engine(trainer),
        "global_batch": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size,
        "trainable_parameters": trainable, "total_parameters": total,
        "data": {"format": prepared.format, "chat_template": prepared.template, "rows": prepared.rows,
                 "sources": prepared.sources, "fingerprints": prepared.fingerprints,
                 "truncated": prepared.train.truncated, "dropped": prepared.train.drops,
                 "bad_rows_skipped": len(prepared.bad_rows), "packing": packing},
        "chat_template_sha256": run_files.template_hash(tokenizer),
        "end_of_turn_token": tokenizer.convert_ids_to_tokens(prepared.end_of_turn_id),
        "eos_token_ids": eos_ids, "peak_memory": _peak_memory(memory), "memory": memory,
        "results": {
            "steps": trainer.state.global_step, "train_runtime_s": round(runtime, 2),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "eval_loss": round(eval_loss, 4) if eval_loss is not None else None,
            "tokens_seen": tokens, "tokens_per_s": round(tokens / runtime, 1),
        },
    }


def _report_data(console: Console, prepared: data_mod.PreparedData, recipe: Recipe) -> None:
    split = prepared.train
    console.print(f"data: {prepared.rows['train']} train / {prepared.rows['eval']} eval examples "
                  f"({prepared.format}, chat template: {prepared.template}), "
                  f"{split.trained_tokens:,} of {split.tokens:,} train tokens trained"
                  f"{' (preprocessing cache)' if prepared.cached else ''}", highlight=False)
    if len(prepared.sources) > 1:
        console.print("mix: " + ", ".join(f"{s['source']} {s['used']} of {s['examples']}" for s in prepared.sources),
                      highlight=False)
    if prepared.bad_rows:
        console.print(f"[yellow]warning:[/] skipped {len(prepared.bad_rows)} malformed rows "
                      f"(data.on_bad_rows: skip); first: {prepared.bad_rows[0]}", highlight=False)
    if split.truncated or split.dropped:
        why = "; ".join(f"{n} {reason}" for reason, n in split.drops.items())
        console.print(f"[yellow]warning:[/] data.max_length={recipe.data.max_length}: {split.truncated} training "
                      f"examples truncated, {split.dropped} dropped{f' ({why})' if why else ''}", highlight=False)


def _engine(trainer) -> str:
    """How the processes share the work, as accelerate runs it: DDP, FSDP (with its version), DeepSpeed, or one."""
    kind = str(trainer.accelerator.distributed_type).split(".")[-1]
    if kind == "FSDP":
        plugin = trainer.accelerator.state.fsdp_plugin
        return f"FSDP{getattr(plugin, 'fsdp_version', '')}"
    return {"MULTI_CPU": "DDP", "MULTI_GPU": "DDP", "DEEPSPEED": "DeepSpeed", "NO": "single process"}.get(kind, kind)


def _disk_full(exc: BaseException, run_dir: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(run_dir).free < 1 << 20
    except OSError:
        return False


def _device_name(precision: model_mod.Precision) -> str:
    if precision.device == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return f"cpu ({os.cpu_count()} cores)"


def memory_record(device: str) -> dict:
    """This process's peak memory, for the manifest and for comparing with `lorakit plan`. On CUDA: the peak
    of live tensors (allocated), of the allocator's pool (reserved), and what the device holds outside the pool
    now (CUDA context, library workspaces; other processes' memory too, when the GPU is shared)."""
    gib = 2**30
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3),
                "outside_allocator_gib": round((total - free - torch.cuda.memory_reserved()) / gib, 3),
                "device_gib": round(total / gib, 2)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def _peak_memory(memory: dict) -> str:
    if "peak_allocated_gib" in memory:
        return f"{memory['peak_allocated_gib']:.2f} GiB GPU (allocator pool {memory['peak_reserved_gib']:.2f} GiB)"
    return f"{memory['peak_rss_gib']:.2f} GiB RSS"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
