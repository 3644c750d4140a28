"""The six stages of the GPU check (the package docstring lists them). Each is a function of a
`runner.Context`: it runs its work as child processes, records checks (name, passed, detail) and figures,
and names the figures the summary table shows in `figures["headline"]`.

Sizes: full on a CUDA GPU (a ~1B model in c, the Llama-3-8B shape with 8 of its 32 layers in d); reduced
without one (the tiny model on CPU in c, `gpu_train.py --preset cpu-smoke` in d).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import statistics
import subprocess
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import yaml

from scripts.gpu_check.runner import PYTHON, ROOT, Context, OutOfTime, Skipped, Stage, stop

PROBE = "scripts.gpu_check.probe"
EXAMPLES = ROOT / "examples" / "reverse"
# TinyLlama 1.1B's shape: the "~1B Llama" of stage c (random weights; the tiny tokenizer's ids fit its vocabulary).
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
SPEED_PRESET = {False: "h200-check", True: "cpu-smoke"}  # by ctx.reduced
CORE_TESTS = ["tests/test_train.py", "tests/test_merge.py", "tests/test_eval.py", "tests/test_resume.py"]


def environment(ctx: Context) -> None:
    if shutil.which("nvidia-smi"):
        smi = ctx.command(
            "nvidia-smi",
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used", "--format=csv,noheader"],
        )
        ctx.figures["nvidia_smi"] = smi.tail.strip().splitlines()[-1]
    found = ctx.need(ctx.python("probe", "-m", PROBE, "environment", json_out=True), "environment probe runs").json()
    ctx.figures.update(found)
    ctx.check("lorakit runs (python -m lorakit --version)", found["lorakit"]["exit"] == 0, found["lorakit"])
    for name in ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "pydantic", "typer"):
        ctx.check(f"{name} installed", found["libraries"].get(name) is not None)
    bnb = found["bitsandbytes"]
    ctx.check("bitsandbytes imports", bnb.get("imported"), bnb.get("error", ""))
    ctx.check(
        "bitsandbytes 4-bit kernels and paged 8-bit AdamW run",
        "error" not in bnb and bnb.get("imported"),
        bnb.get("error", bnb.get("native_library")),
    )
    ctx.check(
        "NF4 round trip within 12% (relative norm)",
        bnb.get("nf4_relative_error", 1) < 0.12,
        bnb.get("nf4_relative_error"),
    )
    ctx.check(
        "Linear4bit forward matches the dequantized weight",
        bnb.get("linear4bit_max_diff", 1e9) <= 2e-2 * bnb.get("linear4bit_scale", 0) + 1e-3,
        bnb.get("linear4bit_max_diff"),
    )
    ctx.check("paged 8-bit AdamW step moves the parameter", bnb.get("paged_adamw_8bit_moved", 0) > 0)
    if ctx.cuda:
        ctx.check("bf16 supported", found.get("bf16"))
        ctx.check(
            "bitsandbytes loaded its CUDA library", "cuda" in bnb.get("native_library", ""), bnb.get("native_library")
        )
    ctx.figures["headline"] = {
        "device": found.get("device", "cpu"),
        "torch": found["torch"],
        "cuda": found["torch_cuda"],
        "bnb": bnb.get("native_library"),
        "flash-attn": found["flash_attn"],
        "liger": found["liger"],
    }


def tests(ctx: Context) -> None:
    """The gpu-marked tests and the train/merge/eval/resume tests, with CUDA visible: both selections at once,
    each spread over pytest-xdist workers when it is installed (one file per worker, so the port-binding
    launches of one file never overlap); at the cap both are interrupted and report what finished."""
    workers = (lambda n: ["-n", str(n), "--dist", "loadfile"]) if importlib.util.find_spec("xdist") else (lambda n: [])
    per_test = ["--timeout", "100"] if importlib.util.find_spec("pytest_timeout") else []
    running = {}
    for label, selection, n in (("gpu-marked", ["-m", "gpu", "tests"], 3), ("core", CORE_TESTS, 4)):
        report = ctx.work / f"b-{label}.xml"
        argv = [
            PYTHON,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfE",
            *workers(n),
            *per_test,
            f"--junitxml={report}",
            *selection,
        ]
        running[label] = (*ctx.start(label, argv), report)
    try:
        for proc, _, _ in running.values():
            proc.wait(timeout=max(ctx.left(), 1))
    except subprocess.TimeoutExpired:
        raise OutOfTime("the tests ran past the stage's cap; finished ones are counted") from None
    finally:
        for proc, _, _ in running.values():
            stop(proc, signal.SIGINT)  # pytest writes its report on an interrupt
        headline = {}
        for label, (proc, log, report) in running.items():
            counts = junit(report)
            counts["exit"] = proc.returncode
            ctx.figures[label] = counts
            headline[label] = f"{counts['passed']}/{counts['tests']} passed"
            ctx.check(
                f"{label} tests pass",
                counts["failed"] + counts["errors"] == 0 and counts["passed"] > 0,
                "; ".join(counts["failures"]) or log.read_text(errors="replace")[-1500:],
            )
        ctx.figures["headline"] = headline


def junit(path: Path) -> dict:
    if not path.is_file():
        return {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": ["no report written"]}
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        counts["tests"] += 1
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        counts[{"failure": "failed", "error": "errors"}.get(outcome, outcome)] += 1
        if outcome in ("failure", "error"):
            message = next(child for child in case if child.tag == outcome).get("message", "")
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}: {message[:300]}")
    return counts


def qlora(ctx: Context) -> None:
    """4-bit QLoRA of the ~1B model in bf16 with paged 8-bit AdamW and gradient checkpointing: loss falls;
    SIGTERM then --resume matches the straight run; merges under both policies verify; eval; generate."""
    work = ctx.work / "c"
    work.mkdir(exist_ok=True)
    model = _model(ctx, "llama-1b", LLAMA_1B)
    steps, save, stop_at = (24, 8, 9) if ctx.reduced else (60, 20, 25)
    env = {"MKL_CBWR": "AUTO,STRICT", "OMP_NUM_THREADS": "1"} if ctx.reduced else {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    straight = _recipe(work / "straight", model, steps, save)
    done = ctx.need(ctx.lorakit("train", "train", straight, env=env), "QLoRA training runs")
    run = work / "straight"
    manifest = json.loads((run / "manifest.json").read_text())
    losses = _losses(run)
    first, last = statistics.mean(list(losses.values())[:5]), statistics.mean(list(losses.values())[-5:])
    ctx.figures["train"] = {
        "model": manifest["base_model"],
        "parameters": manifest["total_parameters"],
        "steps": manifest["results"]["steps"],
        "first_losses_mean": round(first, 4),
        "last_losses_mean": round(last, 4),
        "tokens_per_s": manifest["results"]["tokens_per_s"],
        "precision": manifest["precision"],
        "optimizer": manifest.get("optimizer"),
        "device": manifest["device"],
        "kernels": manifest["kernels"],
        "memory": manifest.get("memory"),
        "wall_s": round(done.seconds, 1),
    }
    ctx.check("loss falls (mean of the last 5 logged < 0.8 x the first 5)", last < 0.8 * first, f"{first} -> {last}")
    ctx.check(
        "paged 8-bit AdamW and gradient checkpointing used",
        manifest.get("optimizer") == "paged_adamw_8bit" and manifest["kernels"]["gradient_checkpointing"],
    )
    if not ctx.reduced:
        ctx.check(
            "trains in bf16 on the GPU",
            manifest["precision"] == "bfloat16" and "cpu" not in manifest["device"],
            f"{manifest['precision']} on {manifest['device']}",
        )
    # the interrupted run and its resume share the GPU with the merges, eval and generate below (the straight
    # run, whose peak memory stage e compares with the plan, had it alone)
    errors: list[BaseException] = []

    def interrupt_and_resume() -> None:
        try:
            _interrupt_and_resume(ctx, work, model, steps, save, stop_at, env, losses)
        except BaseException as exc:  # re-raised in the stage's own thread below
            errors.append(exc)

    resuming = threading.Thread(target=interrupt_and_resume, name="interrupt-and-resume")
    resuming.start()
    try:
        _outputs(ctx, work, run)
    finally:
        resuming.join(timeout=max(ctx.left(), 1) + 30)
    if errors:
        raise errors[0]
    ctx.figures["headline"] = {
        "loss": f"{first:.2f}->{last:.2f}",
        "tok/s": manifest["results"]["tokens_per_s"],
        "peak GiB": next(iter((manifest.get("memory") or {}).values()), None),
        "resume max diff": ctx.figures.get("resume", {}).get("max_abs_diff"),
        "merge nf4 diff": ctx.figures.get("merge_nf4", {}).get("max_abs_diff"),
    }


def _outputs(ctx: Context, work: Path, run: Path) -> None:
    """Merges under both QLoRA policies (verified), `lorakit eval` and `lorakit generate` on the run."""
    for policy in ("nf4", "original"):
        done = ctx.lorakit(
            f"merge-{policy}",
            "merge",
            run,
            "--merge-into",
            policy,
            "--output",
            work / f"merged-{policy}",
            "--json",
            json_out=True,
        )
        if ctx.check(f"merge into {policy} runs", done.code == 0, done.tail[-1500:]):
            verification = done.json()["verification"]
            ctx.figures[f"merge_{policy}"] = {
                **verification["merged_vs_reference"],
                "tolerance": verification["tolerance"],
                "vs_base_max_abs_diff": verification["merged_vs_base"]["max_abs_diff"],
                "seconds": round(done.seconds, 1),
            }
            ctx.check(
                f"merge into {policy} verified against base + adapter", verification["passed"], verification["reason"]
            )
    report = ctx.need(ctx.lorakit("eval", "eval", run, "--json", json_out=True), "lorakit eval runs").json()
    metrics = report["metrics"]
    ctx.figures["eval"] = {
        name: {k: v for k, v in values.items() if isinstance(v, (int, float))} for name, values in metrics.items()
    }
    ctx.check(
        "tuned eval loss below the base's",
        metrics["tuned"]["loss"] < metrics["base"]["loss"],
        f"{metrics['tuned']['loss']} vs {metrics['base']['loss']}",
    )
    # generate on the first eval prompts: the same template, stop tokens and greedy replies as eval's samples
    rows = [json.loads(line) for line in (EXAMPLES / "eval.jsonl").read_text().splitlines()[:4]]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"][:-1]}) + "\n" for r in rows))
    done = ctx.need(
        ctx.lorakit("generate", "generate", run, "--file", prompts, "--json", json_out=True), "lorakit generate runs"
    )
    replies = [json.loads(line)["reply"] for line in done.stdout.read_text().splitlines() if line.startswith("{")]
    samples = [json.loads(line)["tuned"] for line in (run / "eval" / "samples.jsonl").read_text().splitlines()[:4]]
    agree = sum(a == b for a, b in zip(replies, samples))
    ctx.figures["generate"] = {"replies": replies, "eval_samples": samples, "agree": f"{agree}/{len(rows)}"}
    ctx.check("generate replies to every prompt", len(replies) == len(rows), replies)
    if ctx.reduced:  # fp32 on CPU: batched (eval) and one-by-one (generate) greedy decoding agree exactly
        ctx.check("generate's replies equal eval's samples", agree == len(rows), ctx.figures["generate"])


def _interrupt_and_resume(
    ctx: Context, work: Path, model: Path, steps: int, save: int, stop_at: int, env: dict, straight: dict
) -> None:
    recipe = _recipe(work / "interrupted", model, steps, save)
    run = work / "interrupted"
    proc, log = ctx.start("train-interrupted", [PYTHON, "-m", "lorakit", "train", recipe], env=env)
    try:
        while proc.poll() is None and max(_losses(run), default=0) < stop_at:
            if ctx.left() < 5:
                raise OutOfTime("the interrupted run did not reach its step in time")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=max(ctx.left(), 1))
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    if not ctx.check(
        "SIGTERM writes a checkpoint and exits 143", code == 143 and "--resume" in text, f"exit {code}: {text[-1200:]}"
    ):
        return
    stopped = max(_losses(run))
    ctx.need(ctx.lorakit("train-resume", "train", recipe, "--resume", env=env), "--resume finishes the run")
    resumed = _losses(run)
    shared = [s for s in straight if s in resumed]
    diffs = [abs(resumed[s] - straight[s]) for s in shared]
    relative = max(abs(resumed[s] - straight[s]) / abs(straight[s]) for s in shared)
    adapters = ctx.need(
        ctx.python("compare-adapters", "-m", PROBE, "compare-adapters", work / "straight", run, json_out=True),
        "adapters compared",
    ).json()
    ctx.figures["resume"] = {
        "stopped_at": stopped,
        "steps_compared": len(diffs),
        "max_abs_diff": max(diffs),
        "max_rel_diff": relative,
        "bit_exact": max(diffs) == 0,
        "adapter_max_abs_diff": adapters["max_abs_diff"],
    }
    ctx.check(
        "resumed run logs the same steps",
        sorted(resumed) == sorted(straight),
        f"{len(resumed)} vs {len(straight)} steps",
    )
    tolerance = 1e-6 if ctx.reduced else 1e-2  # CPU: exact (MKL_CBWR); GPU bf16: kernels may reduce in any order
    ctx.check(f"resumed losses match the straight run (relative <= {tolerance:g})", relative <= tolerance, relative)


def _model(ctx: Context, name: str, shape: dict) -> Path:
    """Full size: a Llama-shaped model with random weights, built, saved and reloaded; reduced: the tiny model."""
    if ctx.reduced:
        path = ctx.work / "tiny-llama"
        ctx.need(ctx.python("tiny-model", "scripts/tiny_model.py", path), "tiny model built")
        return path
    path = ctx.work / name
    ctx.need(
        ctx.python(f"build-{name}", "-m", PROBE, "build-model", json.dumps(shape), path, json_out=True), f"{name} built"
    )
    return path


def _recipe(run: Path, model: Path, steps: int, save: int) -> Path:
    recipe = {
        "model": {"name_or_path": str(model), "load_in_4bit": True},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(EXAMPLES / "train.jsonl"), "eval": str(EXAMPLES / "eval.jsonl"), "max_length": 64},
        "train": {
            "output_dir": str(run),
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "logging_steps": 1,
            "save_steps": save,
            "eval_steps": steps,
            "optim": "paged_adamw_8bit",
            "gradient_checkpointing": True,
            "seed": 0,
        },
        "eval": {"max_examples": 16, "max_new_tokens": 16},
    }
    path = run.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def speed(ctx: Context) -> None:
    """benchmarks/gpu_train.py: lorakit against the plain TRL baseline; its report is written as it goes."""
    report = ctx.work / "d-speed-report.json"
    try:
        done = ctx.python(
            "gpu-train",
            "benchmarks/gpu_train.py",
            "--preset",
            SPEED_PRESET[ctx.reduced],
            "--work",
            ctx.work / "speed",
            "--json",
            report,
        )
    finally:
        found = json.loads(report.read_text()) if report.is_file() else {}
        ctx.figures.update({k: v for k, v in found.items() if k != "runs"})
    ctx.need(done, "gpu_train.py runs both sides")
    for side in ("lorakit", "baseline"):
        row = found[side]
        ctx.check(f"{side}: tokens/s measured", row["tokens_per_s"] > 0, row["tokens_per_s"])
        ctx.check(f"{side}: gradient norms finite and non-zero", row["grad_norm_min"] > 0, row["grad_norm_min"])
        ctx.check(
            f"{side}: the benchmark's sequence trains at batch 1",
            row.get("longest_seq_batch1", 0) >= found["settings"]["seq"],
            row.get("longest_seq_batch1"),
        )
    ctx.check(
        "mean losses agree (same random model and data)",
        abs(found["ratios"]["mean_loss"] - 1) < 0.05,
        found["ratios"]["mean_loss"],
    )
    ours, theirs = found["lorakit"], found["baseline"]
    ctx.figures["headline"] = {
        "shape": found.get("shape_note", ""),
        "tok/s x": round(found["ratios"]["tokens_per_s"], 2),
        "memory x": round(found["ratios"]["peak_memory"], 2),
        "MFU": ours.get("mfu") and round(ours["mfu"], 3),
        "longest": f"{ours.get('longest_seq_batch1')} vs {theirs.get('longest_seq_batch1')}",
    }


def plan(ctx: Context) -> None:
    """`lorakit plan` on the recipe of every run c and d measured, against its measured peak."""
    runs = [ctx.work / "c" / "straight", *sorted((ctx.work / "speed").glob("lorakit-*/"))]
    rows = ctx.need(
        ctx.python("plan", "-m", PROBE, "plan", *[r for r in runs if r.is_dir()], json_out=True),
        "lorakit plan runs on the measured recipes",
    ).json()["rows"]
    ctx.figures["rows"] = rows
    ctx.check("plans made for the measured runs", len(rows) > 0, len(rows))
    if not ctx.cuda:
        raise Skipped(f"no CUDA: {len(rows)} plans made, nothing measured on a GPU to compare them with")
    errors = [abs(r["total_error"]) for r in rows if "total_error" in r]
    ctx.figures["headline"] = {"settings": len(errors), "worst total error": f"{max(errors, default=0):+.0%}"}
    ctx.notes.append("error = plan / measured - 1; measured total = peak allocator pool + memory outside it")


def distributed(ctx: Context) -> None:
    """Two processes sharing the one GPU (gloo DDP), and FSDP + QLoRA through accelerate, on the ~1B model."""
    model = ctx.work / "llama-1b"
    if not (model / "config.json").is_file():
        raise Skipped("stage c did not build the ~1B model")
    work = ctx.work / "f"
    work.mkdir(exist_ok=True)
    refused = ctx.lorakit("nccl-refused", "train", _recipe(work / "refused", model, 6, 100), "--nproc", "2")
    ctx.check(
        "--nproc 2 on one GPU with NCCL is refused before launch",
        refused.code == 2 and "Duplicate GPU" in refused.tail,
        refused.tail[-800:],
    )
    for label, extra in (
        (
            "ddp-gloo",
            ["--nproc", "2", "--set", "train.ddp_backend=gloo", "--set", "train.per_device_train_batch_size=4"],
        ),
        (
            "fsdp-qlora",
            [
                "--nproc",
                "1",
                "--set",
                f"distributed.accelerate_config={ROOT / 'configs/accelerate/fsdp_qlora.yaml'}",
                "--set",
                "train.optim=adamw_torch",
            ],
        ),
    ):
        run = work / label
        done = ctx.lorakit(label, "train", _recipe(run, model, 20, 100), *extra)
        if not ctx.check(f"{label} trains", done.code == 0, done.tail[-1500:]):
            continue
        manifest = json.loads((run / "manifest.json").read_text())
        results = manifest["results"]
        ctx.figures[label] = {
            "engine": manifest["engine"],
            "world_size": manifest["world_size"],
            "first_loss": results["first_loss"],
            "last_loss": results["last_loss"],
            "tokens_per_s": results["tokens_per_s"],
            "wall_s": round(done.seconds, 1),
        }
        ctx.check(f"{label}: loss falls", results["last_loss"] < results["first_loss"])
        if ctx.left() < 30:  # the trainings come first; loading each adapter back only if time remains
            ctx.notes.append(f"{label}: no time left to load the adapter in plain peft")
            continue
        loads = ctx.python(f"{label}-peft", "-m", PROBE, "adapter-loads", model, run, json_out=True)
        ctx.check(
            f"{label}: the adapter loads in plain peft", loads.code == 0 and loads.json()["finite"], loads.tail[-800:]
        )
    ctx.figures["headline"] = {k: ctx.figures[k]["engine"] for k in ("ddp-gloo", "fsdp-qlora") if k in ctx.figures}


STAGES = [
    Stage("a", "environment", cap=45, body=environment, reduced_cap=120),
    Stage("b", "tests", cap=120, body=tests, needs_cuda=True, minimum=40),
    Stage("c", "qlora", cap=140, body=qlora, minimum=60, reduced_cap=300),
    Stage("d", "speed", cap=180, body=speed, minimum=60, reduced_cap=300),
    Stage("e", "plan", cap=30, body=plan, minimum=10, reduced_cap=120),
    Stage("f", "distributed", cap=90, body=distributed, needs_cuda=True, minimum=45),
]
