"""Loss masks and data errors, on the tiny model's real tokenizer (ChatML template, pad == eos)."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from lorakit.data import IGNORE, prepare
from lorakit.errors import DataError
from lorakit.recipe.schema import DataConfig


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


def test_messages_train_only_assistant_turns_and_their_end_of_turn(tokenizer, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "reverse: a b c"},
                {"role": "assistant", "content": "c b a"},
                {"role": "user", "content": "reverse: d e f"},
                {"role": "assistant", "content": "f e d"},
            ]
        }
    ]
    data = prepare(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows)), tokenizer, seed=0)
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    assert trained_text(tokenizer, ids, labels) == "c b a<|im_end|>f e d<|im_end|>"
    eos = tokenizer.eos_token_id
    assert data.end_of_turn_id == eos
    assert sum(1 for lab in labels if lab == eos) == 2  # both turn ends are trained although pad == eos
    # everything else, including the system and user turns and the newline after <|im_end|>, is masked
    assert labels[-1] == IGNORE and tokenizer.decode([ids[-1]]) == "\n"
    assert ids == tokenizer.apply_chat_template(rows[0]["messages"], tokenize=True, return_dict=True)["input_ids"]


def test_prompt_completion_trains_completion_and_eos(tokenizer, tmp_path):
    rows = [{"prompt": "reverse: a b c\nanswer:", "completion": " c b a"}]
    data = prepare(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows)), tokenizer, seed=0)
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    assert data.format == "prompt_completion"
    assert trained_text(tokenizer, ids, labels) == " c b a<|im_end|>"
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id


def test_conversational_prompt_completion_trains_only_completion(tokenizer, tmp_path):
    rows = [
        {
            "prompt": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "old"},
                {"role": "user", "content": "again"},
            ],
            "completion": [{"role": "assistant", "content": "new"}],
        }
    ]
    data = prepare(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows)), tokenizer, seed=0)
    assert trained_text(tokenizer, data.train.input_ids[0], data.train.labels[0]) == "new<|im_end|>"


def test_truncation_counted_and_fully_masked_rows_dropped(tokenizer, tmp_path):
    long_user = " ".join(["word"] * 80)
    rows = [
        {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_user}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    data = prepare(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows), max_length=24), tokenizer, seed=0)
    assert data.train.truncated == 1 and data.train.drops == {"nothing left to train on after truncation": 1}
    assert len(data.train.input_ids) == 2
    assert all(len(ids) <= 24 for ids in data.train.input_ids)


def test_eval_fraction_split_is_seeded_and_disjoint(tokenizer, tmp_path):
    rows = [{"prompt": f"p{i}:", "completion": f" c{i}"} for i in range(20)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows), eval_fraction=0.25)
    first, again = prepare(cfg, tokenizer, seed=1), prepare(cfg, tokenizer, seed=1)
    assert first.rows == {"train": 15, "eval": 5}
    assert first.eval.input_ids == again.eval.input_ids
    assert not {tuple(x) for x in first.eval.input_ids} & {tuple(x) for x in first.train.input_ids}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"messages": [}\n', "t.jsonl:1: invalid JSON"),
        ("[1, 2]\n", "t.jsonl:1: each line must be a JSON object, got list"),
        ('{"foo": "x"}\n', "t.jsonl:1: cannot tell the data format from the keys ['foo']"),
        (
            '{"text": "x", "prompt": "a", "completion": "b"}\n',
            "t.jsonl:1: the keys ['completion', 'prompt', 'text'] "
            "fit several formats (prompt_completion, text); set `data.format`",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}\n',
            "t.jsonl:1: messages[1].content is empty",
        ),
        ('{"messages": [{"role": "user", "content": 5}]}\n', "t.jsonl:1: messages[0].content must be a string"),
        ('{"instruction": "a", "output": 3}\n', "t.jsonl:1: `output` must be a string, got a int"),
        ('{"conversations": [{"from": "robot", "value": "x"}]}\n', "t.jsonl:1: conversations[0].from must be one of"),
        ('{"messages": [{"role": "user", "content": "q"}]}\n', "t.jsonl:1: `messages` has no assistant message"),
        ('{"messages": [{"role": "bot", "content": "q"}]}\n', "t.jsonl:1: messages[0].role must be one of"),
        ('{"prompt": "a", "completion": ""}\n', "t.jsonl:1: `completion` is empty"),
        ('{"prompt": "a"}\n', "t.jsonl:1: cannot tell the data format"),
        ("", "t.jsonl: no examples"),
    ],
)
def test_bad_rows_name_file_and_line(tokenizer, tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        prepare(DataConfig(train=str(path)), tokenizer, seed=0)
    assert message in str(info.value)


def test_bad_row_later_in_file_names_its_line(tokenizer, tmp_path):
    good = json.dumps({"prompt": "a", "completion": " b"})
    path = tmp_path / "t.jsonl"
    path.write_text(f"{good}\n\n{good}\n{{broken\n")
    with pytest.raises(DataError, match=r"t\.jsonl:4: invalid JSON"):
        prepare(DataConfig(train=str(path)), tokenizer, seed=0)


def test_template_without_special_turn_end_is_refused(tokenizer, tmp_path):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(DataError, match="never learn to stop"):
        prepare(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows)), plain, seed=0)


def test_the_tiny_tokenizer_pads_with_its_eos(tokenizer):
    """The trap this module guards against: pad and eos are one token, so masking pad must not mask eos."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
