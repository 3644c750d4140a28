"""CLI start-up latency: `lorakit --help` and a recipe with a misspelled key, against bare Python; and the
time from the command to the first training step, against the plain TRL baseline script.

Each command is run N times as a fresh process; the report gives the median wall time and its ratio to
`python -c pass` measured in the same run (the floor any Python CLI pays). Targets: --help under 0.5 s,
a misspelled key rejected (with line and suggestion) under 2 s.

Time to first step: the tiny QLoRA model on the bundled data, from starting the process to the first logged
training loss (lorakit: the first line of metrics.jsonl; baseline `benchmarks/trl_baseline.py`: its first
printed loss), both logging after step 1; alternating, median of `--first-step-runs`.

    .venv/bin/python benchmarks/cli_startup.py [--runs 10] [--first-step-runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """model:
  name_or_path: meta-llama/Llama-3.1-8B-Instruct
lora:
  rank: 16
data:
  train: {train}
"""


def timed(cmd: list[str], runs: int, expect_rc: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if out.returncode != expect_rc:
            raise SystemExit(f"{cmd}: exit {out.returncode}, expected {expect_rc}\n{out.stderr}")
    return times


def until(cmd: list[str], first_step, cwd: Path) -> float:
    """Seconds from starting `cmd` until `first_step(stdout_so_far)` is true (the process is then stopped)."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        while proc.poll() is None:
            log.seek(0)
            if first_step(log.read()):
                elapsed = time.perf_counter() - start
                proc.kill()
                proc.wait()
                return elapsed
            time.sleep(0.01)
        log.seek(0)
        raise SystemExit(f"{cmd[:4]} ended before its first step ({proc.returncode}):\n{log.read()[-3000:]}")


def first_step_times(root: Path, runs: int) -> dict[str, float]:
    sys.path.insert(0, str(root))
    import yaml

    from benchmarks.synthetic import TEMPLATE
    from scripts.tiny_model import build_tiny_model

    model = build_tiny_model(root / ".cache" / "tiny-llama")
    data = root / "examples" / "reverse" / "train.jsonl"
    times: dict[str, list[float]] = {"lorakit train": [], "TRL baseline script": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        template = tmp / "template.jinja"
        template.write_text(TEMPLATE)
        for run in range(runs):
            out = tmp / f"lorakit-{run}"
            recipe = tmp / f"lorakit-{run}.yaml"
            recipe.write_text(
                yaml.safe_dump(
                    {
                        "model": {"name_or_path": str(model), "load_in_4bit": True},
                        "data": {"train": str(data), "chat_template": str(template), "max_length": 64},
                        "train": {"output_dir": str(out), "max_steps": 50, "per_device_train_batch_size": 8},
                    }
                )
            )
            metrics = out / "metrics.jsonl"
            times["lorakit train"].append(
                until(
                    [sys.executable, "-m", "lorakit", "train", str(recipe), "--no-cache"],
                    lambda _, metrics=metrics: metrics.exists() and metrics.stat().st_size > 0,
                    root,
                )
            )
            times["TRL baseline script"].append(
                until(
                    [
                        sys.executable,
                        str(root / "benchmarks" / "trl_baseline.py"),
                        "--model",
                        str(model),
                        "--data",
                        str(data),
                        "--template",
                        str(template),
                        "--output",
                        str(tmp / f"trl-{run}"),
                        "--result",
                        os.devnull,
                        "--max-steps",
                        "50",
                        "--batch",
                        "8",
                        "--max-length",
                        "64",
                        "--logging-steps",
                        "1",
                    ],
                    lambda text: "'loss'" in text,
                    root,
                )
            )
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--first-step-runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "typo.yaml"
        recipe.write_text(RECIPE.format(train=root / "examples" / "reverse" / "train.jsonl"))
        cases = {
            "python -c pass (baseline)": ([sys.executable, "-c", "pass"], 0),
            "lorakit --help": ([sys.executable, "-m", "lorakit", "--help"], 0),
            "lorakit train typo.yaml (rejected)": ([sys.executable, "-m", "lorakit", "train", str(recipe)], 2),
        }
        results = {name: statistics.median(timed(cmd, args.runs, rc)) for name, (cmd, rc) in cases.items()}
    base = results["python -c pass (baseline)"]
    print(f"| command | median of {args.runs} (s) | x baseline |")
    print("|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.3f} | {value / base:.1f} |")
    if args.first_step_runs:
        first = first_step_times(root, args.first_step_runs)
        trl = first["TRL baseline script"]
        print(
            f"\n| command to first training step (tiny QLoRA) | median of {args.first_step_runs} (s) | x TRL script |"
        )
        print("|---|---|---|")
        for name, value in first.items():
            print(f"| {name} | {value:.2f} | {value / trl:.2f} |")


if __name__ == "__main__":
    main()
