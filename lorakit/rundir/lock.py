"""One writer per run directory: `lorakit train` holds an exclusive lock on it for its whole life, and the
commands that read a run (merge, eval, generate, chat, export) hold a shared one while they read.

The lock is a `flock` on `.<run name>.lock` beside the run directory (so `--overwrite` can delete the run
without deleting its lock). The operating system releases it when the process ends, however it ends: a
`kill -9` leaves nothing stale to clean up. The writer records its pid, command and start time in the file
for the message that refuses a second writer or a reader.

A `lorakit train --nproc` launch keeps the lock across the launcher replacing the process (the descriptor
is inherited) and tells the processes it starts (`HELD`) that it holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.rundir.directory import unwritable

HELD = "LORAKIT_RUN_LOCK_HELD"  # the lock file a launching lorakit process holds for the processes it starts
_open: list = []  # the held lock files stay open (and locked) until the process exits


def lock_file(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def hold_for_writing(run_dir: Path, command: str) -> None:
    """Take the run directory for this process (and the processes it launches), or refuse naming who has it."""
    run_dir = Path(run_dir).expanduser().resolve()
    path = lock_file(run_dir)
    if os.environ.get(HELD) == str(path):
        return  # the lorakit process that launched this one holds it
    problem = unwritable(run_dir)
    if problem:
        raise LorakitError(f"train.output_dir: {run_dir} cannot be written: {problem}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = _opened(path)
    except OSError as exc:  # whatever else the filesystem says: where, and its words
        raise LorakitError(f"train.output_dir: cannot write beside {run_dir}: {exc.strerror or exc}") from None
    who = _take(handle, fcntl.LOCK_EX)
    if who:
        raise LorakitError(f"train.output_dir: {run_dir} is in use: {who}; wait for it to end (or stop it)")
    handle.seek(0)
    handle.truncate()
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    handle.write(json.dumps({"pid": os.getpid(), "command": command, "since": since}) + "\n")
    handle.flush()
    os.set_inheritable(handle.fileno(), True)  # kept by a launcher that replaces this process
    os.environ[HELD] = str(path)
    _open.append(handle)


def hold_for_reading(run_dir: Path) -> None:
    """Read the run only while no process writes it; a writer that comes later is refused until we end."""
    run_dir = Path(run_dir).expanduser().resolve()
    path = lock_file(run_dir)
    if os.environ.get(HELD) == str(path) or not run_dir.parent.is_dir():
        return
    if not path.exists() and not (run_dir / "recipe.yaml").is_file():
        return  # not a run, and no writer ever took it (a writer makes the lock file first): leave no file
    try:
        handle = _opened(path)
    except OSError:  # a read-only place: nothing can write the run there either
        return
    who = _take(handle, fcntl.LOCK_SH)
    if who:
        raise LorakitError(f"{run_dir} is being written: {who}; wait until it finishes")
    _open.append(handle)


def _take(handle, mode: int) -> str | None:
    """Lock `handle` in `mode` without waiting; None when taken, else who holds it (the handle closed)."""
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        who = _holder(handle)
        handle.close()
        return who


def _opened(path: Path):
    return open(path, "a+", encoding="utf-8")


def _holder(handle) -> str:
    """Who holds the lock: the writer it names, or readers (a shared lock still comes when only they hold it)."""
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)
        return "another lorakit command is reading it (merge, eval, generate, chat or export)"
    except BlockingIOError:
        pass
    handle.seek(0)
    try:
        info = json.loads(handle.readline())
        return f"`{info['command']}` (pid {info['pid']}, since {info['since']}) is writing it"
    except (ValueError, KeyError):
        return "another process is writing it"
