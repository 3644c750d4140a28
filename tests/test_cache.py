"""The preprocessing cache: a hit gives the same data; any change to what shapes the data misses."""

from __future__ import annotations

import pytest
from conftest import write_jsonl
from transformers import AutoTokenizer

from lorakit.data import prepare
from lorakit.data.templates import CHATML_EOS
from lorakit.recipe.schema import DataConfig

ROWS = [
    {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"n{i}"}]}
    for i in range(12)
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(root))
    return root


def entries(root) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_hit_gives_the_same_data(cache, tokenizer, tmp_path):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", ROWS), eval_fraction=0.25)
    first, second = prepare(cfg, tokenizer, seed=0), prepare(cfg, tokenizer, seed=0)
    assert (first.cached, second.cached) == (False, True)
    assert second.train.input_ids == first.train.input_ids and second.train.labels == first.train.labels
    assert second.eval.input_ids == first.eval.input_ids
    assert (second.rows, second.formats, second.end_of_turn_id) == (first.rows, first.formats, first.end_of_turn_id)
    assert len(entries(cache)) == 1 and not [n for n in entries(cache) if n.startswith(".")]  # no staging left


def test_num_proc_shares_the_entry(cache, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    prepare(DataConfig(train=path, num_proc=1), tokenizer, seed=0)
    assert prepare(DataConfig(train=path, num_proc=2), tokenizer, seed=0).cached


@pytest.mark.parametrize(
    "change",
    ["file content", "data section", "seed with eval split", "template choice", "template file content", "tokenizer"],
)
def test_any_change_misses(cache, tokenizer, tmp_path, tiny_model, change):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    jinja = tmp_path / "chat.jinja"
    jinja.write_text(
        CHATML_EOS.replace("eos_token + '\n'", "eos_token + '\n\n'")
    )  # ChatML with a blank line between turns
    cfg = DataConfig(train=path, eval_fraction=0.25, chat_template=str(jinja))
    base = prepare(cfg, tokenizer, seed=0)
    assert prepare(cfg, tokenizer, seed=0).cached
    seed = 0
    if change == "file content":
        write_jsonl(tmp_path / "t.jsonl", ROWS[:-1] + [ROWS[0]])
    elif change == "data section":
        cfg = cfg.model_copy(update={"train_on": "all"})
    elif change == "seed with eval split":
        seed = 1
    elif change == "template choice":
        cfg = cfg.model_copy(update={"chat_template": "chatml"})
    elif change == "template file content":
        jinja.write_text(CHATML_EOS)
    elif change == "tokenizer":
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    again = prepare(cfg, tokenizer, seed=seed)
    assert not again.cached
    assert prepare(cfg, tokenizer, seed=seed).cached
    if change != "tokenizer":
        assert (again.train.input_ids, again.train.labels) != (base.train.input_ids, base.train.labels)


def test_hit_sets_the_chosen_template_on_the_tokenizer(cache, tiny_model, tmp_path):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", ROWS), chat_template="chatml")
    prepare(cfg, AutoTokenizer.from_pretrained(tiny_model), seed=0)
    fresh = AutoTokenizer.from_pretrained(tiny_model)
    assert fresh.chat_template != CHATML_EOS
    assert prepare(cfg, fresh, seed=0).cached
    assert fresh.chat_template == CHATML_EOS  # the run saves the template training used


def test_no_cache_neither_reads_nor_writes(cache, tokenizer, tmp_path):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", ROWS))
    assert not prepare(cfg, tokenizer, seed=0, use_cache=False).cached
    assert entries(cache) == []
    prepare(cfg, tokenizer, seed=0)
    assert not prepare(cfg, tokenizer, seed=0, use_cache=False).cached


def test_damaged_entry_is_rebuilt(cache, tokenizer, tmp_path):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", ROWS))
    first = prepare(cfg, tokenizer, seed=0)
    (entry,) = [cache / n for n in entries(cache)]
    for arrow in (entry / "train").glob("*.arrow"):
        arrow.unlink()
    again = prepare(cfg, tokenizer, seed=0)
    assert not again.cached and again.train.input_ids == first.train.input_ids
    assert prepare(cfg, tokenizer, seed=0).cached


@pytest.mark.parametrize("damage", ["one bit", "random bytes", "garbage dataset_info.json"])
def test_a_changed_entry_is_discarded_with_a_notice_and_rebuilt_never_trained_on(
    cache, tokenizer, tmp_path, capsys, damage
):
    """Issue 20, fault 2: one flipped bit in a cached arrow file changed a trained label unnoticed; random
    bytes put labels like -7.4e17 into training; a garbage dataset_info.json failed every run with a
    TypeError that did not mention the cache."""
    import random

    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", ROWS))
    first = prepare(cfg, tokenizer, seed=0)
    (entry,) = [cache / n for n in entries(cache)]
    (arrow,) = list((entry / "train").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    if damage == "one bit":
        data[-200] ^= 0x04
        arrow.write_bytes(bytes(data))
    elif damage == "random bytes":
        start = len(data) // 2
        data[start : start + 200] = random.Random(0).randbytes(200)
        arrow.write_bytes(bytes(data))
    else:
        (entry / "train" / "dataset_info.json").write_text("17")
    capsys.readouterr()
    again = prepare(cfg, tokenizer, seed=0)
    notice = capsys.readouterr().err
    assert f"the preprocessing cache entry {entry} is damaged" in notice and "rebuilding it" in notice
    assert ("dataset_info.json" if "dataset_info" in damage else arrow.name) in notice
    assert not again.cached
    assert again.train.input_ids == first.train.input_ids and again.train.labels == first.train.labels
    assert prepare(cfg, tokenizer, seed=0).cached  # the rebuilt entry is whole again
