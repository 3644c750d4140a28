"""Recipe errors: each one names the cause and where (file, line, key), exits 2, and prints no traceback."""

from __future__ import annotations

import pytest
from conftest import EXAMPLES, lorakit

from lorakit.errors import RecipeError
from lorakit.recipe.loading import load_recipe
from lorakit.recipe.schema import Recipe

TRAIN = EXAMPLES / "train.jsonl"


def base_text(extra_model: str = "", extra_lora: str = "", extra_train: str = "") -> str:
    return (  # line numbers below are those of a recipe without extras
        "model:\n"  # 1
        "  name_or_path: org/some-model\n"  # 2
        f"{extra_model}"
        "lora:\n"
        "  r: 8\n"
        f"{extra_lora}"
        "data:\n"
        f"  train: {TRAIN}\n"
        "train:\n"
        "  learning_rate: 1e-4\n"
        f"{extra_train}"
    )


def error_of(path, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return str(info.value)


def test_valid_recipe_loads_with_float_learning_rate(write_recipe):
    recipe = load_recipe(write_recipe(base_text()))
    assert recipe.train.learning_rate == 1e-4
    assert isinstance(recipe.train.learning_rate, float)
    assert recipe.lora.r == 8 and recipe.lora.lora_alpha == 32 and recipe.lora.lora_dropout == 0.05
    assert recipe.train.output_dir == "runs/recipe"  # default: runs/<recipe file name>
    assert recipe.data.train[0].path == str(TRAIN.resolve())


def test_unknown_key_names_path_line_and_suggestion(write_recipe):
    path = write_recipe(base_text(extra_lora="  rank: 16\n"))
    assert error_of(path) == f"{path}:5: unknown key 'lora.rank'; did you mean 'lora.r'?"


def test_misspelled_key_gets_closest_match(write_recipe):
    path = write_recipe(base_text(extra_train="  learning_rat: 0.1\n"))
    assert error_of(path) == f"{path}:9: unknown key 'train.learning_rat'; did you mean 'train.learning_rate'?"


def test_key_in_wrong_section_points_to_right_section(write_recipe):
    path = write_recipe(base_text(extra_lora="  num_train_epochs: 2\n"))
    assert error_of(path) == f"{path}:5: unknown key 'lora.num_train_epochs'; did you mean 'train.num_train_epochs'?"


def test_unknown_section(write_recipe):
    path = write_recipe(base_text() + "trainer:\n  x: 1\n")
    assert error_of(path) == f"{path}:9: unknown key 'trainer'; did you mean 'train'?"


@pytest.mark.parametrize(
    "line, expected",
    [
        ("  r: 0\n", "lora.r: input should be greater than 0 (got 0)"),
        ("  r: -3\n", "lora.r: input should be greater than 0 (got -3)"),
        ("  lora_dropout: 1.0\n", "lora.lora_dropout: input should be less than 1 (got 1.0)"),
        ("  lora_dropout: -0.1\n", "lora.lora_dropout: input should be greater than or equal to 0 (got -0.1)"),
        ("  bias: some\n", "lora.bias: input should be 'none', 'all' or 'lora_only' (got 'some')"),
    ],
)
def test_out_of_range_lora_values(write_recipe, line, expected):
    text = base_text().replace("  r: 8\n", line if line.startswith("  r:") else "  r: 8\n" + line)
    path = write_recipe(text)
    assert error_of(path) == (f"{path}:4: {expected}" if line.startswith("  r:") else f"{path}:5: {expected}")


def test_learning_rate_must_be_positive(write_recipe):
    path = write_recipe(base_text().replace("learning_rate: 1e-4", "learning_rate: 0"))
    assert error_of(path) == f"{path}:8: train.learning_rate: input should be greater than 0 (got 0)"


def test_wrong_type(write_recipe):
    path = write_recipe(base_text().replace("r: 8", "r: eight"))
    assert error_of(path) == (
        f"{path}:4: lora.r: input should be a valid integer, unable to parse string as an integer (got 'eight')"
    )


def test_all_problems_reported_at_once(write_recipe):
    path = write_recipe(base_text(extra_lora="  rank: 16\n").replace("r: 8", "r: 0"))
    message = error_of(path)
    assert len(message.splitlines()) == 2
    assert "lora.r: input should be greater than 0" in message and "unknown key 'lora.rank'" in message


def test_missing_required_key(write_recipe):
    path = write_recipe("model:\n  revision: main\ndata:\n  train: x.jsonl\n")
    message = error_of(path)
    assert f"{path}:1: missing required key 'model.name_or_path'" in message


def test_malformed_yaml_gives_line_and_column(write_recipe):
    path = write_recipe("model:\n  name_or_path: [a, b\ndata:\n  train: x\n")
    assert error_of(path).startswith(f"{path}:3:5: invalid YAML:")


def test_duplicate_key_refused(write_recipe):
    path = write_recipe(base_text(extra_lora="  r: 16\n"))
    assert error_of(path) == f"{path}:5:3: invalid YAML: duplicate key 'r' (first on line 4)"


def test_missing_recipe_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"recipe not found: {tmp_path / 'nope.yaml'}"


def test_empty_recipe(write_recipe):
    path = write_recipe("")
    assert "the recipe is empty" in error_of(path)


def test_missing_data_file_names_key_and_line(write_recipe, tmp_path):
    path = write_recipe(base_text().replace(str(TRAIN), "no/such.jsonl"))
    assert error_of(path) == f"{path}:6: data.train: file not found: no/such.jsonl"


def test_override_parsed_as_yaml_scalar(write_recipe):
    path = write_recipe(base_text())
    recipe = load_recipe(
        path, ["train.learning_rate=3e-5", "lora.target_modules=[q_proj, v_proj]", "model.load_in_4bit=true"]
    )
    assert recipe.train.learning_rate == 3e-5 and isinstance(recipe.train.learning_rate, float)
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.model.load_in_4bit is True


def test_override_wins_over_yaml_and_is_validated(write_recipe):
    path = write_recipe(base_text())
    assert error_of(path, ["lora.r=0"]) == "--set lora.r=0: lora.r: input should be greater than 0 (got 0)"
    assert error_of(path, ["lora.lora_alhpa=4"]) == (
        "--set lora.lora_alhpa=4: unknown key 'lora.lora_alhpa'; did you mean 'lora.lora_alpha'?"
    )


def test_malformed_override(write_recipe):
    path = write_recipe(base_text())
    assert "expected KEY=VALUE" in error_of(path, ["train.learning_rate"])
    assert error_of(path, ["lora.r.x=1"]) == "--set lora.r.x=1: `lora.r` is a value, not a section"


def test_quantization_without_4bit_refused(write_recipe):
    path = write_recipe(base_text(extra_model="  quantization:\n    bnb_4bit_quant_type: nf4\n"))
    assert error_of(path) == (
        f"{path}:1: model: `quantization` settings are given but `load_in_4bit` is false; "
        "set `load_in_4bit: true` for QLoRA or remove `quantization`"
    )


def test_loftq_without_4bit_refused(write_recipe):
    path = write_recipe(base_text(extra_lora="  init_lora_weights: loftq\n"))
    assert "`loftq` starts the adapter from the quantization error of the 4-bit base" in error_of(path)


def test_eval_strategy_needs_eval_data(write_recipe):
    path = write_recipe(base_text(extra_train="  eval_strategy: steps\n"))
    assert "there is no eval data" in error_of(path)


def test_secret_not_saved(write_recipe):
    recipe = load_recipe(write_recipe(base_text(extra_train="  hub_token: hf_secret123\n")))
    assert recipe.train.hub_token.get_secret_value() == "hf_secret123"
    assert "hf_secret123" not in str(recipe.to_saved_dict())
    assert "hf_secret123" not in repr(recipe)


def test_cli_bad_recipe_exit_2_without_traceback(write_recipe):
    path = write_recipe(base_text(extra_lora="  rank: 16\n"))
    out = lorakit("train", str(path))
    assert out.returncode == 2
    assert out.stderr == f"error: {path}:5: unknown key 'lora.rank'; did you mean 'lora.r'?\n"
    assert "Traceback" not in out.stderr


def test_cli_dry_run_prints_resolved_recipe(write_recipe):
    path = write_recipe(base_text())
    out = lorakit("train", str(path), "--dry-run", "--set", "lora.r=4")
    assert out.returncode == 0, out.stderr
    assert "r: 4" in out.stdout and "learning_rate: 0.0001" in out.stdout


def test_train_keys_exist_in_sft_config():
    """Recipe `train:` keys are trl SFTConfig names; a rename upstream must fail here, not in a user's run."""
    import dataclasses

    from trl import SFTConfig

    from lorakit.recipe.schema import OBJECTIVE_KEYS
    from lorakit.train.objectives import config_class

    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    train = Recipe.model_fields["train"].annotation
    ours = set(train.model_fields) - train.LORAKIT_ONLY - set(OBJECTIVE_KEYS)
    assert ours - sft_fields == set()
    for key, objectives in OBJECTIVE_KEYS.items():  # each objective's keys are its trl config's names
        for objective in objectives:
            assert key in {f.name for f in dataclasses.fields(config_class(objective))}, (key, objective)


def test_lora_keys_exist_in_lora_config():
    import dataclasses

    from peft import LoraConfig

    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    section = Recipe.model_fields["lora"].annotation
    assert set(section.model_fields) - lora_fields == set(section.LORAKIT_ONLY)


@pytest.mark.parametrize(
    "section, config",
    [
        ("adalora", "AdaLoraConfig"),
        ("ia3", "IA3Config"),
        ("prompt_tuning", "PromptTuningConfig"),
        ("prefix_tuning", "PrefixTuningConfig"),
    ],
)
def test_method_keys_exist_in_peft_configs(section, config):
    import dataclasses

    import peft

    fields = {f.name for f in dataclasses.fields(getattr(peft, config))}
    assert set(Recipe.model_fields[section].annotation.model_fields) - fields == set()


def test_quantization_keys_exist_in_bitsandbytes_config():
    import inspect

    from transformers import BitsAndBytesConfig

    params = set(inspect.signature(BitsAndBytesConfig).parameters)
    ours = set(Recipe.model_fields["model"].annotation.model_fields["quantization"].annotation.model_fields)
    assert ours - params == set()


def test_every_float_setting_must_be_finite(write_recipe):
    """`.inf` as a learning rate made every adapter tensor NaN on the first update (issue 20, fault 5)."""
    path = write_recipe(base_text())
    assert error_of(path, ["train.learning_rate=.inf"]) == (
        "--set train.learning_rate=.inf: train.learning_rate: input should be a finite number (got inf)"
    )
    assert "lora.lora_dropout: input should be a finite number" in error_of(path, ["lora.lora_dropout=.nan"])
    in_file = write_recipe(base_text().replace("learning_rate: 1e-4", "learning_rate: -.inf"), name="inf")
    assert error_of(in_file) == f"{in_file}:8: train.learning_rate: input should be a finite number (got -inf)"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(write_recipe):
    """Nine levels of nine aliases (9**9 values) ran for a minute and ended in MemoryError (issue 20, fault 6);
    the composed document is measured first, each node once."""
    import time

    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path = write_recipe("\n".join(lines) + "\n", name="bomb")
    started = time.perf_counter()
    assert (
        error_of(path)
        == f"{path}:6: the YAML expands to more than 100,000 values (aliases of aliases); a recipe is far smaller"
    )
    assert time.perf_counter() - started < 5  # it was a minute; here it takes milliseconds
    huge = write_recipe("x: " + "a" * (1 << 20) + "\n", name="huge")
    assert error_of(huge) == f"{huge}: 1,048,580 characters; a recipe is limited to 1,048,576"
