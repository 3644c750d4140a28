"""The set-up of a command, decided once: how its base is loaded (`Loading`: precision and device from the
hardware, 4-bit or not and the BitsAndBytesConfig, the engine's placement) and, for training, the engine's
refusals, the optimizer, Liger and packing (`Setup`, from the model's config, before any weight is read).

Every command resolves it at its start and hands it down; the 4-bit toggle of a recipe is read here and in
the schema only. `lorakit check` and `lorakit train` share one resolution (`resolve`): check lists each
decision or why it cannot be made, train refuses with the first reason. `lorakit plan` resolves the same
decisions for the GPU it plans for (`for_plan`); merge, eval, generate and chat load through `for_loading`.

Exports `Loading`, `Setup`, `Threads`, `cpu_threads`, `Resolution`, `resolve`, `for_training`, `for_plan`, `for_loading`,
`engine_problems`, `optimizer_for`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.errors import LorakitError
from lorakit.model import engines
from lorakit.model import gguf as gguf_mod
from lorakit.model.base import (
    SINGLE,
    Precision,
    model_class_for,
    quantization_config,
    resolve_precision,
    use_liger,
    use_packing,
)
from lorakit.model.engines import Engine
from lorakit.recipe.schema import ModelConfig, Recipe


@dataclass(frozen=True)
class Loading:
    """How a base is loaded: its precision and device, the engine that places it, and its 4-bit config
    (None for a full-precision base)."""

    precision: Precision
    engine: Engine = SINGLE
    quantization: object | None = None  # transformers' BitsAndBytesConfig of a QLoRA base
    gguf: gguf_mod.GgufBase | None = None  # a GGUF base: its file and the checkpoint converted from it

    @property
    def four_bit(self) -> bool:
        return self.quantization is not None

    def describe(self, name: str) -> str:
        weights = "4-bit NF4" if self.four_bit else self.precision.dtype
        origin = f"; weights dequantized from {self.gguf.main_type} GGUF" if self.gguf else ""
        return f"loading {name} ({weights}, {self.precision.device}, compute {self.precision.dtype}{origin})"


def for_loading(
    cfg: ModelConfig, *, precision: Precision | None = None, engine: Engine = SINGLE, four_bit: bool | None = None
) -> Loading:
    """The loading of `cfg`'s base: the recipe's precision and 4-bit toggle unless given (a merge verifies in
    float32, a merged model's base is full precision)."""
    precision = precision or resolve_precision(cfg)
    four_bit = cfg.load_in_4bit if four_bit is None else four_bit
    quantization = quantization_config(cfg.quantization, precision, engine) if four_bit else None
    return Loading(precision, engine, quantization, gguf_mod.materialize(cfg) if gguf_mod.is_gguf(cfg) else None)


@dataclass(frozen=True)
class Threads:
    """torch's CPU threads per process, and why that many."""

    count: int
    why: str


def cpu_threads(processes: int, env=None) -> Threads:
    """OMP_NUM_THREADS when set (by you or the launcher); else the physical cores this process may use (its
    CPU affinity and cgroup quota) shared between the processes of the launch on this machine. torch's own
    default counts every core of the machine, which oversubscribes a container or a shared machine."""
    import os

    env = os.environ if env is None else env
    given = str(env.get("OMP_NUM_THREADS", "")).strip()
    if given.isdigit() and int(given) > 0:
        return Threads(int(given), f"OMP_NUM_THREADS={given}")
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        per_core = max((psutil.cpu_count() or 1) // (psutil.cpu_count(logical=False) or 1), 1)
    except ImportError:
        per_core = 1
    cores = max(logical // per_core, 1)
    quota = cgroup_cpus(_read("/sys/fs/cgroup/cpu.max"))
    why = f"{cores} physical cores available (CPU affinity)"
    if quota is not None and quota < cores:
        cores, why = quota, f"{quota} CPUs of cgroup quota"
    count = max(cores // max(processes, 1), 1)
    return Threads(count, f"{why} / {processes} process{'es' if processes != 1 else ''} on this machine")


def cgroup_cpus(text: str | None) -> int | None:
    """Whole CPUs of a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD" for none); at least one."""
    parts = (text or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        return max(int(int(parts[0]) / int(parts[1])), 1)
    except (ValueError, ZeroDivisionError):
        return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return None


@dataclass(frozen=True)
class Setup:
    """A training run's decisions; the trainer's arguments, the base's loading and the manifest read them."""

    loading: Loading
    optimizer: str
    liger: bool
    packing: bool
    threads: Threads = Threads(1, "not decided (a planned machine)")

    @property
    def precision(self) -> Precision:
        return self.loading.precision

    @property
    def engine(self) -> Engine:
        return self.loading.engine

    @property
    def four_bit(self) -> bool:
        return self.loading.four_bit

    def method_name(self, method: str) -> str:
        """The run's method as the manifest and card name it: LoRA on a 4-bit base is QLoRA."""
        return ("qlora" if self.four_bit else "lora") if method == "lora" else method


@dataclass
class Resolution:
    """Each decision of a training run on this machine, or the reason it cannot be made (in the order a
    run meets them), so that `lorakit check` can list every reason and `lorakit train` refuse with one."""

    engine: Engine | None = None
    precision: Precision | None = None
    loading: Loading | None = None
    optimizer: str | None = None
    liger: bool | None = None
    packing: bool | None = None
    threads: Threads | None = None
    problems: dict[str, LorakitError] = field(default_factory=dict)  # decision -> why it cannot be made

    def setup(self) -> Setup:
        """The decisions, or the first reason a run cannot start."""
        if self.problems:
            raise next(iter(self.problems.values()))
        return Setup(self.loading, self.optimizer, self.liger, self.packing, self.threads)


def optimizer_for(recipe: Recipe, engine: Engine) -> str:
    """The recipe's optimizer, else paged 8-bit AdamW for QLoRA on one process or DDP, plain AdamW where
    FSDP or DeepSpeed shard the optimizer state themselves (and bitsandbytes optimizers break their
    checkpoints)."""
    if recipe.train.optim:
        return recipe.train.optim
    if recipe.model.load_in_4bit and engine.kind in ("single", "ddp"):
        return "paged_adamw_8bit"
    return "adamw_torch"


def engine_problems(
    recipe: Recipe, engine: Engine, *, cuda: bool, dtype: str | None = None, processes: int = 1, gpus: int | None = None
) -> None:
    """Refuse, with every reason at once, what `engine` cannot run (lorakit.model.engines' rules), with the
    recipe's 4-bit toggle and optimizer as decided here."""
    engines.check(
        recipe,
        engine,
        cuda=cuda,
        dtype=dtype,
        processes=processes,
        gpus=gpus,
        four_bit=recipe.model.load_in_4bit,
        optimizer=optimizer_for(recipe, engine),
    )


def planned_engine(recipe: Recipe) -> Engine:
    """The engine of this process's launch, or, before any launch, the one the recipe's accelerate config asks for."""
    engine = engines.from_environment()
    if engine.kind in ("single", "ddp") and recipe.distributed.accelerate_config:
        engine = engines.from_accelerate_config(recipe.distributed.accelerate_config)[0]
    return engine


def resolve(recipe: Recipe, *, processes: int = 1, engine: Engine | None = None) -> Resolution:
    """Every decision for a run of `processes` processes on this machine under `engine` (else the planned one)."""
    import torch

    out = Resolution()

    def decide(name: str, body):
        try:
            return body()
        except LorakitError as exc:
            out.problems.setdefault(name, exc)
        except OSError as exc:  # an unreachable model or tokenizer
            out.problems.setdefault(name, LorakitError(f"{recipe.model.name_or_path}: {exc}"))
        return None

    cuda = torch.cuda.is_available()
    out.threads = cpu_threads(processes)
    out.precision = decide("precision", lambda: resolve_precision(recipe.model))
    out.engine = engine or decide("engine", lambda: planned_engine(recipe))
    if out.engine is not None:
        dtype = out.precision.dtype if out.precision else None
        gpus = torch.cuda.device_count() if cuda else None
        checked = decide(
            "engine",
            lambda: engine_problems(recipe, out.engine, cuda=cuda, dtype=dtype, processes=processes, gpus=gpus) or True,
        )
        optimizer = optimizer_for(recipe, out.engine)
        if checked and decide("optimizer", lambda: engines.check_optim(optimizer) or True):
            out.optimizer = optimizer
    if out.precision is not None and out.engine is not None:
        out.loading = decide("precision", lambda: for_loading(recipe.model, precision=out.precision, engine=out.engine))
    model = decide("model", lambda: model_class_for(recipe.model))
    if model is not None:
        model_class, model_type = model
        if out.precision is not None:
            out.liger = decide("liger", lambda: _liger(recipe, out.precision, model_type))
        out.packing = decide("packing", lambda: packing_for(recipe, model_class, model_type))
    return out


def _liger(recipe: Recipe, precision: Precision, model_type: str) -> bool:
    """Liger as the model and machine allow; never under a preference objective (trl's preference trainers
    compute log-probabilities with their own fused head; the recipe refuses `true` there)."""
    setting = recipe.train.use_liger_kernel
    return setting is not False and recipe.train.objective == "sft" and use_liger(setting, precision, model_type)


def packing_for(recipe: Recipe, model_class: type, model_type: str | None) -> bool:
    """Packing as the model allows; never under a preference objective (trl pads each pair)."""
    return recipe.train.objective == "sft" and use_packing(recipe.train.packing, model_class, model_type, recipe.method)


def for_training(recipe: Recipe, *, processes: int, engine: Engine | None = None) -> Setup:
    """The set-up of a run of `processes` processes on this machine, refusing what would fail under its engine."""
    return resolve(recipe, processes=processes, engine=engine or engines.from_environment()).setup()


def for_plan(recipe: Recipe, *, engine: Engine, dtype: str, fused_loss: bool) -> Setup:
    """The set-up `lorakit plan` plans for: a CUDA GPU training in `dtype` under `engine`, with Liger's fused
    loss or not (the planned machine, not this one, decides it); packing as the model allows."""
    precision = Precision(dtype, "cuda")
    model_class, model_type = model_class_for(recipe.model)
    packing = packing_for(recipe, model_class, model_type)
    return Setup(
        for_loading(recipe.model, precision=precision, engine=engine),
        optimizer_for(recipe, engine),
        fused_loss,
        packing,
    )
