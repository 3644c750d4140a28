"""PEFT methods other than plain LoRA (`method:`), new special tokens and LoftQ: each trains on the tiny model,
saves, reloads with plain peft to the logits training ended with, evaluates, and merges with verification
where there is something to merge (prompt and prefix tuning are refused with the reason)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch_logits, lorakit, tiny_recipe
from peft import AdaLoraConfig, PeftModel, get_peft_model
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.evaluate import compare as evaluate
from lorakit.model import base as model_mod
from lorakit.model import peft_methods as methods
from lorakit.model.setup import for_loading
from lorakit.recipe.loading import load_recipe
from lorakit.recipe.schema import Recipe
from lorakit.train.trainer import run as train

ADALORA = {"init_r": 8, "target_r": 4, "tinit": 0.25, "tfinal": 0.25}
METHODS = {  # name: (method, section, 4-bit base)
    "adalora": ("adalora", ADALORA, True),
    "ia3": ("ia3", {}, False),
    "prompt_tuning": (
        "prompt_tuning",
        {
            "num_virtual_tokens": 8,
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "Reverse the order of the words.",
        },
        True,
    ),
    "prefix_tuning": ("prefix_tuning", {"num_virtual_tokens": 8}, False),
}
NEW_TOKENS = ["<rev>", "</rev>"]


def method_recipe(tiny_model, out_dir, method: str, section: dict, four_bit: bool, steps: int = 8) -> dict:
    recipe = tiny_recipe(tiny_model, out_dir, four_bit=four_bit, steps=steps)
    recipe["method"] = method
    recipe.pop("lora")
    if section:
        recipe[method] = dict(section)
    return recipe


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    out = {}
    for name, (method, section, four_bit) in METHODS.items():
        recipe = method_recipe(tiny_model, tmp_path_factory.mktemp(name) / "run", method, section, four_bit)
        out[name] = train(Recipe.model_validate(recipe), console=Console(stderr=True, quiet=True))
    return out


@pytest.fixture(scope="module")
def token_run(tiny_model, tmp_path_factory):
    """LoRA with two new special tokens wrapped around every answer."""
    from conftest import EXAMPLES

    tmp = tmp_path_factory.mktemp("tokens")
    rows = [json.loads(line) for line in (EXAMPLES / "train.jsonl").read_text().splitlines()[:160]]
    with open(tmp / "train.jsonl", "w") as handle:
        for row in rows:
            row["messages"][-1]["content"] = f"{NEW_TOKENS[0]}{row['messages'][-1]['content']}{NEW_TOKENS[1]}"
            handle.write(json.dumps(row) + "\n")
    recipe = tiny_recipe(tiny_model, tmp / "run", four_bit=False, steps=8)
    recipe["model"]["new_special_tokens"] = NEW_TOKENS
    recipe["data"] = {"train": str(tmp / "train.jsonl"), "eval_fraction": 0.1, "max_length": 48}
    return train(Recipe.model_validate(recipe), console=Console(stderr=True, quiet=True))


def load_like_training(run_dir):
    recipe = load_recipe(run_dir / "recipe.yaml")
    return model_mod.load_base(recipe.model, for_loading(recipe.model))


def merge(run_dir):
    return lorakit("merge", str(run_dir), "--json", timeout=300)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_reloads_with_plain_peft_and_evaluates(runs, name):
    result = runs[name]
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    trained = batch_logits(result.model, ids)
    base = batch_logits(load_like_training(result.run_dir), ids)
    reloaded = batch_logits(PeftModel.from_pretrained(load_like_training(result.run_dir), result.run_dir), ids)
    assert (trained - base).abs().max() > 1e-3, "training changed nothing"
    assert (reloaded - trained).abs().max() < 1e-3, name
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["method"] == name
    report = evaluate.run(
        evaluate.resolve(result.run_dir),
        compare_base=True,
        settings=load_recipe(result.run_dir / "recipe.yaml").eval.model_copy(
            update={"max_examples": 4, "max_new_tokens": 8}
        ),
    )
    tuned, untouched = report["metrics"]["tuned"]["loss"], report["metrics"]["base"]["loss"]
    assert tuned != pytest.approx(untouched, abs=1e-4)
    if name in ("prompt_tuning", "prefix_tuning"):  # no packing: the trainer's eval loss is the same mean
        assert tuned == pytest.approx(manifest["results"]["eval_loss"], abs=2e-3)


@pytest.mark.parametrize("name", ["adalora", "ia3"])
def test_mergeable_methods_merge_with_verification(runs, name):
    out = merge(runs[name].run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["verification"]["passed"] and report["lora_layers_merged"] > 0


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_has_nothing_to_merge(runs, name):
    out = merge(runs[name].run_dir)
    assert out.returncode == 2
    assert "nothing to merge" in out.stderr and not (runs[name].run_dir / "merged").exists()


def test_prompt_learning_trains_padded_not_packed(runs):
    manifest = json.loads((runs["prompt_tuning"].run_dir / "manifest.json").read_text())
    assert manifest["kernels"]["packing"] is False
    assert json.loads((runs["ia3"].run_dir / "manifest.json").read_text())["kernels"]["packing"] is True


def test_adalora_reallocates_ranks_to_the_budget(runs):
    manifest = json.loads((runs["adalora"].run_dir / "manifest.json").read_text())
    ranks = manifest["adalora_final_ranks"]
    assert len(ranks) == 4 * 7  # every linear layer of the 4 decoder layers
    assert sum(ranks.values()) == ADALORA["target_r"] * len(ranks)  # the final budget, exactly
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= ADALORA["init_r"]  # moved between layers
    config = json.loads((runs["adalora"].run_dir / "adapter_config.json").read_text())
    assert config["total_step"] == 8 and config["tinit"] == 2 and config["tfinal"] == 2


def test_adalora_penalty_is_peft_orthogonality_term(tiny_model):
    """The penalty lorakit adds to trl's loss is the term peft's AdaLoRA adds to the model's own loss."""
    torch.manual_seed(0)
    config = AdaLoraConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj"],
        init_r=6,
        target_r=3,
        total_step=10,
        orth_reg_weight=0.7,
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config)
    ids = torch.randint(3, 200, (1, 12))
    with_penalty = model(input_ids=ids, labels=ids).loss
    config.orth_reg_weight = 0.0
    without = model(input_ids=ids, labels=ids).loss
    config.orth_reg_weight = 0.7
    section = Recipe.model_validate({"model": {"name_or_path": "x"}, "data": {"train": "x.jsonl"}}).adalora
    ours = methods.AdaLoraBudget(model, section).penalty()
    assert ours.item() > 0.01
    assert ours.item() == pytest.approx((with_penalty - without).item(), rel=1e-5)


def test_new_special_tokens_train_only_their_rows_and_survive_reload_eval_and_merge(token_run, tiny_model):
    run_dir = token_run.run_dir
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    ids = tokenizer.convert_tokens_to_ids(NEW_TOKENS)
    base_vocab = AutoModelForCausalLM.from_pretrained(tiny_model).config.vocab_size
    assert ids == [base_vocab, base_vocab + 1]  # appended to the vocabulary
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": ids} and "lm_head" in config["modules_to_save"]
    # reload on a base grown the same way
    base = load_like_training(run_dir)
    assert base.get_input_embeddings().weight.shape[0] == base_vocab + 2
    old_rows = base.get_input_embeddings().weight[[5, 40]].detach().clone()
    tuned = PeftModel.from_pretrained(base, run_dir)
    probe = torch.tensor([[5, 40, ids[0], 70, 80, ids[1]]])
    assert (batch_logits(tuned, probe) - batch_logits(token_run.model, probe)).abs().max() < 1e-3
    embedded = tuned.get_input_embeddings()(torch.tensor(ids + [5, 40]))
    started = token_run.model.get_input_embeddings().token_adapter.trainable_tokens_original["default"]
    assert started.shape == (2, embedded.shape[1])
    assert not torch.allclose(embedded[:2], started)  # the new rows trained away from where the run started
    assert torch.equal(embedded[2:], old_rows)  # the old rows did not move
    # the model learned to emit the new token first
    report = evaluate.run(
        evaluate.resolve(run_dir),
        compare_base=False,
        settings=load_recipe(run_dir / "recipe.yaml").eval.model_copy(update={"max_examples": 4, "max_new_tokens": 4}),
    )
    assert report["metrics"]["tuned"]["loss"] == pytest.approx(
        json.loads((run_dir / "manifest.json").read_text())["results"]["eval_loss"], rel=0.05
    )
    replies = [json.loads(line)["tuned"] for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    assert any(reply.startswith(NEW_TOKENS[0]) for reply in replies), replies  # shown, not stripped as special
    out = merge(run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["verification"]["passed"]
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    assert merged.config.vocab_size == base_vocab + 2
    assert len(AutoTokenizer.from_pretrained(run_dir / "merged")) == len(tokenizer)
    assert (batch_logits(merged, probe) - batch_logits(token_run.model, probe)).abs().max() < 1e-3


@pytest.mark.parametrize("known_first", [False, True])
def test_new_tokens_already_in_the_vocabulary_are_refused(tiny_model, tmp_path, write_recipe, known_first):
    recipe = tiny_recipe(tiny_model, tmp_path / "run", four_bit=False)
    known = AutoTokenizer.from_pretrained(tiny_model).eos_token
    recipe["model"]["new_special_tokens"] = [known, "<fresh>"] if known_first else ["<fresh>", known]
    out = lorakit("train", str(write_recipe(recipe)), timeout=300)
    assert out.returncode == 2 and f"model.new_special_tokens: {known} already in the tokenizer" in out.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ia3": {"target_modules": ["q_proj"]}}, "`ia3:` settings are given but `method` is lora"),
        ({"method": "ia3", "lora": {"r": 4}}, "`method: ia3` uses no `lora:` settings; lora.r would be ignored"),
        ({"method": "adalora", "lora": {"r": 4}}, "set the rank in adalora.init_r"),
        ({"method": "adalora", "lora": {"use_dora": True}}, "lora.use_dora would be ignored"),
        ({"method": "prompt_tuning", "train": {"packing": True}}, "packed examples would share one prompt"),
        ({"method": "ia3", "model": {"new_special_tokens": ["<x>"]}}, "need `method: lora`"),
        ({"method": "adalora", "adalora": {"init_r": 4, "target_r": 8}}, "AdaLoRA only removes rank"),
        ({"method": "adalora", "adalora": {"tinit": 0.6, "tfinal": 0.5}}, "leave no steps for the budget"),
        ({"method": "prompt_tuning", "prompt_tuning": {"prompt_tuning_init": "TEXT"}}, "needs prompt_tuning_init_text"),
        ({"method": "prefix_tuning", "prefix_tuning": {"encoder_hidden_size": 64}}, "set prefix_projection: true"),
        ({"lora": {"init_lora_weights": "loftq"}}, "`loftq` starts the adapter from the quantization error"),
    ],
)
def test_method_rules(change, message):
    recipe = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    for key, value in change.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("`", "`")):
        Recipe.model_validate(recipe)


def test_saved_recipe_keeps_only_the_chosen_method(runs):
    saved = (runs["adalora"].run_dir / "recipe.yaml").read_text()
    assert "adalora:" in saved and "ia3:" not in saved and "prompt_tuning:" not in saved
    assert "  r:" not in saved  # the LoRA rank is AdaLoRA's init_r, not saved twice
    load_recipe(runs["adalora"].run_dir / "recipe.yaml")  # and it loads back


def test_loftq_without_cuda_is_refused_before_loading(tiny_model, tmp_path, write_recipe):
    recipe = tiny_recipe(tiny_model, tmp_path / "run", four_bit=True)
    recipe["lora"]["init_lora_weights"] = "loftq"
    out = lorakit("train", str(write_recipe(recipe)), timeout=300)
    assert out.returncode == 2 and "loftq needs a CUDA GPU" in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peft computes LoftQ on a CUDA GPU")
def test_loftq_starts_closer_to_the_full_precision_model(tiny_model, tmp_path):
    """At step 0 a LoftQ adapter on the 4-bit base approximates the full-precision model better than the bare
    4-bit base; it trains, reloads with plain peft and merges into the NF4 weights with verification."""
    recipe = tiny_recipe(tiny_model, tmp_path / "run", four_bit=True, steps=1, learning_rate=1e-12)
    recipe["lora"].update({"init_lora_weights": "loftq"})  # alpha 32 / r 16: scaling 2 (peft#1982 undone)
    result = train(Recipe.model_validate(recipe), console=Console(stderr=True, quiet=True))
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    full = batch_logits(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).cuda(), ids).float()
    quantized = load_like_training(result.run_dir)
    bare = batch_logits(quantized, ids).float()
    with_adapter = batch_logits(PeftModel.from_pretrained(quantized, result.run_dir), ids).float()
    assert (with_adapter - full).abs().mean() < (bare - full).abs().mean()
    out = merge(result.run_dir)
    assert out.returncode == 0 and json.loads(out.stdout)["verification"]["passed"]


def test_planner_counts_what_each_method_trains(runs, token_run):
    """`lorakit plan`/`check` count trainable parameters on a weightless model: equal to what training had."""
    from lorakit.preflight import plan as plan_mod

    for result in [*runs.values(), token_run]:
        manifest = json.loads((result.run_dir / "manifest.json").read_text())
        counted = plan_mod.count(load_recipe(result.run_dir / "recipe.yaml")).lora
        assert counted == manifest["trainable_parameters"], result.run_dir


def test_adalora_resume_is_refused_with_the_reason(tiny_model, tmp_path):
    """peft saves AdaLoRA checkpoints cut to the ranks allocated so far; resuming would fail on shapes."""
    from lorakit.errors import LorakitError

    recipe = Recipe.model_validate(method_recipe(tiny_model, tmp_path / "run", "adalora", ADALORA, False))
    with pytest.raises(LorakitError, match="AdaLoRA runs cannot be resumed"):
        train(recipe, resume=True, console=Console(stderr=True, quiet=True))


def test_prompt_learning_generates_each_prompt_as_if_alone(runs):
    """peft ignores position ids under prompt tuning, so a left-padded batch would shift the shorter prompts'
    positions: lorakit generates them one at a time, and a batch gives what each prompt gives alone."""
    from lorakit.evaluate import generation
    from lorakit.recipe.schema import EvalConfig

    result = runs["prompt_tuning"]
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for text in ("reverse: a", "reverse: cup coin bell lamp", "reverse: snow fire")
    ]
    settings = EvalConfig(max_new_tokens=6)
    stops = [tokenizer.eos_token_id]
    batched = generation.generate(result.model, tokenizer, prompts, stops, settings, batch_size=3)
    alone = [generation.generate(result.model, tokenizer, [p], stops, settings, batch_size=1)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in alone]


def test_a_setting_the_method_ignores_is_reported_at_its_line(tmp_path):
    from lorakit.errors import RecipeError

    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  name_or_path: m\nmethod: prompt_tuning\nlora:\n  r: 4\ndata:\n  train: t.jsonl\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value).startswith(f"{path}:4: lora: `method: prompt_tuning` uses no `lora:` settings; lora.r")


def test_a_loftq_adapter_is_not_merged_into_the_published_weights(tiny_model, tmp_path):
    """LoftQ cannot run here (CUDA only), so a QLoRA run's recipe is marked LoftQ: the refusal reads the recipe."""
    import yaml

    run_dir = train(
        Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "run", four_bit=True, steps=2)),
        console=Console(stderr=True, quiet=True),
    ).run_dir
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    saved["lora"]["init_lora_weights"] = "loftq"
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(saved))
    out = lorakit("merge", str(run_dir), "--merge-into", "original", timeout=300)
    assert out.returncode == 2 and "would count that correction twice" in out.stderr
    assert not (run_dir / "merged").exists()


def test_streaming_merge_refuses_ia3_on_biased_layers_and_keeps_adalora_saved_modules(tmp_path):
    """Adapters built with plain peft on weightless bases, then read by the streaming merge's skeleton."""
    from peft import IA3Config
    from transformers import LlamaConfig

    from lorakit.errors import ModelError
    from lorakit.merge import skeleton as adapter
    from lorakit.model import shards as checkpoint

    def base_with(name, **config):
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                tie_word_embeddings=False,
                **config,
            )
        )
        model.save_pretrained(tmp_path / name)
        return model, tmp_path / name

    model, biased = base_with("biased", attention_bias=True)
    get_peft_model(model, IA3Config(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "ia3")
    with pytest.raises(ModelError, match="scales the output of model.layers.0.self_attn.k_proj, which has a bias"):
        adapter.on_skeleton(tmp_path / "ia3", biased, "biased", checkpoint.Checkpoint.open(biased))

    model, plain = base_with("plain")
    config = AdaLoraConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj"],
        init_r=4,
        target_r=2,
        total_step=10,
        modules_to_save=["lm_head"],
    )
    get_peft_model(model, config).save_pretrained(tmp_path / "ada")
    skeleton = adapter.on_skeleton(tmp_path / "ada", plain, "plain", checkpoint.Checkpoint.open(plain))
    assert skeleton.saved["lm_head.weight"].shape == (64, 32) and len(skeleton.layers) == 2


def test_preview_check_and_training_agree_that_prompt_learning_pads(runs, tiny_model, tmp_path):
    """One packing decision (model.use_packing) serves `data preview`, `check` and the trainer."""
    from lorakit.preflight import check, preview

    recipe = Recipe.model_validate(method_recipe(tiny_model, tmp_path / "run", "prompt_tuning", {}, False))
    assert preview.run(recipe, count=1)["packing"] is False
    finding = next(f for f in check.run(recipe, memory=False) if f.check == "packing")
    assert finding.message.startswith("padding (no packing): prompt_tuning puts its virtual tokens")
    assert json.loads((runs["prompt_tuning"].run_dir / "manifest.json").read_text())["kernels"]["packing"] is False
