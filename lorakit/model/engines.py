"""How several processes share a run (DDP, FSDP, DeepSpeed ZeRO), and what each engine asks of a recipe.

The engine is accelerate's: an accelerate config file (`distributed.accelerate_config`, or the one given
to `accelerate launch`) picks it, accelerate's launcher passes it to every process through the
environment, and the trainer's Accelerator builds it. lorakit reads the same two places, before any
weights are loaded, to

- refuse what cannot work, before N processes start: FSDP or DeepSpeed without CUDA GPUs (accelerate
  would quietly run plain DDP), 4-bit weights stored as integers under a parameter-sharding engine
  (FSDP cannot flatten them), bitsandbytes optimizers where the engine breaks them, settings the
  DeepSpeed JSON contradicts;
- load the base the way the engine needs it (storage dtype of the 4-bit weights, device placement,
  no upcasting of norms into a second dtype), see `lorakit.model.base`.

Reads only files and environment variables (and torch.cuda, when asked by the caller).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.recipe.schema import OBJECTIVE_FACTS, QuantizationConfig, Recipe

# transformers' optimizer names that are bitsandbytes optimizers.
_BNB_OPTIMIZERS = frozenset(
    {
        "adamw_bnb_8bit",
        "adamw_8bit",
        "ademamix",
        "ademamix_8bit",
        "lion_8bit",
        "lion_32bit",
        "paged_adamw_32bit",
        "paged_adamw_8bit",
        "paged_ademamix_32bit",
        "paged_ademamix_8bit",
        "paged_lion_32bit",
        "paged_lion_8bit",
        "rmsprop_bnb",
        "rmsprop_bnb_8bit",
        "rmsprop_bnb_32bit",
    }
)
# DeepSpeed JSON keys the trainer fills from the recipe when they are "auto", and the recipe key each must match.
_DS_MATCHING = {
    "train_micro_batch_size_per_gpu": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "max_grad_norm",
}


_MIXED = {"bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Engine:
    """The engine the processes of a run share."""

    kind: str = "single"  # single | ddp | fsdp | deepspeed
    fsdp_version: int = 0
    zero_stage: int = 0
    offload: bool = False  # FSDP parameters, or DeepSpeed optimizer state / parameters, kept in CPU memory
    fsdp_activation_checkpointing: bool = False
    fsdp_use_orig_params: bool = False  # FSDP1: flat parameters keep each original parameter's requires_grad
    deepspeed_config: dict | None = None  # the DeepSpeed JSON, when there is one
    mixed_precision: str = "no"  # accelerate's mixed_precision (no | bf16 | fp16 | fp8)
    source: str = "the launch environment"

    @property
    def name(self) -> str:
        if self.kind == "fsdp":
            return f"FSDP{self.fsdp_version}"
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return {"single": "single process", "ddp": "DDP"}[self.kind]

    @property
    def shards_parameters(self) -> bool:
        """FSDP and ZeRO-3 split each parameter across processes: every weight must be a float of one dtype."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)


def _flag(env, key: str) -> bool:
    return str(env.get(key, "false")).strip().lower() in ("1", "true", "yes")


def from_environment(env=None) -> Engine:
    """The engine of this process, from the variables `accelerate launch` (or torchrun) set."""
    env = os.environ if env is None else env
    mixed = str(env.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return Engine(
            "fsdp",
            fsdp_version=int(env.get("FSDP_VERSION", "1")),
            offload=_flag(env, "FSDP_OFFLOAD_PARAMS"),
            fsdp_activation_checkpointing=_flag(env, "FSDP_ACTIVATION_CHECKPOINTING"),
            fsdp_use_orig_params=_flag(env, "FSDP_USE_ORIG_PARAMS"),
            mixed_precision=mixed,
        )
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        ds = _read_deepspeed_json(config_file, "ACCELERATE_DEEPSPEED_CONFIG_FILE") if config_file else None
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or _zero(ds).get("stage", 0))
        offload = any(
            env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none") not in ("none", "")
            for what in ("OPTIMIZER", "PARAM")
        ) or _ds_offloads(ds)
        return Engine("deepspeed", zero_stage=stage, offload=offload, deepspeed_config=ds, mixed_precision=mixed)
    return Engine("ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single", mixed_precision=mixed)


def from_accelerate_config(path: str) -> tuple[Engine, int | None]:
    """The engine an accelerate config file asks for, and its process count (None when it sets none)."""
    if not Path(path).is_file():
        raise LorakitError(f"distributed.accelerate_config: file not found: {path}")
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        config = load_config_from_file(path)
    except (ValueError, TypeError, KeyError) as exc:
        raise LorakitError(f"{path}: not a valid accelerate config: {exc}") from None
    where = f"accelerate config {path}"
    mixed = str(getattr(config, "mixed_precision", None) or "no").lower()
    kind = str(getattr(config, "distributed_type", "NO")).split(".")[-1]
    processes = config.num_processes if getattr(config, "num_processes", -1) and config.num_processes > 0 else None
    if kind == "FSDP":
        fsdp = config.fsdp_config or {}
        return Engine(
            "fsdp",
            fsdp_version=int(fsdp.get("fsdp_version", 1)),
            offload=bool(fsdp.get("fsdp_offload_params")),
            fsdp_activation_checkpointing=bool(fsdp.get("fsdp_activation_checkpointing")),
            fsdp_use_orig_params=bool(fsdp.get("fsdp_use_orig_params")),
            mixed_precision=mixed,
            source=where,
        ), processes
    if kind == "DEEPSPEED":
        options = config.deepspeed_config or {}
        ds = None
        if options.get("deepspeed_config_file"):
            ds = _read_deepspeed_json(
                options["deepspeed_config_file"], f"{path}: deepspeed_config.deepspeed_config_file"
            )
        stage = int(options.get("zero_stage") or _zero(ds).get("stage", 0))
        offload = any(
            str(options.get(key, "none")) != "none" for key in ("offload_optimizer_device", "offload_param_device")
        ) or _ds_offloads(ds)
        return Engine(
            "deepspeed", zero_stage=stage, offload=offload, deepspeed_config=ds, mixed_precision=mixed, source=where
        ), processes
    if kind in ("MULTI_GPU", "MULTI_CPU", "NO"):
        return Engine("ddp", mixed_precision=mixed, source=where), processes
    raise LorakitError(f"{path}: distributed_type {kind} is not one lorakit runs (DDP, FSDP or DeepSpeed)")


def _process_placement(recipe: Recipe, engine: Engine, cuda: bool, processes: int, gpus: int | None) -> list[str]:
    """One process per GPU: NCCL refuses two processes on one device ("Duplicate GPU detected"), and FSDP and
    DeepSpeed shard across devices; only gloo DDP may share a GPU."""
    backend = recipe.train.ddp_backend
    if backend == "nccl" and not cuda:
        return ["train.ddp_backend: nccl needs CUDA GPUs and none was found; leave it unset (gloo on CPUs)"]
    if not cuda or gpus is None or processes <= gpus:
        return []
    many = f"{processes} processes on this machine's {gpus} GPU{'s' if gpus != 1 else ''}"
    if engine.kind in ("fsdp", "deepspeed"):
        return [f"{many}: {engine.name} runs one process per GPU; start at most {gpus} (--nproc {gpus})"]
    if backend == "gloo":
        return []
    return [
        f'{many}: NCCL cannot put two processes on one GPU (it fails with "Duplicate GPU detected"); start '
        f"at most {gpus} (--nproc {gpus}), or set train.ddp_backend: gloo to share a GPU (slow: gradients are "
        "reduced through CPU memory)"
    ]


def _read_deepspeed_json(path: str, where: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorakitError(
            f"{where}: DeepSpeed config not found: {path} (relative paths are read from the "
            f"current directory, {os.getcwd()})"
        ) from None
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: a DeepSpeed config is a JSON object")
    return data


def _zero(ds: dict | None) -> dict:
    return (ds or {}).get("zero_optimization") or {}


def _ds_offloads(ds: dict | None) -> bool:
    zero = _zero(ds)
    return any(
        (zero.get(key) or {}).get("device", "none") not in ("none", None)
        for key in ("offload_optimizer", "offload_param")
    )


def is_bnb_optimizer(name: str) -> bool:
    return name in _BNB_OPTIMIZERS


def check_optim(name: str) -> None:
    from transformers.training_args import OptimizerNames

    known = [o.value for o in OptimizerNames]
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
        raise LorakitError(f"train.optim: unknown optimizer {name!r}{hint}")


def quant_storage(q: QuantizationConfig, engine: Engine, compute_dtype: str) -> str:
    """The dtype 4-bit weights are packed into: `auto` is uint8, except under FSDP or ZeRO-3 where it is
    the training dtype, so that the packed weights shard and flatten with every other parameter."""
    chosen = q.bnb_4bit_quant_storage
    if chosen != "auto":
        return chosen
    return compute_dtype if engine.shards_parameters else "uint8"


@dataclass(frozen=True)
class _Run:
    """What the rules know of the run besides its recipe: the machine, the decided dtype, 4-bit base and
    optimizer (lorakit.model.setup decides them), and where the engine came from (for the messages)."""

    cuda: bool
    dtype: str | None
    four_bit: bool
    optimizer: str
    where: str


def _precision_problems(recipe: Recipe, engine: Engine, run: _Run) -> list[str]:
    """mixed precision in the accelerate config against the run's dtype; engines that need CUDA or deepspeed."""
    problems = []
    wanted = _MIXED.get(engine.mixed_precision, engine.mixed_precision)
    if engine.mixed_precision != "no" and run.dtype is not None and wanted != run.dtype:
        problems.append(
            f"the accelerate config sets mixed_precision: {engine.mixed_precision}, but this run trains in "
            f"{run.dtype} (model.dtype: {recipe.model.dtype}{' on a machine without CUDA' if not run.cuda else ''})"
            f"{run.where}, and the trainer would autocast to {engine.mixed_precision} anyway. Set "
            "mixed_precision: 'no' there (lorakit picks the precision from model.dtype and the hardware) "
            "or model.dtype to match"
        )
    if engine.kind in ("fsdp", "deepspeed") and not run.cuda:
        problems.append(
            f"{engine.name} needs CUDA GPUs and none was found{run.where}: accelerate would run the "
            "processes as plain DDP, each holding the whole model. Use DDP (`--nproc N` without an "
            "accelerate config) here, or run on GPUs"
        )
    if engine.kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append(
            f"{engine.name} needs the `deepspeed` package, which is not installed{run.where}: pip install deepspeed"
        )
    return problems


def _method_problems(recipe: Recipe, engine: Engine, run: _Run) -> list[str]:
    """what a method or a new-token set-up cannot do under a sharding engine, or without CUDA."""
    problems = []
    if (
        recipe.model.new_special_tokens
        and engine.kind == "fsdp"
        and engine.fsdp_version == 1
        and not engine.fsdp_use_orig_params
    ):
        problems.append(
            f"model.new_special_tokens: only the new rows of the embedding train, and FSDP1 flattens "
            f"the embedding into one parameter that is trained whole or not at all{run.where}; set "
            "fsdp_use_orig_params: true in the accelerate config (peft's requirement), or use FSDP2"
        )
    if recipe.method == "adalora" and engine.shards_parameters:
        problems.append(
            f"method: adalora scores every singular value from its full gradient after each step and "
            f"penalises whole A and B matrices, which {engine.name} holds in shards{run.where}; use DDP"
        )
    objective = recipe.train.objective
    if OBJECTIVE_FACTS[objective].experimental and engine.shards_parameters:
        problems.append(
            f"train.objective: {objective} trains through trl.experimental's "
            f"{'ORPO' if objective == 'orpo' else 'CPO'}Trainer, which has none of the handling trl's DPO and KTO "
            f"trainers have for an adapter on parameters {engine.name} shards{run.where}; use DDP or ZeRO-1/2"
        )
    if recipe.lora.init_lora_weights == "loftq" and not run.cuda:
        problems.append(
            "lora.init_lora_weights: loftq needs a CUDA GPU: peft computes the decomposition of the "
            "quantization error there only (and none was found); use true or gaussian here"
        )
    if engine.shards_parameters and recipe.lora.moves_base_weights():
        problems.append(
            f"lora.init_lora_weights: {recipe.lora.init_lora_weights} rewrites the base weights at the start, which lorakit "
            f"does not do on weights {engine.name} has sharded{run.where}; use DDP, or true/gaussian"
        )
    return problems


def _storage_problems(recipe: Recipe, engine: Engine, run: _Run) -> list[str]:
    """4-bit storage a sharding engine cannot hold."""
    problems = []
    storage = recipe.model.quantization.bnb_4bit_quant_storage
    if run.four_bit and engine.shards_parameters and storage == "uint8":
        if engine.kind == "fsdp" and engine.fsdp_version == 2:
            what = (
                "accelerate then leaves the 4-bit weights out of the sharding, so every GPU holds the whole "
                "4-bit base and FSDP saves nothing on it"
            )
        elif engine.kind == "fsdp":
            what = (
                "FSDP flattens each wrapped block's parameters into one float tensor and fails with "
                '"Cannot flatten integer dtype tensors"'
            )
        else:
            what = "ZeRO-3 partitions every parameter as a float tensor and cannot hold integer-packed weights"
        problems.append(
            f"model.quantization.bnb_4bit_quant_storage: uint8 under {engine.name}{run.where}: {what}. "
            "Set it to `auto` (the training dtype) or bfloat16"
        )
    return problems


def _optimizer_problems(recipe: Recipe, engine: Engine, run: _Run) -> list[str]:
    """optimizer and checkpointing settings the engine (or its DeepSpeed JSON) contradicts."""
    problems = []
    optim = run.optimizer
    if engine.kind == "fsdp" and is_bnb_optimizer(optim):
        problems.append(
            f"train.optim: {optim} is a bitsandbytes optimizer, which fails when FSDP saves a "
            f"checkpoint{run.where}; FSDP already shards the optimizer state: use adamw_torch "
            "(the default under FSDP)"
        )
    if engine.kind == "deepspeed" and engine.offload and is_bnb_optimizer(optim):
        problems.append(
            f"train.optim: {optim} is a bitsandbytes optimizer, and the DeepSpeed config offloads to "
            f"the CPU, which needs DeepSpeed's own CPU Adam{run.where}: drop train.optim (or set an "
            "`optimizer` in the DeepSpeed JSON)"
        )
    if engine.kind == "fsdp" and engine.fsdp_activation_checkpointing and recipe.train.gradient_checkpointing:
        problems.append(
            f"train.gradient_checkpointing is on and the FSDP config turns on its own activation "
            f"checkpointing{run.where}; the trainer refuses both. Keep one: set "
            "train.gradient_checkpointing: false, or fsdp_activation_checkpointing: false"
        )
    ds = engine.deepspeed_config or {}
    if ds.get("optimizer") and recipe.train.optim:
        problems.append(
            f"train.optim is {recipe.train.optim} but the DeepSpeed config defines its own optimizer "
            f"({ds['optimizer'].get('type', '?')}), which would be used instead{run.where}; remove one"
        )
    for ds_key, recipe_key in _DS_MATCHING.items():
        value = ds.get(ds_key, "auto")
        wanted = getattr(recipe.train, recipe_key)
        if value != "auto" and value != wanted:
            problems.append(
                f"train.{recipe_key} is {wanted} but the DeepSpeed config sets {ds_key}: {value}{run.where}; "
                'set it to "auto" there so the recipe decides'
            )
    return problems


def check(
    recipe: Recipe,
    engine: Engine,
    *,
    cuda: bool,
    four_bit: bool,
    optimizer: str,
    dtype: str | None = None,
    processes: int = 1,
    gpus: int | None = None,
) -> None:
    """Refuse, with every reason at once, what would fail (or quietly do something else) under `engine`;
    `dtype` is the run's training dtype, when already known; `processes` the processes started on this
    machine and `gpus` its CUDA GPUs, when the caller knows them."""
    run = _Run(cuda, dtype, four_bit, optimizer, f" ({engine.source})")
    problems = _process_placement(recipe, engine, cuda, processes, gpus)
    for rules in (_precision_problems, _method_problems, _storage_problems, _optimizer_problems):
        problems += rules(recipe, engine, run)
    if problems:
        raise LorakitError("cannot run this recipe with " + engine.name + ":\n  " + "\n  ".join(problems))
