"""`make gpu-check`: the GPU validation as one prepared call, sized for a 15-minute device lease.

Stages run in order, each under its own time cap and all under one budget; each writes its JSON result to the
output folder as soon as it finishes, so a run stopped at its limit still returns every finished stage:

    a  environment   GPU, torch/CUDA, library versions, bitsandbytes' CUDA kernels, flash-attn and Liger
    b  tests         the `gpu`-marked tests, then those of train, merge, eval and resume, with CUDA visible
    c  qlora         a ~1B Llama-shaped model in 4-bit: bf16, paged 8-bit AdamW, gradient checkpointing; loss
                     falls, SIGTERM then --resume matches, merges under both QLoRA policies, eval, generate
    d  speed         benchmarks/gpu_train.py on the Llama-3-8B shape (fewer layers): tokens/s, MFU, peak memory,
                     longest sequence at batch 1, against the plain TRL baseline
    e  plan          `lorakit plan`'s prediction against the peak memory measured in c and d
    f  distributed   two processes sharing the GPU (gloo DDP), FSDP + QLoRA through accelerate

Without CUDA the same stages run reduced (the tiny model on CPU; stages that need CUDA say "skipped: no
CUDA"), which is how the tests keep the script from rotting between GPU draws.

Modules: `runner` (stages, caps, commands, results, summary), `stages` (a-f), `record` (the docs sections
the results fill in), `__main__` (the command line).
"""
