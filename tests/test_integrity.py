"""What lorakit trusts carries a hash (issue 20, fault 4): the run's adapter files are hashed into
manifest.json when training finishes; merge, eval, generate and chat refuse an adapter that no longer
matches, naming the file (a damaged safetensors header included), unless --accept-changed-adapter says to
use it anyway, which they then say; eval reports record the adapter hashes they measured."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import yaml
from conftest import lorakit, tiny_recipe


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model, root / "run", four_bit=False, steps=4)))
    done = lorakit("train", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "run"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_manifest_records_the_adapter_and_eval_reports_what_they_measured(run_dir, tmp_path):
    recorded = json.loads((run_dir / "manifest.json").read_text())["adapter_sha256"]
    assert recorded == {name: sha256(run_dir / name) for name in ("adapter_model.safetensors", "adapter_config.json")}
    done = lorakit("eval", str(run_dir), "--output", str(tmp_path / "eval"), "--max-examples", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["adapter_sha256"] == {"tuned": recorded}


@pytest.mark.parametrize("damage", ["flipped byte", "damaged header"])
def test_a_changed_adapter_is_refused_naming_the_file_unless_accepted(run_dir, tmp_path, damage):
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    adapter = copy / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    if damage == "flipped byte":
        data[-8] ^= 0x01  # inside a tensor: loads fine, computes something else
    else:
        data[8:16] = b"{garbage"  # the JSON header: safetensors cannot parse it
    adapter.write_bytes(bytes(data))
    expected = f"{adapter} (changed): no longer matches the sha256 manifest.json recorded"
    for args in (
        ["merge", str(copy)],
        ["eval", str(copy), "--output", str(tmp_path / "eval")],
        ["generate", str(copy), "--prompt", "reverse: a b"],
        ["chat", str(copy)],
    ):
        out = lorakit(*args, input="/quit\n")
        said = " ".join(out.stderr.split())
        assert out.returncode == 2 and expected in said and "--accept-changed-adapter" in said, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert not (copy / "merged").exists() and not (tmp_path / "eval").exists()
    if damage == "flipped byte":
        accepted = lorakit("generate", str(copy), "--prompt", "reverse: a b", "--accept-changed-adapter")
        assert accepted.returncode == 0, accepted.stderr[-2000:]
        assert "used anyway (--accept-changed-adapter)" in " ".join(accepted.stderr.split())


def test_staging_left_by_killed_processes_is_removed_by_the_next_command_there(run_dir, tmp_path):
    """kill -9 during merge or eval leaves `.OUT.partial-PID` folders (each up to a model copy); the next
    merge or eval writing there removes those of processes that no longer run, and keeps live ones."""
    import os
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = [
        tmp_path / f".merged.partial-{gone.pid}",
        tmp_path / f".merged.replaced-{gone.pid}",
        tmp_path / f".eval.partial-{gone.pid}",
    ]
    live = tmp_path / f".merged.partial-{os.getppid()}"  # a running process's (this test's parent)
    for folder in (*stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    merged = lorakit("merge", str(run_dir), "--output", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    evaluated = lorakit("eval", str(run_dir), "--output", str(tmp_path / "eval"), "--max-examples", "2")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert not any(folder.exists() for folder in stale) and live.is_dir()


def test_sigterm_during_merge_exits_143_with_a_message_and_leaves_nothing(run_dir, tmp_path):
    import signal
    import time

    from cli_process import CliProcess

    out = tmp_path / "merged"
    proc = CliProcess(["merge", str(run_dir), "--output", str(out)])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".merged.partial-*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated by SIGTERM; nothing half-written was kept" in err, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".merged.*"))
