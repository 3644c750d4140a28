"""The child processes of the GPU check: each prints one JSON object on stdout.

python -m scripts.gpu_check.probe environment            # stage a: versions, CUDA, bitsandbytes kernels
python -m scripts.gpu_check.probe build-model SHAPE OUT  # a Llama-shaped model with random weights
python -m scripts.gpu_check.probe plan RUN_DIR...        # stage e: lorakit plan vs each run's measured peak
python -m scripts.gpu_check.probe adapter-loads BASE RUN # the run's adapter in plain peft, on the GPU
python -m scripts.gpu_check.probe compare-adapters RUN_A RUN_B
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "pydantic",
    "pydantic-core",
    "typer",
    "rich",
    "pyyaml",
    "safetensors",
    "tokenizers",
    "huggingface-hub",
    "numpy",
    "pyarrow",
    "fsspec",
    "dill",
    "multiprocess",
    "triton",
    "liger-kernel",
    "flash-attn",
    "deepspeed",
    "pytest",
    "pytest-xdist",
)
GIB = 2**30


def environment() -> dict:
    import torch

    carried = os.environ.get("LORAKIT_WHEELS_SITE", "")
    libraries = {}
    for name in LIBRARIES:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            libraries[name] = None
            continue
        where = str(dist.locate_file(""))
        libraries[name] = {
            "version": dist.version,
            "from": "carried" if carried and where.startswith(carried) else "image",
        }
    found = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "libraries": libraries,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "liger": importlib.util.find_spec("liger_kernel") is not None,
        "pip_check": _pip_check(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found.update(
            device=props.name,
            devices=torch.cuda.device_count(),
            capability=list(torch.cuda.get_device_capability()),
            memory_gib=round(props.total_memory / GIB, 1),
            bf16=torch.cuda.is_bf16_supported(),
        )
    found["bitsandbytes"] = _bitsandbytes("cuda" if torch.cuda.is_available() else "cpu")
    found["lorakit"] = _lorakit_cli()
    return found


def _pip_check() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    return (out.stdout + out.stderr).strip()[-3000:]


def _bitsandbytes(device: str) -> dict:
    """The kernels QLoRA needs, on `device`: NF4 quantize/dequantize with double quantization, a Linear4bit
    forward and backward in bf16 against the dequantized weight, and one paged 8-bit AdamW step."""
    import torch

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception as exc:  # the import itself is what this probe reports on
        return {"imported": False, "error": f"{type(exc).__name__}: {exc}"}
    found = {"imported": True, "version": bnb.__version__}
    from bitsandbytes import cextension

    native = vars(cextension.lib).get("_lib")  # the loaded CDLL (a stand-in object has none)
    found["backend"] = cextension.BNB_BACKEND
    found["native_library"] = Path(native._name).name if native is not None else "none"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        torch.manual_seed(0)
        weight = torch.randn(1024, 1024, device=device, dtype=dtype)
        packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        back = F.dequantize_4bit(packed, state)
        found["nf4_relative_error"] = round(((back.float() - weight.float()).norm() / weight.float().norm()).item(), 4)
        layer = bnb.nn.Linear4bit(1024, 1024, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(8, 1024, device=device, dtype=dtype, requires_grad=True)
        y = layer(x)
        reference = x.detach() @ F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype).t()
        found["linear4bit_max_diff"] = round((y.detach().float() - reference.float()).abs().max().item(), 4)
        found["linear4bit_scale"] = round(reference.float().abs().max().item(), 2)
        y.float().pow(2).mean().backward()
        found["input_grad_finite"] = bool(torch.isfinite(x.grad).all().item())
        param = torch.nn.Parameter(torch.randn(4096, 64, device=device))
        optimizer = bnb.optim.PagedAdamW8bit([param], lr=1e-2)
        before = param.detach().clone()
        param.grad = torch.randn_like(param)
        optimizer.step()
        found["paged_adamw_8bit_moved"] = round((param.detach() - before).abs().mean().item(), 5)
    except Exception as exc:
        found["error"] = f"{type(exc).__name__}: {exc}"[:1500]
    return found


def _lorakit_cli() -> dict:
    out = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True, cwd=ROOT)
    return {
        "exit": out.returncode,
        "version": out.stdout.strip(),
        "error": out.stderr[-1500:] if out.returncode else "",
    }


def build_model(shape: str, out: str) -> dict:
    from benchmarks.gpu_train import build_model as build

    shape_dict = json.loads(shape)
    path = build(shape_dict, Path(out))
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return {"path": str(path), "bytes": size}


def plan_against_runs(run_dirs: list[str]) -> list[dict]:
    """For each run with a measured CUDA peak (manifest `memory`), `lorakit plan` on the run's own recipe:
    the plan's tensor terms against the peak allocated, its total against the allocator's peak pool plus
    what the device held outside it."""
    import yaml

    from lorakit.preflight import plan as plan_mod
    from lorakit.recipe.schema import Recipe

    rows = []
    for run in map(Path, run_dirs):
        manifest_path = run / "manifest.json"
        if not manifest_path.is_file():
            continue
        manifest = json.loads(manifest_path.read_text())
        memory = manifest.get("memory", {})
        recipe = Recipe.model_validate(yaml.safe_load((run / "recipe.yaml").read_text()))
        device = memory.get("device_gib", 80)
        plan = plan_mod.run(recipe, gpu_memory=int(device * GIB), with_time=False)
        tensors = sum(line.bytes for line in plan.lines if line.name != "CUDA context and allocator") / GIB
        row = {
            "run": run.name,
            "micro_batch": plan.micro_batch,
            "sequence": plan.sequence,
            "layers_note": manifest.get("base_model", ""),
            "plan_tensors_gib": round(tensors, 3),
            "plan_total_gib": round(plan.total / GIB, 3),
            "kernels": manifest.get("kernels", {}),
            "lines": {line.name: round(line.bytes / GIB, 3) for line in plan.lines},
        }
        if "peak_allocated_gib" in memory:
            measured_total = memory["peak_reserved_gib"] + memory["outside_allocator_gib"]
            row.update(
                measured_allocated_gib=memory["peak_allocated_gib"],
                measured_total_gib=round(measured_total, 3),
                tensors_error=round(tensors / memory["peak_allocated_gib"] - 1, 3),
                total_error=round(plan.total / GIB / measured_total - 1, 3),
            )
        rows.append(row)
    return rows


def adapter_loads(base: str, run: str) -> dict:
    """The run's adapter with plain transformers + peft on the GPU: loads, and changes the logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model = model.to(device)
    ids = torch.arange(3, 35, device=device).unsqueeze(0)
    with torch.no_grad():
        plain = model(ids).logits.float()
        tuned = PeftModel.from_pretrained(model, run).eval()(ids).logits.float()
    return {
        "max_logit_change": round((tuned - plain).abs().max().item(), 4),
        "finite": bool(torch.isfinite(tuned).all()),
    }


def compare_adapters(a: str, b: str) -> dict:
    """The largest difference between two runs' adapter tensors (same names required)."""
    from safetensors.torch import load_file

    one, two = (load_file(Path(d) / "adapter_model.safetensors") for d in (a, b))
    if one.keys() != two.keys():
        return {"max_abs_diff": float("inf"), "tensors": len(one), "names_differ": True}
    diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    return {"max_abs_diff": diff, "tensors": len(one)}


def main() -> None:
    what, args = sys.argv[1], sys.argv[2:]
    if what == "environment":
        result = environment()
    elif what == "build-model":
        result = build_model(*args)
    elif what == "plan":
        from lorakit.console import quiet_libraries

        quiet_libraries()
        result = {"rows": plan_against_runs(args)}
    elif what == "adapter-loads":
        result = adapter_loads(*args)
    elif what == "compare-adapters":
        result = compare_adapters(*args)
    else:
        raise SystemExit(f"unknown probe {what!r}")
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
