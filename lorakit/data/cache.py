"""The preprocessing cache: tokenized splits stored under a key of everything that shapes them.

The key covers the content of every data source (sha256), the tokenizer (its full vocabulary and rules,
special tokens and own chat template), a chat template file's content, the whole `data:` section
except `num_proc` (which does not change the result), the seed where it matters (eval split, weights)
and lorakit's version. Any change gives a new key, so a stale entry is never read. Entries are written
to a temporary directory and renamed into place, so a reader never sees half of one; `meta.json`, written
last, holds the sha256 of every file of the entry, and a reader checks them all: an entry whose files
changed (a flipped bit, random bytes, a garbage dataset_info.json) is discarded with a notice naming the
file and rebuilt, never trained on.

Location: lorakit.locations.cache_root(); safe to delete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from lorakit import __version__
from lorakit.data.templates import chosen_template
from lorakit.digest import damaged, folder_sha256
from lorakit.locations import cache_root
from lorakit.recipe.schema import DataConfig

FORMAT = 2  # bump when the stored layout or the encoding rules change (2: file hashes in meta.json)


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges, normalizer and special tokens (the chat template is keyed separately)."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(cfg: DataConfig, fingerprints: dict[str, str], tokenizer, seed: int) -> str:
    section = cfg.model_dump(mode="json", exclude={"num_proc"})
    seeded = cfg.eval_fraction is not None or any(s.weight != 1 for s in cfg.train)
    template = chosen_template(tokenizer, cfg.chat_template)
    parts = {
        "format": FORMAT,
        "lorakit": __version__,
        "data": section,
        "sources": fingerprints,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template,  # the text, so an edited file misses
        "seed": seed if seeded else None,
        # libraries that render and tokenize: an upgrade may change either
        "libraries": {name: _version(name) for name in ("transformers", "tokenizers", "jinja2")},
        # templates that print today's date render differently tomorrow
        "date": date.today().isoformat() if template and "strftime_now" in template else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load(key: str):
    """(meta, {split name: Dataset}) for a complete, intact entry, or None (a damaged one is removed)."""
    entry = cache_root() / key
    meta_file = entry / "meta.json"
    if not meta_file.is_file():
        return None
    from datasets import load_from_disk

    try:
        meta = json.loads(meta_file.read_text())
        problem = _damage(entry, meta.get("files"))
        if problem is None:
            return meta, {name: load_from_disk(str(entry / name)) for name in meta["splits"]}
    except Exception as exc:  # whatever a damaged entry makes datasets raise: it is rebuilt, not trusted
        problem = f"it cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    print(f"notice: the preprocessing cache entry {entry} is damaged ({problem}); rebuilding it", file=sys.stderr)
    shutil.rmtree(entry, ignore_errors=True)
    return None


def _hashes(entry: Path) -> dict[str, str]:
    return folder_sha256(entry, skip=("meta.json",))


def _damage(entry: Path, recorded: dict | None) -> str | None:
    """The first recorded file that is missing or changed. Files added later are datasets' own caches of
    operations on a loaded split (`cache-*.arrow`), never read in place of the recorded ones."""
    if not isinstance(recorded, dict):
        return "its meta.json records no file hashes"
    found = damaged(entry, recorded)
    if not found:
        return None
    name, state = found[0][:-1].rsplit(" (", 1)
    return f"{name} is missing" if state == "missing" else f"{name} changed since it was written"


def store(key: str, meta: dict, splits: dict) -> None:
    """Write an entry atomically; a failure to cache never fails the run."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    except OSError:
        return
    try:
        for name, dataset in splits.items():
            dataset.save_to_disk(str(staging / name))
        files = _hashes(staging)
        (staging / "meta.json").write_text(json.dumps({**meta, "splits": list(splits), "files": files}, indent=1))
        staging.rename(root / key)
    except OSError:  # disk full, or another process stored the same key first (theirs is as good)
        shutil.rmtree(staging, ignore_errors=True)


def _remove_abandoned(root: Path, older_than_s: float = 24 * 3600) -> None:
    """Staging directories left by runs that were killed while storing (a day old: none still writing)."""
    now = time.time()
    for staging in root.glob(".*-*"):
        try:
            if staging.is_dir() and now - staging.stat().st_mtime > older_than_s:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError:
            continue


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
