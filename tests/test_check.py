"""`lorakit check`: every check fires on a recipe made to trip it and stays quiet on a good one; `lorakit
train` runs it first."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, lorakit, tiny_recipe

from lorakit.preflight import check as check_mod
from lorakit.recipe.schema import Recipe


def findings_of(tiny_model, tmp_path, **sections):
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return check_mod.run(Recipe.model_validate(recipe))


def levels(findings, name):
    return [f.level for f in findings if f.check == name]


def test_a_good_recipe_passes_every_check(tiny_model, tmp_path):
    findings = findings_of(tiny_model, tmp_path)
    assert [f for f in findings if f.level != "ok"] == []
    names = {f.check for f in findings}
    assert {
        "precision",
        "engine",
        "optimizer",
        "target modules",
        "packing",
        "data",
        "end of turn",
        "padding",
        "memory",
    } <= names
    targets = next(f.message for f in findings if f.check == "target modules")
    assert "q_proj x4" in targets and "down_proj x4" in targets  # 4 layers of the tiny model, each counted


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only refusals")
@pytest.mark.parametrize(
    "sections, check, words",
    [
        ({"model": {"dtype": "float16"}}, "precision", "float16 training needs a CUDA GPU"),
        (
            {"distributed": {"accelerate_config": str(ROOT / "configs" / "accelerate" / "fsdp_qlora.yaml")}},
            "engine",
            "needs CUDA GPUs and none was found",
        ),
        ({"train": {"use_liger_kernel": True}}, "liger", "Triton kernels for CUDA GPUs"),
    ],
)
def test_hardware_checks_fire_without_a_gpu(tiny_model, tmp_path, sections, check, words):
    findings = findings_of(tiny_model, tmp_path, **sections)
    errors = [f for f in findings if f.level == "error"]
    assert [f.check for f in errors] == [check] and words in errors[0].message
    assert levels(findings, "data") == ["ok"]  # the other checks still ran


@pytest.mark.parametrize(
    "sections, check, words",
    [
        ({"train": {"optim": "adamw_8bits"}}, "optimizer", "did you mean"),
        ({"lora": {"target_modules": ["q_proj", "qkv_proj"]}}, "target modules", "'qkv_proj' matches no module"),
    ],
)
def test_recipe_checks_fire(tiny_model, tmp_path, sections, check, words):
    errors = [f for f in findings_of(tiny_model, tmp_path, **sections) if f.level == "error"]
    assert [f.check for f in errors] == [check] and words in errors[0].message


def test_the_length_policy_is_a_warning_and_keeps_the_end_of_turn_trained(tiny_model, tmp_path):
    findings = findings_of(tiny_model, tmp_path, data={"max_length": 24, "on_overflow": "truncate"})
    warning = [f for f in findings if f.check == "data" and f.level == "warning"]
    assert warning and "data.max_length=24" in warning[0].message and "dropped" in warning[0].message
    assert levels(findings, "end of turn") == ["ok"]  # lorakit's cut ends a trained turn with its end token


def test_a_template_whose_turns_never_end_is_an_error(tiny_model, tmp_path):
    template = tmp_path / "no-end.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    findings = findings_of(tiny_model, tmp_path, data={"chat_template": str(template)})
    error = [f for f in findings if f.level == "error"]
    assert [f.check for f in error] == ["data"] and "would never learn to stop" in error[0].message


def test_malformed_rows_skipped_are_a_warning(tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    good = (ROOT / "examples" / "reverse" / "train.jsonl").read_text().splitlines()[:300]
    data.write_text("\n".join(good[:150] + ['{"messages": "not a list"}'] + good[150:]) + "\n")
    findings = findings_of(tiny_model, tmp_path, data={"train": str(data), "on_bad_rows": "skip"})
    warning = [f for f in findings if f.check == "data" and f.level == "warning"]
    assert warning and "1 malformed rows skipped" in warning[0].message


def test_memory_that_does_not_fit_is_an_error(tiny_model, tmp_path, write_recipe):
    path = write_recipe(tiny_recipe(tiny_model, tmp_path / "run"))
    out = lorakit("check", str(path), "--gpu-memory", "1MiB", "--json")
    assert out.returncode == 2, out.stderr[-2000:]
    memory = [f for f in json.loads(out.stdout) if f["check"] == "memory"]
    assert memory[0]["level"] == "error" and "GiB available" in memory[0]["message"]
    fine = lorakit("check", str(path), "--gpu-memory", "8GiB")
    assert fine.returncode == 0 and "error" not in fine.stdout


def test_train_runs_the_preflight_first(tiny_model, tmp_path, write_recipe):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_model, run_dir)
    recipe["lora"]["target_modules"] = ["q_proj", "qkv_proj"]
    path = write_recipe(recipe)
    out = lorakit("train", str(path))
    assert out.returncode == 2 and "the preflight found problems" in out.stderr and "qkv_proj" in out.stderr
    assert not run_dir.exists()
    skipped = lorakit("train", str(path), "--no-check")
    assert skipped.returncode == 2 and "preflight" not in skipped.stderr and "qkv_proj" in skipped.stderr


def test_float16_on_a_model_trained_in_bfloat16_is_a_warning(tmp_path):
    recipe = Recipe.model_validate(
        {
            "model": {"name_or_path": str(ROOT / "tests" / "fixtures" / "configs" / "llama-3-8b"), "dtype": "float16"},
            "data": {"train": str(ROOT / "examples" / "reverse" / "train.jsonl")},
        }
    )
    findings: list = []
    check_mod._model_dtype(recipe, findings)
    assert [f.level for f in findings] == ["warning"] and "trained in bfloat16" in findings[0].message
    recipe.model.dtype = "bfloat16"
    findings.clear()
    check_mod._model_dtype(recipe, findings)
    assert findings == []


def test_the_first_example_is_shown_with_its_mask(tiny_model, tmp_path):
    first = next(f for f in findings_of(tiny_model, tmp_path) if f.check == "first example")
    assert "«" in first.message and "⟨<|im_end|>⟩" in first.message
