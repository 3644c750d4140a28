"""Running the stages: one budget for the whole check, a cap for each stage, commands in their own process
group (killed with everything they started when the cap is reached), a JSON result per stage written as
soon as it ends, and the summary (summary.md, logs.tar.gz) refreshed after every stage.

The driver never imports torch: each stage's work runs in child processes, so a cap can always be enforced
and no stage's CUDA memory is held by the driver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
_NAMING = threading.Lock()


class OutOfTime(Exception):
    """The stage's cap (or the whole check's budget) was reached."""


class Skipped(Exception):
    """The stage cannot run here; the message says why."""


class StageFailed(Exception):
    """A step the rest of the stage depends on failed; the checks so far say which."""


@dataclass
class Done:
    """A finished command: exit code, its output's tail, seconds, the log (stdout and stderr) and, for
    commands run with `json_out`, the file their stdout went to."""

    code: int
    tail: str
    seconds: float
    log: Path
    stdout: Path | None = None

    def json(self) -> dict:
        """The JSON object the command printed on stdout (anything a library printed before it is skipped)."""
        lines = self.stdout.read_text(errors="replace").splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith(("{", "[")))
        return json.loads("\n".join(lines[first:]))


@dataclass
class Context:
    """What a stage works with: the shared folders, its deadline, its checks and figures."""

    key: str
    work: Path
    logs: Path
    reduced: bool
    cuda: bool
    deadline: float
    env: dict
    checks: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    _count: int = 0

    def _log(self, label: str) -> Path:
        """A new log file for a command (stages may run commands from two threads)."""
        with _NAMING:
            self._count += 1
            return self.logs / f"{self.key}{self._count:02d}-{label}.log"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        self.checks.append(
            {"name": name, "ok": bool(ok), "detail": detail if isinstance(detail, (int, float)) else str(detail)[:2000]}
        )
        return bool(ok)

    def command(
        self,
        label: str,
        argv: list,
        *,
        env: dict | None = None,
        timeout: float | None = None,
        interrupt_first: bool = False,
        json_out: bool = False,
    ) -> Done:
        """Run argv to completion in its own process group (cwd: the repository), its output in a log (with
        `json_out`, stdout in a file of its own); past the stage's deadline (or `timeout`), the group is
        stopped and OutOfTime raised. `interrupt_first` sends SIGINT first (pytest then writes its report)."""
        log = self._log(label)
        stdout = log.with_suffix(".out") if json_out else None
        limit = min(self.left(), timeout or float("inf"))
        if limit <= 1:
            raise OutOfTime(f"no time left for {label}")
        started = time.monotonic()
        with open(log, "w") as handle, open(stdout or os.devnull, "w") as out:
            handle.write("$ " + " ".join(map(str, argv)) + "\n")
            handle.flush()
            proc = subprocess.Popen(
                [str(a) for a in argv],
                stdout=out if json_out else handle,
                stderr=handle if json_out else subprocess.STDOUT,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                stop(proc, signal.SIGINT if interrupt_first else signal.SIGTERM)
                raise OutOfTime(f"{label} ran past {limit:.0f} s (log: {log.name})") from None
        return Done(code, tail(log), time.monotonic() - started, log, stdout)

    def start(self, label: str, argv: list, *, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        """Start argv in the background (its own process group); the caller waits for it."""
        log = self._log(label)
        handle = open(log, "w")
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            start_new_session=True,
        )
        return proc, log

    def python(self, label: str, *args, **kwargs) -> Done:
        return self.command(label, [PYTHON, *args], **kwargs)

    def lorakit(self, label: str, *args, **kwargs) -> Done:
        return self.command(label, [PYTHON, "-m", "lorakit", *args], **kwargs)

    def need(self, done: Done, what: str, codes: tuple[int, ...] = (0,)) -> Done:
        """Record a check that the command exited as expected; stop the stage when it did not."""
        if not self.check(
            what,
            done.code in codes,
            f"exit {done.code}" if done.code in codes else f"exit {done.code}: {done.tail[-1500:]}",
        ):
            raise StageFailed(f"{what}: exit {done.code} (log: {done.log.name})")
        return done


def stop(proc: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 15) -> None:
    """Stop a process group: `first`, then SIGKILL after `grace` seconds."""
    for sig, wait in ((first, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(log: Path, chars: int = 3000) -> str:
    text = log.read_text(errors="replace")
    return text[-chars:]


@dataclass
class Stage:
    key: str
    name: str
    cap: float  # seconds on the GPU machine (full size)
    body: Callable[[Context], None]
    needs_cuda: bool = False
    minimum: float = 20  # not started with less than this left of the budget
    reduced_cap: float = 300  # seconds on the CPU rehearsal


def run_stages(
    stages: list[Stage],
    out: Path,
    work: Path,
    *,
    reduced: bool,
    cuda: bool,
    budget: float,
    env: dict,
    only: set[str] | None = None,
) -> list[dict]:
    """Every stage in order, within `budget` seconds; returns their results (also written to `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + budget
    results = []
    for stage in stages:
        if only and stage.key not in only:
            continue
        result = _run_one(stage, end, work, logs, reduced=reduced, cuda=cuda, env=env)
        results.append(result)
        (out / f"{stage.key}-{stage.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        write_summary(results, out / "summary.md", reduced=reduced)
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            tar.add(logs, arcname="logs")
        print(f"gpu-check: {stage.key} {stage.name}: {result['status']} ({result['seconds']:.0f} s)", flush=True)
    return results


def _run_one(stage: Stage, end: float, work: Path, logs: Path, *, reduced: bool, cuda: bool, env: dict) -> dict:
    cap = stage.reduced_cap if reduced else stage.cap
    started = time.monotonic()
    ctx = Context(stage.key, work, logs, reduced, cuda, min(started + cap, end), env)
    status, reason = "passed", ""
    if stage.needs_cuda and not cuda:
        status, reason = "skipped", "no CUDA"
    elif end - started < stage.minimum:
        status, reason = "skipped", f"out of time ({end - started:.0f} s of the budget left)"
    else:
        try:
            stage.body(ctx)
        except Skipped as exc:
            status, reason = "skipped", str(exc)
        except OutOfTime as exc:
            status, reason = "timed out", str(exc)
        except StageFailed as exc:
            status, reason = "failed", str(exc)
        except Exception as exc:  # a defect of the check itself: say where, keep going
            status, reason = "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
    if status == "passed" and not all(c["ok"] for c in ctx.checks):
        status = "failed"
        reason = "; ".join(c["name"] for c in ctx.checks if not c["ok"])
    return {
        "stage": stage.key,
        "name": stage.name,
        "status": status,
        "reason": reason,
        "reduced": reduced,
        "cap_s": cap,
        "seconds": round(time.monotonic() - started, 1),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checks": ctx.checks,
        "figures": ctx.figures,
        "notes": ctx.notes,
    }


def summary_table(results: list[dict]) -> str:
    """One table: stage, status, time against its cap, checks passed, the headline figures."""
    lines = ["| stage | status | s (cap) | checks | figures |", "|---|---|---|---|---|"]
    for r in results:
        passed = sum(c["ok"] for c in r["checks"])
        status = r["status"] + (f": {r['reason'].splitlines()[0][:120]}" if r["reason"] else "")
        figures = ", ".join(f"{k} {v}" for k, v in headline(r["figures"]).items())
        lines.append(
            f"| {r['stage']} {r['name']} | {status} | {r['seconds']:.0f} ({r['cap_s']:.0f}) | "
            f"{passed}/{len(r['checks'])} | {figures} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(results: list[dict], path: Path, *, reduced: bool) -> str:
    text = f"gpu-check{' (reduced: no CUDA)' if reduced else ''}\n\n" + summary_table(results)
    path.write_text(text)
    return text


def headline(figures: dict) -> dict:
    """The figures a stage marks for the summary (its `headline` entry), rounded for a table."""
    chosen = figures.get("headline", {})
    return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in chosen.items()}
