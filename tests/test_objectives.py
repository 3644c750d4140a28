"""The preference objectives beside DPO (issue 21), what is decided before training: ORPO and SimPO on pairs
(trl.experimental's ORPOTrainer and CPOTrainer, reference-free), KTO on labelled completions or on pairs
(trl's KTOTrainer). Each objective's keys and refusals, what the plan counts for it, and KTO's data encoded
exactly as SFT examples. Their runs (after the SFT run DPO continues) are in tests/test_preference.py."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import PAIRS, ROOT, preference_recipe, refusal, write_jsonl

from lorakit.data import check_objective, prepare
from lorakit.data.pairs import unpaired_columns
from lorakit.errors import DataError, LorakitError
from lorakit.evaluate.generation import prompt_ids
from lorakit.model import engines
from lorakit.model.setup import engine_problems, for_plan
from lorakit.preflight import plan as plan_mod
from lorakit.recipe.schema import DataConfig, Recipe

USER = {"role": "user", "content": "reverse: cat sun rain"}


# --- the recipe --------------------------------------------------------------------------------------------------


def test_each_objective_takes_only_its_own_keys_and_what_its_trainer_can_do(tiny_model, tmp_path, write_recipe):
    dpo = preference_recipe(tiny_model, tmp_path / "run", "dpo")
    dpo["train"]["simpo_gamma"] = 1.0
    path = tmp_path / "recipe.yaml"
    line = next(
        n for n, text in enumerate(yaml.safe_dump(dpo, sort_keys=False).splitlines(), 1) if "simpo_gamma" in text
    )
    assert refusal(write_recipe, dpo) == (
        f"{path}:{line}: train.simpo_gamma: is a setting of train.objective simpo; this recipe's objective is dpo, "
        "which would ignore it"
    )
    for objective, key, value in (
        ("orpo", "loss_type", "ipo"),
        ("kto", "cpo_alpha", 1.0),
        ("simpo", "desirable_weight", 2.0),
    ):
        recipe = preference_recipe(tiny_model, tmp_path / "run", objective)
        recipe["train"][key] = value
        assert f"train.{key}: is a setting of train.objective" in refusal(write_recipe, recipe), key
    kto = preference_recipe(tiny_model, tmp_path / "run", "kto", per_device_train_batch_size=1)
    assert "train.per_device_train_batch_size: `kto` estimates its KL term" in refusal(write_recipe, kto)
    prompt = preference_recipe(tiny_model, tmp_path / "run", "orpo") | {"method": "prompt_tuning"}
    del prompt["lora"]
    assert "method: `prompt_tuning` puts virtual tokens in front of every sequence" in refusal(write_recipe, prompt)
    simpo = Recipe.model_validate(preference_recipe(tiny_model, tmp_path / "run", "simpo"))
    for engine in (engines.Engine("fsdp", fsdp_version=2), engines.Engine("deepspeed", zero_stage=3)):
        with pytest.raises(LorakitError, match="train.objective: simpo trains through trl.experimental's CPOTrainer"):
            engine_problems(simpo, engine, cuda=True)
    engine_problems(simpo, engines.Engine("ddp"), cuda=True)


def test_the_plan_counts_the_sequences_and_passes_of_each_objective(tiny_model, tmp_path):
    """Pair trainers run both replies of a pair together; DPO adds the reference pass, KTO the reference and
    the mismatched KL completions (policy and reference), ORPO and SimPO nothing (reference-free); the
    experimental trainers hold all the logits."""
    plans, times = {}, {}
    for objective in ("sft", "dpo", "orpo", "simpo", "kto"):
        recipe = Recipe.model_validate(preference_recipe(tiny_model, tmp_path / "run", objective))
        setup = for_plan(recipe, engine=engines.Engine(), dtype="bfloat16", fused_loss=False)
        lines = {ln.name: ln for ln in plan_mod.estimate(recipe, plan_mod.count(recipe), setup, processes=1).lines}
        plans[objective] = lines
        times[objective] = plan_mod.run(recipe, gpu_memory=8 << 30, tokens_per_s=None, gpu_kind="H100").time
    assert (
        "chosen and rejected" in plans["orpo"]["activations"].note
        and "chosen and rejected" not in plans["kto"]["activations"].note
    )
    assert (
        plans["orpo"]["activations"].bytes == plans["dpo"]["activations"].bytes == plans["simpo"]["activations"].bytes
    )
    assert plans["kto"]["activations"].bytes == plans["sft"]["activations"].bytes
    assert "fused head" in plans["dpo"]["logits and loss"].note and "fused head" in plans["kto"]["logits and loss"].note
    assert "logits in bfloat16" in plans["orpo"]["logits and loss"].note
    assert "forward passes without gradients" not in times["orpo"]["basis"]
    assert "+ 1 x (2 N" in times["dpo"]["basis"] and "+ 3 x (2 N" in times["kto"]["basis"]
    assert times["kto"]["rows"] == 2 * times["dpo"]["rows"]  # KTO unpairs each pair
    speed = {o: float(t["basis"].split(" tokens/s")[0].replace(",", "")) for o, t in times.items()}
    assert speed["kto"] < speed["dpo"] < speed["orpo"] == speed["simpo"] == speed["sft"]


# --- data --------------------------------------------------------------------------------------------------------


def data(tokenizer, path, **cfg):
    return prepare(DataConfig(train=str(path), **cfg), tokenizer, seed=0, use_cache=False)


def test_labelled_completions_are_encoded_as_sft_examples_and_pairs_unpair_for_kto(tokenizer, tmp_path):
    rows = [
        {"prompt": [USER], "completion": "rain sun cat", "label": True},
        {"prompt": [USER], "completion": [{"role": "assistant", "content": "sun rain cat"}], "label": False},
        {"prompt": "reverse: cat sun rain", "completion": [{"role": "assistant", "content": "rain sun cat"}], "label": True},
    ]  # fmt: skip
    labelled = data(tokenizer, write_jsonl(tmp_path / "kto.jsonl", rows))
    assert labelled.formats == {
        str(tmp_path / "kto.jsonl"): "unpaired"
    }  # prompt + completion + label: not prompt_completion
    assert labelled.train.kind == "unpaired" and labelled.train.dataset["desirable"] == [True, False, True]
    sft = data(
        tokenizer,
        write_jsonl(tmp_path / "sft.jsonl", [{"messages": [USER, {"role": "assistant", "content": "rain sun cat"}]}]),
    )
    assert labelled.train.input_ids[0] == sft.train.input_ids[0] == labelled.train.input_ids[2]
    assert labelled.train.labels[0] == sft.train.labels[0]
    columns = unpaired_columns(labelled.train.dataset)
    prompt = prompt_ids(tokenizer, [USER])  # what generate and chat give the model
    assert columns["prompt_ids"][0] == prompt and columns["label"] == [True, False, True]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (
        tokenizer.decode(columns["completion_ids"][1]) == "sun rain cat<|im_end|>"
        and columns["completion_ids"][1][-1] == end
    )
    pairs = data(tokenizer, PAIRS / "train.jsonl")
    unpaired = unpaired_columns(pairs.train.dataset)
    assert len(unpaired) == 2 * len(pairs.train.dataset) and unpaired["label"][:4] == [True, False, True, False]
    assert unpaired["prompt_ids"][0] == unpaired["prompt_ids"][1]
    check_objective(pairs, "kto")
    check_objective(labelled, "kto")
    with pytest.raises(
        DataError, match=r"`dpo` trains on preference pairs .* holds labelled completions .* which kto trains"
    ):
        check_objective(labelled, "dpo")
    with pytest.raises(DataError, match="`sft` trains on SFT examples; data.train holds labelled completions"):
        check_objective(labelled, "sft")


def test_bad_labelled_completions_are_bad_rows_with_their_file_and_line(tokenizer, tmp_path):
    good = {"prompt": [USER], "completion": "rain sun cat", "label": True}
    cases = {
        "no label": ({"prompt": [USER], "completion": "rain sun cat", "label": None}, "`label` must be true"),
        "a number": ({"prompt": [USER], "completion": "rain sun cat", "label": 1}, "got 1"),
        "two replies": (
            {"prompt": [USER], "completion": [{"role": "assistant", "content": "a"}, USER], "label": True},
            "`completion` must be one assistant reply after the prompt",
        ),
    }  # fmt: skip
    for name, (row, said) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [good, row, *[good] * 18])
        with pytest.raises(DataError, match="^" + path.replace(".", r"\.") + ":2: ") as refused:
            data(tokenizer, path, format="unpaired")
        assert said in str(refused.value), name
        kept = data(tokenizer, path, format="unpaired", on_bad_rows="skip", max_bad_fraction=0.1)
        assert len(kept.train.input_ids) == 19
    mixed = DataConfig(train=[write_jsonl(tmp_path / "kto.jsonl", [good] * 4), str(PAIRS / "eval.jsonl")])
    with pytest.raises(DataError, match=f"^{PAIRS / 'eval.jsonl'}:1: a preference pair among labelled completions"):
        prepare(mixed, tokenizer, seed=0, use_cache=False)


def test_the_bundled_examples_are_what_the_seeded_script_writes(tmp_path):
    """examples/ (the pairs and KTO's labelled completions among them) is generated; a hand edit shows here."""
    from scripts.make_examples import write_examples

    written = write_examples(tmp_path)
    files = sorted(p.relative_to(written) for p in written.rglob("*.jsonl"))
    assert "preference/unpaired_train.jsonl" in {str(f) for f in files}
    for name in files:
        assert (written / name).read_bytes() == (ROOT / "examples" / name).read_bytes(), name
    labelled = [
        json.loads(line) for line in (ROOT / "examples/preference/unpaired_eval.jsonl").read_text().splitlines()
    ]
    assert sum(row["label"] for row in labelled) == 128 and {isinstance(r["completion"], str) for r in labelled} == {
        True,
        False,
    }
