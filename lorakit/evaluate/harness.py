"""lm-evaluation-harness tasks on the models `lorakit eval` already holds (the `lm-eval` extra).

Owns: wrapping a loaded model (base + adapter, or merged) in the harness's HF model class, finding tasks
(the harness's own, or task YAML files in `--lm-eval-include`), and reducing its results to
{task: {metric: value}}. The harness is imported only when tasks are asked for.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError


def check_available() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LorakitError("--lm-eval-tasks needs lm-evaluation-harness: pip install 'lorakit[lm-eval]'") from None


def task_manager(tasks: list[str], include: Path | None):
    """The harness's task index (with `include`'s YAML files); unknown tasks are refused before any model loads."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise LorakitError(
            f"--lm-eval-tasks: unknown task {unknown[0]!r} (lm-eval knows {len(manager.all_tasks)} "
            "tasks; give --lm-eval-include DIR for your own task YAML files)"
        )
    return manager


def run_tasks(
    model, tokenizer, tasks: list[str], manager, *, limit: int | None, batch_size: int
) -> dict[str, dict[str, float]]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(
        model=harness_model,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
    )
    # keys are "metric,filter": the filter is kept unless it is "none" (gsm8k reports strict and flexible)
    return {
        task: {
            key.removesuffix(",none"): float(value)
            for key, value in figures.items()
            if isinstance(value, (int, float)) and "stderr" not in key and key != "sample_len"
        }
        for task, figures in out["results"].items()
    }
