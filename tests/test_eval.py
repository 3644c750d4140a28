"""`lorakit eval` and `lorakit generate` after a real tiny training: reports, gates and exit codes, stop
rate, merged model against base + adapter, and refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import lorakit, tiny_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.errors import DataError, LorakitError, ModelError
from lorakit.evaluate import compare as evaluate
from lorakit.evaluate import generation
from lorakit.evaluate import metrics as metrics_mod
from lorakit.merge import fold as merge_mod
from lorakit.recipe.schema import EvalConfig, Recipe
from lorakit.train.trainer import run as train

SETTINGS = EvalConfig(max_new_tokens=12, max_examples=8)


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    recipe = tiny_recipe(
        tiny_model, tmp_path_factory.mktemp("eval") / "run", four_bit=False, steps=40, learning_rate=3e-3
    )
    return train(Recipe.model_validate(recipe)).run_dir


@pytest.fixture(scope="module")
def report(run_dir):
    return evaluate.run(evaluate.resolve(run_dir), settings=SETTINGS, gates=[("loss", "<=", 100.0)])


def test_trainings_final_eval_loss_is_the_loss_eval_reports(run_dir, report):
    """One definition (the mean per trained token): the figure `lorakit train` reports at the end is the one
    `lorakit eval` gives for the same adapter and data, not the trainer's mean of per-batch means."""
    results = json.loads((run_dir / "manifest.json").read_text())["results"]
    assert results["eval_loss"] == pytest.approx(report["metrics"]["tuned"]["loss"], abs=1e-4)


def test_report_compares_tuned_and_base_and_writes_its_files(run_dir, report):
    tuned, base = report["metrics"]["tuned"], report["metrics"]["base"]
    for figures in (tuned, base):
        assert set(metrics_mod.LOSS_METRICS + metrics_mod.GENERATION_METRICS) <= set(figures)
        assert not set(metrics_mod.PREFERENCE_METRICS) & set(figures)  # SFT data: no pairs to prefer between
    assert tuned["loss"] < base["loss"] - 1 and tuned["perplexity"] < base["perplexity"]
    assert tuned["stop_rate"] > base["stop_rate"]  # trained to stop on <|im_end|>
    assert report["data"]["loss_examples"] == 64 and report["data"]["generation_prompts"] == 8
    assert report["gates"] == [
        {"metric": "loss", "op": "<=", "threshold": 100.0, "value": tuned["loss"], "passed": True}
    ]
    assert report["settings"]["stop_token_ids"] == [2] and report["passed"]
    folder = run_dir / "eval"
    assert json.loads((folder / "report.json").read_text())["metrics"] == report["metrics"]
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "reference", "tuned", "base", "tuned_stopped", "base_stopped"} <= set(
        samples[0]
    )
    assert samples[0]["prompt"].endswith("<|im_start|>assistant\n") and samples[0]["reference"]
    markdown = (folder / "report.md").read_text()
    assert "| exact_match |" in markdown and "reference:" in markdown
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_is_the_token_mean_over_the_training_masks(run_dir, report, tiny_model):
    """Recomputed here, in one batch of one example each, with the model's own loss."""
    from peft import PeftModel

    from lorakit.data import prepare
    from lorakit.recipe.schema import DataConfig

    tok = AutoTokenizer.from_pretrained(run_dir)
    recipe = Recipe.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    data = prepare(DataConfig.model_validate(recipe.data.model_dump()), tok, recipe.train.seed)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run_dir).eval()
    total = count = 0
    with torch.no_grad():
        for ids, labels in zip(data.eval.input_ids, data.eval.labels):
            n = sum(1 for t in labels[1:] if t != -100)
            total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
            count += n
    assert abs(report["metrics"]["tuned"]["loss"] - total / count) < 1e-4


def test_stop_rate_counts_outputs_that_stop_and_outputs_that_do_not(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "reverse: a b c"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    greedy = []  # five greedy tokens, step by step, for reference
    with torch.no_grad():
        for _ in range(5):
            greedy.append(int(model(input_ids=torch.tensor([prompt + greedy])).logits[0, -1].argmax()))
    settings = EvalConfig(max_new_tokens=5)
    stopping = generation.generate(model, tok, [prompt, prompt], [greedy[2]], settings, batch_size=2)
    assert all(g.stopped and g.tokens == greedy.index(greedy[2]) for g in stopping)
    never = next(t for t in range(len(tok)) if t not in greedy)
    runaway = generation.generate(model, tok, [prompt], [never], settings, batch_size=1)[0]
    assert not runaway.stopped and runaway.tokens == 5
    assert runaway.text == tok.decode(greedy, skip_special_tokens=True).strip()
    outs = stopping + [runaway]
    assert (
        metrics_mod.score([o.text for o in outs], ["x"] * 3, [o.tokens for o in outs], [o.stopped for o in outs])[
            "stop_rate"
        ]
        == 2 / 3
    )


def test_metrics_on_known_strings():
    s = metrics_mod.score(["The cat sat.", "dog", "a b c d"], ["the cat sat", "cat", "b c"], [3, 1, 4], [True] * 3)
    assert s["exact_match"] == 0 and s["normalized_exact_match"] == 1 / 3
    assert s["contains_reference"] == 2 / 3  # "b c" is in "b c d" (the article "a" is dropped)
    assert abs(s["rouge_l"] - (1 + 0 + 2 * (2 / 3) * 1 / (2 / 3 + 1)) / 3) < 1e-9
    assert s["mean_generated_tokens"] == 8 / 3


def test_gates_exit_codes_from_the_command_line(run_dir, tmp_path):
    common = [str(run_dir), "--max-examples", "4", "--max-new-tokens", "6", "--output", str(tmp_path / "e")]
    ok = lorakit("eval", *common, "--fail-under", "stop_rate=0", "--max-loss", "50", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["passed"] is True and "exact_match" in ok.stderr
    missed = lorakit("eval", *common, "--fail-over", "loss=0.0001", "--compare", "none")
    assert missed.returncode == 3
    assert "gate missed: loss = " in missed.stderr and "needs <= 0.0001" in missed.stderr
    bad = lorakit("eval", *common, "--fail-under", "exactmatch=1")
    assert bad.returncode == 2 and "METRIC one of loss, perplexity, exact_match" in bad.stderr


def test_merged_model_evaluates_like_base_plus_adapter(run_dir, report, tmp_path):
    merged = tmp_path / "merged"
    merge_mod.run(merge_mod.plan(run_dir, output=str(merged)))
    again = evaluate.run(evaluate.resolve(merged), settings=SETTINGS, compare_base=False)
    assert again["kind"] == "merged" and list(again["metrics"]) == ["tuned"]
    assert abs(again["metrics"]["tuned"]["loss"] - report["metrics"]["tuned"]["loss"]) < 1e-4
    ours = [json.loads(line)["tuned"] for line in (merged / "eval" / "samples.jsonl").read_text().splitlines()]
    theirs = [json.loads(line)["tuned"] for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    assert ours == theirs


def test_generate_with_the_runs_template_and_stop_tokens(run_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "reverse: cat dog sun"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "reverse: a b c"}]})
        + "\n"
    )
    out = lorakit(
        "generate", str(run_dir), "-p", "reverse: red blue", "--file", str(prompts), "--json", "--max-new-tokens", "8"
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == [
        "reverse: red blue",
        "reverse: cat dog sun",
        "reverse: a b c",
    ]
    assert all(r["tokens"] <= 8 for r in rows)
    base = lorakit("generate", str(run_dir), "-p", "reverse: red blue", "--base", "--json", "--max-new-tokens", "8")
    assert base.returncode == 0 and json.loads(base.stdout)["reply"] != rows[0]["reply"]
    assert lorakit("generate", str(run_dir)).returncode == 2


def test_refusals_name_the_cause(run_dir, tiny_model, tmp_path, write_recipe):
    incomplete = tmp_path / "no-adapter"
    shutil.copytree(run_dir, incomplete, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    (incomplete / "adapter_config.json").unlink()
    with pytest.raises(LorakitError, match="holds no adapter"):
        evaluate.resolve(incomplete)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=429,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(other)
    recipe = write_recipe(tiny_recipe(other, tmp_path / "unused", four_bit=False))
    with pytest.raises(ModelError, match="does not fit"):
        evaluate.run(evaluate.resolve(recipe, adapter=str(run_dir)), settings=SETTINGS)
    broken = tmp_path / "bad-eval"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    bad_data = tmp_path / "eval.jsonl"
    bad_data.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    saved = yaml.safe_load((broken / "recipe.yaml").read_text())
    saved["data"]["eval"] = str(bad_data)
    (broken / "recipe.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(DataError, match=rf"{bad_data}:1: `messages` has no assistant message"):
        evaluate.run(evaluate.resolve(broken), settings=SETTINGS)


LM_EVAL_TASK = """task: lorakit_reverse
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "<|begin_of_text|><|im_start|>user\\n{{{{question}}}}<|im_end|>\\n<|im_start|>assistant\\n"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_lm_eval_harness_on_a_local_task(run_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from conftest import EXAMPLES

    rows = [json.loads(line)["messages"] for line in (EXAMPLES / "eval.jsonl").read_text().splitlines()[:6]]
    data = tmp_path / "reverse.jsonl"
    data.write_text(
        "".join(json.dumps({"question": m[-2]["content"], "answer": m[-1]["content"]}) + "\n" for m in rows)
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lorakit_reverse.yaml").write_text(LM_EVAL_TASK.format(data=data))
    report = evaluate.run(
        evaluate.resolve(run_dir),
        settings=EvalConfig(max_new_tokens=6, max_examples=2),
        output=tmp_path / "e",
        lm_eval={"tasks": ["lorakit_reverse"], "include": tasks, "limit": 6},
    )
    for name in ("tuned", "base"):
        score = report["metrics"][name]["lm_eval"]["lorakit_reverse"]["exact_match"]
        assert 0 <= score <= 1
    assert report["metrics"]["base"]["lm_eval"]["lorakit_reverse"]["exact_match"] == 0  # a random base
    assert "lm-eval lorakit_reverse exact_match" in (tmp_path / "e" / "report.md").read_text()
    with pytest.raises(LorakitError, match="unknown task 'no_such_task'"):
        evaluate.run(
            evaluate.resolve(run_dir),
            settings=SETTINGS,
            output=tmp_path / "e2",
            lm_eval={"tasks": ["no_such_task"], "include": tasks, "limit": 2},
        )


def test_contains_reference_matches_whole_words_and_gates_fail_on_missing_metrics():
    assert (
        metrics_mod.score(["42", "yes", "the cat sat"], ["4", "The", "cat"], [1, 1, 3], [True] * 3)[
            "contains_reference"
        ]
        == 1 / 3
    )
    assert metrics_mod.check_gates([("exact_match", ">=", 0.5)], {"loss": 1.0}) == [
        {"metric": "exact_match", "op": ">=", "threshold": 0.5, "value": None, "passed": False}
    ]
    with pytest.raises(ValueError, match="finite"):
        metrics_mod.parse_gates([], ["loss=inf"])


def test_eval_output_must_be_a_report_directory(run_dir, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "main.py").write_text("keep me")
    with pytest.raises(LorakitError, match="is not a lorakit eval report"):
        evaluate.run(evaluate.resolve(run_dir), settings=SETTINGS, output=precious)
    assert (precious / "main.py").read_text() == "keep me"
