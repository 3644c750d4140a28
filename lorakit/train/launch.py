"""What `lorakit train` does before the trainer, in order: the refusals that need nothing loaded, the
preflight (`lorakit check`), the launcher when several processes are asked for, and the run directory's
checks; then `trainer.run`.

The launcher is torchrun (DDP) or `accelerate launch` (an accelerate config), never lorakit's own: this
process is replaced by the launcher, which starts the same command once per process.
"""

from __future__ import annotations

import sys

from lorakit.errors import LorakitError
from lorakit.recipe.schema import Recipe
from lorakit.train import distributed


def train(
    recipe: Recipe,
    *,
    overwrite: bool,
    use_cache: bool,
    resume: bool,
    force_resume: bool,
    nproc: int | None,
    preflight: bool,
    resume_command: str,
) -> None:
    """`lorakit train` after its options are parsed: refuse, check, launch (or not), then train."""
    resuming = resume or force_resume
    if resuming and overwrite:
        raise LorakitError(
            "--resume and --overwrite contradict each other: one continues the run, the other deletes it"
        )
    if distributed.is_main():  # before anything else: a second writer is refused in well under a second
        from lorakit.rundir.lock import hold_for_writing

        hold_for_writing(recipe.train.output_dir, "lorakit " + " ".join(sys.argv[1:]))
    setup = None
    if not distributed.launched():  # a launched process resolves its own set-up in its own environment
        from lorakit.model import setup as setup_mod

        engine, processes, config = _launch_plan(recipe, nproc)
        resolution = setup_mod.resolve(recipe, processes=processes, engine=engine)
        if preflight:
            from lorakit.preflight import check

            check.before_training(recipe, use_cache, resolution)
        setup = resolution.setup()  # the refusals, before any process starts or the directory is touched
        if config or processes > 1:
            _launch(recipe, processes, config, resuming, overwrite)
    if resuming:
        from lorakit.train.resume import run_to_resume

        run_to_resume(recipe.train.output_dir)
    elif distributed.is_main():  # the other processes of a launch find the directory claimed
        from lorakit.rundir.directory import check_free

        check_free(recipe.train.output_dir, overwrite)  # refuse before the slow imports
    from lorakit.console import quiet_libraries

    quiet_libraries()
    from lorakit.train.trainer import run

    run(
        recipe,
        overwrite=overwrite,
        use_cache=use_cache,
        resume=resuming,
        force_resume=force_resume,
        resume_command=resume_command,
        setup=setup,
    )


def _launch_plan(recipe: Recipe, nproc: int | None):
    """(engine, processes, accelerate config) of the launch the command line and the recipe ask for: the
    accelerate config's engine, DDP for several processes, else this process's own environment."""
    from lorakit.model import engines

    config = recipe.distributed.accelerate_config
    if config:
        engine, config_processes = engines.from_accelerate_config(config)
        return engine, nproc or recipe.distributed.nproc or config_processes or 1, config
    processes = nproc or recipe.distributed.nproc or 1
    return (engines.Engine("ddp") if processes > 1 else engines.from_environment()), processes, None


def _launch(recipe: Recipe, processes: int, config: str | None, resuming: bool, overwrite: bool) -> None:
    """Replace this process by the launcher (torchrun, or `accelerate launch` with a config), which starts
    this command once per process; the run directory is checked free first."""
    if not resuming:
        from lorakit.rundir.directory import check_free

        check_free(recipe.train.output_dir, overwrite)
    distributed.launch(processes, _without_option(sys.argv[1:], "--nproc"), config)


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv minus `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out
