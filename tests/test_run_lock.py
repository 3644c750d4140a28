"""One writer per run directory (issue 20, fault 1): while `lorakit train` writes a run, a second train
(with --overwrite or --resume) is refused naming the writer's pid and command, and merge, eval, generate,
chat and export refuse to read it; a command reading a run keeps a writer out until it ends; a writer killed
with SIGKILL leaves no stale lock behind."""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
import yaml
from cli_process import CliProcess
from conftest import lorakit, tiny_recipe

from lorakit.rundir import lock


def metrics_started(run_dir, proc, timeout: float = 120) -> None:
    """Until `proc` holds the lock (its pid in the lock file) and has started training its own run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        held = lock.lock_file(run_dir).is_file() and f'"pid": {proc.pid},' in lock.lock_file(run_dir).read_text()
        fresh = not (run_dir / "adapter_model.safetensors").exists()  # the copied finished run is gone
        if held and fresh and (run_dir / "metrics.jsonl").is_file():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not start training in time")


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One finished short run, trained once through the CLI; tests work on copies of it."""
    root = tmp_path_factory.mktemp("locked")
    recipe = tiny_recipe(tiny_model, root / "run", four_bit=False, steps=4)
    path = root / "short.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = lorakit("train", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "run", path, recipe


@pytest.fixture
def finished(trained, tmp_path):
    """A copy of the finished run, a recipe that retrains it briefly and one that trains it for long."""
    template, _, recipe = trained
    shutil.copytree(template, tmp_path / "run")
    paths = []
    for name, steps in (("short", 4), ("long", 100_000)):
        own = {**recipe, "train": {**recipe["train"], "output_dir": str(tmp_path / "run"), "max_steps": steps}}
        own["train"]["logging_steps"] = 1
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(own))
    return tmp_path / "run", *paths


def test_a_second_writer_and_every_reader_are_refused_while_a_run_trains(finished, tmp_path):
    run_dir, short, long = finished
    writer = CliProcess(["train", str(long), "--overwrite"])
    try:
        metrics_started(run_dir, writer)
        for args in (["train", str(short), "--overwrite"], ["train", str(short), "--resume"]):
            second = lorakit(*args)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"is in use: `lorakit train {long} --overwrite` (pid {writer.pid}" in second.stderr
        for args in (
            ["merge", str(run_dir), "--output", str(tmp_path / "m")],
            ["eval", str(run_dir), "--output", str(tmp_path / "e")],
            ["generate", str(run_dir), "--prompt", "hi"],
            ["export", str(run_dir), "--output", str(tmp_path / "x")],
        ):
            reader = lorakit(*args)
            assert reader.returncode == 2 and "is being written" in reader.stderr, (args, reader.stderr[-2000:])
            assert f"pid {writer.pid}" in reader.stderr
        assert not any((tmp_path / d).exists() for d in "mex")
        assert writer.poll() is None  # the writer went on, untouched
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.wait(timeout=120)
    assert writer.returncode == 143  # stopped by SIGTERM after a complete checkpoint, as documented
    again = lorakit("train", str(short), "--overwrite")  # the lock went with the writer
    assert again.returncode == 0, again.stderr[-2000:]


def test_a_writer_killed_with_sigkill_leaves_no_stale_lock(finished):
    run_dir, short, long = finished
    writer = CliProcess(["train", str(long), "--overwrite"])
    metrics_started(run_dir, writer)
    writer.kill()
    writer.wait(timeout=60)
    after = lorakit("train", str(short), "--overwrite")
    assert after.returncode == 0, after.stderr[-2000:]


def test_a_run_being_read_keeps_a_writer_out_until_the_reader_ends(finished):
    run_dir, short, _ = finished
    lock.hold_for_reading(run_dir)  # what merge/eval/generate/chat/export hold while they read
    try:
        refused = lorakit("train", str(short), "--overwrite")
        assert refused.returncode == 2 and "another lorakit command is reading it" in refused.stderr
        assert (run_dir / "manifest.json").is_file()  # nothing deleted
    finally:
        for handle in lock._open:
            handle.close()
        lock._open.clear()
    assert lorakit("train", str(short), "--overwrite").returncode == 0


def test_the_lock_file_sits_beside_the_run_and_names_its_last_writer(trained):
    run_dir, short, _ = trained
    info = json.loads(lock.lock_file(run_dir).read_text())
    assert lock.lock_file(run_dir).parent == run_dir.parent  # so --overwrite, deleting the run, keeps it
    assert info["command"] == f"lorakit train {short}" and isinstance(info["pid"], int)
