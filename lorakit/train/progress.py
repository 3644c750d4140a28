"""What a user sees while a run trains, and `metrics.jsonl`: one trainer callback, plus the closing summary.

On a terminal: a rich progress bar with loss, learning rate, tokens/s and ETA. Elsewhere (CI, logs): one
plain line per logged step. Only the main process prints or writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import TrainerCallback


class RunProgress(TrainerCallback):
    """Shows progress and appends every log (train and eval) to `metrics.jsonl`."""

    def __init__(self, metrics_path: Path, console: Console):
        self.metrics_path, self.console = metrics_path, console
        self.progress: Progress | None = None
        self.task = None
        self.started = 0.0
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        if not state.is_world_process_zero:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=state.max_steps, stats="")
            self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.perf_counter() - self.started
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time_s": round(elapsed, 2)}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        if state.num_input_tokens_seen:
            record["tokens_seen"] = int(state.num_input_tokens_seen)
            record["tokens_per_s"] = round(state.num_input_tokens_seen / max(elapsed, 1e-9), 1)
        self.history.append(record)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        stats = _format(record)
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=stats)
        elif stats:
            self.console.print(f"step {state.global_step}/{state.max_steps} {stats}", highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None

    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history if "loss" in r]


def _format(record: dict) -> str:
    parts = []
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    if "learning_rate" in record:
        parts.append(f"lr {record['learning_rate']:.2e}")
    if "tokens_per_s" in record and "loss" in record:
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    return "  ".join(parts)


def summary_table(summary: dict) -> Table:
    table = Table(title="lorakit train: done", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary.items():
        table.add_row(key, str(value))
    return table
