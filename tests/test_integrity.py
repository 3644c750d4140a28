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
    assert report["files_sha256"] == {
        p.name: sha256(p) for p in (tmp_path / "eval").iterdir() if p.name != "report.json"
    }


def test_a_report_is_shown_only_as_written_and_on_the_weights_it_measured(run_dir, tmp_path):
    """`eval --show` reads a report back (for CI gates without evaluating again): a changed report file, or a
    report that measured other weights than the run holds now, exits 2 naming it; gates are checked (exit 3)."""
    out = tmp_path / "eval"
    assert lorakit("eval", str(run_dir), "--output", str(out), "--max-examples", "2").returncode == 0
    written = json.loads((out / "report.json").read_text())
    shown = lorakit("eval", str(run_dir), "--output", str(out), "--show", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout)["metrics"] == written["metrics"]
    missed = lorakit("eval", str(run_dir), "--output", str(out), "--show", "--fail-under", "exact_match=1.01")
    assert missed.returncode == 3 and "exact_match" in missed.stderr
    again = lorakit("eval", str(run_dir), "--output", str(out), "--show", "--max-new-tokens", "4")
    assert again.returncode == 2 and "--max-new-tokens would need a new evaluation" in again.stderr

    retrained = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "eval"))
    adapter = retrained / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-8] ^= 0x01
    adapter.write_bytes(bytes(data))  # as a new training would leave it: the manifest records the new hash
    manifest = json.loads((retrained / "manifest.json").read_text())
    manifest["adapter_sha256"]["adapter_model.safetensors"] = sha256(adapter)
    (retrained / "manifest.json").write_text(json.dumps(manifest))
    stale = lorakit("eval", str(retrained), "--output", str(out), "--show")
    said = " ".join(stale.stderr.split())
    assert stale.returncode == 2 and f"{out / 'report.json'}: measured other weights than {retrained}" in said
    assert "the report is stale" in said and "Traceback" not in stale.stderr

    samples = out / "samples.jsonl"
    samples.write_text(samples.read_text().replace("reverse", "reverze", 1))
    changed = lorakit("eval", str(run_dir), "--output", str(out), "--show")
    said = " ".join(changed.stderr.split())
    assert changed.returncode == 2 and f"{samples} (changed): no longer matches the sha256 report.json" in said


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


@pytest.fixture(scope="module")
def merged(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "merged"
    done = lorakit("merge", str(run_dir), "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_a_merged_model_records_its_files_and_a_changed_one_is_refused_unless_accepted(merged, tmp_path):
    """merge_report.json, written last, holds the sha256 of every file of the merged model; eval, generate
    and export check them before loading it."""
    files = json.loads((merged / "merge_report.json").read_text())["files_sha256"]
    written = {p.relative_to(merged).as_posix() for p in merged.rglob("*") if p.is_file()}
    assert set(files) == written - {"merge_report.json"} and "model.safetensors" in files
    assert all(sha256(merged / name) == digest for name, digest in files.items())
    copy = shutil.copytree(merged, tmp_path / "merged")
    shard = copy / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0x01
    shard.write_bytes(bytes(data))
    expected = f"{shard} (changed): no longer matches the sha256 merge_report.json recorded"
    for args in (
        ["eval", str(copy), "--output", str(tmp_path / "eval"), "--max-examples", "2"],
        ["generate", str(copy), "--prompt", "reverse: a b"],
        ["export", str(copy), "--output", str(tmp_path / "gguf")],
    ):
        out = lorakit(*args)
        said = " ".join(out.stderr.split())
        assert out.returncode == 2 and expected in said and "--accept-changed-adapter" in said, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "eval").exists() and not (tmp_path / "gguf").exists()
    accepted = lorakit("generate", str(copy), "--prompt", "reverse: a b", "--accept-changed-adapter")
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert "used anyway (--accept-changed-adapter)" in " ".join(accepted.stderr.split())


@pytest.mark.parametrize("garbage", [b'{"status": "compl', b"[1, 2]"])
def test_a_damaged_manifest_or_merge_report_is_named_not_a_decoding_traceback(run_dir, merged, tmp_path, garbage):
    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    (run / "manifest.json").write_bytes(garbage)
    model = shutil.copytree(merged, tmp_path / "merged")
    (model / "merge_report.json").write_bytes(garbage)
    for args, damaged in (
        (["merge", str(run), "--output", str(tmp_path / "out")], run / "manifest.json"),
        (["eval", str(run), "--output", str(tmp_path / "out")], run / "manifest.json"),
        (["generate", str(model), "--prompt", "reverse: a b"], model / "merge_report.json"),
        (["export", str(model), "--output", str(tmp_path / "out")], model / "merge_report.json"),
    ):
        out = lorakit(*args)
        said = " ".join(out.stderr.split())
        assert out.returncode == 2 and f"{damaged}:" in said and "Traceback" not in out.stderr, (args, out.stderr)
    assert not (tmp_path / "out").exists()


def test_a_damaged_gguf_conversion_is_removed_to_be_converted_again(tmp_path, capsys):
    """The cached transformers checkpoint of a GGUF base records its files' hashes in its marker, last."""
    from lorakit.digest import folder_sha256
    from lorakit.model import gguf

    folder = tmp_path / "conversion"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "config.json").write_text("{}")
    info = {"format": gguf.FORMAT, "files_sha256": folder_sha256(folder)}
    (folder / gguf.MARKER).write_text(json.dumps(info))
    assert gguf._intact(folder) == info and folder.is_dir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 3)
    assert gguf._intact(folder) is None and not folder.exists()
    assert "is damaged (model.safetensors (changed)): converting again" in capsys.readouterr().err
    folder.mkdir()
    (folder / gguf.MARKER).write_text("{garbage")
    assert gguf._intact(folder) is None and not folder.exists()
