"""Which process this is when a launcher (torchrun, accelerate launch) starts several, and the few
places they must agree: only the main process claims and writes the run directory, the others wait for
it; data is prepared by the main process first, so the others read the preprocessing cache.

Rank and world size are read from the launcher's environment (RANK, WORLD_SIZE), so the CLI can decide
before torch is imported. The process group itself is accelerate's (`PartialState`), the same one the
trainer uses: gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


@contextmanager
def main_first():
    """The main process runs the block first (filling caches); the others run it after."""
    if world_size() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def launch(nproc: int, argv: list[str]) -> None:
    """Replace this process with torchrun starting `nproc` copies of the same command on this machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lorakit", *argv]
    os.execv(sys.executable, command)
