"""`lorakit data preview`: what training sees, from the tokenizer alone, as text and as JSON."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import EXAMPLES, lorakit


def preview(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return lorakit("data", "preview", *args, cwd=cwd)


@pytest.fixture
def weightless_model(tiny_model, tmp_path):
    """The tiny model's config and tokenizer without any weights: the preview must not need them."""
    copy = tmp_path / "no-weights"
    shutil.copytree(tiny_model, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(copy.glob("*.safetensors"))
    return copy


@pytest.fixture
def recipe(write_recipe, weightless_model, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "reverse: a b c"},
                {"role": "assistant", "content": "c b a"},
            ]
        },
        {"messages": [{"role": "user", "content": "hello " * 40}, {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]},
    ]
    data = tmp_path / "t.jsonl"
    data.write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
        + "{broken\n"
        + "\n".join(
            json.dumps({"messages": [{"role": "user", "content": f"r{i}"}, {"role": "assistant", "content": f"s{i}"}]})
            for i in range(200)
        )
        + "\n"
    )
    return write_recipe(
        {
            "model": {"name_or_path": str(weightless_model)},
            "data": {"train": str(data), "eval": str(EXAMPLES / "eval.jsonl"), "max_length": 40, "on_bad_rows": "skip"},
            "train": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4},
        }
    )


def test_json_report_counts_and_masks(recipe):
    out = preview(str(recipe), "--json", "-n", "2")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    stats = report["stats"]
    assert report["rows"] == {"train": 202, "eval": 64} and report["bad_rows_skipped"] == 1
    assert report["first_bad_row"].endswith(
        "t.jsonl:4: invalid JSON: Expecting property name enclosed in double quotes (column 2)"
    )
    assert stats["truncated"] == 0 and stats["dropped"] == {"nothing left to train on after truncation": 1}
    assert report["end_of_turn_token"] == "<|im_end|>" and report["packing"] is True
    first = report["examples"][0]
    trained = "".join(s["text"] for s in first["segments"] if s["trained"])
    assert trained == "c b a<|im_end|>"
    specials = [(s["text"], s["trained"]) for s in first["segments"] if s["special"]]
    assert specials[-1] == ("<|im_end|>", True) and ("<|im_end|>", False) in specials  # user turns' stay masked
    assert first["trained_tokens"] == sum(1 for _ in trained.split(" ")) or first["trained_tokens"] > 0
    assert stats["examples"] == 202 and stats["tokens_per_example"]["max"] <= 40
    assert 0 < stats["trained_share"] < 1 and 0 < stats["packed"]["fill"] <= 1
    assert stats["packed"]["rows"] < stats["examples"]  # short examples share rows
    assert 0 < stats["padded"]["padding_share"] < 1 and stats["padded"]["batch_size"] == 4


def test_text_view_marks_trained_tokens_without_colour(recipe):
    out = preview(str(recipe), "-n", "1")
    assert out.returncode == 0, out.stderr
    assert "«c b a⟨<|im_end|>⟩»" in out.stdout
    assert "⟨<|im_start|>⟩user\nreverse: a b c⟨<|im_end|>⟩" in out.stdout  # the prompt is not marked
    words = " ".join(out.stdout.split())  # rich wraps long lines at the console width
    assert "dropped 1 nothing left to train on after truncation" in words
    assert "malformed rows skipped 1" in words
    assert "packing on" in words


def test_eval_split_and_errors(recipe, write_recipe, tmp_path):
    out = preview(str(recipe), "--split", "eval", "--json", "-n", "0")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stats"]["examples"] == 64
    out = preview(str(recipe), "--split", "test")
    assert out.returncode == 2 and "--split: expected train or eval" in out.stderr
    out = preview(str(recipe), "--set", "data.eval=null", "--split", "eval")
    assert out.returncode == 2 and "there is no eval split" in out.stderr
    out = preview(str(recipe), "--set", "data.max_length=8", "--set", "data.on_overflow=error")
    assert out.returncode == 2 and "longer than data.max_length=8" in out.stderr and "Traceback" not in out.stderr
