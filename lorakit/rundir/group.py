"""Several lorakit runs used together (`lorakit merge RUN1 RUN2 ...`, `lorakit eval RUN1 RUN2 ...`,
`lorakit generate RUN1 RUN2 ...`): each run read once, a name for each in reports, and the refusals that
apply to any use of several adapters with one base.

Owns: reading a run's recipe, manifest and adapter config; unique display names (the run directory
names); refusing runs on different bases or with different chat templates. Does not load weights
(lorakit.merge.combine, lorakit.evaluate.compare).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.recipe.schema import Recipe
from lorakit.rundir.directory import MANIFEST, RECIPE, check_adapter, read_record
from lorakit.rundir.lock import hold_for_reading

RESERVED = ("base", "tuned", "where", "prompt", "reference")  # names eval reports already use


@dataclass
class Run:
    path: Path
    name: str  # unique among the runs given: the directory name, suffixed when two are equal
    recipe: Recipe
    manifest: dict
    adapter: dict  # adapter_config.json

    @property
    def four_bit(self) -> bool:
        """Whether it trained on a 4-bit base, as its manifest records the run's set-up."""
        return bool(self.manifest.get("load_in_4bit"))


def read(paths: list[str | Path], accept_changed_adapter: bool = False) -> list[Run]:
    """The runs, checked to be complete lorakit runs holding an adapter, each named once."""
    from lorakit.recipe.loading import load_recipe

    resolved = [Path(p).expanduser().resolve() for p in paths]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise LorakitError(f"{path} is given twice")
        hold_for_reading(path)
        if not (path / RECIPE).is_file() or not (path / "adapter_config.json").is_file():
            raise LorakitError(f"{path} is not a lorakit run (no {RECIPE} or adapter_config.json)")
        if not (path / MANIFEST).is_file():
            raise LorakitError(f"{path} is an incomplete run (no {MANIFEST}: training did not finish)")
        notice = check_adapter(path, read_record(path / MANIFEST), accept_changed_adapter)
        if notice:
            print(notice, file=sys.stderr)
    names = unique_names([p.name for p in resolved])
    return [
        Run(
            path,
            name,
            load_recipe(path / RECIPE),
            read_record(path / MANIFEST),
            json.loads((path / "adapter_config.json").read_text()),
        )
        for path, name in zip(resolved, names)
    ]


def unique_names(names: list[str]) -> list[str]:
    """`run`, `run` -> `run`, `run-2`; a name reports already use (base, tuned, ...) gets a suffix too."""
    taken, out = set(RESERVED), []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        taken.add(candidate)
        out.append(candidate)
    return out


def check_same_base(runs: list[Run]) -> None:
    """Every run trained on the first run's base (name and revision) with the first run's chat template."""
    first = runs[0]
    for run in runs[1:]:
        for key in ("name_or_path", "revision"):
            mine, theirs = getattr(run.recipe.model, key), getattr(first.recipe.model, key)
            if mine != theirs:
                raise LorakitError(
                    f"run {run.name} ({run.path}) trained on model.{key} {mine!r}, run {first.name} on "
                    f"{theirs!r}: several adapters must share one base"
                )
        mine, theirs = run.manifest.get("chat_template_sha256"), first.manifest.get("chat_template_sha256")
        if mine != theirs:
            raise LorakitError(
                f"run {run.name} ({run.path}) trained with another chat template than run {first.name} (manifest "
                f"chat_template_sha256 {str(mine)[:12]} vs {str(theirs)[:12]}): its adapter would be prompted in a "
                "format it did not learn; retrain it with the same data.chat_template"
            )


def check_same_loading(runs: list[Run]) -> None:
    """Every run loads the base exactly as the first one does (one loaded base serves them all). The adapter
    a run started from (`model.adapter`) is not part of the base: an SFT run and the preference run that
    continued it are compared on one base."""
    first = runs[0].recipe.model.model_dump(exclude={"adapter"})
    for run in runs[1:]:
        mine = run.recipe.model.model_dump(exclude={"adapter"})
        for key, value in first.items():
            if mine.get(key) != value:
                raise LorakitError(
                    f"run {run.name} ({run.path}) loads the base with model.{key} = {mine.get(key)!r}, "
                    f"run {runs[0].name} with {value!r}: adapters evaluated on one loaded base must "
                    "agree on the model section; evaluate them separately"
                )
