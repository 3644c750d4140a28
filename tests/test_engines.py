"""FSDP and DeepSpeed: the shipped accelerate configs, the combinations refused before launch (with their
reasons), and, on CPU, that a base loaded the way lorakit loads it for FSDP really shards and trains while
the settings the refusals name really fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import EXAMPLES, ROOT, lorakit, tiny_recipe

from lorakit.errors import LorakitError
from lorakit.model import engines
from lorakit.model.setup import engine_problems, optimizer_for
from lorakit.recipe.loading import load_recipe
from lorakit.recipe.schema import Recipe

ACCELERATE = ROOT / "configs" / "accelerate"
BUNDLED = [f"data.train={EXAMPLES / 'train.jsonl'}", f"data.eval={EXAMPLES / 'eval.jsonl'}"]


def recipe(tiny_model, tmp_path, *, four_bit=True, **train) -> Recipe:
    return Recipe.model_validate(tiny_recipe(tiny_model, tmp_path / "run", four_bit=four_bit, **train))


def engine_of(name: str) -> engines.Engine:
    return engines.from_accelerate_config(str(ACCELERATE / name))[0]


@pytest.mark.parametrize(
    "name, kind, detail, processes",
    [
        ("ddp.yaml", "DDP", {}, 8),
        ("fsdp_qlora.yaml", "FSDP1", {"offload": True}, 2),
        ("fsdp_lora.yaml", "FSDP2", {"offload": False}, 8),
        ("deepspeed_zero2.yaml", "DeepSpeed ZeRO-2", {"shards_parameters": False}, 8),
        ("deepspeed_zero3.yaml", "DeepSpeed ZeRO-3", {"shards_parameters": True}, 8),
    ],
)
def test_shipped_accelerate_configs_read_by_accelerate(name, kind, detail, processes, monkeypatch):
    monkeypatch.chdir(ROOT)  # their DeepSpeed JSON paths are relative to the repository root
    engine, count = engines.from_accelerate_config(str(ACCELERATE / name))
    assert engine.name == kind and count == processes
    for key, value in detail.items():
        assert getattr(engine, key) == value
    if engine.kind == "deepspeed":  # every batch and clipping value is left to the recipe
        assert all(
            engine.deepspeed_config[k] == "auto"
            for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
        )


def test_70b_recipe_is_fsdp_qlora_over_two_gpus(monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = load_recipe(ROOT / "configs" / "llama-3.1-70b-qlora-fsdp.yaml", BUNDLED)
    engine, _ = engines.from_accelerate_config(plan.distributed.accelerate_config)
    assert engine.name == "FSDP1" and engine.offload and plan.distributed.nproc == 2
    engine_problems(plan, engine, cuda=True)  # nothing to refuse on GPUs
    assert plan.model.load_in_4bit and engines.quant_storage(plan.model.quantization, engine, "bfloat16") == "bfloat16"
    assert optimizer_for(plan, engine) == "adamw_torch"
    assert plan.train.per_device_train_batch_size * plan.train.gradient_accumulation_steps * 2 == 16


def test_8b_recipe_is_lora_ddp_over_eight_gpus(monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = load_recipe(ROOT / "configs" / "llama-3.1-8b-lora-ddp8.yaml", BUNDLED)
    assert plan.distributed.nproc == 8 and plan.distributed.accelerate_config is None
    assert not plan.model.load_in_4bit and plan.model.dtype == "bfloat16"
    engine_problems(plan, engines.Engine("ddp"), cuda=True)
    assert plan.train.per_device_train_batch_size * plan.train.gradient_accumulation_steps * 8 == 64


def test_quant_storage_follows_the_engine(tiny_model, tmp_path):
    cfg = recipe(tiny_model, tmp_path).model
    assert engines.quant_storage(cfg.quantization, engines.Engine("ddp"), "bfloat16") == "uint8"
    assert engines.quant_storage(cfg.quantization, engines.Engine("deepspeed", zero_stage=2), "bfloat16") == "uint8"
    assert engines.quant_storage(cfg.quantization, engines.Engine("deepspeed", zero_stage=3), "bfloat16") == "bfloat16"
    assert engines.quant_storage(cfg.quantization, engines.Engine("fsdp", fsdp_version=2), "float32") == "float32"


@pytest.mark.parametrize(
    "engine, message",
    [
        (engines.Engine("fsdp", fsdp_version=1), '"Cannot flatten integer dtype tensors"'),
        (engines.Engine("fsdp", fsdp_version=2), "every GPU holds the whole 4-bit base"),
        (engines.Engine("deepspeed", zero_stage=3), "cannot hold integer-packed weights"),
    ],
)
def test_integer_quant_storage_is_refused_where_parameters_are_sharded(tiny_model, tmp_path, engine, message):
    plan = recipe(tiny_model, tmp_path)
    plan.model.quantization.bnb_4bit_quant_storage = "uint8"
    with pytest.raises(LorakitError) as err:
        engine_problems(plan, engine, cuda=True)
    assert "bnb_4bit_quant_storage: uint8" in str(err.value) and message in str(err.value)
    engine_problems(plan, engines.Engine("ddp"), cuda=True)  # DDP keeps each copy whole: uint8 is fine there


def test_bitsandbytes_optimizers_are_refused_under_fsdp(tiny_model, tmp_path):
    plan = recipe(tiny_model, tmp_path, optim="paged_adamw_8bit")
    with pytest.raises(LorakitError, match="paged_adamw_8bit is a bitsandbytes optimizer, which fails when FSDP"):
        engine_problems(plan, engines.Engine("fsdp", fsdp_version=1), cuda=True)
    plan.train.optim = "adamw_torch_8bit"  # torchao's, not bitsandbytes'
    engine_problems(plan, engines.Engine("fsdp", fsdp_version=1), cuda=True)
    assert optimizer_for(recipe(tiny_model, tmp_path), engines.Engine("ddp")) == "paged_adamw_8bit"


def test_fsdp_activation_checkpointing_and_gradient_checkpointing_are_refused_together(tiny_model, tmp_path):
    plan = recipe(tiny_model, tmp_path, gradient_checkpointing=True)
    engine = engines.Engine("fsdp", fsdp_version=2, fsdp_activation_checkpointing=True)
    with pytest.raises(LorakitError, match="train.gradient_checkpointing is on and the FSDP config"):
        engine_problems(plan, engine, cuda=True)
    plan.train.gradient_checkpointing = False
    engine_problems(plan, engine, cuda=True)


def test_deepspeed_json_contradicting_the_recipe_is_refused(tiny_model, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": "auto",
                "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
            }
        )
    )
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config), "WORLD_SIZE": "2"}
    engine = engines.from_environment(env)
    assert engine.name == "DeepSpeed ZeRO-2" and engine.offload
    plan = recipe(tiny_model, tmp_path, optim="paged_adamw_8bit")
    with pytest.raises(LorakitError) as err:
        engine_problems(plan, engine, cuda=True)
    text = str(err.value)
    assert "offloads to the CPU, which needs DeepSpeed's own CPU Adam" in text  # every problem at once
    assert "defines its own optimizer (AdamW), which would be used instead" in text
    assert (
        "train.per_device_train_batch_size is 8 but the DeepSpeed config sets train_micro_batch_size_per_gpu: 2" in text
    )


def test_environment_set_by_accelerate_launch_is_read(tmp_path):
    assert engines.from_environment({}).name == "single process"
    assert engines.from_environment({"WORLD_SIZE": "4"}).name == "DDP"
    fsdp = engines.from_environment(
        {
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "2",
            "FSDP_ACTIVATION_CHECKPOINTING": "true",
            "FSDP_OFFLOAD_PARAMS": "false",
        }
    )
    assert fsdp.name == "FSDP2" and fsdp.fsdp_activation_checkpointing and not fsdp.offload
    stage = engines.from_environment({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert stage.name == "DeepSpeed ZeRO-3"
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(LorakitError, match=r"broken.json:1: not valid JSON"):
        engines.from_environment({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(broken)})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_fsdp_on_a_machine_without_gpus_is_refused_before_launch(tiny_model, tmp_path, write_recipe):
    run_dir = tmp_path / "run"
    path = write_recipe(tiny_recipe(tiny_model, run_dir))
    out = lorakit(
        "train",
        str(path),
        "--nproc",
        "2",
        "--set",
        f"distributed.accelerate_config={ACCELERATE / 'fsdp_qlora.yaml'}",
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "FSDP1 needs CUDA GPUs and none was found" in out.stderr and "plain DDP" in out.stderr
    assert "Traceback" not in out.stderr and not run_dir.exists()
    # the same recipe started by `accelerate launch` itself: each process reads the engine from its environment
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}
    out = lorakit("train", str(path), env=env, timeout=120)
    assert out.returncode == 2 and "FSDP1 needs CUDA GPUs" in out.stderr and not run_dir.exists()


def test_deepspeed_without_the_package_is_refused(tiny_model, tmp_path, monkeypatch):
    if __import__("importlib").util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    monkeypatch.chdir(ROOT)
    with pytest.raises(LorakitError, match="needs the `deepspeed` package, which is not installed"):
        engine_problems(recipe(tiny_model, tmp_path), engine_of("deepspeed_zero3.yaml"), cuda=True)


def test_a_missing_or_broken_accelerate_config_names_the_file(tiny_model, tmp_path, write_recipe):
    path = write_recipe(
        {**tiny_recipe(tiny_model, tmp_path / "run"), "distributed": {"accelerate_config": "no/such.yaml"}}
    )
    with pytest.raises(LorakitError, match=r"recipe.yaml:\d+: distributed.accelerate_config: file not found"):
        load_recipe(path)
    broken = tmp_path / "acc.yaml"
    broken.write_text("distributed_type: FSDP\nfsdp_confg: {}\n")
    with pytest.raises(LorakitError, match=r"acc.yaml: not a valid accelerate config: .*fsdp_confg"):
        engines.from_accelerate_config(str(broken))


def test_lorakit_fsdp_base_shards_and_trains_where_the_refused_settings_fail(tiny_model, tmp_path):
    """Two CPU processes run torch's FSDP on the tiny 4-bit base as lorakit loads it for FSDP (quant storage
    `auto`, no upcast norms): FSDP1 and FSDP2 train. uint8 storage and upcast norms, both refused or
    skipped by lorakit, fail with the errors the refusal quotes."""
    cases = {
        "fsdp1": [1, "auto", "bfloat16", False],
        "fsdp2": [2, "auto", "bfloat16", False],
        "uint8": [1, "uint8", "bfloat16", False],
        "upcast_norms": [1, "auto", "bfloat16", True],
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "fsdp_worker.py"),
            str(tiny_model),
            json.dumps(cases),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = {}
    for log in sorted(tmp_path.glob("rank*.jsonl")):
        for line in log.read_text().splitlines():
            row = json.loads(line)
            results.setdefault(row["case"], []).append(row)
    assert {name: len(rows) for name, rows in results.items()} == {name: 2 for name in cases}
    for name in ("fsdp1", "fsdp2"):
        for row in results[name]:
            assert row["frozen_dtypes"] == ["bfloat16"], row  # 4-bit weights and norms: one dtype
            assert "error" not in row and row["losses"][-1] < row["losses"][0] - 0.5, row
    assert all(row["error"] == "Cannot flatten integer dtype tensors" for row in results["uint8"])
    assert all("Must flatten tensors with uniform dtype" in row["error"] for row in results["upcast_norms"])


def test_accelerate_mixed_precision_contradicting_the_run_is_refused(tiny_model, tmp_path):
    plan = recipe(tiny_model, tmp_path)
    engine = engines.from_environment({"WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "bf16"})
    with pytest.raises(LorakitError, match="sets mixed_precision: bf16, but this run trains in float32"):
        engine_problems(plan, engine, cuda=False, dtype="float32")
    engine_problems(plan, engine, cuda=True, dtype="bfloat16")
    engine_problems(plan, engines.from_environment({"WORLD_SIZE": "2"}), cuda=False, dtype="float32")


def test_recipe_starts_accelerate_launch_with_its_config(tiny_model, tmp_path, write_recipe):
    """`distributed:` in the recipe, no command-line flag: lorakit execs `accelerate launch --config_file`
    (the shipped DDP config; accelerate runs it on CPU processes here) and the run is one DDP run."""
    run_dir = tmp_path / "run"
    path = write_recipe(
        {
            **tiny_recipe(tiny_model, run_dir, steps=4, per_device_train_batch_size=4),
            "distributed": {"nproc": 2, "accelerate_config": str(ACCELERATE / "ddp.yaml")},
        }
    )
    out = lorakit("train", str(path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["engine"] == "DDP" and manifest["precision"] == "float32"
    assert out.stderr.count("lorakit train: done") == 1


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config, four_bit, engine",
    [
        ("fsdp_qlora.yaml", True, "FSDP1"),
        ("fsdp_lora.yaml", False, "FSDP2"),
        ("deepspeed_zero2.yaml", True, "DeepSpeed"),
        ("deepspeed_zero3.yaml", True, "DeepSpeed"),
    ],
)
def test_engine_trains_through_accelerate_on_gpus(tiny_model, tmp_path, write_recipe, config, four_bit, engine):
    """The whole path on GPUs: lorakit starts accelerate launch with the shipped config; the run trains and
    leaves one standard PEFT adapter."""
    import importlib.util

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if "deepspeed" in config and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    run_dir = tmp_path / "run"
    path = write_recipe(
        tiny_recipe(tiny_model, run_dir, four_bit=four_bit, steps=8, per_device_train_batch_size=4, save_steps=4)
    )
    nproc = str(min(2, torch.cuda.device_count()))
    out = lorakit(
        "train",
        str(path),
        "--nproc",
        nproc,
        "--set",
        f"distributed.accelerate_config={ACCELERATE / config}",
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["engine"].startswith(engine), manifest["engine"]
    assert manifest["results"]["last_loss"] < manifest["results"]["first_loss"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run_dir)


def test_new_tokens_under_fsdp1_need_original_parameters(tiny_model, tmp_path):
    """Trainable token rows leave part of the embedding frozen; FSDP1's flat parameters need use_orig_params."""
    plan = recipe(tiny_model, tmp_path)
    plan.model.new_special_tokens = ["<t>"]
    with pytest.raises(LorakitError, match="set fsdp_use_orig_params: true"):
        engine_problems(plan, engines.Engine("fsdp", fsdp_version=1), cuda=True)
    engine_problems(plan, engines.Engine("fsdp", fsdp_version=1, fsdp_use_orig_params=True), cuda=True)
    engine_problems(plan, engines.Engine("fsdp", fsdp_version=2), cuda=True)
    assert engines.from_environment(
        {"ACCELERATE_USE_FSDP": "true", "FSDP_USE_ORIG_PARAMS": "true"}
    ).fsdp_use_orig_params


def test_adalora_is_refused_where_parameters_are_sharded(tiny_model, tmp_path):
    raw = tiny_recipe(tiny_model, tmp_path / "run", four_bit=False)
    raw.pop("lora")
    plan = Recipe.model_validate({**raw, "method": "adalora"})
    for engine in (
        engines.Engine("fsdp", fsdp_version=1),
        engines.Engine("fsdp", fsdp_version=2),
        engines.Engine("deepspeed", zero_stage=3),
    ):
        with pytest.raises(LorakitError, match="method: adalora scores every singular value"):
            engine_problems(plan, engine, cuda=True)
    engine_problems(plan, engines.Engine("ddp"), cuda=True)


def test_processes_beyond_the_gpus_are_refused_unless_gloo_shares_them(tiny_model, tmp_path):
    """NCCL refuses two processes on one GPU ("Duplicate GPU detected") after N processes have loaded the model;
    lorakit refuses before launch, and lets gloo DDP share a GPU when asked."""
    plan = recipe(tiny_model, tmp_path)
    with pytest.raises(
        LorakitError,
        match=r"2 processes on this machine's 1 GPU: NCCL cannot put two processes "
        r"on one GPU .*--nproc 1.*train.ddp_backend: gloo",
    ):
        engine_problems(plan, engines.Engine("ddp"), cuda=True, processes=2, gpus=1)
    engine_problems(plan, engines.Engine("ddp"), cuda=True, processes=2, gpus=2)
    engine_problems(plan, engines.Engine("ddp"), cuda=False, processes=2, gpus=None)  # gloo on CPUs
    plan.train.ddp_backend = "gloo"
    engine_problems(plan, engines.Engine("ddp"), cuda=True, processes=2, gpus=1)
    with pytest.raises(LorakitError, match="FSDP1 runs one process per GPU; start at most 1"):
        engine_problems(plan, engine_of("fsdp_qlora.yaml"), cuda=True, processes=2, gpus=1)
    plan.train.ddp_backend = "nccl"
    with pytest.raises(LorakitError, match="train.ddp_backend: nccl needs CUDA GPUs"):
        engine_problems(plan, engines.Engine("ddp"), cuda=False, processes=2)


def test_a_named_backend_waits_for_several_processes(tiny_model, tmp_path):
    """One process has no process group: naming a backend there must not make the trainer look for one (the
    two-process QLoRA test in test_distributed.py runs with train.ddp_backend: gloo)."""
    from lorakit.model.setup import for_training
    from lorakit.train.trainer import trainer_config

    plan = recipe(tiny_model, tmp_path, ddp_backend="gloo")
    assert trainer_config(plan, tmp_path / "run", for_training(plan, processes=1)).ddp_backend is None


def test_cpu_threads_follow_the_cores_this_process_may_use():
    """OMP_NUM_THREADS wins; else the cores of the CPU affinity (and cgroup quota) over the processes."""
    from lorakit.model.setup import cgroup_cpus, cpu_threads

    assert cpu_threads(1, {"OMP_NUM_THREADS": "3"}).count == 3
    cores = len(os.sched_getaffinity(0))
    one, many = cpu_threads(1, {}), cpu_threads(cores * 2, {})
    assert 1 <= one.count <= cores and "CPU" in one.why and many.count == 1  # never below one thread
    assert cpu_threads(2, {}).count == max(one.count // 2, 1)
    assert cgroup_cpus("200000 100000\n") == 2 and cgroup_cpus("50000 100000") == 1
    assert cgroup_cpus("max 100000") is None and cgroup_cpus(None) is None and cgroup_cpus("junk") is None
