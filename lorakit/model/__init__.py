"""The base model and what a run trains on it: precision, tokenizer, (4-bit) loading, the PEFT method,
the engine that shares the run between processes, the set-up decided once, and base checkpoints as files.

Modules: `base` (precision, tokenizer, from_pretrained, target modules, packing and Liger support),
`setup` (`Setup`: the training decisions made once), `engines` (DDP/FSDP/DeepSpeed and their refusals),
`peft_methods` (each method's peft config, AdaLoRA's budget, LoftQ), `method_training` (what training
adds per method), `scoring` (the token-weighted loss eval and training report), `shards` (finding, reading
and writing safetensors shards).
"""
