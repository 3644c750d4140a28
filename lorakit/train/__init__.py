"""Training: `lorakit train` from the parsed recipe to the complete run directory.

Modules: `launch` (the refusals, the preflight, torchrun/accelerate for several processes),
`trainer` (`run`: the trainer built and run as named steps), `resume` (checkpoint markers, rotation,
resume checks, signals), `progress` (progress bar, metrics.jsonl, the summary), `distributed` (ranks,
main-process-first, barrier, starting the launcher).
"""
