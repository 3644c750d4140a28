"""Checkpoints, resume and interrupts, on real subprocesses and really damaged files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from cli_process import CliProcess
from conftest import lorakit, losses, tiny_recipe
from safetensors.torch import load_file

from lorakit.train.resume import INCOMING, MARKER, read_marker

STEPS = 40
# Every run in its own process at one torch thread (MKL_CBWR is set for every process in conftest): the
# straight run and the interrupted-then-resumed one compute alike, so their comparison is about resuming.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(recipe_path, *args) -> CliProcess:
    return CliProcess(["train", str(recipe_path), *args], env=ENV)


def wait_for_step(run_dir, step: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not reach the step in time")


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    """The reference: STEPS steps without interruption."""
    import yaml

    root = tmp_path_factory.mktemp("straight")
    path = root / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            tiny_recipe(tiny_model, root / "run", four_bit=False, steps=STEPS, logging_steps=1, save_steps=10)
        )
    )
    proc = start(path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return root / "run"


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupt_saves_and_resume_is_exact(straight, tiny_model, tmp_path, write_recipe, sig, code):
    recipe = write_recipe(
        tiny_recipe(tiny_model, tmp_path / "run", four_bit=False, steps=STEPS, logging_steps=1, save_steps=10)
    )
    run_dir = tmp_path / "run"
    proc = start(recipe)
    wait_for_step(run_dir, 13, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"lorakit train {recipe} --resume" in err
    marked = sorted(p.parent.name for p in (run_dir / "checkpoints").glob(f"*/{MARKER}"))
    stopped = max(losses(run_dir))
    assert f"checkpoint-{stopped}" in marked and stopped < STEPS
    assert not (run_dir / "adapter_model.safetensors").exists() and not (run_dir / "manifest.json").exists()
    marker = json.loads((run_dir / "checkpoints" / f"checkpoint-{stopped}" / MARKER).read_text())  # before rotation

    resumed = start(recipe, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming from checkpoint-{stopped}" in err
    ours, theirs = losses(run_dir), losses(straight)
    assert sorted(ours) == sorted(theirs)
    assert all(abs(ours[s] - theirs[s]) < 1e-6 for s in theirs), {s: (ours[s], theirs[s]) for s in theirs}
    a, b = load_file(run_dir / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    the_run_not_its_last_part(run_dir, straight, stopped, marker, err)


def the_run_not_its_last_part(run_dir, straight, stopped: int, marker: dict, err: str) -> None:
    """After a resume the figures are the whole run's: each step logged once, times counting on from the
    checkpoint's, the first loss the run's first, tokens/s over the whole training time."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # the interrupted part's steps after the checkpoint are gone
    times = [r["time_s"] for r in records]
    assert times == sorted(times)  # the resumed part counts on from the checkpoint's time, not from zero
    at_checkpoint = next(r["time_s"] for r in records if r["step"] == stopped and "loss" in r)
    assert marker["train_seconds"] >= at_checkpoint
    results = json.loads((run_dir / "manifest.json").read_text())["results"]
    reference = json.loads((straight / "manifest.json").read_text())["results"]
    assert results["first_loss"] == records[0]["loss"] == pytest.approx(reference["first_loss"], abs=1e-6)
    assert results["resumed_from_step"] == stopped and reference["resumed_from_step"] is None
    assert results["train_runtime_s"] > marker["train_seconds"] and results["tokens_seen"] == reference["tokens_seen"]
    assert results["tokens_per_s"] == pytest.approx(results["tokens_seen"] / results["train_runtime_s"], rel=0.01)
    assert all(
        r["tokens_per_s"] == pytest.approx(r["tokens_seen"] / r["time_s"], rel=0.05)
        for r in records[1:]
        if "tokens_per_s" in r
    )
    assert f"resumed at step {stopped}" in err
    card = (run_dir / "README.md").read_text()
    first, last = f"{results['first_loss']:.4f}", f"{results['last_loss']:.4f}"
    assert f"| train loss (first -> last) | {first} -> {last} |" in card


def test_resume_refuses_a_changed_recipe_and_damaged_checkpoints(straight, tiny_model, tmp_path, write_recipe):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    (run_dir / "manifest.json").unlink()  # as if it had been interrupted after its last checkpoint
    (run_dir / "adapter_model.safetensors").unlink()
    changed = tiny_recipe(
        tiny_model, run_dir, four_bit=False, steps=STEPS, logging_steps=1, save_steps=10, learning_rate=1e-3
    )
    changed["lora"]["r"] = 8
    out = start(write_recipe(changed), "--resume")
    _, err = out.communicate(timeout=120)
    assert out.returncode == 2
    assert "lora.r: 16 -> 8" in err and "train.learning_rate: 0.002 -> 0.001" in err and "--force-resume" in err
    # the newest checkpoint loses its last bytes: detected, and the one before is used
    newest = run_dir / "checkpoints" / "checkpoint-40" / "optimizer.pt"
    newest.write_bytes(newest.read_bytes()[:-100])
    same = write_recipe(
        tiny_recipe(tiny_model, run_dir, four_bit=False, steps=STEPS, logging_steps=1, save_steps=10), name="same"
    )
    proc = start(same, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "checkpoint-40 is damaged (optimizer.pt has" in err and "resuming from checkpoint-30" in err


def test_damaged_markers_are_skipped_with_the_reason_and_set_aside_out_of_rotation(
    straight, tiny_model, tmp_path, write_recipe
):
    """A marker that is not JSON, or that lacks its fields, is a damaged checkpoint (issue 20, fault 8): the
    run falls back to the one before, says why, and renames the damaged ones so rotation never keeps them
    over the checkpoint it resumed from."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    for name in ("manifest.json", "adapter_model.safetensors"):
        (run_dir / name).unlink()
    checkpoints = run_dir / "checkpoints"
    missing = tmp_path / "missing"  # a marker without its fields, read as resuming reads it
    shutil.copytree(checkpoints / "checkpoint-30", missing)
    marker = json.loads((missing / MARKER).read_text())
    del marker["data_fingerprints"]
    (missing / MARKER).write_text(json.dumps(marker))
    assert read_marker(missing) == (None, f"its {MARKER} lacks data_fingerprints")
    (checkpoints / "checkpoint-40" / MARKER).write_text("{not json")
    recipe = tiny_recipe(tiny_model, run_dir, four_bit=False, steps=STEPS, logging_steps=1, save_steps=10)
    recipe["train"]["save_total_limit"] = 1  # may change on resume
    proc = start(write_recipe(recipe), "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    said = " ".join(err.split())  # the console wraps long lines
    assert f"checkpoint-40 is damaged (its {MARKER} is unreadable (JSONDecodeError)); set aside as damaged" in said
    assert "resuming from checkpoint-30" in said
    assert (checkpoints / "damaged-checkpoint-40").is_dir()
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-40"]  # the new, good one
    assert json.loads((checkpoints / "checkpoint-40" / MARKER).read_text())["step"] == 40


def test_a_save_killed_midway_is_ignored(straight, tiny_model, tmp_path, write_recipe):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    for name in ("manifest.json", "adapter_model.safetensors"):
        (run_dir / name).unlink()
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints" / "checkpoint-30").iterdir()}
    partial = run_dir / "checkpoints" / "checkpoint-40"
    (partial / MARKER).unlink()  # what kill -9 during the save leaves: files, no marker
    (partial / "optimizer.pt").write_bytes(b"half")
    recipe = write_recipe(tiny_recipe(tiny_model, run_dir, four_bit=False, steps=STEPS, logging_steps=1, save_steps=10))
    proc = start(recipe, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resuming from checkpoint-30" in err and "damaged" not in err
    after = {p.name: p.read_bytes() for p in (run_dir / "checkpoints" / "checkpoint-30").iterdir()}
    assert after == before  # the checkpoint resumed from is left byte for byte as it was
    assert (partial / MARKER).is_file() and (partial / "optimizer.pt").stat().st_size > 4  # redone, complete


def test_resume_needs_a_run_and_a_checkpoint(tiny_model, tmp_path, write_recipe):
    recipe = write_recipe(tiny_recipe(tiny_model, tmp_path / "none", four_bit=False))
    out = lorakit("train", str(recipe), "--resume")
    assert out.returncode == 2 and "holds no lorakit run to resume" in out.stderr
    out = lorakit("train", str(recipe), "--resume", "--overwrite")
    assert out.returncode == 2 and "contradict" in out.stderr


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_intact(tiny_model, tmp_path, write_recipe):
    """SIGKILL the moment the trainer starts writing a checkpoint (in checkpoints/.incoming/)."""
    recipe = write_recipe(
        tiny_recipe(tiny_model, tmp_path / "run", four_bit=False, steps=400, logging_steps=1, save_steps=5)
    )
    checkpoints = tmp_path / "run" / "checkpoints"
    proc = start(recipe)
    snapshot, killed_at = {}, None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        for checkpoint in checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else []:
            if checkpoint.name not in snapshot:
                snapshot[checkpoint.name] = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
        for checkpoint in (checkpoints / INCOMING).glob("checkpoint-*") if snapshot else []:
            proc.send_signal(signal.SIGKILL)  # a save in progress: the trainer is writing it
            killed_at = checkpoint.name
            break
        if killed_at:
            break
        time.sleep(0.002)
    proc.communicate(timeout=60)
    assert killed_at, "no save was caught in progress"
    assert proc.returncode == -signal.SIGKILL
    complete = sorted((p.parent.name for p in checkpoints.glob(f"*/{MARKER}")), key=lambda n: int(n.split("-")[1]))
    previous = complete[-1]
    assert int(previous.split("-")[1]) < int(killed_at.split("-")[1]) and not (checkpoints / killed_at).exists()
    assert {p.name: p.read_bytes() for p in (checkpoints / previous).iterdir()} == snapshot[previous]
    resumed = start(recipe, "--resume", "--set", "train.max_steps=" + str(int(previous.split("-")[1]) + 3))
    _, err = resumed.communicate(timeout=300)
    assert f"resuming from {previous}" in err


def test_a_second_sigint_stops_at_once_and_keeps_the_last_checkpoint(tiny_model, tmp_path, write_recipe):
    recipe = write_recipe(
        tiny_recipe(tiny_model, tmp_path / "run", four_bit=False, steps=400, logging_steps=1, save_steps=10)
    )
    run_dir = tmp_path / "run"
    proc = start(recipe)
    wait_for_step(run_dir, 12, proc)
    first = run_dir / "checkpoints" / "checkpoint-10"
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert not (run_dir / "manifest.json").exists() and not (run_dir / "adapter_model.safetensors").exists()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tiny_model, tmp_path, write_recipe):
    """On a small tmpfs that holds one checkpoint and not two (needs the right to mount; skipped without)."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")  # asked first: the probe run costs seconds
    subprocess.run(["umount", str(disk)], check=True)
    probe = tmp_path / "probe"
    recipe = tiny_recipe(tiny_model, probe, four_bit=False, steps=2, save_steps=2)
    proc = start(write_recipe(recipe, name="probe"))
    assert proc.wait(timeout=300) == 0
    checkpoint = sum(p.stat().st_size for p in (probe / "checkpoints" / "checkpoint-2").rglob("*") if p.is_file())
    size = int(checkpoint * 1.6) + (256 << 10)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        path = write_recipe(tiny_recipe(tiny_model, disk / "run", four_bit=False, steps=8, save_steps=2), name="full")
        proc = start(path)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        assert "the disk is full" in err and "checkpoint-2 is the last complete checkpoint" in err
        assert f"lorakit train {path} --resume" in err
        assert (disk / "run" / "checkpoints" / "checkpoint-2" / MARKER).is_file()
        assert not (disk / "run" / "checkpoints" / "checkpoint-4" / MARKER).exists()
    finally:
        subprocess.run(["umount", str(disk)])


def test_resume_refuses_a_base_changed_in_place(tiny_model, tmp_path, write_recipe):
    """Issue 20, fault 3: re-randomized weights, an edited chat template or tokenizer in the same base
    directory resumed silently (with the edited template the trained-token count doubled)."""
    import torch
    from safetensors.torch import save_file

    base = shutil.copytree(tiny_model, tmp_path / "base")
    recipe = write_recipe(tiny_recipe(base, tmp_path / "run", four_bit=False, steps=10, save_steps=5))
    first = start(recipe)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    for name in ("manifest.json", "adapter_model.safetensors"):
        (tmp_path / "run" / name).unlink()  # as if interrupted after its last checkpoint

    def resume() -> str:
        proc = start(recipe, "--resume")
        _, said = proc.communicate(timeout=300)
        assert proc.returncode == 2, said
        return " ".join(said.split())

    template = base / "chat_template.jinja"
    original = template.read_text()
    template.write_text(original.replace("<|im_start|>", "<|im_start|> "))
    assert "base chat_template.jinja: content changed" in resume()
    template.write_text(original)
    weights = load_file(base / "model.safetensors")
    save_file(
        {k: torch.randn_like(v) for k, v in weights.items()}, base / "model.safetensors", metadata={"format": "pt"}
    )
    said = resume()
    assert "base model.safetensors (sampled): content changed" in said and "chat_template" not in said
    assert "--force-resume" in said
