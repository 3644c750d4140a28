"""Hostile or broken input ends in a message naming the file and line (or key), never a raw crash
(issue 20, faults 6 and 9): a lone surrogate, JSON nested 100k deep, a row of megabytes, an output
directory under a file, special-token text inside a message."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from conftest import lorakit, tiny_recipe

from lorakit.data import prepare
from lorakit.errors import DataError
from lorakit.recipe.schema import DataConfig

GOOD = {"messages": [{"role": "user", "content": "reverse: a b"}, {"role": "assistant", "content": "b a"}]}


def lines(tmp_path, bad_line: str):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + bad_line + "\n" + (json.dumps(GOOD) + "\n") * 19)
    return str(path)


CASES = {
    "lone surrogate": ('{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}',
                       "the row holds a lone UTF-16 surrogate ('\\ud800'), which is not text"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
    "control text": ('{"messages": [{"role": "user", "content": "hi<|im_end|>x"}, {"role": "assistant", "content": "b"}]}',
                     "messages[0].content holds '<|im_end|>', the text of a special token: it would be read as that "
                     "control token, not as text; remove it from the data"),
    "huge row": (json.dumps({"text": "x" * (2 << 20)}), "the row is 2.0 MiB, over lorakit's limit of 1 MiB per row (longer than any max_length can keep; split it)"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_row_is_a_bad_row_with_its_file_and_line(case, tokenizer, tmp_path):
    text, message = CASES[case]
    path = lines(tmp_path, text)
    with pytest.raises(DataError) as refused:
        prepare(DataConfig(train=path), tokenizer, seed=0, use_cache=False)
    assert str(refused.value) == f"{path}:2: {message}"
    kept = prepare(DataConfig(train=path, on_bad_rows="skip", max_bad_fraction=0.1), tokenizer, seed=0, use_cache=False)
    assert len(kept.train.input_ids) == 20  # the good rows; the bad one skipped and reported


def test_an_output_directory_under_a_file_is_refused_by_train_and_check(tiny_model, tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    recipe = tiny_recipe(tiny_model, tmp_path / "afile" / "run", four_bit=False, steps=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    trained = lorakit("train", str(path))
    assert trained.returncode == 2 and "Traceback" not in trained.stderr
    assert f"{tmp_path / 'afile'} is a file, so no directory can be made under it" in " ".join(trained.stderr.split())
    checked = lorakit("check", str(path))
    assert checked.returncode == 2 and "output directory" in checked.stdout + checked.stderr


def test_an_output_directory_on_a_read_only_filesystem_is_refused(tiny_model, tmp_path):
    """A read-only tmpfs (needs the right to mount; skipped without): exit 2 naming it, not a raw errno."""
    disk = tmp_path / "read-only"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe(tiny_model, disk / "run", four_bit=False, steps=2)))
        trained = lorakit("train", str(path))
        assert trained.returncode == 2 and "Traceback" not in trained.stderr
        assert f"{disk} is on a read-only filesystem" in " ".join(trained.stderr.split())
        checked = lorakit("check", str(path))
        assert checked.returncode == 2 and "read-only filesystem" in " ".join((checked.stdout + checked.stderr).split())
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model, root / "run", four_bit=False, steps=2)))
    assert lorakit("train", str(path)).returncode == 0
    return root / "run"


def test_generate_refuses_a_prompt_that_fills_the_models_context(run_dir):
    """A prompt far past the context ran for over 300 s before; now it is refused at once (context 512)."""
    out = lorakit("generate", str(run_dir), "--prompt", "reverse: " + "a b " * 2000, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "tokens, and the model's context is 512: nothing can be generated after it" in " ".join(out.stderr.split())


def test_chat_says_a_line_that_is_not_utf8_and_goes_on(run_dir):
    import subprocess
    import sys

    piped = b"\xff\xfe broken\nreverse: a b\n/quit\n"  # bytes, as a pipe delivers them: not through text mode
    out = subprocess.run(
        [sys.executable, "-m", "lorakit", "chat", str(run_dir), "--max-new-tokens", "4"],
        input=piped,
        capture_output=True,
        timeout=300,
    )
    said = out.stdout.decode("utf-8", "replace")
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert "that line is not UTF-8 text (byte 0); type it again" in said and said.count("tuned>") == 1
