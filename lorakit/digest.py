"""Content hashes of the files lorakit writes and later trusts (the preprocessing cache, checkpoints, the
run's adapter, merged models, GGUF conversions): sha256 of a file, of a folder's files, and which recorded
files are missing or changed. Writers record the hashes last; readers name what no longer matches."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def folder_sha256(folder: Path, names=None, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of `names` that exist in `folder`, or of every file under it (but `skip`)."""
    if names is not None:
        paths = [folder / name for name in names if (folder / name).is_file()]
    else:
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in paths}


def damaged(folder: Path, recorded: dict[str, str]) -> list[str]:
    """The recorded files that are now missing or changed, each as 'NAME (missing|changed)'."""
    out = []
    for name, digest in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            out.append(f"{name} (missing)")
        elif file_sha256(path) != digest:
            out.append(f"{name} (changed)")
    return out
