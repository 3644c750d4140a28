"""Sources: where a recipe's rows come from, and a content fingerprint of each.

Local files (one file, a directory of them, or a glob) are read by lorakit's own readers
(`rows.read_rows`), so every error names `file:line`. Hub dataset ids, and local directories given with
`split` or `subset` (a downloaded dataset repository), go through `datasets.load_dataset`: the same call
that loads a hub id loads its local copy, which is how this path is tested offline.
"""

from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.data.rows import read_rows, rename_columns
from lorakit.errors import DataError
from lorakit.recipe.schema import DATA_SUFFIXES, DataConfig, DataSource


@dataclass
class Opened:
    """A source resolved to what will be read: a list of local files, or a loaded `datasets.Dataset`."""

    source: DataSource
    label: str  # `data.train[1]` style, for messages
    files: list[str] = field(default_factory=list)
    dataset: object = None

    @property
    def name(self) -> str:
        if self.dataset is None:
            return self.source.path
        return f"{self.source.path}[{self.source.split or 'train'}]"

    def fingerprints(self) -> dict[str, str]:
        """sha256 of the content read: each local file, or the dataset's Arrow files."""
        if self.dataset is None:
            return {path: _sha256([path]) for path in self.files}
        files = sorted(f["filename"] for f in self.dataset.cache_files)  # load_dataset always writes Arrow files
        return {self.name + (f" ({self.source.subset})" if self.source.subset else ""): _sha256(files)}

    def rows(self, cfg: DataConfig, bad: list[str] | None) -> list[tuple[str, dict]]:
        """(position, row) pairs with the column mapping applied, at most `max_rows` of them."""
        columns = self.source.columns if self.source.columns is not None else cfg.columns
        limit = self.source.max_rows
        if self.dataset is not None:
            rows = [(f"{self.name} row {i}", row) for i, row in enumerate(self.dataset.to_list(), start=1)]
        else:
            rows = []
            for path in self.files:
                left = None if limit is None else limit - len(rows)
                if left == 0:
                    break
                rows += [(f"{path}:{pos}", row) for pos, row in read_rows(path, bad, limit=left)]
        return [(where, rename_columns(row, columns)) for where, row in rows]


SPLIT_WORDS = {"test", "validation", "valid", "val", "eval", "dev"}


def open_source(source: DataSource, label: str) -> Opened:
    path = Path(source.path).expanduser()
    if path.is_file():  # before globbing: `train[1].jsonl` is a file name, not a pattern
        return Opened(source, label, files=[str(path)])
    if path.is_dir() and source.split is None and source.subset is None:
        files = sorted(str(p) for p in path.rglob("*") if _is_data_file(p.relative_to(path), p))
        if not files:
            raise DataError(f"{label}: the directory {source.path} holds no .jsonl, .json, .csv or .parquet file")
        _refuse_mixed_splits(files, path, label)
        return Opened(source, label, files=files)
    if glob.has_magic(source.path):
        files = sorted(p for p in glob.glob(str(path), recursive=True) if _is_data_file(Path(p), Path(p)))
        if not files:
            raise DataError(f"{label}: no .jsonl, .json, .csv or .parquet file matches {source.path}")
        return Opened(source, label, files=files)
    return Opened(source, label, dataset=_load_dataset(source, label))


def _is_data_file(shown: Path, path: Path) -> bool:
    """A data file not hidden and not inside a hidden folder (.ipynb_checkpoints, .cache, .git)."""
    return (
        path.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith(".") for part in shown.parts)
        and path.is_file()
    )


def _refuse_mixed_splits(files: list[str], directory: Path, label: str) -> None:
    """A directory holding train and test files (a downloaded dataset repository) must not all be trained on."""
    named = {f: set(re.split(r"[-_./]", str(Path(f).relative_to(directory).with_suffix("")).lower())) for f in files}
    held_out = [f for f, words in named.items() if words & SPLIT_WORDS]
    if held_out and len(held_out) < len(files):
        raise DataError(
            f"{label}: the directory {directory} holds what look like several splits (e.g. "
            f"{Path(held_out[0]).relative_to(directory)}); point at the training files with a glob, "
            "or give `split:` to load it as a dataset"
        )


def _load_dataset(source: DataSource, label: str):
    import datasets

    split = source.split or "train"
    if source.max_rows is not None:
        split = f"{split}[:{source.max_rows}]"  # datasets reads no more than the cap into the split
    try:
        loaded = datasets.load_dataset(source.path, name=source.subset, split=split, revision=source.revision)
    except Exception as exc:  # datasets raises many types (offline, not found, bad split or config names)
        what = ", ".join(
            f"{k}={v}"
            for k, v in (("subset", source.subset), ("split", source.split or "train"), ("revision", source.revision))
            if v
        )
        local = "" if Path(source.path).expanduser().exists() else " (there is no local file or directory of that name)"
        raise DataError(
            f"{label}: cannot load the dataset {source.path!r}{local} ({what}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if len(loaded) == 0:
        raise DataError(f"{label}: the dataset {source.path!r} split {source.split or 'train'!r} is empty")
    return loaded


def _sha256(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
