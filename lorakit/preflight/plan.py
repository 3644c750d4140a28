"""`lorakit plan`: the memory one GPU needs for a recipe, and how long it will train, from the model's config
alone (no weights).

The model is built on the meta device from its config and the recipe's LoRA adapter is attached there by peft
itself, so every parameter count is exact: base weights as they are stored (NF4: packed 4-bit data, one absmax
per block of 64, with double quantization 8-bit absmax and one fp32 constant per 256 blocks, plus the codebooks;
the layers bitsandbytes leaves unquantized in the dtype the QLoRA preparation leaves them in), LoRA parameters,
their gradients and optimizer state. Activations, the logits buffer and the framework overhead are estimates,
each stated with its assumption. Engines divide what they shard: FSDP and ZeRO-3 the weights, gradients and
optimizer state; ZeRO-2 gradients and optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lorakit.errors import LorakitError
from lorakit.model import engines
from lorakit.model import setup as setup_mod
from lorakit.model.engines import Engine
from lorakit.model.setup import Setup
from lorakit.recipe.schema import OBJECTIVE_FACTS, Recipe

GIB = 2**30
BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes 4-bit blocks (transformers' default) and double-quant blocks
CUDA_CONTEXT = int(0.75 * GIB)  # CUDA context, cuBLAS workspace, kernels: measured 0.5-1 GiB on recent drivers
ALLOCATOR_SLACK = 0.10  # the caching allocator's fragmentation, as a share of what is allocated
ASSUMED_MFU = 0.35  # for the time estimate: model FLOPs utilisation of a tuned LoRA run on one GPU
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_8BIT_OPTIMIZERS = ("8bit",)


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """GPU bytes of one NF4-quantized weight: what bitsandbytes' Params4bit and QuantState hold."""
    blocks = math.ceil(numel / BLOCK)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the NF4 codebook, fp32
    if not double_quant:
        return packed + 4 * blocks + code
    # absmax quantized to 8 bits; per 256 of them one fp32 absmax, a 256-entry fp32 codebook, one fp32 offset
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + 4 + code


@dataclass
class Line:
    name: str
    bytes: int
    note: str
    exact: bool = False


@dataclass
class MemoryPlan:
    model: str
    engine: str
    processes: int
    dtype: str
    micro_batch: int
    sequence: int
    lines: list[Line]
    parameters: dict
    gpu_memory: int | None = None
    suggestions: list[dict] = field(default_factory=list)
    time: dict | None = None

    @property
    def total(self) -> int:
        return sum(line.bytes for line in self.lines)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "engine": self.engine,
            "processes": self.processes,
            "dtype": self.dtype,
            "micro_batch": self.micro_batch,
            "sequence": self.sequence,
            "parameters": self.parameters,
            "per_gpu": [
                {
                    "name": ln.name,
                    "bytes": ln.bytes,
                    "gib": round(ln.bytes / GIB, 3),
                    "exact": ln.exact,
                    "note": ln.note,
                }
                for ln in self.lines
            ],
            "total_gib": round(self.total / GIB, 3),
            "gpu_memory_gib": None if self.gpu_memory is None else round(self.gpu_memory / GIB, 3),
            "fits": self.fits,
            "suggestions": self.suggestions,
            "time": self.time,
        }


@dataclass(frozen=True)
class Counts:
    """Exact parameter counts of the base and of the adapter, from the meta-device model."""

    quantized: list[int]  # numel of each linear weight bitsandbytes would quantize
    other: int  # every other base parameter (embeddings, norms, biases, lm_head)
    lora: int  # trainable adapter parameters
    total: int  # all base parameters
    layers: int
    hidden: int
    intermediate: int
    kv_hidden: int
    heads: int
    vocab: int
    targets: dict = field(default_factory=dict)  # module name -> how many layers got an adapter


def count(recipe: Recipe) -> Counts:
    """Build the base on the meta device from its config and attach the recipe's adapter with peft."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.model import base as model_mod
    from lorakit.model import peft_methods as methods

    cfg = recipe.model
    config = AutoConfig.from_pretrained(
        model_mod.source(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    output = base.get_output_embeddings()
    quantized, other = [], 0
    for module in base.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Linear) and name == "weight" and module is not output:
                quantized.append(param.numel())
    total = sum(p.numel() for p in base.parameters())
    other = total - sum(quantized)
    if recipe.method in ("lora", "adalora") and cfg.adapter is None:
        model_mod.check_target_modules(base, recipe.lora)
    new_ids = []
    if cfg.new_special_tokens:  # the grown vocabulary: new input rows train, and the output layer in full
        tokenizer = model_mod.load_tokenizer(cfg)
        new_ids = tokenizer.convert_tokens_to_ids(cfg.new_special_tokens)
        with torch.device("meta"):
            model_mod.grow_embeddings(base, len(tokenizer))
    if cfg.adapter is not None:  # the run continues this adapter: its own config says what trains
        from peft import PeftConfig

        from lorakit.recipe.loading import missing_adapter

        if missing_adapter(recipe):
            raise LorakitError(missing_adapter(recipe))

        peft_config = PeftConfig.from_pretrained(cfg.adapter)
        peft_config.inference_mode = False
    else:
        peft_config = methods.peft_config(recipe, base, new_ids)
    with torch.device("meta"):
        tuned = get_peft_model(base, peft_config)
    lora = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    targets: dict[str, int] = {}
    for name, module in tuned.named_modules():
        if hasattr(module, "lora_A") or hasattr(module, "ia3_l"):
            targets[name.rsplit(".", 1)[-1]] = targets.get(name.rsplit(".", 1)[-1], 0) + 1
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1)
    hidden = text.hidden_size
    kv = getattr(text, "num_key_value_heads", None) or heads
    return Counts(
        quantized,
        other,
        lora,
        total,
        text.num_hidden_layers,
        hidden,
        getattr(text, "intermediate_size", 4 * hidden),
        hidden * kv // heads,
        heads,
        text.vocab_size,
        targets,
    )


def estimate(
    recipe: Recipe, counts: Counts, setup: Setup, *, processes: int, gpu_memory: int | None = None
) -> MemoryPlan:
    """The per-GPU breakdown for `recipe` (its micro-batch, sequence, checkpointing) with the decisions of
    `setup` (`lorakit.model.setup.for_plan`: engine, dtype, 4-bit base, optimizer, fused loss).

    Long on purpose: one formula sheet read top to bottom, each memory term computed next to the line that
    shows it, over sizes every term shares; split up, the terms would be checked against docs/plan.md in
    several places instead of one."""
    engine, dtype, four_bit, fused_loss = setup.engine, setup.precision.dtype, setup.four_bit, setup.liger
    compute = _BYTES[dtype]
    train = recipe.train
    b, s = train.per_device_train_batch_size, recipe.data.max_length
    facts = OBJECTIVE_FACTS[train.objective]
    pairs = facts.sides == 2  # a pair trainer's micro-batch runs both sides of each pair: 2 b sequences
    b *= facts.sides
    h, f, kv, layers, vocab = counts.hidden, counts.intermediate, counts.kv_hidden, counts.layers, counts.vocab
    sharded = engine.shards_parameters
    weights_split = processes if sharded else 1
    state_split = processes if engine.kind == "fsdp" or (engine.kind == "deepspeed" and engine.zero_stage >= 2) else 1
    lines = []

    offloaded = engine.kind == "fsdp" and engine.offload
    if offloaded:  # FSDP keeps parameters, gradients and optimizer state in CPU memory; one layer (+ prefetch) on GPU
        weights_split = state_split = max(counts.layers / 2, 1)
    split_note = (
        " (offloaded to CPU memory; about two layers on the GPU at a time)"
        if offloaded
        else f" (1/{processes}: sharded)"
        if weights_split > 1
        else ""
    )
    if four_bit:
        double = recipe.model.quantization.bnb_4bit_use_double_quant
        packed = sum(nf4_bytes(n, double) for n in counts.quantized)
        # the QLoRA preparation upcasts every unquantized parameter to fp32 (not under FSDP/ZeRO-3, see model/base.py)
        other_bytes = counts.other * (compute if sharded else 4)
        lines.append(
            Line(
                "base weights (NF4)",
                int(packed / weights_split),
                f"{len(counts.quantized)} linear weights, {sum(counts.quantized):,} parameters in NF4"
                f"{' with double quantization' if double else ''}{split_note}",
                exact=not offloaded,
            )
        )
        lines.append(
            Line(
                "base weights (unquantized)",
                int(other_bytes / weights_split),
                f"{counts.other:,} parameters (embeddings, norms, lm_head) in "
                f"{dtype if sharded else 'float32 (the QLoRA preparation upcasts them)'}{split_note}",
                exact=not offloaded,
            )
        )
    else:
        lines.append(
            Line(
                "base weights",
                int(counts.total * compute / weights_split),
                f"{counts.total:,} parameters in {dtype}{split_note}",
                exact=not offloaded,
            )
        )
    adapter_dtype = dtype if (four_bit and dtype != "float32") else "float32"  # trl: QLoRA adapters in bf16
    adapter = _BYTES[adapter_dtype]
    lines.append(
        Line(
            "adapter parameters",
            int(counts.lora * adapter / weights_split),
            f"{counts.lora:,} trainable parameters in {adapter_dtype}{split_note}",
            exact=not offloaded,
        )
    )
    lines.append(
        Line(
            "adapter gradients",
            int(counts.lora * adapter / state_split),
            f"{adapter_dtype}, one per parameter",
            exact=True,
        )
    )
    optim = setup.optimizer
    per_param = 2 if any(marker in optim for marker in _8BIT_OPTIMIZERS) else 8
    lines.append(
        Line(
            "optimizer state",
            int(counts.lora * per_param / state_split),
            f"{optim}: {per_param} bytes per trainable parameter"
            f"{' (paged: spills to CPU memory under pressure)' if 'paged' in optim else ''}",
            exact=True,
        )
    )

    per_token_layer = 22 * h + 4 * kv + 8 * f  # bytes per token inside one decoder layer (bf16 + fp32 norms)
    tokens = b * s
    if train.gradient_checkpointing:
        activations = tokens * (layers * 2 * h + per_token_layer)
        why = "checkpointed: each layer's input kept, one layer recomputed at a time"
    else:
        activations = tokens * layers * per_token_layer
        why = "every layer's activations kept"
    if recipe.model.attn_implementation == "eager":
        activations += b * counts.heads * s * s * 4 * (1 if train.gradient_checkpointing else layers)
        why += "; eager attention keeps the s x s scores"
    if four_bit:
        activations += max(counts.quantized) * compute  # one weight dequantized at a time
    lines.append(
        Line(
            "activations",
            activations,
            f"estimate for {b} x {s} tokens{' (chosen and rejected of each pair)' if pairs else ''} ({why}; "
            "flash/sdpa attention keeps no s x s scores)",
        )
    )
    if fused_loss or facts.fused_head:
        lines.append(
            Line(
                "logits and loss",
                tokens * h * 4,
                "trl's fused head: log-probabilities in chunks, never all the logits (estimate)"
                if facts.fused_head
                else "fused linear cross-entropy: chunks of logits, never all of them (estimate)",
            )
        )
    else:
        lines.append(
            Line(
                "logits and loss",
                tokens * vocab * (compute + 4 + 4),
                f"{b} x {s} x {vocab:,} logits in {dtype}, their fp32 copy for the loss and its gradient",
            )
        )
    allocated = sum(line.bytes for line in lines)
    lines.append(
        Line(
            "CUDA context and allocator",
            CUDA_CONTEXT + int(ALLOCATOR_SLACK * allocated),
            f"assumed: {CUDA_CONTEXT / GIB:.2f} GiB context + {ALLOCATOR_SLACK:.0%} fragmentation",
        )
    )
    return MemoryPlan(
        recipe.model.name_or_path,
        engine.name,
        processes,
        dtype,
        b,
        s,
        lines,
        {"base": counts.total, "quantized": sum(counts.quantized), "lora": counts.lora},
        gpu_memory=gpu_memory,
    )


def suggest(
    recipe: Recipe, counts: Counts, plan: MemoryPlan, setup: Setup, *, processes: int, largest_batch: bool = False
) -> list[dict]:
    """Changes that make a plan fit, each with its new estimate; the largest micro-batch with `largest_batch`.

    Long on purpose: the list of levers in the order they are tried (each a recipe change and its
    re-estimate), kept in one place so the order is visible."""
    if plan.gpu_memory is None:
        return []
    engine, dtype, fused_loss = setup.engine, setup.precision.dtype, setup.liger

    def option(change: str, changed: Recipe, *, engine=engine, processes=processes, fused_loss=fused_loss) -> dict:
        planned = setup_mod.for_plan(changed, engine=engine, dtype=dtype, fused_loss=fused_loss)
        new = estimate(changed, counts, planned, processes=processes, gpu_memory=plan.gpu_memory)
        return {"change": change, "total_gib": round(new.total / GIB, 2), "fits": new.fits}

    out = []
    train = recipe.train
    if not plan.fits:
        if not setup.four_bit:
            out.append(option("model.load_in_4bit: true (QLoRA)", _with(recipe, model={"load_in_4bit": True})))
        if not train.gradient_checkpointing:
            out.append(
                option("train.gradient_checkpointing: true", _with(recipe, train={"gradient_checkpointing": True}))
            )
        if not fused_loss:
            out.append(
                option("a fused loss: train.use_liger_kernel with liger-kernel installed", recipe, fused_loss=True)
            )
        batch = train.per_device_train_batch_size
        while batch > 1:
            batch //= 2
            accumulation = train.gradient_accumulation_steps * train.per_device_train_batch_size // batch
            result = option(
                f"train.per_device_train_batch_size: {batch}, train.gradient_accumulation_steps: "
                f"{accumulation} (same global batch)",
                _with(
                    recipe, train={"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation}
                ),
            )
            out.append(result)
            if result["fits"]:
                break
        shorter = recipe.data.max_length // 2
        if shorter >= 128:
            out.append(
                option(
                    f"data.max_length: {shorter} (longer examples are truncated or dropped)",
                    _with(recipe, data={"max_length": shorter}),
                )
            )
        for more in (2, 4, 8):
            if more > processes:
                out.append(
                    option(f"FSDP over {more} GPUs", recipe, engine=Engine("fsdp", fsdp_version=1), processes=more)
                )
        out.append(
            option(
                f"FSDP with parameters offloaded to CPU over {max(processes, 2)} GPUs "
                "(configs/accelerate/fsdp_qlora.yaml)",
                recipe,
                engine=Engine("fsdp", fsdp_version=1, offload=True),
                processes=max(processes, 2),
            )
        )
        if not any(item["fits"] for item in out):
            out.append(_combined(recipe, counts, plan, dtype=dtype, processes=processes, engine=engine))
    if largest_batch:
        best = None
        for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            changed = _with(recipe, train={"per_device_train_batch_size": batch})
            if not estimate(changed, counts, setup, processes=processes, gpu_memory=plan.gpu_memory).fits:
                break
            best = batch
        out.append(
            {
                "change": f"largest micro-batch that fits: {best}" if best else "no micro-batch fits",
                "micro_batch": best,
                "fits": best is not None,
            }
        )
    return out


def _combined(recipe: Recipe, counts: Counts, plan: MemoryPlan, *, dtype: str, processes: int, engine: Engine) -> dict:
    """No single change fits: add them up in order of cost to the run until one combination fits."""
    train = recipe.train
    changed = _with(
        recipe,
        model={"load_in_4bit": True},
        train={
            "gradient_checkpointing": True,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": train.gradient_accumulation_steps * train.per_device_train_batch_size,
        },
    )
    steps = [
        "model.load_in_4bit: true",
        "train.gradient_checkpointing: true",
        "train.per_device_train_batch_size: 1 (accumulation keeps the global batch)",
        "a fused loss",
    ]
    layouts = [(engine, processes, None)] + [
        (Engine("fsdp", fsdp_version=1), n, f"FSDP over {n} GPUs") for n in (2, 4, 8) if n > processes
    ]
    layouts += [
        (Engine("fsdp", fsdp_version=1, offload=True), n, f"FSDP with CPU offload over {n} GPUs")
        for n in (2, 4, 8)
        if n >= processes
    ]
    new = None
    for layout, count_, label in layouts:
        planned = setup_mod.for_plan(changed, engine=layout, dtype=dtype, fused_loss=True)
        new = estimate(changed, counts, planned, processes=count_, gpu_memory=plan.gpu_memory)
        if new.fits:
            return {
                "change": "together: " + ", ".join(steps + ([label] if label else [])),
                "total_gib": round(new.total / GIB, 2),
                "fits": True,
            }
    return {
        "change": "nothing lorakit can change fits this model in this memory: use GPUs with more memory",
        "total_gib": round(new.total / GIB, 2),
        "fits": False,
    }


def training_time(
    plan: MemoryPlan,
    counts: Counts,
    train_tokens: int,
    epochs: float,
    peak_flops: float | None,
    tokens_per_s: float | None,
    no_grad_forwards: int = 0,
) -> dict | None:
    """Hours for the recipe's tokens, from a measured tokens/s, or from the GPU's peak FLOP/s at ASSUMED_MFU.
    `no_grad_forwards`: forward passes over every token without gradients besides the one that trains (the
    reference model's; KTO's mismatched KL completions), `train_tokens` counting both sides of every pair."""
    basis = f"{tokens_per_s:,.0f} tokens/s per GPU (given)" if tokens_per_s else None
    if tokens_per_s is None:
        if peak_flops is None:
            return None
        attention = counts.layers * plan.sequence * counts.hidden
        per_token = 4 * counts.total + 6 * counts.lora + 6 * attention
        per_token += no_grad_forwards * (2 * counts.total + 2 * attention)
        tokens_per_s = ASSUMED_MFU * peak_flops / per_token
        basis = (
            f"{tokens_per_s:,.0f} tokens/s per GPU assumed: {ASSUMED_MFU:.0%} of {peak_flops / 1e12:,.0f} "
            "TFLOP/s (bf16 peak), 4 N + 6 N_lora + 6 L s d FLOPs per token"
            + (
                f" + {no_grad_forwards} x (2 N + 2 L s d) for the forward passes without gradients (reference"
                f"{', KL completions' if no_grad_forwards > 1 else ''})"
                if no_grad_forwards
                else ""
            )
        )
    seconds = train_tokens * epochs / (tokens_per_s * plan.processes)
    return {
        "tokens": train_tokens,
        "epochs": epochs,
        "seconds": round(seconds, 1),
        "hours": round(seconds / 3600, 3),
        "basis": basis,
    }


def _with(recipe: Recipe, **sections) -> Recipe:
    """A copy of the recipe with some keys of some sections changed."""
    update = {name: getattr(recipe, name).model_copy(update=values) for name, values in sections.items()}
    return recipe.model_copy(update=update)


def parse_size(text: str) -> int:
    """'24GiB', '80GB', '24' (GiB) -> bytes."""
    units = {"gib": GIB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "": GIB}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("gibmb")  # noqa: B005 (the unit letters, in any order)
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = None
    if unit not in units or value is None or value <= 0:
        raise ValueError(f"expected a size such as 24GiB, 80GB or 512MiB, got {text!r}")
    return int(value * units[unit])


def gpu_memory_option(text: str | None) -> int | None:
    """`--gpu-memory` in bytes."""
    try:
        return parse_size(text) if text else None
    except ValueError as exc:
        raise LorakitError(f"--gpu-memory: {exc}") from None


def run(
    recipe: Recipe,
    *,
    gpu_memory: int | None = None,
    gpus: int | None = None,
    largest_batch: bool = False,
    tokens_per_s: float | None = None,
    gpu_kind: str | None = None,
    with_time: bool = True,
    counts: Counts | None = None,
) -> MemoryPlan:
    """The plan for the GPUs this recipe will run on: its engine (distributed section), its precision (bf16
    unless model.dtype says otherwise), the fused loss when Liger will be used. `counts`: the recipe's
    `count()`, when the caller has it already."""
    import importlib.util

    import torch

    if recipe.distributed.accelerate_config:
        engine, config_processes = engines.from_accelerate_config(recipe.distributed.accelerate_config)
    else:
        engine, config_processes = Engine(), None
    processes = gpus or recipe.distributed.nproc or config_processes or 1
    if engine.kind in ("single", "ddp"):
        engine = Engine("ddp" if processes > 1 else "single")
    cuda = torch.cuda.is_available()
    if gpu_memory is None and cuda:
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    dtype = "bfloat16" if recipe.model.dtype == "auto" else recipe.model.dtype
    liger = recipe.train.use_liger_kernel
    fused = liger is True or (liger == "auto" and importlib.util.find_spec("liger_kernel") is not None)
    counts = counts or count(recipe)
    setup = setup_mod.for_plan(recipe, engine=engine, dtype=dtype, fused_loss=fused)
    result = estimate(recipe, counts, setup, processes=processes, gpu_memory=gpu_memory)
    result.suggestions = suggest(recipe, counts, result, setup, processes=processes, largest_batch=largest_batch)
    if with_time:
        result.time = _time(
            recipe,
            result,
            counts,
            setup.packing,
            tokens_per_s,
            gpu_kind or (torch.cuda.get_device_name() if cuda else None),
        )
    return result


def _time(
    recipe: Recipe, plan: MemoryPlan, counts: Counts, packing: bool, tokens_per_s: float | None, gpu_kind: str | None
) -> dict | None:
    """The training time of the recipe's tokens. With `train.max_steps` the epochs are the rows the steps
    draw over the rows there are: with packing, the rows trl's packing makes (as the trainer will), not the
    examples."""
    from trl.trainer.utils import get_peak_flops

    from lorakit import data as data_mod
    from lorakit.data import stats
    from lorakit.errors import LorakitError
    from lorakit.model import base as model_mod

    try:
        prepared = data_mod.prepare(recipe.data, model_mod.load_tokenizer(recipe.model), recipe.train.seed)
    except (LorakitError, OSError, ValueError) as exc:  # no tokenizer or data here: the plan stands without time
        return {"hours": None, "basis": f"no estimate: the data could not be tokenized ({str(exc).splitlines()[0]})"}
    peak = get_peak_flops(gpu_kind, "bfloat16") if gpu_kind else None
    epochs = recipe.train.num_train_epochs
    available = stats.packed_rows(prepared.train, recipe.data.max_length)["rows"] if packing else prepared.rows["train"]
    if prepared.train.pairs and OBJECTIVE_FACTS[recipe.train.objective].sides == 1:
        available *= 2  # KTO unpairs each pair into two rows
    if recipe.train.max_steps > 0:  # steps x global batch rows; with packing a row is up to max_length tokens
        drawn = (
            recipe.train.max_steps
            * recipe.train.per_device_train_batch_size
            * recipe.train.gradient_accumulation_steps
            * plan.processes
        )
        epochs = drawn / max(available, 1)
    found = training_time(
        plan,
        counts,
        prepared.train.tokens,
        epochs,
        peak,
        tokens_per_s,
        no_grad_forwards=OBJECTIVE_FACTS[recipe.train.objective].no_grad_forwards,
    )
    if found is None:
        return {"hours": None, "basis": "no estimate: give --gpu-kind (e.g. H100) or --tokens-per-s"}
    found["rows"] = available
    found["rows_are"] = "packed rows" if packing else "examples"
    return found


def show(plan: MemoryPlan, console) -> None:
    from rich.table import Table

    table = Table(
        title=f"{plan.model}: {plan.engine}, {plan.processes} GPU(s), {plan.dtype}, micro-batch "
        f"{plan.micro_batch} x {plan.sequence} tokens (per GPU)"
    )
    table.add_column("memory")
    table.add_column("GiB", justify="right")
    table.add_column("how")
    for line in plan.lines:
        table.add_row(line.name, f"{line.bytes / GIB:.2f}", ("exact: " if line.exact else "") + line.note)
    table.add_row("[bold]total", f"[bold]{plan.total / GIB:.2f}", "")
    console.print(table)
    if plan.gpu_memory is not None:
        verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
        console.print(
            f"{verdict} in {plan.gpu_memory / GIB:.1f} GiB per GPU ({100 * plan.total / plan.gpu_memory:.0f}% used)"
        )
    else:
        console.print("no GPU here and no --gpu-memory: give --gpu-memory 24GiB for a verdict")
    for item in plan.suggestions:
        mark = "[green]fits[/]" if item["fits"] else "[red]no[/]"
        size = f"{item['total_gib']:.2f} GiB" if "total_gib" in item else ""
        console.print(f"  {mark}  {item['change']}  {size}", highlight=False)
    if plan.time:
        hours = plan.time["hours"]
        when = (f"{hours:.1f} h" if hours >= 1 else f"{plan.time['seconds'] / 60:.1f} min") if hours is not None else ""
        console.print(
            (f"training time: about {when}" if hours is not None else "training time: ")
            + (
                f" ({plan.time['tokens']:,} tokens x {plan.time['epochs']:.3g} epochs of "
                f"{plan.time['rows']:,} {plan.time['rows_are']}; "
                if hours is not None
                else ""
            )
            + plan.time["basis"]
            + (")" if hours is not None else ""),
            highlight=False,
        )
