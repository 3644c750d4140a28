"""A merged Hugging Face checkpoint written as one GGUF file, through the `gguf` package (llama.cpp's own
gguf-py): its tensor-name map, its quantizers and its tokenizer metadata reader.

What is written: the architecture's hyperparameters; every weight under its GGUF name, 2-D weights in the
chosen type (f16, bf16 or q8_0; norms stay f32, as llama.cpp keeps them), the query/key projections
permuted into the rotary layout llama.cpp expects (transformers' GGUF reader undoes exactly this); the
byte-level BPE tokenizer (tokens, types, merges), its special tokens, the chat template, and the run's
end-of-turn token as the end-of-turn id llama.cpp and Ollama stop on.

Tensors are spooled to a temporary file as they are converted, so memory holds one tensor at a time.
K-quants (q4_k_m, ...) are made from the f16 file by llama.cpp's `llama-quantize` when it is on PATH, and
refused by name otherwise. Architectures, tokenizers and settings this writer does not express are refused
by name before anything is written (`refusal`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ModelError

OUTTYPES = ("f16", "bf16", "q8_0")
ARCHITECTURES = {"llama": "llama"}  # config.json model_type -> GGUF architecture
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
QUANTIZE = "llama-quantize"  # llama.cpp's quantizer: K-quants are made from the f16 file by it


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer as GGUF stores it."""

    tokens: list[str]
    types: list[int]
    pre: str  # llama.cpp's name for how text is split before BPE


def refusal(config: dict, tokenizer_json: dict, outtype: str) -> str | None:
    """Why this checkpoint cannot be written as GGUF here, or None."""
    if outtype in K_QUANTS and not shutil.which(QUANTIZE):
        return (
            f"--outtype {outtype}: K-quants are made by llama.cpp's `{QUANTIZE}`, which is not on PATH (install "
            f"llama.cpp, or write f16 here and run `{QUANTIZE} model-f16.gguf model-{outtype}.gguf {outtype.upper()}`)"
        )
    if outtype not in OUTTYPES + K_QUANTS:
        return f"--outtype: expected one of {', '.join(OUTTYPES)} (or a K-quant with {QUANTIZE}), got {outtype!r}"
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        return (
            f"the {model_type!r} architecture cannot be exported to GGUF by lorakit yet (it writes "
            f"{', '.join(ARCHITECTURES)}: Llama, SmolLM, TinyLlama and other LlamaForCausalLM models)"
        )
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        return f"rope scaling ({rope.get('rope_type') or config.get('rope_scaling')}) is not written to GGUF yet"
    if config.get("attention_bias") or config.get("mlp_bias"):
        return "attention or MLP biases are not written to GGUF for the llama architecture"
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(tokenizer_json):
        return (
            f"the tokenizer ({model.get('type')}) is not a byte-level BPE tokenizer; lorakit writes GPT-2-style "
            "byte-level BPE vocabularies to GGUF"
        )
    return None


def _byte_level(tokenizer_json: dict) -> bool:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def vocabulary(tokenizer, size: int, pre: str | None) -> Vocabulary:
    """Every id below `size` (the embedding rows) with its token text and GGUF token type; ids the
    tokenizer does not use (padding rows) become unused `[PADn]` tokens, as llama.cpp's converter writes."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= size:
        raise ModelError(f"the tokenizer has ids up to {max(by_id)} but the model only {size} embedding rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(
                TokenType.NORMAL
                if i not in added
                else TokenType.CONTROL
                if added[i].special
                else TokenType.USER_DEFINED
            )
    return Vocabulary(tokens, [int(t) for t in types], pre or "gpt2")


def write(merged: Path, out: Path, outtype: str, vocab: Vocabulary, end_of_turn_id: int, name: str) -> dict:
    """Write `merged` (a standard checkpoint directory) to the GGUF file `out`; returns tensor counts by type."""
    import gguf

    config = json.loads((merged / "config.json").read_text())
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ARCHITECTURES[config["model_type"]])
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    _hyperparameters(writer, config, outtype, name)
    counts = _tensors(writer, merged, config, arch, outtype)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    gguf.SpecialVocab(merged, load_merges=True, n_vocab=len(vocab.tokens)).add_to_gguf(writer, quiet=True)
    writer.add_eot_token_id(end_of_turn_id)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def k_quantize(f16: Path, out: Path, outtype: str) -> None:
    """`llama-quantize` turns the f16 file into a K-quant one (then removed: only the result is kept)."""
    done = subprocess.run([shutil.which(QUANTIZE), str(f16), str(out), outtype.upper()], capture_output=True, text=True)
    f16.unlink()
    if done.returncode != 0:
        raise ModelError(f"{QUANTIZE} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-400:]}")


def _hyperparameters(writer, config: dict, outtype: str, name: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))


def _tensors(writer, merged: Path, config: dict, arch, outtype: str) -> dict:
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    files = sorted(merged.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{merged}: no safetensors weights to export")
    counts: dict[str, int] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # llama.cpp reuses token_embd when output.weight is absent
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ModelError(f"{file.name}: no GGUF name for the tensor {hf_name}")
                data = f.get_tensor(hf_name).float().numpy()
                if hf_name.endswith("self_attn.q_proj.weight"):
                    data = _rotary_layout(data, heads)
                elif hf_name.endswith("self_attn.k_proj.weight"):
                    data = _rotary_layout(data, kv_heads)
                qtype = _tensor_type(data, outtype)
                writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
                counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return dict(sorted(counts.items()))


def _tensor_type(data, outtype: str):
    """1-D tensors (norms) stay F32; 2-D ones take the chosen type (Q8_0 needs rows of whole 32-blocks)."""
    from gguf import GGMLQuantizationType as T

    if data.ndim < 2:
        return T.F32
    if outtype == "q8_0":
        return T.Q8_0 if data.shape[-1] % 32 == 0 else T.F16
    return T.BF16 if outtype == "bf16" else T.F16


def _rotary_layout(weight, n_heads: int):
    """Hugging Face's query/key rows (each head's rotary halves one after the other) in the interleaved
    pairs llama.cpp's rope reads; transformers' GGUF reader applies the inverse."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
