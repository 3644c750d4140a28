"""Several adapters: `lorakit merge RUN1 RUN2 --combination` (peft's add_weighted_adapter) into a merged model or
one adapter, checked here against the runs' own weights; what cannot be combined is refused before any weight
is read; `lorakit eval` / `generate` with several runs switch adapters on one loaded base and give each
adapter the figures and replies it gets alone."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from conftest import logits, max_diff, tiny_recipe
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.evaluate import compare as evaluate
from lorakit.merge import combine
from lorakit.model import base as model_mod
from lorakit.model.setup import for_loading
from lorakit.recipe.schema import EvalConfig, ModelConfig, Recipe
from lorakit.train.trainer import run as train

SETTINGS = EvalConfig(max_new_tokens=6, max_examples=4)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Two LoRA runs of rank 16 (different seeds and learning rates), one of rank 8, one QLoRA run."""
    root = tmp_path_factory.mktemp("combine-runs")
    made = {}
    for name, r, four_bit, train_args in (
        ("one", 16, False, {"seed": 1}),
        ("two", 16, False, {"seed": 2, "learning_rate": 4e-3}),
        ("eight", 8, False, {"seed": 3}),
        ("qlora", 16, True, {"seed": 4}),
    ):
        recipe = tiny_recipe(tiny_model, root / name, four_bit=four_bit, steps=6, **train_args)
        recipe["lora"].update({"r": r, "lora_alpha": 2 * r})
        made[name] = train(Recipe.model_validate(recipe)).run_dir
    return made


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


def base_model(tiny_model):
    return model_mod.load_base(
        ModelConfig(name_or_path=str(tiny_model)), for_loading(ModelConfig(name_or_path=str(tiny_model)))
    )


def deltas(folder) -> dict:
    """Each layer's update B @ A * lora_alpha / r, from the saved adapter alone."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    state = load_file(folder / "adapter_model.safetensors")
    return {
        k.removesuffix(".lora_A.weight"): state[k.replace("lora_A", "lora_B")] @ state[k] * scale
        for k in state
        if k.endswith("lora_A.weight")
    }


def relative(a, b) -> float:
    return (a - b).norm().item() / b.norm().item()


def plan(paths, tmp_path, combination="cat", weights="0.7,0.3", density=None, adapter_only=True, seed=None, **kw):
    return combine.plan(
        paths,
        combination=combination,
        weights=weights,
        density=density,
        seed=seed,
        output=str(tmp_path / "out"),
        adapter_only=adapter_only,
        **kw,
    )


def test_cat_of_different_ranks_is_the_weighted_sum_and_the_adapter_equals_the_merge(runs, tiny_model, tmp_path):
    report = combine.run(plan([runs["one"], runs["eight"]], tmp_path))
    adapter = tmp_path / "out"
    assert report["rank"] == 24 and report["seed"] == 1 and report["verification"]["passed"]
    assert report["checks"][0]["passed"] and report["vs_weighted_sum"]["max_rel_diff"] < 1e-5
    ours, one, eight = deltas(adapter), deltas(runs["one"]), deltas(runs["eight"])
    assert len(ours) == 28
    assert max(relative(ours[k], 0.7 * one[k] + 0.3 * eight[k]) for k in ours) < 1e-5
    saved = json.loads((adapter / "combine_report.json").read_text())
    assert [(r["name"], r["weight"]) for r in saved["runs"]] == [("one", 0.7), ("eight", 0.3)]
    assert "`cat`" in (adapter / "README.md").read_text()
    assert (adapter / "chat_template.jinja").read_text() == (runs["one"] / "chat_template.jinja").read_text()
    # plain peft reloads it; its logits are the merged model's, and not the base's
    combined = logits(PeftModel.from_pretrained(base_model(tiny_model), adapter))
    merged = combine.run(plan([runs["one"], runs["eight"]], tmp_path / "m", adapter_only=False))
    assert merged["verification"]["passed"] and merged["combination"]["combination"] == "cat"
    assert merged["run"] == str(runs["one"])  # eval of the merged model reads the first run's recipe
    assert max_diff(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "out")), combined) < 1e-4
    assert max_diff(logits(base_model(tiny_model)), combined) > 1e-2
    assert not list(tmp_path.glob(".out.*")) and not list((tmp_path / "m").glob(".out.*"))


def test_linear_is_peft_rule_not_the_sum_of_updates(runs, tmp_path):
    """peft's linear adds sqrt(w*scaling)-scaled lora_A and lora_B separately: B_sum @ A_sum, cross terms included."""
    combine.build(plan([runs["one"], runs["two"]], tmp_path, "linear"), tmp_path)
    a = load_file(runs["one"] / "adapter_model.safetensors")
    b = load_file(runs["two"] / "adapter_model.safetensors")
    ours = deltas(tmp_path)
    scale = 32 / 16  # lora_alpha / r of both runs
    worst_rule = worst_sum = 0.0
    for key, update in ours.items():
        wa, wb = math.sqrt(0.7 * scale), math.sqrt(0.3 * scale)
        rule = (wa * a[f"{key}.lora_B.weight"] + wb * b[f"{key}.lora_B.weight"]) @ (
            wa * a[f"{key}.lora_A.weight"] + wb * b[f"{key}.lora_A.weight"]
        )
        worst_rule = max(worst_rule, relative(update, rule))
        weighted = (
            0.7 * scale * a[f"{key}.lora_B.weight"] @ a[f"{key}.lora_A.weight"]
            + 0.3 * scale * b[f"{key}.lora_B.weight"] @ b[f"{key}.lora_A.weight"]
        )
        worst_sum = max(worst_sum, relative(update, weighted))
    assert worst_rule < 1e-5 and worst_sum > 0.1
    figures = json.loads((tmp_path / "manifest.json").read_text())["combination"]
    assert figures["vs_peft_linear_rule"]["max_rel_diff"] < 1e-5
    assert abs(figures["vs_weighted_sum"]["max_rel_diff"] - worst_sum) < 1e-4


@pytest.mark.parametrize("combination,density", [("linear", None), ("ties", 0.5), ("dare_ties", 0.5)])
def test_combinations_merge_and_pass_verification(runs, tiny_model, tmp_path, combination, density):
    report = combine.run(plan([runs["one"], runs["two"]], tmp_path, combination, density=density, adapter_only=False))
    check = report["verification"]
    assert check["passed"] and check["merged_vs_reference"]["max_abs_diff"] < 1e-4
    assert check["reference"] == "full-precision base + combined adapter"
    assert report["combination"]["density"] == density and report["lora_layers_merged"] == 28
    assert (
        max_diff(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), logits(base_model(tiny_model))) > 1e-2
    )


def test_dare_is_seeded_and_the_seed_recorded(runs, tmp_path):
    def made(seed, name):
        c = plan([runs["one"], runs["two"]], tmp_path / name, "dare_linear", density=0.5, seed=seed)
        (tmp_path / name).mkdir()
        combine.build(c, tmp_path / name)
        return load_file(tmp_path / name / "adapter_model.safetensors"), c.seed

    first, seed = made(None, "a")
    again, _ = made(None, "b")
    other, _ = made(7, "c")
    assert seed == 1  # the first run's train.seed
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["combination"]["seed"] == 7


def test_rslora_runs_combine_to_the_weighted_sum(runs, tmp_path):
    """peft copies use_rslora into the combined adapter, scaling it by sqrt(r) (huggingface/peft#3761); lorakit
    keeps the combined scaling at 1, so the reloaded adapter's update is the weighted sum."""
    copies = []
    for name in ("one", "eight"):
        copy = shutil.copytree(runs[name], tmp_path / f"rs-{name}", ignore=shutil.ignore_patterns("checkpoints"))
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
        copies.append(copy)
    (tmp_path / "c").mkdir()
    combine.build(plan(copies, tmp_path / "c", "cat", weights="1,-0.5", accept_changed_adapter=True), tmp_path / "c")
    ours, one, eight = deltas(tmp_path / "c"), deltas(copies[0]), deltas(copies[1])
    assert max(relative(ours[k], one[k] - 0.5 * eight[k]) for k in ours) < 1e-5


def edited_copy(run_dir, tmp_path, name, file, change):
    copy = shutil.copytree(run_dir, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))
    path = copy / file
    if file.endswith(".json"):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    else:
        path.write_text(yaml.safe_dump(change(yaml.safe_load(path.read_text()))))
    return copy


def test_refusals_name_the_run_and_the_setting(runs, tiny_model, tmp_path):
    one, two = runs["one"], runs["two"]
    out = tmp_path / "out"
    other_base = shutil.copytree(tiny_model, tmp_path / "other-base")
    cases = [
        (
            (
                one,
                edited_copy(
                    two,
                    tmp_path,
                    "elsewhere",
                    "recipe.yaml",
                    lambda r: {**r, "model": {**r["model"], "name_or_path": str(other_base)}},
                ),
            ),
            [],
            "run elsewhere (",
            "trained on model.name_or_path",
        ),
        (
            (
                one,
                edited_copy(two, tmp_path, "template", "manifest.json", lambda m: {**m, "chat_template_sha256": "ab"}),
            ),
            [],
            "run template",
            "another chat template",
        ),
        ((one, runs["qlora"]), [], "run qlora trained on a 4-bit (QLoRA) base", "pass --merge-into original"),
        ((one, runs["qlora"]), ["--adapter-only"], "run qlora trained on a 4-bit (QLoRA) base", "served on one base"),
        (
            (
                runs["qlora"],
                edited_copy(
                    runs["qlora"],
                    tmp_path,
                    "q2",
                    "manifest.json",
                    lambda m: {**m, "quantization": {**m["quantization"], "blocksize": 128}},
                ),
            ),
            [],
            "run q2 trained on a base quantized differently",
            "(manifest quantization)",
        ),
        (
            (one, edited_copy(two, tmp_path, "ia3", "adapter_config.json", lambda c: {**c, "peft_type": "IA3"})),
            [],
            "run ia3",
            "holds a IA3 adapter (adapter_config.json peft_type); combining is for LoRA adapters",
        ),
        (
            (one, edited_copy(two, tmp_path, "dora", "adapter_config.json", lambda c: {**c, "use_dora": True})),
            [],
            "run dora",
            "trains DoRA magnitude vectors (use_dora",
        ),
        (
            (
                one,
                edited_copy(
                    two, tmp_path, "saves", "adapter_config.json", lambda c: {**c, "modules_to_save": ["lm_head"]}
                ),
            ),
            [],
            "run saves",
            "whole trained modules (modules_to_save)",
        ),
        (
            (one, runs["eight"]),
            ["--combination", "linear"],
            "run eight has r=[8]",
            "needs every adapter at one rank",
            "use --combination cat (exact) or svd",
        ),
        ((one, two), ["--weights", "0.5,0.3,0.2"], "--weights has 3 values for 2 runs"),
        ((one, two), ["--combination", "ties", "--density", "1.5"], "--density: expected a value in (0, 1], got 1.5"),
        ((one, two), ["--combination", "ties"], "--combination ties needs --density"),
        ((one, two), ["--density", "0.5"], "--density is for ties, dare_linear, dare_ties; --combination cat"),
        ((one, two), ["--combination", "magic"], "--combination: expected one of cat, linear"),
    ]
    for paths, options, *messages in cases:
        # some runs here are edited copies: past the adapter check, to reach the refusal each case is about
        code, err = cli("merge", *paths, "--output", out, *options, "--accept-changed-adapter")
        assert code == 2, (options, err)
        for message in messages:
            assert message in err, (message, err)
        assert not out.exists()
    code, err = cli("merge", one, "--weights", "1")
    assert code == 2 and "--weights: for combining several runs" in err
    code, err = cli("merge", one, two)
    assert code == 2 and "several runs: give --output" in err


@pytest.fixture(scope="module")
def side_by_side(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("side-by-side") / "report"
    return evaluate.run(evaluate.resolve_several([runs["one"], runs["two"]]), settings=SETTINGS, output=out), out


def test_eval_of_two_adapters_gives_each_its_single_run_figures(runs, side_by_side, tmp_path):
    report, folder = side_by_side
    assert list(report["metrics"]) == ["one", "two", "base"] and report["kind"] == "runs"
    assert report["models"]["two"] == str(runs["two"])
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert "| metric | one | two | base |" in (folder / "report.md").read_text()
    for name in ("one", "two"):
        alone = evaluate.run(
            evaluate.resolve(runs[name]), settings=SETTINGS, compare_base=False, output=tmp_path / name
        )
        assert alone["metrics"]["tuned"] == report["metrics"][name]
        mine = [json.loads(line)["tuned"] for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        assert mine == [s[name] for s in samples]
    assert report["metrics"]["one"]["loss"] != report["metrics"]["two"]["loss"]


def test_switching_adapters_on_one_base_gives_each_adapters_own_logits(runs, tiny_model):
    target = evaluate.resolve_several([runs["one"], runs["two"]])
    seen = {name: logits(model) for name, model in evaluate.load_models(target, ("one", "two", "base"))}
    for name in ("one", "two"):
        assert max_diff(seen[name], logits(PeftModel.from_pretrained(base_model(tiny_model), runs[name]))) < 1e-6
    assert max_diff(seen["base"], logits(base_model(tiny_model))) < 1e-6
    assert max_diff(seen["one"], seen["two"]) > 1e-2


def test_gates_apply_to_every_adapter_and_generate_names_each_reply(runs, side_by_side, tmp_path):
    report, _ = side_by_side
    losses = sorted(report["metrics"][n]["loss"] for n in ("one", "two"))
    worse = next(n for n in ("one", "two") if report["metrics"][n]["loss"] == losses[1])
    code, err = cli(
        "eval",
        runs["one"],
        runs["two"],
        "--max-examples",
        "2",
        "--max-new-tokens",
        "4",
        "--compare",
        "none",
        "--fail-over",
        f"loss={sum(losses) / 2}",
        "--output",
        tmp_path / "e",
    )
    assert code == 3 and f"gate missed: {worse}: loss = " in err and err.count("loss = ") == 1
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(runs["one"]),
            str(runs["two"]),
            "-p",
            "reverse: red blue",
            "--base",
            "--json",
            "--max-new-tokens",
            "6",
        ],
    )
    assert result.exit_code == 0, result.stderr
    replies = json.loads(result.stdout)["replies"]
    assert list(replies) == ["one", "two", "base"]
    alone = evaluate.reply(
        evaluate.resolve(runs["two"]),
        [[{"role": "user", "content": "reverse: red blue"}]],
        settings=EvalConfig(max_new_tokens=6),
    )[0]
    assert replies["two"]["reply"] == alone.text
    code, err = cli("eval", runs["one"], runs["qlora"])
    assert code == 2 and "run qlora" in err and "model.load_in_4bit" in err
