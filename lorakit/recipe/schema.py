"""The recipe schema: one pydantic class per recipe section.

Keys use the names of the library object each section becomes (transformers `from_pretrained` and
bitsandbytes under `model:`, peft `LoraConfig` under `lora:`, trl `SFTConfig` under `train:`), so users
can read upstream docs directly. `data:` is lorakit's own. Every class forbids unknown keys, and each
field's help text is written once, here, in its `description`: docs/recipe.md is generated from it.

This module owns validation of single fields and cross-field rules. Reading YAML files, line numbers
and `--set` overrides live in `lorakit.recipe.loading`. Nothing here imports torch or the HF stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from lorakit.recipe.peft_sections import (
    LORA_KEYS_FOR,
    METHOD_SECTIONS,
    PROMPT_LEARNING,
    AdaLoraSection,
    IA3Section,
    Method,
    MethodRules,
    PrefixTuningSection,
    PromptTuningSection,
)
from lorakit.recipe.section import Section

DType = Literal["auto", "bfloat16", "float16", "float32"]
_INIT_LORA = ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal")
REPORT_TO = (
    "none",
    "all",
    "tensorboard",
    "wandb",
    "mlflow",
    "comet_ml",
    "clearml",
    "dvclive",
    "neptune",
    "swanlab",
    "trackio",
    "azure_ml",
    "codecarbon",
    "dagshub",
    "flyte",
)


class QuantizationConfig(Section):
    """bitsandbytes 4-bit settings (`BitsAndBytesConfig` names); used when `model.load_in_4bit` is true."""

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: NF4 (QLoRA's normal-float, recommended) or FP4."
    )
    bnb_4bit_use_double_quant: bool = Field(
        True, description="Quantize the quantization constants too (saves about 0.4 bit per parameter)."
    )
    bnb_4bit_compute_dtype: DType = Field(
        "auto",
        description="dtype the 4-bit weights are dequantized to for matmuls; `auto` follows the "
        "training precision chosen from the hardware (bfloat16, float16 or float32).",
    )
    bnb_4bit_quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype the packed 4-bit weights are stored in. `auto`: uint8, except under FSDP "
        "or DeepSpeed ZeRO-3, which shard every parameter and need floats of one dtype: there the training "
        "dtype (the base is then loaded in it too). uint8 under those engines is refused.",
    )


class ModelConfig(Section):
    """The base model and how it is loaded."""

    name_or_path: str = Field(
        description="Hub id (`meta-llama/Llama-3.1-8B-Instruct`) or local directory, passed to `from_pretrained`; "
        "or a `.gguf` file (llama.cpp / Ollama), read once through transformers and the `gguf` package "
        "(dequantized) into a standard checkpoint in lorakit's cache."
    )
    gguf_file: str | None = Field(
        None,
        description="A GGUF file inside `name_or_path` (a local directory or a hub repository), as "
        "`from_pretrained(..., gguf_file=...)` takes it; or name the `.gguf` file in `name_or_path` directly.",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit to load.")
    tokenizer_name_or_path: str | None = Field(
        None, description="Load the tokenizer from here instead of `name_or_path`."
    )
    dtype: DType = Field(
        "auto",
        description="Precision for weights and training: `auto` picks bfloat16 on GPUs that support it, "
        "float16 on older GPUs and float32 on CPU. An explicit choice the hardware cannot do is refused.",
    )
    load_in_4bit: bool = Field(
        False, description="QLoRA: load the base model in 4-bit (bitsandbytes) and train LoRA adapters on top."
    )
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="4-bit settings; only valid with `load_in_4bit: true`."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = (
        Field(
            None,
            description="Attention kernel. Unset: flash_attention_2 on a CUDA GPU in bf16/fp16 when the "
            "`flash-attn` package is installed, else transformers' choice (sdpa). The manifest records the one used.",
        )
    )
    trust_remote_code: bool = Field(
        False,
        description="Run model code shipped in the model repository. Only for repositories you trust; "
        "the run summary and manifest say when it was on.",
    )
    new_special_tokens: list[str] | None = Field(
        None,
        description="Tokens to add to the tokenizer as special tokens (e.g. `<tool_call>`), for `method: lora`. "
        "The embeddings grow to hold them; only their input-embedding rows train (peft's trainable tokens), while "
        "the output layer trains in full (`modules_to_save`: trl reads its weight directly), which costs vocabulary "
        "x hidden size trainable parameters (`lorakit plan` counts them). Models with tied embeddings are refused. "
        "Eval, chat and merge grow the base the same way.",
    )
    adapter: str | None = Field(
        None,
        description="Start from this adapter instead of a fresh one: a lorakit run directory (checked against its "
        "manifest and base) or a peft adapter folder. Training continues it, with its own settings (`lora:` and "
        "`method` are not read); for `train.objective: dpo` or `kto` a frozen copy of it is the reference, so the usual "
        "pipeline is an SFT run, then a preference run on it. The manifest records it.",
    )
    allow_pickle_weights: bool = Field(
        False,
        description="Allow weights in pickle files (`pytorch_model.bin`), which can run code when loaded. "
        "Off: lorakit loads safetensors only and refuses a model that has no safetensors weights.",
    )

    @model_validator(mode="after")
    def _one_gguf(self) -> ModelConfig:
        if self.gguf_file and self.name_or_path.lower().endswith(".gguf"):
            raise ValueError("`name_or_path` names a .gguf file and `gguf_file` another; name the file in one of them")
        if self.gguf_file and not self.gguf_file.lower().endswith(".gguf"):
            raise ValueError(f"`gguf_file`: expected a .gguf file name, got {self.gguf_file!r}")
        return self

    @model_validator(mode="after")
    def _quantization_needs_4bit(self) -> ModelConfig:
        if "quantization" in self.model_fields_set and not self.load_in_4bit:
            raise ValueError(
                "`quantization` settings are given but `load_in_4bit` is false; "
                "set `load_in_4bit: true` for QLoRA or remove `quantization`"
            )
        return self


class LoraSection(Section):
    """LoRA adapter settings (peft `LoraConfig` names)."""

    LORAKIT_ONLY: ClassVar[frozenset] = frozenset({"loraplus_lr_ratio"})  # named after peft's optimizer helper

    r: int = Field(16, gt=0, description="Rank of the LoRA update matrices.")
    lora_alpha: float = Field(
        32,
        gt=0,
        description="Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with `use_rslora`).",
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input, in [0, 1).")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Modules to adapt: a list of module names (matched as name suffixes, e.g. "
        "`q_proj`), one regular expression matched against full module names, or `all-linear`. Every listed "
        "name must match at least one module of the model.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. `lm_head`, `embed_tokens`)."
    )
    init_lora_weights: bool | str = Field(
        True,
        description="Adapter initialisation: `true` (B = 0, the standard), `false`, or one of "
        f"{', '.join(_INIT_LORA)}, `pissa_niter_N`. PiSSA and OLoRA move part of each base weight into the "
        "adapter; lorakit saves the trained adapter converted so that it applies to the original base.",
    )
    rank_pattern: dict[str, int] | None = Field(
        None,
        description="Ranks per module, overriding `r`: `{pattern: rank}`, the pattern matched (as peft does) "
        "against the end of full module names, e.g. `{down_proj: 8}` or `{'mlp\\..*': 8}`. A pattern that matches "
        "no module is refused.",
    )
    alpha_pattern: dict[str, float] | None = Field(
        None, description="Alphas per module, overriding `lora_alpha`, keyed like `rank_pattern`."
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the B matrices learn this many times faster than the A matrices (peft's "
        "`create_loraplus_optimizer`; the paper suggests 16). Unset: one learning rate.",
    )

    def moves_base_weights(self) -> bool:
        """PiSSA and OLoRA start from the base's principal directions and subtract them from the base weights:
        the trained adapter fits only that rewritten base unless converted when saved."""
        init = self.init_lora_weights
        return isinstance(init, str) and (init in ("pissa", "olora") or init.startswith("pissa_niter_"))

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module (or be `all-linear`)")
        if isinstance(value, str) and value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"is not a valid regular expression: {exc}") from None
        return value

    @field_validator("init_lora_weights")
    @classmethod
    def _known_init(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and value not in _INIT_LORA and not re.fullmatch(r"pissa_niter_\d+", value):
            raise ValueError(f"must be true, false, one of {', '.join(_INIT_LORA)} or pissa_niter_N (got {value!r})")
        if value in ("eva", "corda"):
            raise ValueError(
                f"`{value}` initialises the adapter from activations on the training data, a pass "
                "lorakit does not run yet; without it peft would train a differently initialised "
                "adapter. Use pissa, olora, gaussian or true"
            )
        return value


DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")  # file types lorakit reads itself
DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "unpaired"]


class DataSource(Section):
    """One dataset in `data.train` / `data.eval`. A plain string is short for `{path: ...}`."""

    path: str = Field(
        min_length=1,
        description="A local .jsonl, .json, .csv or .parquet file; a directory of them (read "
        "recursively, in name order); a glob (`data/*.jsonl`, `data/**/*.parquet`); or a hub dataset "
        "id (`HuggingFaceH4/ultrachat_200k`) loaded with `datasets.load_dataset`. A local directory "
        "with `split` or `subset` is loaded with `datasets.load_dataset` too (a downloaded dataset "
        "repository).",
    )
    split: str | None = Field(None, description="Dataset split (`datasets` sources only; default `train`).")
    subset: str | None = Field(None, description="Dataset configuration name (`datasets` sources only).")
    revision: str | None = Field(None, description="Hub branch, tag or commit (hub datasets only).")
    format: DataFormat | None = Field(None, description="This source's format; default: `data.format`.")
    columns: dict[str, str] | None = Field(None, description="This source's column mapping; default: `data.columns`.")
    max_rows: int | None = Field(None, gt=0, description="Use at most the first N rows of this source.")
    weight: float = Field(
        1.0,
        gt=0,
        description="Sampling weight in the training mix: each training example of "
        "this source is used `weight` times on average (0.5 keeps a seeded half, 3 repeats every "
        "example three times). Applied after the eval split, so repeats never leak into eval.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"path": value} if isinstance(value, str) else value

    def is_short(self) -> bool:
        """Only `path` is set: saved back as a plain string."""
        return self.model_fields_set <= {"path"}


def _source_list(value):
    """`train: file.jsonl`, `train: {path: ...}` and lists of either all become a list of sources."""
    if value is None or isinstance(value, list):
        return value
    return [value]


class DataConfig(Section):
    """Training and evaluation data (lorakit's own section)."""

    train: list[DataSource] = Field(
        description="Training data: one source or a list of sources (see `data.train[]` below), each a file, "
        "directory, glob or hub dataset. JSONL is one example per line (UTF-8; a BOM and blank lines are "
        "accepted); .json holds a list of objects. Relative paths are resolved against the current directory "
        "and saved absolute in the run."
    )
    eval: list[DataSource] | None = Field(None, description="Evaluation data, given like `train` (no `weight`).")
    eval_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Hold out this share of `train` for evaluation (seeded by `train.seed`); instead of `eval`.",
    )
    format: DataFormat = Field(
        "auto",
        description="`messages` (OpenAI chat: a list of {role, content}), `sharegpt` (`conversations` "
        "of {from, value}), `alpaca` ({instruction, input, output, system}), `prompt_completion` "
        "({prompt, completion}, strings or lists of messages), `text` ({text}: continued pre-training), "
        "`preference` ({prompt, chosen, rejected}: strings, or lists of messages with the prompt given or shared "
        "by both; for the preference objectives), `unpaired` ({prompt, completion, label}: a completion labelled "
        "desirable (true) or not, for `train.objective: kto`), or `auto` to detect from the first row's keys (the "
        "format whose keys are all present and most specific; ambiguous keys are an error).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map lorakit's field names to your columns, e.g. "
        "`{instruction: question, output: answer}` or `{messages: dialog}`.",
    )
    chat_template: str | None = Field(
        None,
        description="Template for chat data: unset uses the tokenizer's own, or the built-in `chatml` "
        "(turns closed by the tokenizer's eos) when it has none; `tokenizer` insists on the tokenizer's; "
        "`chatml`; or a path to a .jinja file. The template used is saved in the run.",
    )
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant",
        description="Which tokens carry loss: every assistant turn (and completions), only the "
        "last assistant turn, or everything (prompts and user turns too).",
    )
    max_length: int = Field(1024, gt=0, description="Longest tokenized example; see `on_overflow` for longer ones.")
    on_overflow: Literal["truncate", "drop", "error"] = Field(
        "truncate",
        description="Examples longer than `max_length`: `truncate` (keep the start; a cut assistant "
        "turn still ends with the end-of-turn token), `drop`, or `error`. Counts are reported.",
    )

    on_bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="A malformed row (bad JSON or UTF-8, missing or mistyped field, empty content, "
        "unknown role): `error` stops before training with `file:line: reason`; `skip` skips and counts it.",
    )
    max_bad_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="With `on_bad_rows: skip`, the largest share of malformed rows tolerated; more is an error.",
    )

    num_proc: int | None = Field(
        None,
        gt=0,
        description="Processes that render and tokenize the data. Default: one per CPU core (up to 8) "
        "for more than 2,000 examples, else 1. The result does not depend on it.",
    )

    _lists = field_validator("train", "eval", mode="before")(_source_list)

    @field_validator("train")
    @classmethod
    def _some_train(cls, value: list[DataSource]) -> list[DataSource]:
        if not value:
            raise ValueError("needs at least one source")
        return value

    @field_validator("eval")
    @classmethod
    def _eval_unweighted(cls, value: list[DataSource] | None) -> list[DataSource] | None:
        if value is not None and any(source.weight != 1 for source in value):
            raise ValueError("`weight` applies to training sources only; use `max_rows` to cap eval data")
        return value

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError("give either `eval` or `eval_fraction`, not both")
        return self

    def saved(self) -> dict:
        """This section as saved in a run: sources with only a path are written as plain strings."""
        data = self.model_dump(mode="json")
        for key in ("train", "eval"):
            sources = getattr(self, key)
            if sources is not None:
                data[key] = [
                    s.path if s.is_short() else s.model_dump(mode="json", exclude_defaults=True) for s in sources
                ]
                if len(data[key]) == 1 and isinstance(data[key][0], str):
                    data[key] = data[key][0]
        return data


@dataclass(frozen=True)
class ObjectiveFacts:
    """What an objective trains on and what a step of it computes (read by data, plan, engines and train)."""

    data: tuple[str, ...]  # SFT `examples`, preference `pairs`, KTO's `unpaired` labelled completions
    sides: int = 1  # sequences of one example run together (a pair's chosen and rejected reply)
    no_grad_forwards: int = 0  # forward passes per sequence without gradients: the reference, KTO's KL completions
    reference: bool = False  # scores sequences with a reference (the base with the adapter off, or model.adapter)
    fused_head: bool = False  # trl computes log-probabilities in chunks, never all the logits
    experimental: bool = False  # trl keeps its trainer in trl.experimental, in the pre-1.0 design


OBJECTIVE_FACTS = {
    "sft": ObjectiveFacts(("examples",)),
    "dpo": ObjectiveFacts(("pairs",), sides=2, no_grad_forwards=1, reference=True, fused_head=True),
    # pairs unpair into one desirable and one undesirable completion; each completion also runs mismatched with
    # another example's prompt (the KL term), through the policy and the reference, without gradients
    "kto": ObjectiveFacts(("pairs", "unpaired"), no_grad_forwards=3, reference=True, fused_head=True),
    "orpo": ObjectiveFacts(("pairs",), sides=2, experimental=True),
    "simpo": ObjectiveFacts(("pairs",), sides=2, experimental=True),
}
OBJECTIVES = tuple(OBJECTIVE_FACTS)
# Keys of trl's preference configs (DPOConfig, ORPOConfig, CPOConfig, KTOConfig), and the objectives that read each.
OBJECTIVE_KEYS = {
    "beta": ("dpo", "orpo", "simpo", "kto"),
    "loss_type": ("dpo",),
    "label_smoothing": ("dpo", "simpo"),
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("simpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
}


class TrainConfig(Section):
    """Training settings (trl `SFTConfig` / `DPOConfig` / transformers `TrainingArguments` names)."""

    LORAKIT_ONLY: ClassVar[frozenset] = frozenset({"max_nonfinite_steps", "objective"})  # lorakit's own keys

    output_dir: str | None = Field(
        None,
        description="The run directory. Default: `runs/<recipe file name>`. Refused when it holds files, "
        "unless `--overwrite`.",
    )
    objective: Literal[OBJECTIVES] = Field(
        "sft",
        description="What is trained: `sft` (supervised fine-tuning on replies, trl's SFTTrainer); on "
        "prompt/chosen/rejected pairs `dpo` (trl's DPOTrainer; the reference is the base with the adapter "
        "switched off), `orpo` (odds-ratio preference with the SFT loss in one pass, reference-free) or `simpo` "
        "(length-normalized, reference-free, trl's CPOTrainer); `kto` (trl's KTOTrainer) on completions labelled "
        "desirable or not, or on pairs. See docs/preference.md.",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="`dpo`/`kto`: how far the tuned model may move from the reference (higher: less), trl's "
        "default 0.1; `orpo`: the weight of the odds-ratio term (the paper's lambda), 0.1; `simpo`: the reward "
        "scale, lorakit's default 2.0 (the SimPO paper's range; trl's CPO default 0.1 is for its sigmoid loss).",
    )
    loss_type: (
        Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"] | None
    ) = Field(
        None,
        description="`dpo`: the preference loss (trl `DPOConfig.loss_type`): `sigmoid` (DPO, the default), `ipo`, "
        "`hinge`, `robust` (with `label_smoothing`), and the others trl names.",
    )
    label_smoothing: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        description="`dpo`/`simpo`: the probability that a pair's preference is flipped (robust DPO, "
        "conservative SimPO); trl's default 0.",
    )
    simpo_gamma: float | None = Field(
        None,
        ge=0,
        description="`simpo`: the target reward margin between the chosen and the rejected reply; trl's default 0.5.",
    )
    cpo_alpha: float | None = Field(
        None,
        ge=0,
        description="`simpo`: the weight of an SFT term on the chosen reply (CPO-SimPO when above 0); "
        "lorakit's default 0, the SimPO paper's pure form.",
    )
    desirable_weight: float | None = Field(
        None,
        gt=0,
        description="`kto`: the loss weight of desirable completions; trl's default 1. With more undesirable "
        "than desirable examples, raise it so their weighted counts are about even (KTO paper, eq. 8).",
    )
    undesirable_weight: float | None = Field(
        None, gt=0, description="`kto`: the loss weight of undesirable completions; trl's default 1."
    )
    num_train_epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (ignored when `max_steps` > 0)."
    )
    max_steps: int = Field(-1, description="Total optimizer steps; -1 trains for `num_train_epochs`.")
    per_device_train_batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Examples per device per evaluation pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "cosine_with_min_lr",
        "warmup_stable_decay",
    ] = Field("cosine", description="Learning-rate schedule.")
    warmup_steps: float = Field(
        0.03, ge=0, description="Warm-up: a number of steps, or a ratio of all steps when below 1."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables clipping).")
    optim: str | None = Field(
        None,
        description="Optimizer (transformers `OptimizerNames`). Default: `paged_adamw_8bit` with "
        "`load_in_4bit`, `adamw_torch` otherwise.",
    )
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW beta2.")
    logging_steps: int = Field(10, gt=0, description="Log loss and learning rate every N steps.")
    eval_strategy: Literal["auto", "no", "steps", "epoch"] = Field(
        "auto", description="When to evaluate: `auto` evaluates every `eval_steps` when eval data is given."
    )
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (default: `logging_steps` x 5).")
    save_strategy: Literal["no", "steps", "epoch"] = Field("steps", description="When to write checkpoints.")
    save_steps: int = Field(500, gt=0, description="Write a checkpoint every N steps.")
    save_total_limit: int | None = Field(2, gt=0, description="Keep at most N checkpoints.")
    seed: int = Field(42, description="Seed for initialisation, data order and the eval split.")
    max_nonfinite_steps: int = Field(
        3,
        gt=0,
        description="A step whose gradients hold NaN or inf is skipped (no update, logged with its step); "
        "this many in a row stop the run with an error, keeping the last good checkpoint.",
    )
    gradient_checkpointing: bool = Field(
        True,
        description="Recompute activations in the backward pass to save "
        "memory (non-reentrant, transformers' default form).",
    )
    activation_offloading: bool = Field(
        False,
        description="Move the activations kept for the backward pass to CPU "
        "memory (trl's offloading), for sequences whose activations do not fit the GPU.",
    )
    use_liger_kernel: bool | Literal["auto"] = Field(
        "auto",
        description="Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, and a fused linear cross-entropy that "
        "never materialises the full-vocabulary logits). `auto`: on with a CUDA GPU when `liger-kernel` is installed "
        "(`pip install 'lorakit[gpu]'`) and supports the architecture; `true` is refused otherwise.",
    )
    torch_compile: bool = Field(
        False,
        description="Compile the model with `torch.compile` (slower start, often "
        "faster steps; off by default: the first steps pay the compile time).",
    )
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Padding-free packing: several examples share each row of up to `data.max_length` "
        "tokens (best-fit decreasing), with positions restarting per example and no attention across examples: "
        "the same losses and gradients as padding, without computing padding. `auto` packs architectures known "
        "to be exact (attention-only models whose masks follow position ids: Llama, Mistral, Qwen, Gemma, Phi "
        "and others; see docs/data.md) and pads the rest; `true` insists, and is refused where packing would "
        "let examples affect each other (custom masks, recurrent or state-space layers); `false` pads. With "
        "packing, `per_device_train_batch_size` counts packed rows.",
    )
    neftune_noise_alpha: float | None = Field(None, gt=0, description="NEFTune embedding noise.")
    dataloader_num_workers: int = Field(0, ge=0, description="Worker processes for data loading.")
    ddp_backend: Literal["nccl", "gloo"] | None = Field(
        None,
        description="Process-group backend when several processes train: `nccl` on GPUs, `gloo` on CPUs "
        "by default. `gloo` also lets several processes share one GPU, which NCCL refuses (for trying a "
        "multi-process set-up on one GPU; gradients are reduced through CPU memory, so it is slow).",
    )
    report_to: list[str] | str = Field(
        "none",
        description=f"Trackers to log to: {', '.join(REPORT_TO)}. Credentials come from the "
        "environment (e.g. WANDB_API_KEY) and are never written to the run.",
    )
    run_name: str | None = Field(None, description="Run name shown in trackers (default: the run directory name).")
    push_to_hub: bool = Field(False, description="Upload the adapter to the hub at the end (needs network).")
    hub_model_id: str | None = Field(None, description="Hub repository for `push_to_hub`.")
    hub_token: SecretStr | None = Field(
        None, description="Hub token; prefer the HF_TOKEN environment variable. Never saved in the run."
    )

    @field_validator(*OBJECTIVE_KEYS)
    @classmethod
    def _key_of_the_objective(cls, value, info: ValidationInfo):
        objective = info.data.get("objective", "sft")
        if value is not None and objective not in OBJECTIVE_KEYS[info.field_name]:
            raise ValueError(
                f"is a setting of train.objective {' / '.join(OBJECTIVE_KEYS[info.field_name])}; this recipe's "
                f"objective is {objective}, which would ignore it"
            )
        return value

    @field_validator("packing", "use_liger_kernel")
    @classmethod
    def _sft_only(cls, value, info: ValidationInfo):
        objective = info.data.get("objective", "sft")
        if value is True and objective != "sft":
            why = {
                "packing": "trl's preference trainers pad each pair (their padding-free mode is unavailable)",
                "use_liger_kernel": "trl's preference trainers compute log-probabilities with their own fused "
                "head, which Liger's loss would replace",
            }[info.field_name]
            raise ValueError(f"`objective: {objective}`: {why}; set it to auto or false")
        return value

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: list[str] | str) -> list[str] | str:
        for name in [value] if isinstance(value, str) else value:
            if name not in REPORT_TO:
                raise ValueError(f"unknown tracker {name!r}; choose from {', '.join(REPORT_TO)}")
        return value


class EvalConfig(Section):
    """Generation settings for `lorakit eval` and `lorakit generate` (transformers `generate` names)."""

    max_new_tokens: int = Field(
        128,
        gt=0,
        description="Most tokens generated per prompt; a generation that "
        "reaches it without the end-of-turn token counts as not stopped.",
    )
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with `do_sample`).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with `do_sample`).")
    batch_size: int | None = Field(
        None,
        gt=0,
        description="Prompts per generation batch and examples per loss "
        "batch. Default: `train.per_device_eval_batch_size`.",
    )
    max_examples: int | None = Field(
        None, gt=0, description="Generate for at most the first N eval examples (the loss always uses all)."
    )


class DistributedConfig(Section):
    """Starting several processes on this machine (lorakit's own section). Several machines: run the
    launcher yourself, see docs/distributed.md."""

    nproc: int | None = Field(
        None,
        gt=0,
        description="Processes to start on this machine, one per GPU. Default: "
        "the accelerate config's `num_processes`, else one. `--nproc` overrides it.",
    )
    accelerate_config: str | None = Field(
        None,
        description="An accelerate config file (e.g. `configs/accelerate/fsdp_qlora.yaml`) that picks the "
        "engine: DDP, FSDP or DeepSpeed. lorakit then starts `accelerate launch --config_file` with it; without "
        "one, `torchrun` (DDP). Relative paths are read from the current directory.",
    )


class Recipe(MethodRules):
    """A whole lorakit recipe."""

    model: ModelConfig = Field(description="The base model.")
    method: Method = Field(
        "lora",
        description="PEFT method: `lora` (LoRA and its variants: DoRA, rsLoRA, PiSSA, OLoRA, LoftQ, LoRA+, "
        "set in `lora:`), `adalora` (LoRA with ranks reallocated during training; `adalora:` plus the `lora:` "
        "targets), `ia3` (`ia3:`), `prompt_tuning` (`prompt_tuning:`) or `prefix_tuning` (`prefix_tuning:`). "
        "See docs/methods.md.",
    )
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA adapter settings.")
    adalora: AdaLoraSection = Field(default_factory=AdaLoraSection, description="AdaLoRA settings (`method: adalora`).")
    ia3: IA3Section = Field(default_factory=IA3Section, description="IA3 settings (`method: ia3`).")
    prompt_tuning: PromptTuningSection = Field(
        default_factory=PromptTuningSection, description="Prompt tuning settings (`method: prompt_tuning`)."
    )
    prefix_tuning: PrefixTuningSection = Field(
        default_factory=PrefixTuningSection, description="Prefix tuning settings (`method: prefix_tuning`)."
    )
    data: DataConfig = Field(description="Training and evaluation data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and generation settings.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Several processes on this machine."
    )

    @model_validator(mode="after")
    def _cross_section_rules(self) -> Recipe:
        if self.lora.init_lora_weights == "loftq" and not self.model.load_in_4bit:
            raise ValueError(
                "lora.init_lora_weights: `loftq` starts the adapter from the quantization error of the "
                "4-bit base (QLoRA); set `model.load_in_4bit: true`, or use pissa/olora on a "
                "full-precision base"
            )
        init = self.lora.init_lora_weights
        if self.model.load_in_4bit and self.lora.moves_base_weights():
            raise ValueError(
                f"lora.init_lora_weights: `{init}` decomposes the full-precision base weights, which a "
                "4-bit base no longer has (peft refuses it); set `model.load_in_4bit: false`, or use "
                "true or gaussian"
            )
        if self.train.objective != "sft":
            self._fits_the_objective()
        if self.model.adapter is not None:
            self._continues_its_adapter()
        if (
            self.train.eval_strategy in ("steps", "epoch")
            and self.data.eval is None
            and self.data.eval_fraction is None
        ):
            raise ValueError(
                f"train.eval_strategy is `{self.train.eval_strategy}` but there is no eval data; "
                "set `data.eval` or `data.eval_fraction`"
            )
        return self

    def _continues_its_adapter(self) -> None:
        if self.lora.model_fields_set or self.method != "lora":
            key = f"lora.{sorted(self.lora.model_fields_set)[0]}" if self.lora.model_fields_set else "method"
            raise ValueError(
                f"{key}: model.adapter continues that adapter with its own settings; remove the `{key}` setting"
            )
        if self.model.new_special_tokens:
            raise ValueError(
                "model.new_special_tokens: tokens cannot be added to a run that continues model.adapter (its "
                "embeddings and the base's would no longer match)"
            )

    def _fits_the_objective(self) -> None:
        objective = self.train.objective
        if self.method == "adalora":
            raise ValueError(
                f"train.objective: `{objective}` with `method: adalora` is refused: AdaLoRA's rank budget is "
                "driven through lorakit's SFT trainer; use `method: lora` (or DoRA/rsLoRA through `lora:`)"
            )
        if OBJECTIVE_FACTS[objective].experimental and self.method in PROMPT_LEARNING:
            raise ValueError(
                f"method: `{self.method}` puts virtual tokens in front of every sequence, which trl's {objective} "
                "trainer (trl.experimental, CPO/ORPO) does not expect in its logits; use lora or ia3, or `dpo`/`kto`"
            )
        if OBJECTIVE_FACTS[objective].experimental and self.train.activation_offloading:
            raise ValueError(
                f"train.activation_offloading: trl's {objective} trainer (trl.experimental) has no activation "
                "offloading; set it to false, or use `dpo`/`kto`"
            )
        if objective == "kto" and self.train.per_device_train_batch_size < 2:
            raise ValueError(
                "train.per_device_train_batch_size: `kto` estimates its KL term from each micro-batch's other "
                "completions, so it needs at least 2 examples per device (trl's rule)"
            )
        if self.data.train_on != "assistant":
            raise ValueError(
                f"data.train_on: `{objective}` trains the replies it compares (a pair's chosen and rejected reply, "
                f"or KTO's labelled completion); `{self.data.train_on}` does not apply (leave it at assistant)"
            )

    def has_eval(self) -> bool:
        return self.data.eval is not None or self.data.eval_fraction is not None

    def to_saved_dict(self) -> dict:
        """The recipe as it is written into a run: validated values, secrets removed."""
        data = self.model_dump(mode="json")
        data["data"] = self.data.saved()
        data["train"].pop("hub_token", None)
        for key in OBJECTIVE_KEYS:  # unset: trl's default for the objective, which the manifest records
            if data["train"][key] is None:
                data["train"].pop(key)
        if not self.model.load_in_4bit:  # defaults only; saving them would make the recipe invalid
            data["model"].pop("quantization")
        for name in METHOD_SECTIONS:  # only the chosen method's settings, which are all it reads
            if name != self.method:
                data.pop(name)
        allowed = LORA_KEYS_FOR[self.method]
        if self.model.adapter is not None:  # the adapter's own settings apply, which `lora:` may not restate
            data.pop("lora")
        elif allowed is not None:
            data["lora"] = {k: v for k, v in data["lora"].items() if k in allowed}
            if not data["lora"]:
                data.pop("lora")
        return data
