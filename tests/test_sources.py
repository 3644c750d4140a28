"""Data sources: files, directories, globs, `datasets` repositories (the hub code path, offline), several
sources with their own formats, caps and weights, and how the recipe resolves and refuses them."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from lorakit.data import prepare
from lorakit.errors import DataError, RecipeError
from lorakit.recipe.loading import load_recipe
from lorakit.recipe.schema import DataConfig


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"n{i}"}]}


def decoded(tokenizer, split) -> list[str]:
    return [tokenizer.decode(ids) for ids in split.input_ids]


def test_directory_is_read_recursively_in_name_order(tokenizer, tmp_path):
    write_jsonl(tmp_path / "d" / "b.jsonl", [chat(2)])
    write_jsonl(tmp_path / "d" / "a.jsonl", [chat(1)])
    write_jsonl(tmp_path / "d" / "sub" / "c.jsonl", [chat(3)])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    data = prepare(DataConfig(train=str(tmp_path / "d")), tokenizer, seed=0)
    assert [t.split("assistant\n")[1][:2] for t in decoded(tokenizer, data.train)] == ["n1", "n2", "n3"]
    assert len(data.fingerprints) == 3


def test_glob_and_error_positions_name_the_file(tokenizer, tmp_path):
    write_jsonl(tmp_path / "part-1.jsonl", [chat(1)])
    bad = tmp_path / "part-2.jsonl"
    bad.write_text(json.dumps(chat(2)) + "\n{oops\n")
    with pytest.raises(DataError, match=rf"^{bad}:2: invalid JSON"):
        prepare(DataConfig(train=str(tmp_path / "part-*.jsonl")), tokenizer, seed=0)
    bad.write_text(json.dumps(chat(2)) + "\n")
    assert prepare(DataConfig(train=str(tmp_path / "part-*.jsonl")), tokenizer, seed=0).rows["train"] == 2


def test_empty_directory_and_unmatched_glob_are_errors(tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl, .json, .csv or .parquet file"):
        prepare(DataConfig(train=str(tmp_path / "empty")), tokenizer, seed=0)
    with pytest.raises(DataError, match="no .jsonl, .json, .csv or .parquet file matches"):
        prepare(DataConfig(train=str(tmp_path / "*.jsonl")), tokenizer, seed=0)


def dataset_repo(root):
    """A dataset repository laid out as on the hub: two configurations, each with train and test splits."""
    for subset in ("easy", "hard"):
        for split, numbers in (("train", range(4)), ("test", range(10, 12))):
            write_jsonl(
                root / subset / f"{split}.jsonl", [{"instruction": f"{subset} {i}", "output": f"o{i}"} for i in numbers]
            )
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
            f"  - split: test\n    path: {s}/test.jsonl\n"
            for s in ("easy", "hard")
        )
        + "---\n"
    )
    return str(root)


def test_dataset_repository_through_datasets_with_subset_and_split(tokenizer, tmp_path):
    repo = dataset_repo(tmp_path / "repo")
    cfg = DataConfig(
        train={"path": repo, "subset": "hard", "split": "train"}, eval={"path": repo, "subset": "hard", "split": "test"}
    )
    data = prepare(cfg, tokenizer, seed=0)
    assert data.rows == {"train": 4, "eval": 2}
    assert data.format == "alpaca"
    assert all("hard" in t for t in decoded(tokenizer, data.train))
    assert "o11" in decoded(tokenizer, data.eval)[1]
    assert list(data.fingerprints) == [f"{repo}[train] (hard)", f"{repo}[test] (hard)"]
    capped = prepare(
        DataConfig(train={"path": repo, "subset": "easy", "split": "train", "max_rows": 3}), tokenizer, seed=0
    )
    assert capped.rows["train"] == 3


def test_dataset_errors_name_the_source(tokenizer, tmp_path):
    repo = dataset_repo(tmp_path / "repo")
    with pytest.raises(DataError, match=r"^data.train: cannot load the dataset .*subset=easy, split=validation"):
        prepare(DataConfig(train={"path": repo, "subset": "easy", "split": "validation"}), tokenizer, seed=0)
    with pytest.raises(DataError, match=r"^data.train: cannot load the dataset 'nobody/no-such-dataset'"):
        prepare(DataConfig(train="nobody/no-such-dataset"), tokenizer, seed=0)  # offline: a clear error


def test_bad_row_in_a_dataset_names_its_row(tokenizer, tmp_path):
    repo = tmp_path / "repo"
    write_jsonl(repo / "train.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}])
    with pytest.raises(DataError, match=r"\[train\] row 2: `output` is empty"):
        prepare(DataConfig(train={"path": str(repo), "split": "train"}), tokenizer, seed=0)


def test_several_sources_each_with_format_columns_cap_and_weight(tokenizer, tmp_path):
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(10)])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)])
    cfg = DataConfig(
        train=[
            {"path": chats, "max_rows": 8, "weight": 0.5},
            {"path": qa, "format": "alpaca", "columns": {"instruction": "question", "output": "answer"}, "weight": 2},
        ]
    )
    data = prepare(cfg, tokenizer, seed=3)
    assert data.formats == {chats: "messages", qa: "alpaca"}
    assert [(s["examples"], s["used"]) for s in data.sources] == [(8, 4), (6, 12)]
    texts = decoded(tokenizer, data.train)
    assert sum("say" in t for t in texts) == 4 and sum("q" in t.split("user\n")[1][:1] for t in texts) == 12
    assert not any("say 8" in t or "say 9" in t for t in texts)  # beyond the cap
    assert all(texts.count(t) == 2 for t in texts if "q" in t.split("user\n")[1][:1])  # weight 2 repeats each
    again = prepare(cfg, tokenizer, seed=3, use_cache=False)
    assert again.train.input_ids == data.train.input_ids  # seeded, and the cache gives the same data


def test_weights_never_leak_repeats_into_the_eval_split(tokenizer, tmp_path):
    rows = write_jsonl(tmp_path / "t.jsonl", [chat(i) for i in range(20)])
    data = prepare(DataConfig(train=[{"path": rows, "weight": 3}], eval_fraction=0.25), tokenizer, seed=0)
    assert data.rows == {"train": 45, "eval": 5}
    assert not set(map(tuple, data.eval.input_ids)) & set(map(tuple, data.train.input_ids))


def test_parallel_encoding_gives_the_same_data(tokenizer, tmp_path):
    rows = write_jsonl(tmp_path / "t.jsonl", [chat(i) for i in range(300)])
    one = prepare(DataConfig(train=rows, num_proc=1), tokenizer, seed=0, use_cache=False)
    two = prepare(DataConfig(train=rows, num_proc=2), tokenizer, seed=0, use_cache=False)
    assert one.train.input_ids == two.train.input_ids and one.train.labels == two.train.labels


def test_first_error_in_data_order_whatever_the_processes(tokenizer, tmp_path):
    rows = [chat(i) for i in range(300)]
    rows[250]["messages"][1]["role"] = "robot"
    rows[120] = {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}]}
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=r"t.jsonl:251: messages\[1\].role"):
        prepare(DataConfig(train=path, num_proc=2), tokenizer, seed=0)
    rows[250] = chat(250)
    write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=r"t.jsonl:121: \d+ tokens, longer than data.max_length=64"):
        prepare(DataConfig(train=path, num_proc=2, max_length=64, on_overflow="error"), tokenizer, seed=0)


def test_recipe_resolves_sources_and_refuses_what_cannot_work(tmp_path, write_recipe, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data" / "a.jsonl", [chat(1)])
    recipe = {
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": ["data/a.jsonl", {"path": "data/*.jsonl", "weight": 2}, "org/some-dataset"]},
    }
    loaded = load_recipe(write_recipe(recipe))
    assert [s.path for s in loaded.data.train] == [
        str(tmp_path / "data/a.jsonl"),
        str(tmp_path / "data/*.jsonl"),
        "org/some-dataset",
    ]
    saved = loaded.to_saved_dict()["data"]["train"]
    assert saved[0] == str(tmp_path / "data/a.jsonl") and saved[1] == {
        "path": str(tmp_path / "data/*.jsonl"),
        "weight": 2.0,
    }
    recipe["data"]["train"] = [
        "data/a.jsonl",
        {"path": "data/a.jsonl", "split": "train"},
        "data/*.csv",
        {"path": "data/a.jsonl", "wieght": 2},
    ]
    path = write_recipe(recipe)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).splitlines() == [
        f"{path}:10: unknown key 'data.train[3].wieght'; did you mean 'data.train[3].weight'?"
    ]
    del recipe["data"]["train"][3]
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(recipe))
    assert str(err.value).splitlines() == [
        f"{path}:6: data.train[1]: `split`, `subset` and `revision` are for hub datasets and dataset directories, "
        "not for local files",
        f"{path}:8: data.train[2]: no file matches the pattern data/*.csv",
    ]
    recipe["data"] = {"train": "data/a.jsonl", "eval": {"path": "data/a.jsonl", "weight": 2}}
    with pytest.raises(RecipeError, match="`weight` applies to training sources only"):
        load_recipe(write_recipe(recipe))


def test_null_message_fields_render_as_absent(tokenizer, tmp_path):
    """Parquet files and `datasets` give every message every key any message has (`name`, `tool_calls`),
    set to None; a template testing `is defined` must not render them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [{"role": "user", "content": "hi", "name": "ann"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")  # unifies: every message gets `name`
    template = tmp_path / "named.jinja"
    template.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m.role }}{% if m.name is defined %}"
        "{{ ' (' + m.name + ')' }}{% endif %}{{ '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    from_parquet = prepare(
        DataConfig(train=str(tmp_path / "t.parquet"), chat_template=str(template)), tokenizer, seed=0, use_cache=False
    )
    from_jsonl = prepare(
        DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows), chat_template=str(template)),
        tokenizer,
        seed=0,
        use_cache=False,
    )
    assert from_parquet.train.input_ids == from_jsonl.train.input_ids
    texts = decoded(tokenizer, from_parquet.train)
    assert "user (ann)" in texts[0] and "None" not in texts[1]


def test_a_file_name_with_brackets_is_read_as_a_file_not_a_pattern(tokenizer, tmp_path):
    write_jsonl(tmp_path / "train[1].jsonl", [chat(1)])
    write_jsonl(tmp_path / "train1.jsonl", [chat(2), chat(3)])
    data = prepare(DataConfig(train=str(tmp_path / "train[1].jsonl")), tokenizer, seed=0)
    assert data.rows["train"] == 1 and "n1" in decoded(tokenizer, data.train)[0]


def test_directory_skips_hidden_folders_and_refuses_mixed_splits(tokenizer, tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [chat(1)])
    write_jsonl(tmp_path / "d" / ".ipynb_checkpoints" / "train-checkpoint.jsonl", [chat(9)])
    assert prepare(DataConfig(train=str(tmp_path / "d")), tokenizer, seed=0).rows["train"] == 1
    write_jsonl(tmp_path / "d" / "data" / "test-00000.jsonl", [chat(2)])
    with pytest.raises(DataError, match=r"holds what look like several splits \(e.g. data/test-00000.jsonl\)"):
        prepare(DataConfig(train=str(tmp_path / "d")), tokenizer, seed=0)


def test_every_row_malformed_is_reported_per_source(tokenizer, tmp_path):
    first = tmp_path / "a.jsonl"
    first.write_text(json.dumps(chat(1)) + "\n{bad\n" + "".join(json.dumps(chat(i)) + "\n" for i in range(2, 40)))
    second = tmp_path / "b.jsonl"
    second.write_text("[1]\n[2]\n")
    with pytest.raises(DataError, match=rf"data.train\[1\]: {second}: every row is malformed; first: {second}:1:"):
        prepare(
            DataConfig(train=[str(first), str(second)], on_bad_rows="skip", max_bad_fraction=0.5), tokenizer, seed=0
        )
