"""CLI start-up latency: `lorakit --help` and a recipe with a misspelled key, against bare Python.

Each command is run N times as a fresh process; the report gives the median wall time and its ratio to
`python -c pass` measured in the same run (the floor any Python CLI pays). Targets from the train issue:
--help under 1 s, a misspelled key rejected (with line and suggestion) under 2 s.

    .venv/bin/python benchmarks/cli_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
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


if __name__ == "__main__":
    main()
