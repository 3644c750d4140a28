"""The console script and `python -m lorakit`, run as users run them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import lorakit

from lorakit import __version__


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_help(args):
    out = lorakit(*args)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_root_help_lists_commands_and_no_placeholders():
    out = lorakit("--help").stdout
    assert "train" in out and "data" in out
    assert "preview" in lorakit("data", "--help").stdout
    for command in ("merge", "eval", "generate", "data"):
        assert command in out


def test_train_help_documents_options():
    out = lorakit("train", "--help").stdout
    for option in ("--set", "--overwrite", "--dry-run", "--no-cache"):
        assert option in out


def test_version():
    out = lorakit("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"lorakit {__version__}"


def test_console_script_installed():
    from pathlib import Path

    exe = Path(sys.executable).parent / "lorakit"  # installed next to the interpreter by pip
    assert exe.is_file(), "the `lorakit` console script is not installed"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout


def test_help_does_not_import_torch():
    code = "import sys; from lorakit.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_unknown_command_is_usage_error():
    out = lorakit("trian")
    assert out.returncode == 2
