"""One process of tests/test_engines.py's FSDP check (started by torchrun, gloo on CPU).

accelerate runs FSDP only on GPUs, so this drives torch's FSDP directly, the way accelerate and the trainer
do it for a PEFT model (peft's `fsdp_auto_wrap_policy` for FSDP1, as transformers' `update_fsdp_plugin_peft`
installs it; one `fully_shard` per decoder layer for FSDP2), on the base exactly as lorakit loads and
prepares it for that engine. Each case writes one JSON line to OUT/rank<N>.jsonl: the losses of three
steps, or the error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lorakit.model import base as model_mod
from lorakit.model import engines
from lorakit.model import peft_methods as methods
from lorakit.model.setup import for_loading
from lorakit.recipe.schema import LoraSection, ModelConfig


def build(model_dir: str, version: int, storage: str, dtype: str, upcast_norms: bool):
    from peft import get_peft_model, prepare_model_for_kbit_training

    cfg = ModelConfig(
        name_or_path=model_dir, load_in_4bit=True, dtype=dtype, quantization={"bnb_4bit_quant_storage": storage}
    )
    engine = engines.Engine("fsdp", fsdp_version=version)
    loading = for_loading(cfg, engine=engine)
    base = model_mod.load_base(cfg, loading)
    base = model_mod.prepare_for_training(base, loading, False)
    if upcast_norms:  # what the single-GPU QLoRA preparation does, and lorakit skips under FSDP
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return get_peft_model(base, methods.lora_config(LoraSection(r=8, lora_alpha=16, lora_dropout=0.0)))


def shard(model, version: int):
    if version == 1:
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False, device_id=torch.device("cpu")
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def case(model_dir: str, version: int, storage: str, dtype: str, upcast_norms: bool) -> dict:
    torch.manual_seed(0)
    model = build(model_dir, version, storage, dtype, upcast_norms)
    dtypes = sorted({str(p.dtype).split(".")[-1] for p in model.parameters() if not p.requires_grad})
    try:
        model = shard(model, version)
    except (ValueError, RuntimeError, AssertionError) as exc:
        return {"error": str(exc), "frozen_dtypes": dtypes}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(dist.get_rank()))
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "frozen_dtypes": dtypes}


def main() -> None:
    model_dir, cases, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    with open(out / f"rank{dist.get_rank()}.jsonl", "w") as log:
        for name, (version, storage, dtype, upcast) in cases.items():
            result = case(model_dir, version, storage, dtype, upcast)
            log.write(json.dumps({"case": name, "rank": dist.get_rank(), **result}) + "\n")
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
