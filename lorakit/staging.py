"""Outputs that appear whole or not at all: each is written into a staging directory beside it, named after
the writing process, then renamed into place; staging left by a process that was killed is removed by the
next one writing there. Used for merged models, combined adapters, eval reports, GGUF exports and GGUF
conversions in the cache."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

# `.OUT.partial-PID` being written, `.OUT.combined-PID` a combination laid out like a run, `.OUT.replaced-PID`
# the previous output moved aside
STAGING_KINDS = ("partial", "combined", "replaced")


def staging_path(out: Path) -> Path:
    """This process's staging directory for `out`; known before it exists, so a `finally` that removes it
    covers a signal arriving while it is being made."""
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def staging_for(out: Path) -> Path:
    """A fresh, empty staging directory beside `out` for this process (`staging_path`), after removing the
    ones that processes killed before they could clean up (kill -9, power loss) left behind."""
    remove_stale_staging(out)
    staging = staging_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def remove_staging(staging: Path) -> None:
    """Remove a staging directory with SIGTERM/SIGINT held back until it is gone (then they act as usual),
    so a signal cannot stop the cleanup halfway."""
    held = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        shutil.rmtree(staging, ignore_errors=True)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove `.OUT.partial-PID` / `.OUT.replaced-PID` beside `out` whose process no longer runs."""
    removed = []
    for kind in STAGING_KINDS:
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def swap_into_place(staging: Path, out: Path) -> None:
    """Put a finished output directory (merge, combined adapter, eval report) where the earlier one was: the
    earlier one is moved aside, not deleted, until the new one is in place, so a failure never leaves neither."""
    previous = out.parent / f".{out.name}.replaced-{os.getpid()}"
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
