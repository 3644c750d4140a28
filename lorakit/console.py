"""Terminal output shared by the commands: lorakit speaks, the libraries underneath stay quiet."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """lorakit shows its own progress; the libraries' bars, v6 rename notices and bitsandbytes' note about
    an optional CPU kernel package would bury it. Real errors still surface as exceptions."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # before bitsandbytes loads
    warnings.filterwarnings("ignore", message=r"Paged optimizers are not supported on CPU")  # lorakit says it
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6", category=FutureWarning)
    # AdaLoRA prunes layers to rank 0 by design; peft's save check takes those for unsharded FSDP/ZeRO-3 tensors
    warnings.filterwarnings("ignore", message=r"Adapter '.*': \d+ LoRA tensor\(s\) have invalid shape: .*:\(0, \d+\)")
