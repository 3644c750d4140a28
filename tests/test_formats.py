"""Every data format, column mapping, chat-template choices, mask modes and length policies."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lorakit.data import IGNORE, prepare
from lorakit.errors import DataError
from lorakit.recipe.schema import DataConfig

QA = [{"role": "user", "content": "reverse: a b c"}, {"role": "assistant", "content": "c b a"}]

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_GENERATION = (  # with {% generation %} markers, which lorakit does not need but must not trip over
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INST = (  # Mistral-like: no role headers for the assistant, the eos closes its turn
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def write(tmp_path, rows, name="t.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trained(tokenizer, data, i=0) -> str:
    return tokenizer.decode([t for t, lab in zip(data.train.input_ids[i], data.train.labels[i]) if lab != IGNORE])


def test_sharegpt(tokenizer, tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "answer"},
            ]
        }
    ]
    data = prepare(DataConfig(train=write(tmp_path, rows)), tokenizer, seed=0)
    assert data.format == "sharegpt"
    assert trained(tokenizer, data) == "answer<|im_end|>"


def test_alpaca_with_input_and_system(tokenizer, tmp_path):
    rows = [{"instruction": "reverse", "input": "a b c", "output": "c b a", "system": "be brief"}]
    data = prepare(DataConfig(train=write(tmp_path, rows)), tokenizer, seed=0)
    assert data.format == "alpaca"
    text = tokenizer.decode(data.train.input_ids[0])
    assert "<|im_start|>system\nbe brief<|im_end|>" in text and "reverse\n\na b c" in text
    assert trained(tokenizer, data) == "c b a<|im_end|>"


def test_text_trains_everything_and_ends_with_eos(tokenizer, tmp_path):
    data = prepare(DataConfig(train=write(tmp_path, [{"text": "the cat sat"}])), tokenizer, seed=0)
    assert data.format == "text" and data.template.startswith("none")
    assert trained(tokenizer, data) == "the cat sat<|im_end|>"


def test_column_mapping(tokenizer, tmp_path):
    rows = [{"question": "reverse: x y", "answer": "y x", "id": 7}]
    cfg = DataConfig(train=write(tmp_path, rows), columns={"prompt": "question", "completion": "answer"})
    data = prepare(cfg, tokenizer, seed=0)
    assert data.format == "prompt_completion"
    assert trained(tokenizer, data) == "y x<|im_end|>"


def test_stated_format_overrides_detection(tokenizer, tmp_path):
    rows = [{"text": "plain words", "prompt": "p", "completion": " c"}]
    data = prepare(DataConfig(train=write(tmp_path, rows), format="text"), tokenizer, seed=0)
    assert trained(tokenizer, data) == "plain words<|im_end|>"


@pytest.mark.parametrize(
    "train_on, expected",
    [
        ("assistant", "one<|im_end|>two<|im_end|>"),
        ("last_assistant", "two<|im_end|>"),
    ],
)
def test_train_on_modes(tokenizer, tmp_path, train_on, expected):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "one"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "two"},
            ]
        }
    ]
    data = prepare(DataConfig(train=write(tmp_path, rows), train_on=train_on), tokenizer, seed=0)
    assert trained(tokenizer, data) == expected


def test_train_on_all(tokenizer, tmp_path):
    data = prepare(DataConfig(train=write(tmp_path, [{"messages": QA}]), train_on="all"), tokenizer, seed=0)
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    assert labels[:-1] == ids[:-1] and labels[-1] == IGNORE  # all but the newline after the last <|im_end|>


@pytest.mark.parametrize(
    "template, eot",
    [
        (LLAMA3, "<|eot_id|>"),
        (CHATML_GENERATION, "<|im_end|>"),
        (INST, "<|im_end|>"),
    ],
)
def test_masks_across_template_styles(tokenizer, tmp_path, template, eot):
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    jinja = tmp_path / "t.jinja"
    jinja.write_text(template)
    rows = [{"messages": QA + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "x y"}]}]
    data = prepare(DataConfig(train=write(tmp_path, rows), chat_template=str(jinja)), tokenizer, seed=0)
    assert trained(tokenizer, data) == f"c b a{eot}x y{eot}"
    assert data.end_of_turn_id == tokenizer.convert_tokens_to_ids(eot)
    assert tokenizer.chat_template == template  # what the run will save


def test_builtin_chatml_fallback_for_tokenizer_without_template(tokenizer, tmp_path):
    tokenizer.chat_template = None
    data = prepare(DataConfig(train=write(tmp_path, [{"messages": QA}])), tokenizer, seed=0)
    assert data.template.startswith("chatml (built-in fallback")
    assert trained(tokenizer, data) == "c b a" + tokenizer.eos_token
    assert data.end_of_turn_id == tokenizer.eos_token_id


def test_insisting_on_missing_tokenizer_template_is_an_error(tokenizer, tmp_path):
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        prepare(DataConfig(train=write(tmp_path, [{"messages": QA}]), chat_template="tokenizer"), tokenizer, seed=0)


def test_unknown_template_name(tokenizer, tmp_path):
    with pytest.raises(DataError, match="neither `tokenizer`"):
        prepare(DataConfig(train=write(tmp_path, [{"messages": QA}]), chat_template="vicuna"), tokenizer, seed=0)


LONG = [
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " ".join(["word"] * 60)}]},
    {"messages": QA},
]


def test_overflow_truncate_keeps_end_of_turn(tokenizer, tmp_path):
    data = prepare(DataConfig(train=write(tmp_path, LONG), max_length=32), tokenizer, seed=0)
    assert data.train.truncated == 1 and data.train.dropped == 0
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    assert len(ids) == 32 and ids[-1] == labels[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_overflow_drop(tokenizer, tmp_path):
    data = prepare(DataConfig(train=write(tmp_path, LONG), max_length=32, on_overflow="drop"), tokenizer, seed=0)
    assert data.train.truncated == 0 and data.train.dropped == 1 and len(data.train.input_ids) == 1


def test_overflow_error_names_the_line(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"t\.jsonl:1: \d+ tokens, longer than data.max_length=32"):
        prepare(DataConfig(train=write(tmp_path, LONG), max_length=32, on_overflow="error"), tokenizer, seed=0)


def test_nothing_left_is_an_error(tokenizer, tmp_path):
    with pytest.raises(DataError, match="no example is left to train on"):
        prepare(DataConfig(train=write(tmp_path, LONG[:1]), max_length=32, on_overflow="drop"), tokenizer, seed=0)


def test_bom_and_blank_lines_accepted_invalid_utf8_refused(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"messages": QA}).encode() + b"\n\n")
    assert prepare(DataConfig(train=str(path)), tokenizer, seed=0).rows["train"] == 1
    path.write_bytes(json.dumps({"messages": QA}).encode() + b"\n" + b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: invalid UTF-8"):
        prepare(DataConfig(train=str(path)), tokenizer, seed=0)


GOOD = json.dumps({"messages": QA})


def test_bad_rows_skipped_and_counted(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([GOOD] * 8 + ["{broken", '{"messages": []}']) + "\n")
    cfg = DataConfig(train=str(path), on_bad_rows="skip", max_bad_fraction=0.25)
    data = prepare(cfg, tokenizer, seed=0)
    assert data.rows["train"] == 8
    assert data.bad_rows == [
        f"{path}:9: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{path}:10: `messages` must be a non-empty list of {{role, content}} objects",
    ]


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_a_defect_at_the_end_of_a_line_is_placed_on_that_line(tokenizer, tmp_path, ending):
    """The column is counted on the defective line itself, not on the next (the line ending is not parsed)."""
    path = tmp_path / "t.jsonl"
    cut = GOOD[:-1]  # the closing brace missing: the parser runs off the end of the line
    path.write_text(ending.join([GOOD, cut, GOOD]) + ending, newline="")
    with pytest.raises(DataError) as caught:
        prepare(DataConfig(train=str(path)), tokenizer, seed=0)
    assert str(caught.value) == f"{path}:2: invalid JSON: Expecting ',' delimiter (column {len(cut) + 1})"


def test_too_many_bad_rows_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([GOOD] * 8 + ["{broken", "[1]"]) + "\n")
    with pytest.raises(
        DataError,
        match=r"2 of 10 rows are malformed, more than data.max_bad_fraction=0.1; "
        r"first: .*t\.jsonl:9: invalid JSON",
    ):
        prepare(DataConfig(train=str(path), on_bad_rows="skip", max_bad_fraction=0.1), tokenizer, seed=0)


def test_all_bad_rows_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("{broken\n[1]\n")
    with pytest.raises(DataError, match="every row is malformed"):
        prepare(DataConfig(train=str(path), on_bad_rows="skip", max_bad_fraction=1.0), tokenizer, seed=0)


def test_bad_row_stops_by_default(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([GOOD] * 8 + ["{broken"]) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:9: invalid JSON"):
        prepare(DataConfig(train=str(path)), tokenizer, seed=0)


def test_json_csv_and_parquet_sources(tokenizer, tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "reverse: a b\nanswer:", "completion": " b a"},
        {"prompt": "reverse: c d\nanswer:", "completion": " d c"},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with open(tmp_path / "d.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    expected = prepare(DataConfig(train=write(tmp_path, rows)), tokenizer, seed=0).train.input_ids
    for name in ("d.json", "d.csv", "d.parquet"):
        data = prepare(DataConfig(train=str(tmp_path / name)), tokenizer, seed=0)
        assert data.train.input_ids == expected, name


def test_csv_bad_row_names_its_line(tokenizer, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"a","b"\n"c",""\n')
    with pytest.raises(DataError, match=r"d\.csv:3: `completion` is empty"):
        prepare(DataConfig(train=str(path)), tokenizer, seed=0)


def test_unsupported_file_type(tokenizer, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="unsupported data file type '.txt'"):
        prepare(DataConfig(train=str(path)), tokenizer, seed=0)


def test_a_reply_cut_down_to_nothing_is_not_trained_as_an_empty_reply(tokenizer, tmp_path):
    long = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello world"}]}
    short = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    header = len(
        tokenizer.apply_chat_template(long["messages"][:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    )
    assert len(prepare(DataConfig(train=write(tmp_path, [short])), tokenizer, seed=0).train.input_ids[0]) <= header + 1
    # the cut leaves one token of the reply: it would become a bare end-of-turn token, so nothing is trained
    cut = prepare(DataConfig(train=write(tmp_path, [long, short]), max_length=header + 1), tokenizer, seed=0)
    assert cut.train.drops == {"nothing left to train on after truncation": 1} and cut.rows["train"] == 1
    # two tokens left: the first reply token, then the end-of-turn token
    kept = prepare(DataConfig(train=write(tmp_path, [long, short]), max_length=header + 2), tokenizer, seed=0)
    assert kept.train.truncated == 1 and kept.train.dropped == 0
    text = trained(tokenizer, kept)
    assert text.endswith("<|im_end|>") and text != "<|im_end|>" and len(kept.train.input_ids[0]) == header + 2


RAISES_ON_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_conversation_the_template_refuses_is_a_bad_row(tokenizer, tmp_path):
    jinja = tmp_path / "no-system.jinja"
    jinja.write_text(RAISES_ON_SYSTEM)
    rows = [{"messages": QA}, {"messages": [{"role": "system", "content": "s"}] + QA}] + [{"messages": QA}] * 8
    path = write(tmp_path, rows)
    with pytest.raises(
        DataError,
        match=r"t.jsonl:2: the chat template refuses this conversation: System role not "
        "supported",
    ):
        prepare(DataConfig(train=path, chat_template=str(jinja)), tokenizer, seed=0)
    data = prepare(
        DataConfig(train=path, chat_template=str(jinja), on_bad_rows="skip", max_bad_fraction=0.2), tokenizer, seed=0
    )
    assert data.rows["train"] == 9 and len(data.bad_rows) == 1 and "t.jsonl:2:" in data.bad_rows[0]


def test_a_conversation_opening_with_the_assistant_trains_its_reply_only(tokenizer, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y"},
            ]
        }
    ]
    data = prepare(DataConfig(train=write(tmp_path, rows)), tokenizer, seed=0)
    assert trained(tokenizer, data) == "Hi!<|im_end|>y<|im_end|>"


def test_plain_text_ends_in_one_trained_eos_whatever_the_post_processor_adds(tiny_model, tmp_path):
    spec = json.loads((tiny_model / "tokenizer.json").read_text())
    template = spec["post_processor"]["processors"][-1]  # Sequence[ByteLevel, TemplateProcessing]
    template["single"].append({"SpecialToken": {"id": "<|im_end|>", "type_id": 0}})
    template["special_tokens"]["<|im_end|>"] = {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]}
    copy = tmp_path / "tok"
    copy.mkdir()
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    (copy / "tokenizer_config.json").write_text((tiny_model / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(copy)
    assert tok("a b")["input_ids"][-1] == 2  # this tokenizer appends eos itself
    data = prepare(DataConfig(train=write(tmp_path, [{"prompt": "reverse: a b", "completion": " b a"}])), tok, seed=0)
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    assert ids[0] == tok.bos_token_id and ids.count(2) == 1 and ids[-1] == 2 and labels[-1] == 2
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE]) == " b a<|im_end|>"
