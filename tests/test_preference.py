"""Preference tuning (issue 21): `train.objective: dpo` from the recipe, on pairs encoded exactly as SFT examples,
trained by trl's DPOTrainer with the reference taken from the same model (the adapter switched off, or a frozen
copy of the adapter the run continues), after an SFT run: held-out reward accuracy well above chance, resume step
for step, the adapter reloads in plain peft and merges verified."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from conftest import PAIRS, ROOT, lorakit, losses, preference_recipe, refusal, tiny_recipe, write_jsonl

from lorakit.data import IGNORE, check_objective, prepare
from lorakit.data.pairs import reply_columns
from lorakit.errors import DataError
from lorakit.evaluate.generation import prompt_ids
from lorakit.recipe.loading import load_recipe
from lorakit.recipe.schema import DataConfig

USER = {"role": "user", "content": "reverse: cat sun rain"}
CHOSEN, REJECTED = {"role": "assistant", "content": "rain sun cat"}, {"role": "assistant", "content": "sun rain cat"}


# --- the recipe --------------------------------------------------------------------------------------------------


def test_a_setting_of_another_objective_is_refused_with_its_key_and_line(tiny_model, tmp_path, write_recipe):
    sft = tiny_recipe(tiny_model, tmp_path / "run")
    sft["train"]["beta"] = 0.2
    path = tmp_path / "recipe.yaml"
    line = next(n for n, text in enumerate(yaml.safe_dump(sft, sort_keys=False).splitlines(), 1) if "beta" in text)
    assert refusal(write_recipe, sft) == (
        f"{path}:{line}: train.beta: is a setting of train.objective dpo / orpo / simpo / kto; this recipe's objective is "
        "sft, which "
        "would ignore it"
    )
    for key, value, said in (
        ("packing", True, "train.packing: `objective: dpo`: trl's preference trainers pad each pair"),
        ("use_liger_kernel", True, "train.use_liger_kernel: `objective: dpo`:"),
    ):
        dpo = preference_recipe(tiny_model, tmp_path / "run", "dpo")
        dpo["train"][key] = value
        assert said in refusal(write_recipe, dpo)
    adalora = preference_recipe(tiny_model, tmp_path / "run", "dpo") | {"method": "adalora"}
    adalora["lora"] = {"lora_alpha": 32}
    assert "train.objective: `dpo` with `method: adalora` is refused" in refusal(write_recipe, adalora)
    dpo = preference_recipe(tiny_model, tmp_path / "run", "dpo")
    dpo["data"]["train_on"] = "all"
    assert "data.train_on: `dpo` trains the replies it compares" in refusal(write_recipe, dpo)


def test_a_run_continuing_an_adapter_takes_its_settings_from_it(tiny_model, tmp_path, write_recipe):
    recipe = preference_recipe(tiny_model, tmp_path / "run", "dpo")
    recipe["model"]["adapter"] = str(tmp_path / "nothing")
    assert "lora.lora_alpha: model.adapter continues that adapter with its own settings" in refusal(
        write_recipe, recipe
    )
    del recipe["lora"]
    checked = lorakit("check", str(write_recipe(recipe, name="missing")))
    # on one line as printed, however long the path (rich would fold it at the 80 columns it assumes in a pipe)
    assert checked.returncode == 2 and f"model.adapter: {tmp_path / 'nothing'}: no adapter there" in checked.stdout
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "adapter_config.json").write_text("{}")
    assert load_recipe(write_recipe(recipe)).model.adapter == str(tmp_path / "nothing")


# --- the data ----------------------------------------------------------------------------------------------------


def pairs(tokenizer, path, **data):
    return prepare(DataConfig(train=str(path), **data), tokenizer, seed=0, use_cache=False)


def test_both_replies_are_trained_after_the_prompt_generation_sees(tokenizer):
    """Each side is encoded as SFT encodes that reply: the prompt is token for token what generation gives the
    model, and each reply ends on the end-of-turn token; the two layouts (explicit prompt, shared history)
    give the same tokens."""
    data = pairs(tokenizer, PAIRS / "train.jsonl")
    assert data.train.pairs and data.format == "preference" and len(data.train.input_ids) == 400
    rows = [json.loads(line) for line in (PAIRS / "train.jsonl").read_text().splitlines()]
    columns = reply_columns(data.train.dataset)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, trl_row in zip(rows[:20], columns.select(range(20))):
        history = row.get("prompt") or row["chosen"][:-1]
        assert trl_row["prompt_ids"] == prompt_ids(tokenizer, history)
        for side in ("chosen", "rejected"):
            reply = row[side][-1]["content"]
            assert tokenizer.decode(trl_row[f"{side}_ids"]) == reply + "<|im_end|>"
            assert trl_row[f"{side}_ids"][-1] == eot
    assert {"prompt" in r for r in rows[:20]} == {True, False}  # both layouts were among them
    assert data.train.tokens == sum(map(len, data.train.input_ids)) + sum(
        map(len, data.train.dataset["rejected_input_ids"])
    )


def test_bad_pairs_are_bad_rows_with_their_file_and_line(tokenizer, tmp_path):
    good = {"prompt": [USER], "chosen": [CHOSEN], "rejected": [REJECTED]}
    cases = {
        "same reply": ({"prompt": [USER], "chosen": [CHOSEN], "rejected": [CHOSEN]}, "`chosen` and `rejected` are the same reply"),
        "no prompt": ({"chosen": "rain sun cat", "rejected": "sun rain cat"}, "`prompt` is missing"),
        "two replies": (
            {"prompt": [USER], "chosen": [CHOSEN, USER, CHOSEN], "rejected": [REJECTED]},
            "`chosen` must be one assistant reply after the prompt (got assistant, user, assistant",
        ),
        "nothing shared": ({"chosen": [CHOSEN], "rejected": [REJECTED]}, "the pair has no prompt"),
    }  # fmt: skip
    for name, (row, said) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [good, row, *[good] * 18])
        with pytest.raises(DataError, match="^" + path.replace(".", r"\.") + ":2: ") as refused:
            pairs(tokenizer, path, format="preference")
        assert said in str(refused.value), name
        kept = pairs(tokenizer, path, format="preference", on_bad_rows="skip", max_bad_fraction=0.1)
        assert len(kept.train.input_ids) == 19
    sft = ROOT / "examples" / "reverse" / "eval.jsonl"
    with pytest.raises(
        DataError,
        match=rf"^{sft}:1: an SFT example among preference pairs \(prompt/chosen/rejected\); one run trains one kind",
    ):
        pairs(tokenizer, PAIRS / "train.jsonl", eval=str(sft))


def test_the_objective_and_the_data_must_agree(tokenizer):
    with pytest.raises(
        DataError,
        match="`sft` trains on SFT examples; data.train holds preference pairs .* which dpo / kto / orpo / simpo train",
    ):
        check_objective(pairs(tokenizer, PAIRS / "train.jsonl"), "sft")
    with pytest.raises(
        DataError,
        match=r"`dpo` trains on preference pairs .* data.train holds SFT examples \(messages\), which sft trains",
    ):
        check_objective(pairs(tokenizer, ROOT / "examples" / "reverse" / "eval.jsonl"), "dpo")


def test_the_length_policy_applies_to_both_sides_and_keeps_or_drops_the_pair(tokenizer, tmp_path):
    long_reply = {"role": "assistant", "content": " ".join(["rain sun cat"] * 12)}
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [USER], "chosen": [CHOSEN], "rejected": [long_reply]}] * 4)
    data = pairs(tokenizer, path, max_length=24)
    assert data.train.truncated == 4 and len(data.train.dataset["rejected_input_ids"][0]) == 24
    labels = data.train.dataset["rejected_labels"][0]
    assert labels[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and labels[-2] != IGNORE
    dropped = pairs(
        tokenizer,
        write_jsonl(
            tmp_path / "q.jsonl",
            [
                {"prompt": [USER], "chosen": [CHOSEN], "rejected": [long_reply]},
                *[{"prompt": [USER], "chosen": [CHOSEN], "rejected": [REJECTED]}] * 3,
            ],
        ),
        max_length=24,
        on_overflow="drop",
    )
    assert len(dropped.train.input_ids) == 3 and dropped.train.dropped == 1  # the pair goes with its long side


def test_preview_shows_both_replies_and_check_refuses_sft_data(tiny_model, tmp_path, write_recipe):
    path = write_recipe(preference_recipe(tiny_model, tmp_path / "run", "dpo"))
    shown = lorakit("data", "preview", str(path), "--count", "1", env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr[-2000:]
    out = shown.stdout
    assert "example 0 (chosen)" in out and "example 0 (rejected)" in out and "packing off" in out
    assert out.count("⟨<|im_end|>⟩»") == 2  # each reply trained through its end-of-turn token
    sft_data = preference_recipe(tiny_model, tmp_path / "run", "dpo")
    sft_data["data"] = {"train": str(ROOT / "examples" / "reverse" / "eval.jsonl")}
    checked = lorakit("check", str(write_recipe(sft_data, name="sft-data")))
    said = " ".join((checked.stdout + checked.stderr).split())
    assert checked.returncode == 2 and "train.objective: `dpo` trains on preference pairs" in said


# --- training ----------------------------------------------------------------------------------------------------


def test_the_reference_is_the_same_model_with_the_adapter_switched_off(tiny_model, tmp_path):
    """No second model in memory: DPOTrainer holds no reference model, and the base under the adapter computes
    what the plain base does."""
    from lorakit.recipe.schema import Recipe
    from lorakit.train.trainer import Training

    recipe = Recipe.model_validate(preference_recipe(tiny_model, tmp_path / "run", "dpo"))
    training = Training(recipe, None, None)
    training.decide(False, None)
    training.claim(False, False)
    training.prepare_data(False, False, False)
    training.load_model()
    training.build_trainer(())
    trainer = training.trainer
    assert type(trainer).__name__ == "PretokenizedDPOTrainer" and trainer.ref_model is None
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([training.prepared.train.input_ids[0]])
    with torch.no_grad(), trainer.model.disable_adapter():
        switched_off = trainer.model(input_ids=ids).logits
    assert torch.allclose(switched_off, plain(input_ids=ids).logits, atol=1e-5)


@pytest.fixture(scope="module")
def sft_then_dpo(tiny_model, tmp_path_factory):
    """The usual pipeline: an SFT run on the reversal data, then a DPO run continuing its adapter."""
    root = tmp_path_factory.mktemp("preference")
    sft = tiny_recipe(tiny_model, root / "sft", four_bit=False, steps=300, logging_steps=50)
    sft["lora"] = {"r": 32, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}  # the quickstart's
    sft["data"]["max_length"] = 64
    (root / "sft.yaml").write_text(yaml.safe_dump(sft))
    done = lorakit("train", str(root / "sft.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    dpo = preference_recipe(
        tiny_model, root / "dpo", "dpo", steps=150, learning_rate=5e-4, logging_steps=1, save_steps=25, eval_steps=150
    )
    del dpo["lora"]
    dpo["model"]["adapter"] = str(root / "sft")
    (root / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    done = lorakit("train", str(root / "dpo.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_dpo_after_sft_prefers_the_right_reply_on_held_out_pairs(sft_then_dpo):
    """256 held-out pairs, chance 0.5: measured 0.89 (0.78 on another CPU) after 150 steps on a 300-step SFT
    run (0.99 after 200 on the 800-step quickstart); a DPO run from the random base stays near chance: the
    preference needs the skill SFT taught."""
    manifest = json.loads((sft_then_dpo / "dpo" / "manifest.json").read_text())
    results = manifest["results"]
    assert results["eval_reward_accuracy"] >= 0.7 and results["eval_margin"] > 0, results
    assert results["eval_chosen_logps"] > results["eval_rejected_logps"]
    assert manifest["objective"] == {
        "name": "dpo",
        "beta": 0.1,
        "loss_type": "sigmoid",
        "label_smoothing": 0.0,
        "disable_dropout": True,
        "reference": "a frozen copy of model.adapter",
    }
    start = manifest["start_adapter"]
    assert start["path"] == str(sft_then_dpo / "sft") and start["kind"] == "lorakit run"
    sft_manifest = json.loads((sft_then_dpo / "sft" / "manifest.json").read_text())
    assert start["sha256"] == sft_manifest["adapter_sha256"]
    assert not (sft_then_dpo / "dpo" / "ref").exists()  # trl's frozen copy is not part of the trained adapter
    records = [json.loads(line) for line in (sft_then_dpo / "dpo" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*records)
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= logged
    # evaluated once at the end (transformers' end-of-run evaluation): the final figures are that evaluation's,
    # not a second pass over the same held-out pairs with the same weights
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [150]
    assert results["eval_reward_accuracy"] == round(evaluations[0]["eval_rewards/accuracies"], 4)


def test_the_dpo_adapter_reloads_in_plain_peft_and_merges_verified(sft_then_dpo, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[0, 1, 272, 201, 85, 67, 2, 5]])
    outputs = {}
    for name in ("sft", "dpo"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), sft_then_dpo / name)
        with torch.no_grad():
            outputs[name] = model(input_ids=ids).logits
    assert not torch.allclose(outputs["sft"], outputs["dpo"])  # DPO moved the SFT adapter
    run = shutil.copytree(sft_then_dpo / "dpo", tmp_path / "dpo", ignore=shutil.ignore_patterns("checkpoints"))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["adapter"] = str(tmp_path / "deleted-sft-run")  # the run stands on its own once trained
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    merged = lorakit("merge", str(run), "--output", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["verification"]["passed"]


def test_eval_reports_the_preference_of_base_and_tuned_with_gates(sft_then_dpo, tmp_path):
    """On the held-out pairs: how often each model's likelihood prefers the chosen reply, and the tuned model's
    implicit reward against the base; measured 0.89 (tuned) vs 0.53 (base), reward accuracy 0.87."""
    out = tmp_path / "eval"
    args = ["eval", str(sft_then_dpo / "dpo"), "--max-examples", "2", "--output", str(out)]
    done = lorakit(*args, "--fail-under", "reward_accuracy=0.7", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)["metrics"]
    tuned, base = figures["tuned"], figures["base"]
    assert tuned["preference_accuracy"] >= 0.7 and tuned["preference_accuracy"] > base["preference_accuracy"] + 0.2
    assert tuned["reward_accuracy"] >= 0.7 and tuned["reward_margin"] > 0 and "reward_accuracy" not in base
    assert tuned["chosen_logps"] > tuned["rejected_logps"]
    assert "| reward_accuracy |" in (out / "report.md").read_text()
    missed = lorakit(
        "eval", str(sft_then_dpo / "dpo"), "--output", str(out), "--show", "--fail-under", "reward_accuracy=0.99"
    )
    assert missed.returncode == 3 and "reward_accuracy" in missed.stderr


def interrupted_and_resumed(recipe_path, finished, tmp_path) -> None:
    """The recipe's run stopped by SIGTERM at step 30 and resumed logs the losses of `finished`, step for step."""
    from test_resume import start, wait_for_step

    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["train"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / recipe_path.name
    path.write_text(yaml.safe_dump(recipe))
    proc = start(path)
    wait_for_step(tmp_path / "run", 30, proc, timeout=300)
    proc.send_signal(15)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    resumed = start(path, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming from checkpoint-" in err, err
    ours, theirs = losses(tmp_path / "run"), losses(finished)
    assert sorted(ours) == sorted(theirs)
    assert all(abs(ours[s] - theirs[s]) < 1e-6 for s in theirs), {s: (ours[s], theirs[s]) for s in theirs}
    shutil.rmtree(tmp_path / "run" / "checkpoints")


def test_an_interrupted_dpo_run_resumes_step_for_step(sft_then_dpo, tmp_path):
    interrupted_and_resumed(sft_then_dpo / "dpo.yaml", sft_then_dpo / "dpo", tmp_path)


# --- ORPO, SimPO and KTO after the same SFT run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def continued(sft_then_dpo, tiny_model):
    """The other objectives, each continuing the SFT run for 150 steps: ORPO and SimPO on the pairs, KTO on
    the labelled completions (the pairs with one reply of each kept)."""
    root = sft_then_dpo
    for objective in ("orpo", "simpo", "kto"):
        train = {"steps": 150, "learning_rate": 5e-4, "logging_steps": 1, "save_steps": 25, "eval_steps": 150}
        recipe = preference_recipe(tiny_model, root / objective, objective, unpaired=objective == "kto", **train)
        del recipe["lora"]
        recipe["model"]["adapter"] = str(root / "sft")
        (root / f"{objective}.yaml").write_text(yaml.safe_dump(recipe))
        done = lorakit("train", str(root / f"{objective}.yaml"))
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_orpo_and_simpo_prefer_the_right_reply_without_a_reference(continued, tiny_model, tmp_path):
    """Reference-free: the reward is the length-normalized log-probability (SimPO scales it by beta). 256
    held-out pairs, chance 0.5: measured 0.89 for both after 150 steps."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for objective, settings in (
        ("orpo", {"beta": 0.1}),
        ("simpo", {"beta": 2.0, "label_smoothing": 0.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0, "loss_type": "simpo"}),
    ):
        manifest = json.loads((continued / objective / "manifest.json").read_text())
        results = manifest["results"]
        assert results["eval_reward_accuracy"] >= 0.8 and results["eval_margin"] > 0, (objective, results)
        assert manifest["objective"] == {
            "name": objective,
            **settings,
            "disable_dropout": True,
            "reference": "none (reference-free)",
        }
        assert manifest["start_adapter"]["path"] == str(continued / "sft")
        assert results["tokens_seen"] == results["steps"] * 8 * 2 * 19  # both sides of 8 pairs of 19 tokens
        records = [json.loads(line) for line in (continued / objective / "metrics.jsonl").read_text().splitlines()]
        assert {"rewards/accuracies", "rewards/margins", "nll_loss"} <= set().union(*records)
    ids = torch.tensor([[0, 1, 272, 201, 85, 67, 2, 5]])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), continued / "simpo")
    assert set(model.peft_config) == {"default"}  # lorakit applied the adapter itself: a plain peft adapter
    with torch.no_grad():
        moved = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(moved, model(input_ids=ids).logits)
    merged = lorakit("merge", str(continued / "simpo"), "--output", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["verification"]["passed"]


def test_kto_on_labelled_completions_ranks_the_desirable_above_the_undesirable(continued, tmp_path):
    """KTO's reward is the tuned model's gain over its reference (the SFT adapter) on a completion: held out,
    the desirable completions fare better than the undesirable ones (measured margin 0.18 after 150 steps).
    `lorakit eval KTO_RUN SFT_RUN` scores the KTO run against the SFT run it continued: both log-probabilities
    per label, and how often a desirable completion's reward beats an undesirable one's (measured 0.675; the SFT
    run against the base 0.81)."""
    manifest = json.loads((continued / "kto" / "manifest.json").read_text())
    results = manifest["results"]
    assert results["eval_chosen_reward"] > results["eval_rejected_reward"] and results["eval_margin"] > 0.1
    assert manifest["objective"]["reference"] == "a frozen copy of model.adapter"
    assert manifest["objective"]["train_sampling_strategy"] == "sequential"
    out = tmp_path / "eval"
    runs = [str(continued / "kto"), str(continued / "sft")]  # the first run's recipe says which data
    done = lorakit("eval", *runs, "--max-examples", "2", "--output", str(out), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["rewards_against"] == {"kto": "sft", "sft": "base"}  # KTO's against its training reference
    assert report["data"]["labelled_completions"] == {"desirable": 128, "undesirable": 128}
    assert report["data"]["loss_examples"] == 128  # the loss is the desirable completions'
    kto, sft, base = (report["metrics"][n] for n in ("kto", "sft", "base"))
    gap = {n: m["desirable_logps"] - m["undesirable_logps"] for n, m in (("kto", kto), ("sft", sft), ("base", base))}
    assert gap["kto"] > gap["sft"] > gap["base"] and "reward_auc" not in base
    assert kto["reward_auc"] >= 0.6 and sft["reward_auc"] >= 0.7, (kto, sft)
    assert "Rewards against: kto vs sft, sft vs base." in (out / "report.md").read_text()


def test_an_interrupted_kto_run_resumes_step_for_step(continued, tmp_path):
    """KTO reads its data in one seeded shuffled order with each completion's KL partner fixed: the resumed
    run sees the same batches."""
    interrupted_and_resumed(continued / "kto.yaml", continued / "kto", tmp_path)
