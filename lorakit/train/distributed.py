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

_LAUNCHED = "LORAKIT_LAUNCHED"


def launched() -> bool:
    """True in a process a launcher started (lorakit's own `--nproc`, torchrun, accelerate launch)."""
    return any(key in os.environ for key in (_LAUNCHED, "LOCAL_RANK", "WORLD_SIZE"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def local_processes() -> int:
    """Processes the launcher started on this machine (several machines each start their own)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def start(backend: str | None) -> None:
    """Join the launch's process group with the recipe's backend (`train.ddp_backend`) before anything else
    builds it: accelerate's PartialState is built once per process, so the trainer's (which reads the same
    setting) would find it already built with the default backend."""
    if world_size() > 1 and backend:
        from accelerate import PartialState

        PartialState(backend=backend)


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


def launch(nproc: int, argv: list[str], accelerate_config: str | None = None) -> None:
    """Replace this process with the launcher starting `nproc` copies of the same command on this machine:
    `accelerate launch --config_file` when an accelerate config picks the engine, else torchrun (DDP)."""
    if accelerate_config:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            accelerate_config,
            "--num_processes",
            str(nproc),
            "--num_machines",
            "1",
            "-m",
            "lorakit",
            *argv,
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "lorakit",
            *argv,
        ]
    os.environ[_LAUNCHED] = "1"  # the started processes must not launch again
    os.execv(sys.executable, command)
