"""The published chat templates of the major model families, trained as lorakit masks them.

Each family's real template text (tests/fixtures/chat_templates/README.md says where each comes from) is put
on the tiny test tokenizer with that family's special tokens added, and run through `lorakit.data.prepare`,
the path `lorakit train` takes. For each: only replies and their end-of-turn token are trained, the token is
registered as a stop token, the generation prompt is exactly the trained input before each reply (by token),
and a system prompt, a default system prompt, multi-turn history and reasoning are handled as the template
renders them or refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import trl

from lorakit.data import IGNORE, prepare
from lorakit.errors import DataError
from lorakit.evaluate.generation import prompt_ids, stop_ids
from lorakit.recipe.schema import DataConfig
from lorakit.rundir.directory import write_generation_config

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"  # the originals, as trl keeps them for detection
OWN = Path(__file__).parent / "fixtures" / "chat_templates"
LLAMA3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")
DEEPSEEK = ("<｜User｜>", "<｜Assistant｜>")


@dataclass(frozen=True)
class Family:
    name: str
    template: Path
    bos: str | None
    eos: str
    specials: tuple[str, ...]
    end_of_turn: str
    system: str = "kept"  # kept | refused (the template raises) | dropped (once a reply follows)
    inserted_system: str | None = None  # what the template puts in a system turn by itself
    history: str = "kept"  # kept | re-rendered (earlier replies change once later turns follow)
    added: tuple[str, ...] = ()  # added, non-special tokens

    def tokenizer(self, base):
        base.add_special_tokens(
            {"eos_token": self.eos, "additional_special_tokens": list(self.specials)}
            | ({"bos_token": self.bos} if self.bos else {})
        )
        base.add_tokens(list(self.added))
        return base


FAMILIES = [
    Family(  # Llama 3.3 ships the 3.1 template text
        "llama3.1", TRL_TEMPLATES / "llama3_1.jinja", "<|begin_of_text|>", "<|end_of_text|>", LLAMA3, "<|eot_id|>",
        inserted_system="Cutting Knowledge Date: December 2023",
    ),
    Family(
        "llama3.2", TRL_TEMPLATES / "llama3_2.jinja", "<|begin_of_text|>", "<|end_of_text|>", LLAMA3, "<|eot_id|>",
        inserted_system="Cutting Knowledge Date: December 2023",
    ),
    Family(
        "qwen2.5", TRL_TEMPLATES / "qwen2_5.jinja", None, "<|endoftext|>", ("<|im_start|>", "<|im_end|>"),
        "<|im_end|>", inserted_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    Family(
        "qwen3", TRL_TEMPLATES / "qwen3.jinja", None, "<|endoftext|>", ("<|im_start|>", "<|im_end|>"), "<|im_end|>",
        history="re-rendered", added=("<think>", "</think>"),
    ),
    Family("mistral-v3", OWN / "mistral_v3.jinja", "<s>", "</s>", ("[INST]", "[/INST]"), "</s>", system="dropped"),
    Family(
        "mistral-tekken", OWN / "mistral_tekken.jinja", "<s>", "</s>", ("[INST]", "[/INST]"), "</s>", system="dropped"
    ),
    Family(
        "gemma2", TRL_TEMPLATES / "gemma.jinja", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"),
        "<end_of_turn>", system="refused",
    ),
    Family("gemma3", TRL_TEMPLATES / "gemma3.jinja", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    Family(
        "phi3", TRL_TEMPLATES / "phi3.jinja", None, "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>",
    ),
    Family(
        "phi3.5", TRL_TEMPLATES / "phi3_5.jinja", None, "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>",
    ),
    Family("phi4", OWN / "phi4.jinja", None, "<|endoftext|>", ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), "<|im_end|>"),
]  # fmt: skip
DEEPSEEK_FAMILIES = [
    Family(
        name,
        TRL_TEMPLATES / file,
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        DEEPSEEK,
        "<｜end▁of▁sentence｜>",
    )
    for name, file in (("deepseek-v3", "deepseekv3.jinja"), ("deepseek-r1-distill", "deepseek_r1_distill.jinja"))
]
BY_NAME = {f.name: f for f in FAMILIES + DEEPSEEK_FAMILIES}
KEPT_HISTORY = [f for f in FAMILIES if f.history == "kept"]

SYSTEM = {"role": "system", "content": "Answer in one word."}
TWO_TURNS = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue"},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "Apple"},
]


def ids(family: Family):
    return pytest.mark.parametrize("family", family, ids=[f.name for f in family])


def prepared(tmp_path, family: Family, tokenizer, conversations, **data):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    tokenizer = family.tokenizer(tokenizer)
    cfg = DataConfig(train=str(path), chat_template=str(family.template), **data)
    return prepare(cfg, tokenizer, seed=0, use_cache=False), tokenizer


def trained_runs(example_ids, labels) -> list[tuple[int, int]]:
    """(start, stop) of each run of trained tokens."""
    runs, start = [], None
    for j, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = j
        elif label == IGNORE and start is not None:
            runs.append((start, j))
            start = None
    return runs


@ids(KEPT_HISTORY)
def test_only_the_replies_and_their_end_of_turn_token_are_trained(family, tokenizer, tmp_path):
    data, tok = prepared(tmp_path, family, tokenizer, [TWO_TURNS])
    example_ids, labels = data.train.input_ids[0], data.train.labels[0]
    runs = trained_runs(example_ids, labels)
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    assert [tok.decode(example_ids[a : b - 1]).strip() for a, b in runs] == ["Blue", "Apple"]
    assert [example_ids[b - 1] for _, b in runs] == [eot, eot]  # every reply ends on the trained end-of-turn token
    assert data.end_of_turn_id == eot


@ids(KEPT_HISTORY)
def test_the_generation_prompt_is_the_trained_input_before_each_reply_token_for_token(family, tokenizer, tmp_path):
    data, tok = prepared(tmp_path, family, tokenizer, [TWO_TURNS])
    example_ids = data.train.input_ids[0]
    starts = [a for a, _ in trained_runs(example_ids, data.train.labels[0])]
    for start, turn in zip(starts, (1, 3)):  # what `lorakit generate/chat/eval` feed the model before that reply
        assert prompt_ids(tok, TWO_TURNS[:turn]) == example_ids[:start]


@ids(FAMILIES)
def test_the_end_of_turn_token_is_registered_as_a_stop_token(family, tokenizer, tmp_path, tiny_model):
    from transformers import AutoConfig, GenerationConfig

    data, tok = prepared(tmp_path, family, tokenizer, [TWO_TURNS[:2]])
    holder = type(
        "Model", (), {"generation_config": GenerationConfig.from_model_config(AutoConfig.from_pretrained(tiny_model))}
    )
    write_generation_config(tmp_path, holder, tok, data.end_of_turn_id)
    stops = stop_ids(tmp_path, tok)
    assert tok.convert_tokens_to_ids(family.end_of_turn) in stops and tok.eos_token_id in stops


@ids([f for f in FAMILIES if f.system == "kept" and f.history == "kept"])
def test_a_system_prompt_is_in_the_input_and_never_trained(family, tokenizer, tmp_path):
    data, tok = prepared(tmp_path, family, tokenizer, [[SYSTEM, *TWO_TURNS]])
    example_ids, labels = data.train.input_ids[0], data.train.labels[0]
    assert SYSTEM["content"] in tok.decode(example_ids)
    trained = tok.decode([t for t, label in zip(example_ids, labels) if label != IGNORE])
    assert "one word" not in trained and "Name a" not in trained


@ids([f for f in FAMILIES if f.inserted_system])
def test_the_system_prompt_a_template_inserts_by_itself_is_never_trained(family, tokenizer, tmp_path):
    data, tok = prepared(tmp_path, family, tokenizer, [TWO_TURNS[:2]])
    example_ids, labels = data.train.input_ids[0], data.train.labels[0]
    assert family.inserted_system in tok.decode(example_ids)
    start = trained_runs(example_ids, labels)[0][0]
    assert family.inserted_system in tok.decode(example_ids[:start])  # before the reply, masked


def test_a_template_that_refuses_a_system_role_names_the_row_and_the_reason(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"chats\.jsonl:1: the chat template refuses .*System role not supported"):
        prepared(tmp_path, BY_NAME["gemma2"], tokenizer, [[SYSTEM, *TWO_TURNS[:2]]])


@ids([f for f in FAMILIES if f.system == "dropped"])
def test_a_template_that_drops_the_system_prompt_once_a_reply_follows_is_refused(family, tokenizer, tmp_path):
    """Mistral's templates render the system prompt only into a final user turn: every training
    conversation (which ends with a reply) would silently lose it."""
    with pytest.raises(
        DataError, match=r"chats\.jsonl:1: the chat template drops the system message .*first user turn"
    ):
        prepared(tmp_path, family, tokenizer, [[SYSTEM, *TWO_TURNS[:2]]])
    data, _ = prepared(tmp_path, family, tokenizer, [TWO_TURNS])  # without one, multi-turn trains
    assert len(trained_runs(data.train.input_ids[0], data.train.labels[0])) == 2


def test_phi3_ends_each_turn_on_end_and_leaves_the_closing_eos_untrained(tokenizer, tmp_path):
    """Phi-3's template appends eos after the last message only; a turn ends on <|end|>, in every turn."""
    for name in ("phi3", "phi3.5"):
        data, tok = prepared(tmp_path, BY_NAME[name], tokenizer, [TWO_TURNS, TWO_TURNS[:2]])
        for example_ids, labels in zip(data.train.input_ids, data.train.labels):
            assert example_ids[-1] == tok.eos_token_id and labels[-1] == IGNORE
        assert data.end_of_turn_id == tok.convert_tokens_to_ids("<|end|>")


REASONING = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "two and two make four"},
]
INLINE_REASONING = [REASONING[0], {"role": "assistant", "content": "<think>\ntwo and two make four\n</think>\n\n4"}]


def test_qwen3_trains_the_final_replys_reasoning_block_as_its_template_renders_it(tokenizer, tmp_path):
    family = BY_NAME["qwen3"]
    data, tok = prepared(tmp_path, family, tokenizer, [REASONING, INLINE_REASONING, TWO_TURNS[:2]])
    trained = [
        tok.decode([t for t, lab in zip(i, la) if lab != IGNORE])
        for i, la in zip(data.train.input_ids, data.train.labels)
    ]
    assert trained[0] == trained[1] == "<think>\ntwo and two make four\n</think>\n\n4<|im_end|>"
    assert trained[2] == "<think>\n\n</think>\n\nBlue<|im_end|>"  # no reasoning: the empty block the template adds


def test_qwen3_multi_turn_is_refused_with_the_reason_unless_only_final_replies_are_trained(tokenizer, tmp_path):
    """Qwen3 drops reasoning from earlier replies once a later user turn follows, so an earlier reply in the
    history is not the text the model generated for it."""
    family = BY_NAME["qwen3"]
    with pytest.raises(DataError, match=r"chats\.jsonl:1: .*renders assistant turn 1 differently .*last_assistant"):
        prepared(tmp_path, family, tokenizer, [TWO_TURNS])
    data, tok = prepared(tmp_path, family, tokenizer, [TWO_TURNS], train_on="last_assistant")
    example_ids, labels = data.train.input_ids[0], data.train.labels[0]
    [(start, stop)] = trained_runs(example_ids, labels)
    assert tok.decode(example_ids[start:stop]) == "<think>\n\n</think>\n\nApple<|im_end|>"
    assert prompt_ids(tok, TWO_TURNS[:3]) == example_ids[:start]


@ids(DEEPSEEK_FAMILIES)
def test_deepseeks_templates_are_refused_they_open_think_only_at_generation(family, tokenizer, tmp_path):
    """Their generation prompt ends in `<think>\\n` and their replies drop everything up to `</think>`: a
    reasoning model would be trained on replies it never generates."""
    with pytest.raises(DataError, match=r"chats\.jsonl:1: the generation prompt .* ends in '<think>\\n'"):
        prepared(tmp_path, family, tokenizer, [INLINE_REASONING])


@ids(KEPT_HISTORY)
def test_templates_without_reasoning_handling_train_a_think_block_as_reply_text(family, tokenizer, tmp_path):
    data, tok = prepared(tmp_path, family, tokenizer, [INLINE_REASONING])
    example_ids, labels = data.train.input_ids[0], data.train.labels[0]
    [(start, stop)] = trained_runs(example_ids, labels)
    assert tok.decode(example_ids[start : stop - 1]).strip() == INLINE_REASONING[1]["content"]


def test_a_template_whose_end_of_turn_is_not_a_special_token_of_the_tokenizer_is_refused(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": TWO_TURNS}) + "\n")
    cfg = DataConfig(train=str(path), chat_template=str(BY_NAME["llama3.1"].template))
    with pytest.raises(DataError, match=r"chats\.jsonl:1: a trained turn ends in .*not in an end-of-turn/eos token"):
        prepare(cfg, tokenizer, seed=0, use_cache=False)  # the tiny tokenizer has no <|eot_id|>


LONG = [  # more replies than lorakit renders one by one: the middle ones are found in one rendering
    message
    for k in range(8)
    for message in ({"role": "user", "content": f"Name colour {k}."}, {"role": "assistant", "content": f"Colour {k}"})
]


@ids(KEPT_HISTORY)
def test_every_reply_of_a_long_conversation_is_trained_after_its_own_generation_prompt(family, tokenizer, tmp_path):
    data, tok = prepared(tmp_path, family, tokenizer, [LONG])
    example_ids, labels = data.train.input_ids[0], data.train.labels[0]
    runs = trained_runs(example_ids, labels)
    assert [tok.decode(example_ids[a : b - 1]).strip() for a, b in runs] == [f"Colour {k}" for k in range(8)]
    for (start, _), turn in zip(runs, range(1, len(LONG), 2)):
        assert prompt_ids(tok, LONG[:turn]) == example_ids[:start]


def test_masking_renders_a_conversation_a_fixed_number_of_times_whatever_its_length(tokenizer, tmp_path):
    """Per-example work is linear in the number of turns: 10,000 messages cost the same few renderings as 16."""
    family = BY_NAME["qwen2.5"]
    renders = []
    original = family.tokenizer(tokenizer).apply_chat_template

    def counted(*args, **kwargs):
        renders.append(len(args[0]))
        return original(*args, **kwargs)

    tokenizer.apply_chat_template = counted  # counts the calls; the real template renders each one
    path = tmp_path / "chats.jsonl"
    turns = [{"role": r, "content": f"{r} {k}"} for k in range(5000) for r in ("user", "assistant")]
    path.write_text(json.dumps({"messages": LONG}) + "\n" + json.dumps({"messages": turns}) + "\n")
    cfg = DataConfig(train=str(path), chat_template=str(family.template), max_length=200_000)
    data = prepare(cfg, tokenizer, seed=0, use_cache=False)
    per_row = {n: renders.count(n) for n in (len(LONG), len(turns))}
    assert per_row == {16: 2, 10_000: 2}  # the conversation, and once more with markers for its contents
    partial = [n for n in renders if n not in per_row]  # the end-of-turn probe's two; before/through 3 replies a row
    assert len(partial) <= 2 + 2 * 5 and max(partial) == len(turns) - 1
    assert len(trained_runs(data.train.input_ids[1], data.train.labels[1])) == 5000


TRIMMING = (  # a template that rewrites reply text (strips it), so replies cannot be found in one rendering
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_rewrites_replies_has_each_rendered_and_a_bound_on_how_many(tokenizer, tmp_path):
    template = tmp_path / "trim.jinja"
    template.write_text(TRIMMING)
    family = Family("trim", template, None, "<|endoftext|>", ("<|im_start|>", "<|im_end|>"), "<|im_end|>")
    data, tok = prepared(tmp_path, family, tokenizer, [LONG])
    runs = trained_runs(data.train.input_ids[0], data.train.labels[0])
    assert [tok.decode(data.train.input_ids[0][a : b - 1]) for a, b in runs] == [f"Colour {k}" for k in range(8)]
    many = [{"role": r, "content": f" {r} {k} "} for k in range(600) for r in ("user", "assistant")]
    with pytest.raises(DataError, match=r"chats\.jsonl:1: the chat template does not frame every reply the same "
                       r"way, .* up to 512 replies per conversation and this one trains 600; split it"):  # fmt: skip
        prepared(tmp_path, family, tokenizer, [many])
