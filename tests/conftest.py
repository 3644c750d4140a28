"""Shared fixtures: offline always; the tiny Llama model is built from code once per session."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import cli_process
import pytest
import torch
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MKL's conditional numerical reproducibility: otherwise CPU matmuls may round differently from one process to
# the next (buffer alignment), and bit-exact comparisons between processes (a straight run and an interrupted
# then resumed one) would be about MKL. Set before torch loads MKL, here and in every CLI process.
os.environ["MKL_CBWR"] = "AUTO,STRICT"
if os.environ.get("PYTEST_XDIST_WORKER"):  # several workers share the cores: one torch thread each (and in
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the lorakit processes they start), not one per core each
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ["LORAKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="lorakit-test-cache-")  # never the user's cache
# torch sets this one itself, to its default, the first time an in-process run touches inductor's cache, and
# libraries some tests import set the two below; set beforehand, os.environ does not drift from the CLI fork
# server's (tests/cli_process.py), whose every later call would otherwise start a whole interpreter (~10 s, not 1)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lorakit-test-inductor-"))
os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")  # lm_eval sets it when imported (the harness tests)
os.environ.setdefault("KMP_DUPLICATE_LIB_OK", "True")  # and sklearn, which lm_eval imports

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "examples" / "reverse"


# The longest files first (worker seconds measured on 2 cores: 244, 147, 109, 80 of about 920 in all). `make test`
# hands files to its workers in this order (pytest-xdist `--dist loadfile --no-loadscope-reorder`), so the long
# ones start at once and the short ones fill the end; xdist's own order (most tests first) started them last,
# and the last to start ran on alone while the other worker sat idle.
LONGEST_FIRST = ("test_gguf.py", "test_preference.py", "test_gpu_check.py", "test_distributed.py")
assert all((Path(__file__).parent / name).is_file() for name in LONGEST_FIRST), "LONGEST_FIRST names a missing file"


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from scripts.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict (or YAML text) to tmp_path/NAME.yaml and return its path."""

    def write(content, name: str = "recipe") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return path

    return write


def tiny_recipe(model_dir: Path, out_dir: Path, *, four_bit: bool = True, steps: int = 6, **train) -> dict:
    """A recipe that trains the tiny model for a few steps on the bundled reversal data."""
    return {
        "model": {"name_or_path": str(model_dir), "load_in_4bit": four_bit},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "data": {"train": str(EXAMPLES / "train.jsonl"), "eval": str(EXAMPLES / "eval.jsonl"), "max_length": 48},
        "train": {
            "output_dir": str(out_dir),
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "learning_rate": 2e-3,
            "logging_steps": 2,
            "warmup_steps": 0,
            "save_steps": 1000,
            "gradient_checkpointing": False,
            **train,
        },
    }


PAIRS = ROOT / "examples" / "preference"


def preference_recipe(model_dir: Path, out_dir: Path, objective: str, *, unpaired: bool = False, **train) -> dict:
    """tiny_recipe (16-bit) under a preference objective, on the bundled pairs (or labelled completions)."""
    recipe = tiny_recipe(model_dir, out_dir, four_bit=False, **train)
    prefix = "unpaired_" if unpaired else ""
    recipe["data"] = {
        "train": str(PAIRS / f"{prefix}train.jsonl"),
        "eval": str(PAIRS / f"{prefix}eval.jsonl"),
        "max_length": 64,
    }
    recipe["train"]["objective"] = objective
    return recipe


def refusal(write_recipe, recipe) -> str:
    """The RecipeError a recipe dict is refused with, as text."""
    from lorakit.errors import RecipeError
    from lorakit.recipe.loading import load_recipe

    with pytest.raises(RecipeError) as refused:
        load_recipe(write_recipe(recipe))
    return str(refused.value)


# Token ids (tiny tokenizer) and the logits helpers the merge and combination tests compare models with.
IDS = [[0, 1, 272, 201, 85, 67, 2, 5, 1, 30, 60], [0, 1, 40, 41, 42, 43, 2, 5]]


@torch.no_grad()
def logits(model, ids=IDS) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=torch.tensor([i]), use_cache=False).logits[0].float() for i in ids]


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def lorakit(*args: str, env=None, cwd=None, input: str | None = None, timeout: float | None = None):
    """The CLI as a user runs it, in its own process (tests/cli_process.py): a CompletedProcess with text
    stdout and stderr."""
    return cli_process.run(*args, env=env, cwd=cwd, input=input, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    """{step: training loss} as a run logged them in its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def write_jsonl(path: Path, rows) -> str:
    """Rows as a JSONL file (parent folders made); its path as a string, as recipes take it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def tokenizer(tiny_model):
    """A fresh tiny tokenizer per test (data preparation sets its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@torch.no_grad()
def batch_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a batch in eval mode, at the input's own positions (prompt tuning prepends virtual ones)."""
    return model.eval()(input_ids=ids).logits[:, -ids.shape[1] :]
