"""Checkpoints that can be trusted, resuming from them, and stopping cleanly on a signal.

Owns: where checkpoints are written (the trainer saves into `checkpoints/.incoming/`; lorakit flushes
the files, writes the completion marker last (file sizes and sha256, the step, the data fingerprints) and
renames the directory into `checkpoints/`), finding the newest complete checkpoint (a checkpoint without a valid marker, or
whose files no longer match it, is never used), keeping `save_total_limit` checkpoints only after a newer
one is complete, refusing a resume whose recipe or data changed, and the SIGTERM/SIGINT handling that
turns a preemption into a complete checkpoint and a resumable exit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import yaml
from transformers import TrainerCallback

from lorakit.digest import file_sha256
from lorakit.errors import LorakitError
from lorakit.train import distributed

MARKER = "lorakit-checkpoint.json"
INCOMING = ".incoming"  # the trainer writes checkpoints here; only complete ones are renamed into place
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors")
# Keys a resume may change: how long to train and what to log or keep; anything else changes the run.
MAY_CHANGE = {
    ("train", k)
    for k in (
        "max_steps",
        "num_train_epochs",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "report_to",
        "run_name",
        "output_dir",
    )
} | {("eval",)}


def run_to_resume(output_dir: str) -> Path:
    run_dir = Path(output_dir).expanduser().resolve()
    if not (run_dir / "recipe.yaml").is_file():
        raise LorakitError(f"train.output_dir: {output_dir} holds no lorakit run to resume")
    if (run_dir / "manifest.json").is_file():
        raise LorakitError(
            f"train.output_dir: {output_dir} holds a finished run; raise train.max_steps and use "
            "--force-resume to train it further, or start a new run"
        )
    return run_dir


def write_marker(checkpoint: Path, step: int, fingerprints: dict, train_seconds: float | None = None) -> None:
    """Flush every file of the checkpoint, then record them (and the run's training time so far, which a
    resumed run counts on from); the marker appears atomically, last."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MARKER):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
            files[str(path.relative_to(checkpoint))] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise LorakitError(f"{checkpoint}: the trainer wrote no {', '.join(missing)}; the checkpoint cannot resume")
    tmp = checkpoint / (MARKER + ".tmp")
    marker = {"step": step, "files": files, "data_fingerprints": fingerprints, "train_seconds": train_seconds}
    tmp.write_text(json.dumps(marker, indent=1))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint / MARKER)


def complete_checkpoints(directory: Path, warn=print, set_aside: bool = False) -> list[Path]:
    """Complete checkpoints, newest first. Unmarked ones (a save that never finished) are skipped silently;
    marked ones whose marker is malformed or whose files changed (truncated, corrupted) are skipped with a
    warning, and with `set_aside` (resuming) renamed `damaged-checkpoint-N`, out of rotation's way: a damaged
    newer checkpoint is never kept over the good one the run resumes from."""
    found = []
    for checkpoint in sorted(directory.glob("checkpoint-*"), key=_step, reverse=True):
        marker = checkpoint / MARKER
        if not marker.is_file():
            continue
        recorded, problem = read_marker(checkpoint)
        problem = problem or _damage(checkpoint, recorded)
        if problem:
            aside = checkpoint.with_name(f"damaged-{checkpoint.name}")
            if set_aside:
                shutil.rmtree(aside, ignore_errors=True)
                checkpoint.rename(aside)
            kept = f"; set aside as {aside.name}" if set_aside else ""
            warn(f"warning: {checkpoint.name} is damaged ({problem}){kept}; falling back to an earlier checkpoint")
            continue
        found.append(checkpoint)
    return found


def read_marker(checkpoint: Path) -> tuple[dict | None, str | None]:
    """The checkpoint's completion marker, or why it cannot be trusted (not JSON, fields missing)."""
    try:
        marker = json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"its {MARKER} is unreadable ({type(exc).__name__})"
    if not isinstance(marker, dict):
        return None, f"its {MARKER} is not an object"
    missing = [key for key in ("step", "files", "data_fingerprints") if key not in marker]
    if missing:
        return None, f"its {MARKER} lacks {', '.join(missing)}"
    files = marker["files"]
    if not isinstance(files, dict) or not all(
        isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
        for f in files.values()
    ):
        return None, f"its {MARKER} lists files without their size and sha256"
    if not isinstance(marker["step"], int) or not isinstance(marker["data_fingerprints"], dict):
        return None, f"its {MARKER} has a malformed step or data_fingerprints"
    return marker, None


def _damage(checkpoint: Path, marker: dict) -> str | None:
    for name, expected in marker["files"].items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} were written"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} changed since it was written"
    return None


def recipe_changes(saved: dict, new: dict) -> list[str]:
    """`key: old -> new` lines for every value that differs, except those a resume may change."""
    changes = []

    def walk(a, b, path: tuple):
        if path in MAY_CHANGE or path[:1] in MAY_CHANGE:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), (*path, key))
        elif a != b:
            changes.append(f"{'.'.join(path)}: {a!r} -> {b!r}")

    walk(saved, new, ())
    return changes


def check_resumable(run_dir: Path, new_recipe: dict, fingerprints: dict, force: bool, warn=print) -> Path:
    """The checkpoint to resume from; refuses changed recipes and data (unless forced)."""
    checkpoint = next(iter(complete_checkpoints(run_dir / "checkpoints", warn, set_aside=True)), None)
    if checkpoint is None:
        raise LorakitError(f"{run_dir}: no complete checkpoint to resume from")
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    changes = recipe_changes(saved, new_recipe)
    marked = read_marker(checkpoint)[0]["data_fingerprints"]
    if not any(name.startswith("base ") for name in marked):  # a checkpoint of an older lorakit: data only
        fingerprints = {k: v for k, v in fingerprints.items() if not k.startswith("base ")}
    changes += [
        f"{name}: content changed" if name.startswith("base ") else f"data {name}: content changed"
        for name in sorted(set(marked) | set(fingerprints))
        if marked.get(name) != fingerprints.get(name)
    ]
    if changes and not force:
        raise LorakitError(
            "the recipe or data changed since the run started; resuming would train a different run:\n"
            + "\n".join(f"  {c}" for c in changes)
            + "\nstart a new run, or pass --force-resume to continue anyway"
        )
    return checkpoint


def keep_newest(directory: Path, limit: int | None) -> None:
    """Delete older checkpoints beyond `limit`, only ever after a newer one is complete."""
    if not limit:
        return
    # marked ones, newest first; not re-hashed (that is for choosing what to resume from, and checkpoints
    # of large runs hold gigabytes of optimizer state)
    complete = sorted((c for c in directory.glob("checkpoint-*") if read_marker(c)[0]), key=_step, reverse=True)
    for old in complete[limit:]:
        shutil.rmtree(old, ignore_errors=True)
    newest = _step(complete[0]) if complete else None
    unfinished = [*directory.glob("checkpoint-*"), *(directory / INCOMING).glob("checkpoint-*")]
    for partial in unfinished:  # saves that never finished, older than a complete checkpoint
        if newest is not None and _step(partial) < newest and not read_marker(partial)[0]:
            shutil.rmtree(partial, ignore_errors=True)


def resumed_at(checkpoint: Path) -> tuple[int, float | None]:
    """(step, training seconds before it) of the checkpoint a run resumes from, as its marker records them
    (no seconds in the markers of an older lorakit)."""
    marker = read_marker(checkpoint)[0]
    return int(marker["step"]), marker.get("train_seconds")


class CheckpointGuard(TrainerCallback):
    """Marks each checkpoint complete after the trainer saved it (with the run's training time from `clock`),
    then rotates; stops on SIGTERM/SIGINT after the current step with a complete checkpoint. A second SIGINT
    aborts at once."""

    def __init__(self, fingerprints: dict, save_total_limit: int | None, clock=None):
        self.fingerprints, self.limit, self.clock = fingerprints, save_total_limit, clock
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, the last complete checkpoint stays as it is
        self.signal = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # under FSDP every process writes its own shards; all must be done before the marker
        if state.is_world_process_zero:
            incoming = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            directory = incoming.parent.parent
            seconds = round(self.clock(), 2) if self.clock else None
            write_marker(incoming, state.global_step, self.fingerprints, seconds)
            final = directory / incoming.name
            if final.exists():  # a damaged checkpoint of the same step, skipped when resuming
                shutil.rmtree(final)
            os.rename(incoming, final)
            _fsync_directory(directory)
            keep_newest(directory, self.limit)
        return control

    @property
    def exit_code(self) -> int | None:
        return None if self.signal is None else 128 + self.signal


class NonFiniteGuard(TrainerCallback):
    """Skips the update of a step whose gradients are not finite: every gradient is dropped before the
    optimizer steps, and optimizers leave parameters without a gradient untouched (no moment update, no
    weight decay). `limit` such steps in a row stop training."""

    def __init__(self, limit: int, console):
        self.limit, self.console = limit, console
        self.in_a_row, self.skipped = 0, []
        self.stopped_at: int | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            self.in_a_row = 0
            return control
        step = state.global_step + 1
        for p in model.parameters():
            p.grad = None
        self.in_a_row += 1
        self.skipped.append(step)
        if state.is_world_process_zero:
            self.console.print(
                f"[yellow]warning:[/] step {step}: non-finite gradients, update skipped ({self.in_a_row} in a row)",
                highlight=False,
            )
        if self.in_a_row >= self.limit:
            self.stopped_at = step
            control.should_training_stop = True
            control.should_save = False
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            control.should_save = False  # the last good checkpoint stays the newest
        return control


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1
