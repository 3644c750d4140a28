"""The run directory (DESIGN.md's contract between commands): claiming it, and the files lorakit writes in it.

Owns: refusing to reuse a non-empty directory without --overwrite (and refusing to clear anything that is
not a lorakit run), `recipe.yaml`, `manifest.json` (written last: a run without it is incomplete),
`generation_config.json` stop tokens, and the `README.md` model card. The adapter and tokenizer files are
written by the trainer (lorakit.train.trainer).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from lorakit import __version__
from lorakit.digest import damaged, folder_sha256
from lorakit.errors import LorakitError
from lorakit.recipe.peft_sections import METHOD_NAMES
from lorakit.recipe.schema import Recipe

RECIPE, MANIFEST, METRICS, CARD = "recipe.yaml", "manifest.json", "metrics.jsonl", "README.md"
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "tokenizers")


def check_free(output_dir: str, overwrite: bool) -> Path:
    """Refuse, before anything is loaded, a run directory that holds files (without --overwrite) or that
    is not a lorakit run to clear; changes nothing."""
    run_dir = Path(output_dir).expanduser().resolve()  # through `..` and symlinks: the real place
    cwd = Path.cwd().resolve()
    if run_dir == cwd or run_dir in cwd.parents or run_dir == Path(run_dir.anchor):
        raise LorakitError(
            f"train.output_dir: {output_dir} is the current directory or one of its parents; "
            "choose a directory of its own, e.g. runs/NAME"
        )
    home = Path.home().resolve()
    if run_dir == home or run_dir in home.parents or _system_directory(run_dir):
        raise LorakitError(
            f"train.output_dir: {output_dir} resolves to {run_dir}, a home or system directory; "
            "choose a directory of its own, e.g. runs/NAME"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise LorakitError(f"train.output_dir: {output_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise LorakitError(
                f"train.output_dir: {output_dir} is not empty (it holds an earlier run); pass "
                "--overwrite to replace it, or set another train.output_dir"
            )
        if not (run_dir / RECIPE).is_file():
            raise LorakitError(
                f"train.output_dir: {output_dir} is not empty and is not a lorakit run (no "
                f"{RECIPE}); refusing to delete it even with --overwrite"
            )
    return run_dir


def unwritable(output_dir: str | Path) -> str | None:
    """Why a run directory cannot be created or written at `output_dir` (an ancestor that is a file, a
    read-only filesystem, no permission), or None."""
    run_dir = Path(output_dir).expanduser().resolve()
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if existing != run_dir and not existing.is_dir():
        return f"{existing} is a file, so no directory can be made under it"
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK):
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        return f"{folder} is {'on a read-only filesystem' if read_only else 'not writable by this user'}"
    return None


_SYSTEM = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/sbin", "/sys", "/usr", "/var")


def _system_directory(path: Path) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in _SYSTEM) and not str(path).startswith("/var/tmp")


def claim(output_dir: str, overwrite: bool) -> Path:
    """Create the run directory (clearing an earlier run only with --overwrite) and return it."""
    run_dir = check_free(output_dir, overwrite)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    text = yaml.safe_dump(recipe.to_saved_dict(), sort_keys=False, allow_unicode=True)
    (run_dir / RECIPE).write_text("# written by lorakit: the validated recipe of this run\n" + text, encoding="utf-8")


def write_generation_config(run_dir: Path, model, tokenizer, end_of_turn_id: int) -> list[int]:
    """Register the trained end-of-turn token as a stop token next to the adapter; returns the eos ids."""
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None) or GenerationConfig()
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    for token in (tokenizer.eos_token_id, end_of_turn_id):
        if token is not None and token not in eos_ids:
            eos_ids.append(token)
    generation = GenerationConfig(
        **{**config.to_diff_dict(), "eos_token_id": eos_ids, "pad_token_id": tokenizer.pad_token_id}
    )
    generation.save_pretrained(run_dir)
    return eos_ids


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
ACCEPT_FLAG = "--accept-changed-adapter"


def adapter_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of the adapter's files as training wrote them, for manifest.json."""
    return folder_sha256(run_dir, ADAPTER_FILES)


def check_adapter(run_dir: Path, manifest: dict, accept_changed: bool = False) -> str | None:
    """Refuse an adapter whose files no longer match what the manifest recorded at the end of training
    (bytes flipped, a file replaced): merging or evaluating it would measure something else. With
    `accept_changed`, returns the notice to print instead. Runs of an older lorakit record no hashes."""
    recorded = manifest.get("adapter_sha256") or {}
    return check_files(run_dir, recorded, MANIFEST, "the adapter that was trained", accept_changed)


def check_files(folder: Path, recorded: dict, record: str, meaning: str, accept_changed: bool) -> str | None:
    """Refuse `folder` when files `record` hashed when they were written are now missing or changed (or
    return the notice to print, with `accept_changed`). `meaning`: what the files were, for the message."""
    changed = damaged(folder, recorded if isinstance(recorded, dict) else {})
    if not changed:
        return None
    what = ", ".join(f"{folder / name}" for name in changed)
    if accept_changed:
        return f"warning: {what}: no longer as lorakit wrote it ({record}); used anyway ({ACCEPT_FLAG})"
    raise LorakitError(
        f"{what}: no longer matches the sha256 {record} recorded when it was written, so it is not "
        f"{meaning}; pass {ACCEPT_FLAG} to use it anyway"
    )


def read_record(path: Path) -> dict:
    """A JSON record lorakit wrote (manifest.json, merge_report.json), or an error naming the file and what
    is wrong with it, never a bare decoding error."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LorakitError(f"{path}: cannot be read as JSON ({err}); it was damaged after lorakit wrote it") from None
    if not isinstance(value, dict):
        raise LorakitError(f"{path}: holds a JSON {type(value).__name__}, not the object lorakit wrote")
    return value


def write_manifest(run_dir: Path, recipe: Recipe, details: dict) -> None:
    """Everything needed to reproduce or audit the run; written last, so its presence means complete."""
    manifest = {
        "lorakit": __version__,
        "status": "complete",
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": recipe.model.name_or_path,
        "method": details["method"],  # as the run's set-up names it (LoRA on a 4-bit base: qlora)
        "load_in_4bit": details["load_in_4bit"],
        "libraries": {name: _version(name) for name in LIBRARIES},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_revision": _git_revision(),
        **details,
    }
    tmp = run_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / MANIFEST)


def _method_rows(recipe: Recipe, details: dict) -> list[str]:
    """The adapter's own settings, for the model card."""
    lora = recipe.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    if recipe.method == "lora":
        return [
            f"| rank / alpha / dropout | {lora.r} / {lora.lora_alpha} / {lora.lora_dropout} |",
            f"| target modules | {targets} |",
        ]
    if recipe.method == "adalora":
        ranks = details.get("adalora_final_ranks") or {}
        return [
            f"| initial rank / target average rank | {recipe.adalora.init_r} / {recipe.adalora.target_r} |",
            f"| final ranks | {', '.join(f'{k}: {v}' for k, v in ranks.items())} |",
            f"| target modules | {targets} |",
        ]
    if recipe.method == "ia3":
        return [f"| target modules | {recipe.ia3.target_modules or 'peft default'} |"]
    section = getattr(recipe, recipe.method)
    return [f"| virtual tokens | {section.num_virtual_tokens} |"]


def write_model_card(run_dir: Path, recipe: Recipe, details: dict) -> None:
    loss = details.get("results", {})
    name = METHOD_NAMES[recipe.method]
    lines = [
        "---",
        f"base_model: {recipe.model.name_or_path}",
        "library_name: peft",
        f"tags: [lorakit, {recipe.method.replace('_', '-')}" + (", qlora" if details["load_in_4bit"] else "") + "]",
        "---",
        f"# {run_dir.name}",
        "",
        f"A {name} adapter{' (4-bit NF4 base, QLoRA)' if details['load_in_4bit'] else ''} for "
        f"`{recipe.model.name_or_path}`, trained with lorakit {__version__}.",
        "",
        "| setting | value |",
        "|---|---|",
        *_method_rows(recipe, details),
        f"| precision | {details.get('precision')} |",
        f"| learning rate | {recipe.train.learning_rate} |",
        f"| steps | {loss.get('steps')} |",
        f"| train loss (first -> last) | {_rounded(loss.get('first_loss'))} -> {_rounded(loss.get('last_loss'))} |",
        f"| eval loss | {_rounded(loss.get('eval_loss'))} |",
        f"| data | {', '.join(Path(p).name for p in details.get('data', {}).get('fingerprints', {}))} |",
        "",
        "Load it with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), this_dir)`; "
        "the tokenizer and chat template used in training are saved here too.",
    ]
    (run_dir / CARD).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _rounded(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def template_hash(tokenizer) -> str | None:
    template = tokenizer.chat_template
    return hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
