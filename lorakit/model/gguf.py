"""GGUF bases: a recipe's `.gguf` file (`model.name_or_path: x.gguf`, or a directory or hub repository plus
`model.gguf_file`) read once through transformers, which dequantizes it with the `gguf` package, and kept
as a standard Hugging Face checkpoint (config, tokenizer with its chat template, safetensors) in lorakit's
cache. Every command then loads, plans, merges and evaluates that checkpoint like any other base; the
recipe keeps naming the GGUF, and the run's manifest records which file (sha256) and which quantization
types its weights were dequantized from.

The converted checkpoint is keyed by the file's path, size and modification time (an edited file is
converted again) and written to a staging directory renamed into place, so a reader never sees half of
one. Its weights are float32 (dequantized GGUF blocks are exact there) unless `model.dtype` names another.

A GGUF of an architecture transformers cannot read is refused by name, from its metadata alone, before
anything is written.

Exports `is_gguf`, `materialize`, `GgufBase`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lorakit.digest import damaged, file_sha256, folder_sha256
from lorakit.errors import ModelError
from lorakit.locations import cache_root
from lorakit.recipe.schema import ModelConfig
from lorakit.staging import remove_staging, staging_for, staging_path

MARKER = "lorakit-gguf.json"
FORMAT = 2  # bump when the converted layout changes
_DONE: dict[tuple, GgufBase] = {}  # one conversion check per file per process


@dataclass(frozen=True)
class GgufBase:
    """A GGUF file and the checkpoint converted from it."""

    file: Path
    directory: Path
    sha256: str
    architecture: str
    quantization: dict  # GGUF tensor type -> number of tensors stored in it
    tokenizer_pre: str | None = None  # llama.cpp's pre-tokenizer name, written back by `lorakit export`

    @property
    def main_type(self) -> str:
        """The quantization type most tensors are stored in (Q4_1, Q8_0, F16...)."""
        return max(self.quantization, key=self.quantization.get)

    def record(self) -> dict:
        """For manifest.json: where the weights came from and what they were dequantized from."""
        return {
            "file": str(self.file),
            "sha256": self.sha256,
            "architecture": self.architecture,
            "dequantized_from": self.main_type,
            "tensor_types": self.quantization,
            "tokenizer_pre": self.tokenizer_pre,
            "converted": str(self.directory),
        }


def is_gguf(cfg: ModelConfig) -> bool:
    return bool(cfg.gguf_file) or cfg.name_or_path.lower().endswith(".gguf")


def materialize(cfg: ModelConfig) -> GgufBase:
    """The converted checkpoint of `cfg`'s GGUF, converting it the first time."""
    file = _local_file(cfg)
    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns, cfg.dtype)
    if key in _DONE:
        return _DONE[key]
    digest = hashlib.sha256(json.dumps([*key, FORMAT]).encode()).hexdigest()[:24]
    directory = cache_root() / "gguf" / digest
    info = _intact(directory)
    if info:
        base = GgufBase(
            file, directory, info["sha256"], info["architecture"], info["tensor_types"], info.get("tokenizer_pre")
        )
    else:
        architecture, types, pre = _inspect(file)
        base = GgufBase(file, directory, file_sha256(file), architecture, types, pre)
        _convert(base, cfg)
    _DONE[key] = base
    return base


def _intact(directory: Path) -> dict | None:
    """The conversion's marker when every file it recorded is as written; a damaged conversion (a flipped
    bit, a truncated shard, a garbage marker) is removed with a notice, to be converted again."""
    marker = directory / MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
        problem = damaged(directory, info["files_sha256"]) if isinstance(info, dict) else ["its marker"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        problem = [f"{MARKER} (unreadable)"]
    if not problem:
        return info
    print(
        f"notice: the GGUF conversion in {directory} is damaged ({', '.join(problem)}): converting again",
        file=sys.stderr,
    )
    shutil.rmtree(directory, ignore_errors=True)
    return None


def _local_file(cfg: ModelConfig) -> Path:
    """The GGUF file on disk: the recipe's path, or the file downloaded from the hub repository."""
    if cfg.gguf_file:
        folder = Path(cfg.name_or_path).expanduser()
        if folder.is_dir():
            path = folder / cfg.gguf_file
        else:
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(cfg.name_or_path, cfg.gguf_file, revision=cfg.revision))
            except Exception as exc:  # offline, gated, not found: the hub client raises many types
                raise ModelError(
                    f"model.gguf_file: {cfg.gguf_file} is neither in a local directory {cfg.name_or_path} nor "
                    f"downloadable from the hub: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from None
    else:
        path = Path(cfg.name_or_path).expanduser()
    if not path.is_file():
        raise ModelError(f"model.name_or_path: GGUF file not found: {path}")
    return path.resolve()


def _inspect(file: Path) -> tuple[str, dict, str | None]:
    """The architecture, tensor types and pre-tokenizer name from the file's metadata; refuses what
    transformers cannot read."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError(
            f"model.name_or_path: {file.name} is a GGUF file, which needs the `gguf` package: "
            "pip install 'lorakit[gguf]'"
        ) from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(file)
    except (ValueError, OSError) as exc:
        raise ModelError(f"model.name_or_path: {file} is not a readable GGUF file: {exc}") from None

    def text(key: str) -> str | None:
        field = reader.fields.get(key)
        return bytes(field.parts[field.data[0]]).decode() if field else None

    architecture = text("general.architecture") or "?"
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"model.name_or_path: {file.name} holds a GGUF of architecture {architecture!r}, which transformers "
            f"cannot read (it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); use a checkpoint of "
            "that model in Hugging Face format"
        )
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return architecture, dict(sorted(types.items())), text("tokenizer.ggml.pre")


def _convert(base: GgufBase, cfg: ModelConfig) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    print(
        f"converting {base.file.name} ({base.architecture}, {base.main_type}) to a transformers checkpoint "
        f"in {base.directory} (once)",
        file=sys.stderr,
    )
    staging = staging_path(base.directory)
    try:
        staging_for(base.directory)  # and the conversions of killed processes go
        folder, name = str(base.file.parent), base.file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantize: a plain dense model (transformers otherwise keeps the GGUF blocks packed, not trainable)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"format": FORMAT, **base.record(), "dtype": str(dtype).replace("torch.", "")}
        record["files_sha256"] = folder_sha256(staging)  # last: `_intact` checks the conversion against it
        (staging / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        if base.directory.exists():  # another process converted it meanwhile
            shutil.rmtree(staging)
        else:
            os.replace(staging, base.directory)
    finally:
        remove_staging(staging)
