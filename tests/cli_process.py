"""The lorakit CLI in a process of its own, started in about a second instead of ten.

Importing the stack a command needs (torch, transformers, peft, bitsandbytes, trl) takes about 10 s on the
2-core CI machine, and the suite runs the CLI about a hundred times. So each test worker keeps one
`multiprocessing` fork server that has imported those libraries once; every CLI run is a fresh child forked
from it: its own pid, signals, exit code, stdin/stdout/stderr files, working directory and environment, and
it imports lorakit itself afresh and runs `lorakit.cli.main` with the arguments, as `python -m lorakit` does.

A call whose environment differs from the fork server's in what those libraries read when imported (HF_*,
HOME, caches, torch/CUDA/MKL settings: IMPORT_TIME) runs a real `python -m lorakit` instead.
`tests/test_cli.py` runs the installed console script itself.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

PRELOAD = ["torch", "transformers.modeling_utils", "transformers.trainer", "peft", "bitsandbytes", "trl", "datasets"]
IMPORT_TIME = (
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS",
    "DATASETS",
    "TORCH",
    "PYTORCH",
    "CUDA",
    "NCCL",
    "MKL",
    "OMP_",
    "KMP_",
    "BNB_",
    "TRITON",
    "XDG_",
    "PYTHON",
    "LD_",
    "TOKENIZERS",
    "USE_T",
    "HOME",
    "TMP",
    "TEMP",
)
# read when used, not when imported: OMP_NUM_THREADS lorakit applies itself (torch.set_num_threads);
# huggingface_hub reads HF_TOKEN each time it looks for a token (the secret-leak test passes one)
RUN_TIME = {"OMP_NUM_THREADS", "HF_TOKEN"}
_context = None
_server_env: dict[str, str] = {}


def _fork_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        _server_env.update(os.environ)  # the server starts with this environment (at the first run)
    return _context


def _import_time_changes(env: dict[str, str]) -> set[str]:
    base = _server_env or os.environ
    changed = {k for k in set(env) | set(base) if env.get(k) != base.get(k)} - RUN_TIME
    return {k for k in changed if k.startswith(IMPORT_TIME)}


class EnvironmentDrift(UserWarning):
    """The test process's own environment changed, after the fork server started, in a variable read at import
    time (a library set it in-process): every later CLI call then starts a whole interpreter. Set it in
    conftest before the first call, as TORCHINDUCTOR_CACHE_DIR is."""


def _child(args: list[str], env: dict, cwd: str | None, stdin: str, out: str, err: str) -> None:
    """In the forked child: become `lorakit ARGS` run from a shell, then exit as its interpreter would."""
    # Everything the server imported lives as long as the child: frozen, the child's garbage collections skip
    # it. Otherwise a full collection walks the whole preloaded heap (about 500,000 objects: 0.3-0.8 s each,
    # and it writes to every page it walks, which the fork then copies); when one falls due depends on the
    # server's allocation counts, so it struck some installs on almost every call (the CLI tests ran 40 s
    # instead of 24 in a freshly set-up venv, 22-32 s in another, and 24 s in both with the freeze)
    gc.freeze()
    os.environ.clear()
    os.environ.update(env)
    if cwd:
        os.chdir(cwd)
    for fd, path, flags in ((0, stdin, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False, encoding="utf-8")  # noqa: SIM115 - the process's own streams
    sys.stdout = open(1, "w", closefd=False, encoding="utf-8")  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, encoding="utf-8", errors="backslashreplace", buffering=1)  # noqa: SIM115
    sys.argv = ["lorakit", *args]
    for sig in (signal.SIGTERM, signal.SIGINT):  # what an interpreter starts with
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
    code: object = 0
    try:
        from lorakit.cli import main

        main()
    except SystemExit as exit_:
        code = exit_.code
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code == -signal.SIGINT:  # an uncaught KeyboardInterrupt ends the interpreter by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


class CliProcess:
    """`lorakit ARGS` running: the part of subprocess.Popen the tests use (text output)."""

    def __init__(self, args, *, env=None, cwd=None, input: str | None = None):
        self.args = [str(a) for a in args]
        inherited, env = env is None, dict(os.environ if env is None else env)
        drift = _import_time_changes(env)
        if drift and inherited and _server_env:
            warnings.warn(
                f"environment drifted from the fork server's in {sorted(drift)}", EnvironmentDrift, stacklevel=3
            )
        self._dir = Path(tempfile.mkdtemp(prefix="lorakit-cli-"))
        self._out, self._err, stdin = self._dir / "stdout", self._dir / "stderr", self._dir / "stdin"
        stdin.write_text(input or "", encoding="utf-8")
        self._out.touch(), self._err.touch()
        self.returncode: int | None = None
        if not drift:
            self._proc = _fork_context().Process(
                target=_child, args=(self.args, env, cwd and str(cwd), str(stdin), str(self._out), str(self._err))
            )
            self._proc.start()
            self._popen = None
        else:
            with open(stdin, "rb") as i, open(self._out, "wb") as o, open(self._err, "wb") as e:
                self._popen = subprocess.Popen(
                    [sys.executable, "-m", "lorakit", *self.args], stdin=i, stdout=o, stderr=e, env=env, cwd=cwd
                )
            self._proc = None
        self.pid = self._proc.pid if self._proc else self._popen.pid

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._proc.exitcode if self._proc else self._popen.poll()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            if self._proc:
                self._proc.join(0.05)
            else:
                time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        out, err = (p.read_text(encoding="utf-8", errors="replace") for p in (self._out, self._err))
        for path in self._dir.iterdir():
            path.unlink()
        self._dir.rmdir()
        return out, err


def run(*args, env=None, cwd=None, input: str | None = None, timeout: float | None = None):
    """`lorakit ARGS` to the end: a subprocess.CompletedProcess with text stdout and stderr."""
    proc = CliProcess(args, env=env, cwd=cwd, input=input)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
