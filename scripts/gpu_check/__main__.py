"""python -m scripts.gpu_check [--out DIR] [--only a,c] [--budget S]: run the GPU check (see __init__).
python -m scripts.gpu_check record DIR: put a GPU run's results into benchmarks/ and docs/plan.md.

`make gpu-check` (scripts/gpu_check.sh) installs the carried wheels first, then runs this. Results go to
--out, else $OUT (the device tool's folder), else runs/gpu-check; the models and logs to --work.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts.gpu_check.runner import PYTHON, ROOT, run_stages, write_summary
from scripts.gpu_check.stages import STAGES

BUDGET = 520  # seconds for all stages: with the wheels' install, under 9 minutes on an H200


def main(argv: list[str]) -> int:
    if argv[:1] == ["record"]:
        from scripts.gpu_check.record import main as record

        return record(argv[1:])
    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check"))
    parser.add_argument("--work", type=Path, help="models, runs and logs (default: a new temporary directory)")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for all stages together")
    parser.add_argument("--only", help="stages to run, e.g. a,c (default: all)")
    parser.add_argument(
        "--size",
        choices=("auto", "full", "reduced"),
        default="auto",
        help="full on a CUDA GPU, reduced (tiny model, CPU) without one",
    )
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lorakit-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "LORAKIT_CACHE_DIR": str(work / "lorakit-cache"),
    }
    cuda = _cuda(env)
    reduced = args.size == "reduced" or (args.size == "auto" and not cuda)
    print(
        f"gpu-check: {'full size on CUDA' if not reduced else 'reduced (no CUDA)' if not cuda else 'reduced'}; "
        f"results in {args.out}, work in {work}, budget {args.budget:.0f} s",
        flush=True,
    )
    only = set(args.only.split(",")) if args.only else None
    results = run_stages(STAGES, args.out, work, reduced=reduced, cuda=cuda, budget=args.budget, env=env, only=only)
    print(write_summary(results, args.out / "summary.md", reduced=reduced))
    return 1 if any(r["status"] in ("failed", "timed out") for r in results) else 0


def _cuda(env: dict) -> bool:
    probe = subprocess.run(
        [PYTHON, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True, env=env
    )
    return probe.stdout.strip() == "True"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
