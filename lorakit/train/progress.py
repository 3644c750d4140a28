"""What a user sees while a run trains, and `metrics.jsonl`: one trainer callback, plus the closing summary.

On a terminal: a rich progress bar with loss, learning rate, tokens/s and ETA. Elsewhere (CI, logs): one
plain line per logged step, and between them, when a slow run has printed nothing for HEARTBEAT_S seconds,
one line with the step, the elapsed time and an ETA (at most one per HEARTBEAT_S, so logs stay short).
Only the main process prints or writes.

A resumed run continues the figures of the run, not of its last part: metrics.jsonl keeps the records up
to the checkpoint it resumes from (those after it describe steps trained again), times count on from the
training time recorded in that checkpoint, and the first loss is the run's first.
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

HEARTBEAT_S = 60.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class RunProgress(TrainerCallback):
    """Shows progress and appends every log (train and eval) to `metrics.jsonl`."""

    def __init__(self, metrics_path: Path, console: Console, resumed: tuple[int, float | None] | None = None):
        """`resumed`: (step, training seconds before it) of the checkpoint the run resumes from."""
        self.metrics_path, self.console = metrics_path, console
        self.progress: Progress | None = None
        self.task = None
        self.started = self.ended = 0.0
        self.before = 0.0  # training seconds of the earlier parts of a resumed run
        self.resumed = resumed
        self.history: list[dict] = []
        self.heartbeat_s = HEARTBEAT_S
        self.last_line = 0.0  # when the last plain line was printed
        self.first_step = 0  # the step this process started from (a resumed run's checkpoint)

    def elapsed(self) -> float:
        """Training seconds of the whole run so far (up to the end of the training loop), earlier parts of a
        resumed run included."""
        end = self.ended or time.perf_counter()
        return self.before + (end - self.started if self.started else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_line = time.perf_counter()
        self.first_step = state.global_step
        if self.resumed is not None:
            self._continue(*self.resumed, rewrite=state.is_world_process_zero)
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

    def _continue(self, step: int, seconds: float | None, rewrite: bool) -> None:
        """The records up to `step` become the history (the file keeps only them); times count on from
        `seconds` (else the last kept record's time)."""
        records = []
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the interruption
                    continue
                if isinstance(record, dict) and record.get("step", step + 1) <= step:
                    records.append(record)
        self.history = records
        self.before = seconds if seconds is not None else (records[-1].get("time_s", 0.0) if records else 0.0)
        if rewrite:
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            tmp.replace(self.metrics_path)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
        elif state.is_world_process_zero and time.perf_counter() - self.last_line >= self.heartbeat_s:
            self._heartbeat(state)

    def _heartbeat(self, state) -> None:
        now = time.perf_counter()
        done = state.global_step - self.first_step
        eta = (now - self.started) / max(done, 1) * (state.max_steps - state.global_step)
        self.console.print(
            f"step {state.global_step}/{state.max_steps}  elapsed {_duration(self.elapsed())}  eta {_duration(eta)}",
            highlight=False,
        )
        self.last_line = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = self.elapsed()
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
            self.last_line = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = time.perf_counter()
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
