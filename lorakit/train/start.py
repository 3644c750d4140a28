"""The adapter a run starts from (`model.adapter`): an earlier lorakit run, or a peft adapter folder, continued
instead of a fresh adapter. The usual preference pipeline: SFT first, then DPO on the SFT run, whose adapter
(frozen, as trl copies it) is the reference.

Owns: finding the adapter, refusing one trained on another base (or, for a run, one whose files changed
since training or whose chat template differs from this run's), loading it trainable onto the prepared base,
and what the manifest records of it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lorakit.digest import folder_sha256
from lorakit.errors import LorakitError
from lorakit.recipe.loading import missing_adapter
from lorakit.recipe.schema import Recipe
from lorakit.rundir import group
from lorakit.rundir.directory import ADAPTER_FILES, MANIFEST


@dataclass
class StartAdapter:
    path: Path
    run: group.Run | None  # when it is a lorakit run

    def record(self) -> dict:
        return {
            "path": str(self.path),
            "kind": "lorakit run" if self.run else "peft adapter",
            "sha256": folder_sha256(self.path, ADAPTER_FILES),
        }

    def check_template(self, template_sha256: str) -> None:
        """A run's adapter learned its chat template; continuing it on another would teach a second format."""
        theirs = self.run.manifest.get("chat_template_sha256") if self.run else None
        if theirs and theirs != template_sha256:
            raise LorakitError(
                f"model.adapter: {self.path} trained with another chat template (manifest chat_template_sha256 "
                f"{theirs[:12]}, this run's {template_sha256[:12]}); use the same data.chat_template as that run"
            )

    def load(self, base):
        """The adapter on the prepared base, trainable."""
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(self.path), is_trainable=True)


def find(recipe: Recipe, accept_changed_adapter: bool = False) -> StartAdapter | None:
    given = recipe.model.adapter
    if given is None:
        return None
    path = Path(given).expanduser().resolve()
    problem = missing_adapter(recipe)
    if problem:
        raise LorakitError(problem)
    if not (path / MANIFEST).is_file():
        _check_base(path, json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path"), recipe)
        return StartAdapter(path, None)
    [run] = group.read([path], accept_changed_adapter)
    for key in ("name_or_path", "revision"):
        mine, theirs = getattr(recipe.model, key), getattr(run.recipe.model, key)
        if mine != theirs:
            raise LorakitError(
                f"model.adapter: {path} trained on model.{key} {theirs!r}, this recipe names {mine!r}; an adapter "
                "continues on the base it was trained on"
            )
    return StartAdapter(path, run)


def _check_base(path: Path, base: str | None, recipe: Recipe) -> None:
    if base and Path(base).name != Path(recipe.model.name_or_path).name:
        print(
            f"warning: model.adapter: {path} names {base!r} as its base, this recipe {recipe.model.name_or_path!r}",
            file=sys.stderr,
        )
