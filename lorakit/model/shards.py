"""Base checkpoints as files: finding them, reading them shard by shard, writing sharded safetensors.

Owns: resolving a base model to a local directory (a local path, or the hub snapshot that
`from_pretrained` would use), the safetensors shard layout (`model.safetensors` or an index with
shards) and writing shards plus their index. Does not own what is done to the tensors (lorakit.merge.fold).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.digest import file_sha256
from lorakit.errors import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def locate(name_or_path: str, revision: str | None = None) -> Path:
    """The local directory holding the base model's files (downloaded from the hub when it is an id)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name_or_path,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # offline, gated, not found: the hub client raises many types
        raise ModelError(
            f"base model {name_or_path!r} is neither a local directory nor downloadable: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


BASE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "model.safetensors.index.json",
)
SAMPLE = 1 << 20  # bytes read at the start, middle and end of each weight file


def base_fingerprints(directory: Path) -> dict[str, str]:
    """What a resumed run must find unchanged in a local base directory: the config, tokenizer and chat
    template files whole, and each weight file by its size and three 1 MiB samples (start, middle, end),
    which re-randomized or replaced weights change without reading gigabytes at every start. Keys are
    `base FILE`; a hub id (whose files change only with its revision, which the recipe pins) gives none."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    out = {}
    for name in BASE_FILES:
        if (directory / name).is_file():
            out[f"base {name}"] = file_sha256(directory / name)
    for weights in sorted(directory.glob("*.safetensors")):
        size = weights.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with open(weights, "rb") as handle:
            for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE))
        out[f"base {weights.name} (sampled)"] = digest.hexdigest()
    return out


@dataclass
class Checkpoint:
    """A safetensors checkpoint: which shard holds each tensor."""

    directory: Path
    weight_map: dict[str, str]  # tensor name -> shard file name

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
        index = directory / INDEX
        if index.is_file():
            return cls(directory, dict(json.loads(index.read_text())["weight_map"]))
        single = directory / SINGLE
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as handle:
                return cls(directory, {name: SINGLE for name in handle.keys()})
        raise ModelError(
            f"{directory}: no {SINGLE} or {INDEX}; lorakit merges safetensors checkpoints "
            "(convert .bin weights with `save_pretrained(..., safe_serialization=True)`)"
        )

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def read(self, shard: str) -> dict:
        """One shard's tensors, memory-mapped: a tensor costs memory only once it is converted or changed."""
        from safetensors.torch import load_file

        return load_file(str(self.directory / shard))

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.directory / self.weight_map[name]), framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())


def write_shard(path: Path, tensors: dict) -> int:
    """Write one shard; returns its size in bytes of tensor data."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    if set(weight_map.values()) == {SINGLE}:
        return  # a single-file checkpoint needs no index
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
