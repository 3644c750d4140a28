"""`lorakit chat` through piped stdin: streamed replies equal `lorakit generate`'s, /base answers with the
adapter switched off, /compare answers with both, /reset and /save."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import lorakit, tiny_recipe

from lorakit.evaluate import compare as evaluate
from lorakit.recipe.schema import Recipe
from lorakit.train.trainer import run as train


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    recipe = tiny_recipe(
        tiny_model, tmp_path_factory.mktemp("chat") / "run", four_bit=False, steps=40, learning_rate=3e-3
    )
    return train(Recipe.model_validate(recipe)).run_dir


def chat(run_dir, lines: list[str], *args: str) -> subprocess.CompletedProcess:
    return lorakit("chat", str(run_dir), "--max-new-tokens", "12", *args, input="\n".join(lines) + "\n", timeout=300)


def reply(run_dir, conversation, base=False) -> str:
    target = evaluate.resolve(run_dir)
    settings = target.recipe.eval.model_copy(update={"max_new_tokens": 12})
    return evaluate.reply(target, [conversation], settings=settings, base=base)[0].text


def test_chat_streams_the_same_replies_as_generate_and_switches_models(run_dir, tmp_path):
    saved = tmp_path / "talk.jsonl"
    out = chat(
        run_dir,
        [
            "reverse: cat dog sun",
            "/base",
            "reverse: red blue green",
            "/reset",
            "/compare",
            "reverse: one two three",
            f"/save {saved}",
            "/quit",
        ],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    tuned_first = reply(run_dir, [{"role": "user", "content": "reverse: cat dog sun"}])
    assert f"tuned> {tuned_first}" in text
    # the base answers the second message with the first exchange still in the conversation
    history = [
        {"role": "user", "content": "reverse: cat dog sun"},
        {"role": "assistant", "content": tuned_first},
        {"role": "user", "content": "reverse: red blue green"},
    ]
    assert f"base> {reply(run_dir, history, base=True)}" in text
    assert "conversation cleared" in text
    fresh = [{"role": "user", "content": "reverse: one two three"}]
    tuned_third = reply(run_dir, fresh)
    assert f"tuned> {tuned_third}" in text and f"base> {reply(run_dir, fresh, base=True)}" in text
    lines = saved.read_text().splitlines()
    assert len(lines) == 1  # /reset dropped the earlier exchanges; the tuned reply is the one kept
    assert json.loads(lines[0]) == {"messages": fresh + [{"role": "assistant", "content": tuned_third}]}


def test_chat_commands_and_end_of_input(run_dir, tmp_path):
    out = chat(
        run_dir,
        ["/help", "/nonsense", f"/save {tmp_path / 'nothing.jsonl'}", f"/save {tmp_path / 'no' / 'dir.jsonl'}"],
        "--system",
        "Reverse the order of the words.",
    )
    assert out.returncode == 0, out.stderr[-2000:]  # end of input ends the chat
    assert "/compare" in out.stdout and "unknown command /nonsense" in out.stdout
    assert "nothing to save yet" in out.stdout
    assert not (tmp_path / "nothing.jsonl").exists()
