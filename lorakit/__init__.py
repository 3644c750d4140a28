"""lorakit: LoRA and QLoRA fine-tuning from one strict YAML recipe."""

__version__ = "0.1.0"
