"""`lorakit train`: the only module that builds the trainer. Recipe in, complete run directory out.

`run` reads top to bottom as `Training`'s named steps: decide (the set-up, once), claim the directory,
prepare the data, load the model, build the trainer, train, finish. Order matters: everything that can be
refused cheaply (set-up, output directory, data) is checked before the base model's weights are loaded.
What a PEFT method adds is behind its object in lorakit.model.method_training.
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

from lorakit import data as data_mod
from lorakit import upstream
from lorakit.console import quiet_libraries
from lorakit.errors import Interrupted, RunFailed
from lorakit.model import base as model_mod
from lorakit.model import method_training, scoring, shards
from lorakit.model import peft_methods as methods
from lorakit.model import setup as setup_mod
from lorakit.recipe.schema import OBJECTIVE_KEYS, Recipe, TrainConfig
from lorakit.rundir import directory as run_files
from lorakit.train import distributed, objectives
from lorakit.train import resume as resume_mod
from lorakit.train import start as start_mod
from lorakit.train.progress import RunProgress, summary_table

# Recipe keys that are not passed to the trainer's config as they are.
_NOT_SFT = {
    "output_dir",
    "eval_strategy",
    "eval_steps",
    "optim",
    "hub_token",
    "run_name",
    "gradient_checkpointing",
    "packing",
    "save_total_limit",
    "use_liger_kernel",
    "ddp_backend",
    *TrainConfig.LORAKIT_ONLY,
    *OBJECTIVE_KEYS,
}


def trainer_config(recipe: Recipe, run_dir: Path, setup: setup_mod.Setup):
    """The objective's trl config (SFTConfig, DPOConfig, ...) from the recipe's `train:` section and the run's
    set-up."""
    config = objectives.config_class(recipe.train.objective)
    train = recipe.train
    values = train.model_dump(exclude=_NOT_SFT)
    eval_strategy = train.eval_strategy
    if eval_strategy == "auto":
        eval_strategy = "steps" if recipe.has_eval() else "no"
    # transformers 5.2x renamed gradient_checkpointing -> activation_checkpointing; recipes keep the known name.
    field_names = {f.name for f in dataclasses.fields(config)}
    checkpointing = (
        "activation_checkpointing" if "activation_checkpointing" in field_names else "gradient_checkpointing"
    )
    values[checkpointing] = train.gradient_checkpointing
    if "activation_offloading" not in field_names:  # trl.experimental's configs (the recipe refuses `true` there)
        values.pop("activation_offloading")
    if train.objective == "sft":  # whole examples only (they already fit max_length): padding-free, exact
        values.update(packing=setup.packing, packing_strategy="bfd")
    return config(
        **values,
        **objectives.objective_values(recipe),
        output_dir=str(run_dir / "checkpoints" / resume_mod.INCOMING),  # moved up a level once complete
        run_name=train.run_name or run_dir.name,
        optim=setup.optimizer,
        eval_strategy=eval_strategy,
        eval_steps=train.eval_steps or train.logging_steps * 5,
        use_liger_kernel=setup.liger,
        bf16=setup.precision.bf16,
        fp16=setup.precision.fp16,
        use_cpu=setup.precision.device == "cpu",
        logging_first_step=True,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        save_only_model=False,
        save_total_limit=None,  # lorakit rotates, and only after a newer checkpoint is complete (train/resume.py)
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


def run(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    use_cache: bool = True,
    resume: bool = False,
    force_resume: bool = False,
    resume_command: str | None = None,
    console: Console | None = None,
    callbacks: tuple = (),
    setup: setup_mod.Setup | None = None,
) -> TrainResult:
    """Train the recipe and write the complete run directory; with `resume`, continue the run in
    `train.output_dir` from its newest complete checkpoint. `setup`: this process's set-up when the caller
    resolved it already (`lorakit train` does, before its preflight)."""
    training = Training(recipe, console, resume_command)
    training.decide(resume, setup)  # everything refused cheaply comes first, before the directory is touched
    training.claim(overwrite, resume)
    training.prepare_data(use_cache, resume, force_resume)
    training.load_model()
    training.build_trainer(callbacks)
    training.train()
    return training.finish()


class Training:
    """One `lorakit train` run, step by step; each step reads what the earlier ones settled."""

    def __init__(self, recipe: Recipe, console: Console | None, resume_command: str | None):
        self.recipe = recipe
        self.console = console or Console(stderr=True, quiet=not distributed.is_main())  # one voice: the main one
        self.resume_command = resume_command or "lorakit train RECIPE --resume"
        self.started = time.perf_counter()
        self.method = method_training.for_recipe(recipe)
        self.checkpoint = None

    def decide(self, resume: bool, setup: setup_mod.Setup | None) -> None:
        """The set-up (precision, engine, optimizer, Liger, packing), decided once, and the method's refusals."""
        quiet_libraries()
        self.setup = setup or setup_mod.for_training(self.recipe, processes=distributed.local_processes())
        torch.set_num_threads(self.setup.threads.count)  # the intra-op pool, as decided for this machine
        if self.recipe.train.hub_token is not None:  # reaches the hub client without entering args or logs
            os.environ.setdefault("HF_TOKEN", self.recipe.train.hub_token.get_secret_value())
        if resume:
            self.method.check_resume()
        self.start = start_mod.find(self.recipe)  # the adapter this run continues (model.adapter), checked

    def claim(self, overwrite: bool, resume: bool) -> None:
        """The run directory: claimed (or the one to resume found) by the main process; the others wait."""
        recipe = self.recipe
        if resume:
            self.run_dir = resume_mod.run_to_resume(recipe.train.output_dir)
        elif distributed.is_main():
            self.run_dir = run_files.claim(recipe.train.output_dir, overwrite)
            run_files.write_recipe(self.run_dir, recipe)
        else:
            self.run_dir = Path(recipe.train.output_dir).expanduser().resolve()
        distributed.start(recipe.train.ddp_backend)
        distributed.barrier()  # the others go on once the main process has claimed the directory
        torch.manual_seed(recipe.train.seed)

    def prepare_data(self, use_cache: bool, resume: bool, force_resume: bool) -> None:
        """Tokenizer and data (the main process fills the cache, the others read it); on resume, the checks
        that the run can continue from its newest checkpoint."""
        recipe, console = self.recipe, self.console
        self.tokenizer = model_mod.load_tokenizer(recipe.model)  # with the recipe's new special tokens, if any
        with distributed.main_first():
            self.prepared = data_mod.prepare(recipe.data, self.tokenizer, recipe.train.seed, use_cache=use_cache)
        data_mod.check_objective(self.prepared, recipe.train.objective)
        _report_data(console, self.prepared, recipe)
        if self.start is not None:
            self.start.check_template(run_files.template_hash(self.tokenizer))
        # what checkpoints record and a resume must find unchanged: the data's content and the base's files
        self.fingerprints = {
            **self.prepared.fingerprints,
            **shards.base_fingerprints(Path(model_mod.source(recipe.model))),
        }
        if resume:
            self.checkpoint = resume_mod.check_resumable(
                self.run_dir, recipe.to_saved_dict(), self.fingerprints, force_resume, warn=console.print
            )
            if distributed.is_main():
                run_files.write_recipe(self.run_dir, recipe)
            console.print(f"resuming from {self.checkpoint.name}", highlight=False)

    def load_model(self) -> None:
        """The (4-bit) base, grown for new tokens (their rows train), prepared for training."""
        recipe, setup = self.recipe, self.setup
        self.console.print(setup.loading.describe(recipe.model.name_or_path), highlight=False)
        if setup.precision.device == "cpu" and "paged" in setup.optimizer:
            self.console.print(
                f"note: {setup.optimizer} pages optimizer state between GPU and CPU memory; on a CPU "
                "bitsandbytes keeps it in RAM (the 8-bit state is the same)",
                highlight=False,
            )
        base = model_mod.load_base(recipe.model, setup.loading, self.tokenizer)
        if recipe.method in ("lora", "adalora") and self.start is None:
            model_mod.check_target_modules(base, recipe.lora)
        self.quantized = model_mod.quantization_record(base) if setup.four_bit else None
        self.base = model_mod.prepare_for_training(base, setup.loading, recipe.train.gradient_checkpointing)
        if self.start is not None:
            self.console.print(f"continuing the adapter of {self.start.path}", highlight=False)
            self.base = self.start.load(self.base)
        self.attention = upstream.attention_implementation(self.base)

    def build_trainer(self, callbacks: tuple) -> None:
        """The trainer with the method's additions, lorakit's progress, and the guards that keep checkpoints
        trustworthy and stop on non-finite gradients."""
        new_token_ids = self.tokenizer.convert_tokens_to_ids(self.recipe.model.new_special_tokens or [])
        self.trainer, self.progress = _build_trainer(
            self.recipe,
            self.run_dir,
            self.setup,
            self.base,
            self.tokenizer,
            self.prepared,
            self.console,
            self.method,
            None if self.start else methods.peft_config(self.recipe, self.base, new_token_ids),
            self.checkpoint,
        )
        self.parameters = model_mod.trainable_parameters(self.trainer.model)  # before the engine shards them
        self.method.before_training(self.trainer, self.run_dir, distributed.is_main())
        for callback in callbacks:
            self.trainer.add_callback(callback)
        self.nonfinite = resume_mod.NonFiniteGuard(self.recipe.train.max_nonfinite_steps, self.console)
        self.guard = resume_mod.CheckpointGuard(
            self.fingerprints, self.recipe.train.save_total_limit, clock=self.progress.elapsed
        )
        self.trainer.add_callback(self.nonfinite)
        self.trainer.add_callback(self.guard)

    def train(self) -> None:
        """The training loop; a full disk, non-finite gradients or a signal end it, naming the checkpoint to
        resume from."""
        self.guard.install()
        try:
            self.trainer.train(resume_from_checkpoint=str(self.checkpoint) if self.checkpoint else None)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            if not _disk_full(exc, self.run_dir):
                raise
            raise RunFailed(
                f"the disk is full ({self.run_dir}); {self._last_checkpoint('complete')}. Free space "
                f"and resume with:\n  {self.resume_command}"
            ) from None
        finally:
            self.guard.uninstall()
        if self.nonfinite.stopped_at is not None:
            raise RunFailed(
                f"{self.recipe.train.max_nonfinite_steps} steps in a row ended with non-finite gradients "
                f"(the last at step {self.nonfinite.stopped_at}); the run stopped. "
                f"{self._last_checkpoint('good', 'No checkpoint was written')}; lower "
                "train.learning_rate or check the data before resuming"
            )
        if self.guard.exit_code is not None:
            signal = "SIGTERM" if self.guard.exit_code == 143 else "SIGINT"
            raise Interrupted(
                f"interrupted by {signal} at step {self.trainer.state.global_step}; "
                f"{self._last_checkpoint('', 'no checkpoint is complete')}. Resume with:\n  "
                f"{self.resume_command}",
                self.guard.exit_code,
            )

    def _last_checkpoint(self, kind: str, none: str = "no checkpoint is complete") -> str:
        """The newest complete checkpoint, in the words each stop uses (written once here)."""
        saved = next(iter(resume_mod.complete_checkpoints(self.run_dir / "checkpoints")), None)
        if saved is None:
            return none
        return f"{saved.name} is the last {kind} checkpoint" if kind else f"{saved.name} is complete"

    def finish(self) -> TrainResult:
        """The final eval loss, the adapter saved (every process takes part: FSDP and ZeRO-3 gather the
        shards), then, on the main process, the run directory completed and the summary printed."""
        trainer, recipe = self.trainer, self.recipe
        eval_loss, self.preference = self._final_eval()
        if self.setup.engine.kind == "fsdp":  # gather the adapter whole, as a standard PEFT adapter
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        objectives.drop_reference(trainer.model)
        trainer.save_model(str(self.run_dir))  # adapter + tokenizer with the chat template used
        if not trainer.is_world_process_zero():
            return TrainResult(self.run_dir, trainer.model)
        self.method.saved(trainer, self.run_dir)
        eos_ids = run_files.write_generation_config(
            self.run_dir, trainer.model, self.tokenizer, self.prepared.end_of_turn_id
        )
        details = _details(
            trainer,
            self.progress,
            self.prepared,
            self.tokenizer,
            self.setup.precision,
            self.setup.packing,
            eval_loss,
            eos_ids,
            self.parameters,
            recipe.model.trust_remote_code,
        )
        details.update(
            method=self.setup.method_name(recipe.method),
            load_in_4bit=self.setup.four_bit,
            quantization=self.quantized,
            optimizer=self.setup.optimizer,
            **self.method.details(trainer),
        )
        if self.setup.loading.gguf is not None:
            details["base_gguf"] = self.setup.loading.gguf.record()
        details["threads"] = {"torch": torch.get_num_threads(), "why": self.setup.threads.why}
        details["kernels"] = {
            "attention": self.attention,
            "liger": self.setup.liger,
            "packing": self.setup.packing,
            "gradient_checkpointing": recipe.train.gradient_checkpointing,
            "torch_compile": recipe.train.torch_compile,
        }
        details["objective"] = objectives.record(recipe, trainer.args, continued=self.start is not None)
        if self.start is not None:
            details["start_adapter"] = self.start.record()
        details["results"].update({f"eval_{name}": value for name, value in self.preference.items()})
        details["adapter_sha256"] = run_files.adapter_hashes(self.run_dir)  # readers check the adapter against it
        run_files.write_model_card(self.run_dir, recipe, details)
        run_files.write_manifest(self.run_dir, recipe, details)
        self.console.print(summary_table(self._summary(details)))
        return TrainResult(self.run_dir, trainer.model, details)

    def _final_eval(self) -> tuple[float | None, dict]:
        """The run's eval loss at its end, and for a preference objective its held-out preference figures
        (trl's evaluation: reward accuracy, margin, log-probabilities of both replies)."""
        if not self.prepared.eval:
            return None, {}
        if self.recipe.train.objective == "sft":
            return self._final_eval_loss(), {}
        metrics = self._logged_eval_at_the_last_step() or self.trainer.evaluate()
        figures = {
            name: round(float(metrics[f"eval_{key}"]), 4)
            for name, key in objectives.PREFERENCE_FIGURES.items()
            if f"eval_{key}" in metrics
        }
        return metrics["eval_loss"], figures

    def _logged_eval_at_the_last_step(self) -> dict | None:
        """The evaluation the trainer ran and logged at the run's last step, if it ran one (transformers
        evaluates at the end of a run with `eval_strategy: steps`): the weights have not changed since, so
        evaluating the held-out pairs again would repeat the same forward passes for the same figures."""
        state = self.trainer.state
        for logged in reversed(state.log_history):
            if logged.get("step") != state.global_step:
                return None
            if "eval_loss" in logged:
                return logged
        return None

    def _final_eval_loss(self) -> float:
        """The run's eval loss at its end with `lorakit eval`'s definition (lorakit.model.scoring: the mean
        per trained token), so the two agree for the same adapter and data. Every process computes it over
        the whole split, making the same forward calls (FSDP and ZeRO-3 gather weights in them)."""
        data, model = self.prepared.eval.dataset, self.trainer.model_wrapped
        was_training = model.training
        loss, _ = scoring.token_loss(
            model,
            data["input_ids"],
            data["labels"],
            self.tokenizer.pad_token_id or 0,
            self.recipe.train.per_device_eval_batch_size,
        )
        model.train(was_training)
        return loss

    def _summary(self, details: dict) -> dict:
        results, params, train = details["results"], details["trainable_parameters"], self.recipe.train
        gguf = details.get("base_gguf")
        return {
            "steps": results["steps"],
            "train time": f"{results['train_runtime_s']:.1f} s"
            + (
                f" (resumed at step {results['resumed_from_step']}; this part {time.perf_counter() - self.started:.1f} s)"
                if results["resumed_from_step"] is not None
                else ""
            ),
            "tokens/s": results["tokens_per_s"],
            "train loss": f"{_fmt(results['first_loss'])} -> {_fmt(results['last_loss'])}",
            "eval loss": _fmt(results["eval_loss"]),
            **(
                {"eval reward accuracy": f"{results['eval_reward_accuracy']:.1%} (margin {results['eval_margin']:.3g})"}
                if "eval_reward_accuracy" in results
                else {}
            ),
            "global batch": f"{details['global_batch']} ({train.per_device_train_batch_size} per device x "
            f"{train.gradient_accumulation_steps} accumulation x {details['world_size']} processes"
            f"{', ' + details['engine'] if details['world_size'] > 1 else ''})",
            "trainable params": f"{params:,} ({100 * params / details['total_parameters']:.3f}%)",
            **self.method.summary(details),
            "peak memory": details["peak_memory"],
            "adapter": str(self.run_dir),
            **({"base": f"{gguf['file']} (weights dequantized from {gguf['dequantized_from']} GGUF)"} if gguf else {}),
            **({"remote code": "ran (model.trust_remote_code)"} if self.recipe.model.trust_remote_code else {}),
        }


def _build_trainer(
    recipe: Recipe,
    run_dir: Path,
    setup: setup_mod.Setup,
    base,
    tokenizer,
    prepared,
    console: Console,
    method: method_training.MethodTraining,
    peft_config,
    checkpoint: Path | None = None,
):
    """SFTTrainer (or the method's subclass) over lorakit's pre-tokenized data, with lorakit's progress in
    place of the trainer's (continuing the figures of the run `checkpoint` resumes)."""
    from transformers.trainer_callback import PrinterCallback

    progress = RunProgress(
        run_dir / run_files.METRICS, console, resume_mod.resumed_at(checkpoint) if checkpoint else None
    )
    objective = recipe.train.objective
    model, peft_config = objectives.wrap(objective, base, peft_config)
    layout = objectives.layout(objective)
    trainer = objectives.trainer_class(objective, method)(
        model=model,
        args=trainer_config(recipe, run_dir, setup),
        processing_class=tokenizer,
        train_dataset=prepared.train.to_dataset(layout),
        eval_dataset=prepared.eval.to_dataset(layout) if prepared.eval else None,
        peft_config=peft_config,  # None when the base already holds the adapter (continued, or applied by wrap)
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)
    method.built(trainer)
    model_mod.match_adapter_precision(trainer.model, setup.precision)
    if recipe.lora.loraplus_lr_ratio:  # LoRA+: B matrices at ratio x the learning rate, through peft's helper
        from peft.optimizers import create_loraplus_optimizer

        optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
        kwargs.pop("lr", None)
        trainer.optimizer = create_loraplus_optimizer(
            trainer.model,
            optimizer_cls,
            lr=trainer.args.learning_rate,
            loraplus_lr_ratio=recipe.lora.loraplus_lr_ratio,
            **kwargs,
        )
    trainable, total = model_mod.trainable_parameters(trainer.model)
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)", highlight=False)
    if setup.packing:
        rows = len(trainer.train_dataset)
        console.print(
            f"packing: {prepared.rows['train']} examples in {rows} rows of up to "
            f"{recipe.data.max_length} tokens ({prepared.train.tokens / (rows * recipe.data.max_length):.0%}"
            " full; padding-free, positions restart per example)",
            highlight=False,
        )
    return trainer, progress


def _details(
    trainer,
    progress,
    prepared,
    tokenizer,
    precision,
    packing,
    eval_loss,
    eos_ids,
    parameters: tuple[int, int],
    trust_remote_code: bool = False,
) -> dict:
    """The figures that go into manifest.json, the model card and the summary."""
    losses = progress.losses()
    memory = memory_record(precision.device)
    runtime = progress.elapsed()  # the whole run's training time, earlier parts of a resumed run included
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    trainable, total = parameters
    return {
        "precision": precision.dtype,
        "device": _device_name(precision),
        "trust_remote_code": trust_remote_code,
        "world_size": trainer.args.world_size,
        "engine": _engine(trainer),
        "global_batch": trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "data": {
            "format": prepared.format,
            "chat_template": prepared.template,
            "rows": prepared.rows,
            "sources": prepared.sources,
            "fingerprints": prepared.fingerprints,
            "truncated": prepared.train.truncated,
            "dropped": prepared.train.drops,
            "bad_rows_skipped": len(prepared.bad_rows),
            "packing": packing,
        },
        "chat_template_sha256": run_files.template_hash(tokenizer),
        "end_of_turn_token": tokenizer.convert_ids_to_tokens(prepared.end_of_turn_id),
        "eos_token_ids": eos_ids,
        "peak_memory": _peak_memory(memory),
        "memory": memory,
        "results": {
            "steps": trainer.state.global_step,
            "train_runtime_s": round(runtime, 2),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "eval_loss": round(eval_loss, 4) if eval_loss is not None else None,
            "tokens_seen": tokens,
            "tokens_per_s": round(tokens / max(runtime, 1e-9), 1),
            "resumed_from_step": progress.resumed[0] if progress.resumed else None,
        },
    }


def _report_data(console: Console, prepared: data_mod.PreparedData, recipe: Recipe) -> None:
    split = prepared.train
    console.print(
        f"data: {prepared.rows['train']} train / {prepared.rows['eval']} eval examples "
        f"({prepared.format}, chat template: {prepared.template}), "
        f"{split.trained_tokens:,} of {split.tokens:,} train tokens trained"
        f"{' (preprocessing cache)' if prepared.cached else ''}",
        highlight=False,
    )
    if len(prepared.sources) > 1:
        console.print(
            "mix: " + ", ".join(f"{s['source']} {s['used']} of {s['examples']}" for s in prepared.sources),
            highlight=False,
        )
    if prepared.bad_rows:
        console.print(
            f"[yellow]warning:[/] skipped {len(prepared.bad_rows)} malformed rows "
            f"(data.on_bad_rows: skip); first: {prepared.bad_rows[0]}",
            highlight=False,
        )
    if split.truncated or split.dropped:
        why = "; ".join(f"{n} {reason}" for reason, n in split.drops.items())
        console.print(
            f"[yellow]warning:[/] data.max_length={recipe.data.max_length}: {split.truncated} training "
            f"examples truncated, {split.dropped} dropped{f' ({why})' if why else ''}",
            highlight=False,
        )


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
        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3),
            "outside_allocator_gib": round((total - free - torch.cuda.memory_reserved()) / gib, 3),
            "device_gib": round(total / gib, 2),
        }
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def _peak_memory(memory: dict) -> str:
    if "peak_allocated_gib" in memory:
        return f"{memory['peak_allocated_gib']:.2f} GiB GPU (allocator pool {memory['peak_reserved_gib']:.2f} GiB)"
    return f"{memory['peak_rss_gib']:.2f} GiB RSS"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
