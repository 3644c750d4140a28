"""Generate docs/recipe.md, the recipe reference, from the pydantic schema in lorakit/recipe/schema.py.

Help text is written once, in each field's `description`; this page cannot drift from it because
tests/test_docs.py fails when the committed page differs from `render()`.

    python scripts/gen_recipe_docs.py          # rewrite docs/recipe.md
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lorakit.recipe.schema import Recipe  # noqa: E402

DOC = ROOT / "docs" / "recipe.md"


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _listed_section(annotation) -> type[BaseModel] | None:
    """The section class of a `list[Section]` (or `list[Section] | None`) field."""
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is list:
            inner = typing.get_args(arg)[0]
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _default(field) -> str:
    if field.default_factory is not None:
        return "(section)"
    if field.default is PydanticUndefined:
        return "**required**"
    value = field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def _limits(field) -> str:
    """Range constraints from the schema (gt/ge/lt/le), so the page says what the validator enforces."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = [f"{signs[k]} {getattr(m, k)}" for m in field.metadata for k in signs if hasattr(m, k)]
    return f" Must be {' and '.join(parts)}." if parts else ""


def _section(prefix: str, cls: type[BaseModel], out: list[str]) -> None:
    out += [
        f"## `{prefix}`",
        "",
        (cls.__doc__ or "").strip(),
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    nested = []
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((f"{prefix}.{name}", annotation))
            out.append(f"| `{name}` | section | | {field.description} See `{prefix}.{name}` below. |")
            continue
        item = _listed_section(annotation)
        if item is not None:
            if item not in [cls for _, cls in nested]:
                nested.append((f"{prefix}.{name}[]", item))
            kind = f"{item.__name__} \\| list of {item.__name__}" + (" \\| null" if _optional(annotation) else "")
            out.append(f"| `{name}` | {kind} | {_default(field)} | {field.description or ''}{_limits(field)} |")
            continue
        out.append(
            f"| `{name}` | {_type_name(annotation)} | {_default(field)} | {field.description or ''}{_limits(field)} |"
        )
    out.append("")
    for sub_prefix, sub in nested:
        _section(sub_prefix, sub, out)


def render() -> str:
    out = [
        "# Recipe reference",
        "",
        "Generated from `lorakit/recipe/schema.py` by `scripts/gen_recipe_docs.py` (`make docs`); do not edit by hand.",
        "",
        "A recipe needs `model` and `data`; every other section is optional. `method` picks the PEFT method "
        "and with it the section that configures it (`lora`, `adalora`, `ia3`, `prompt_tuning`, `prefix_tuning`). "
        "Unknown keys are errors (with the line and a suggestion); "
        "values are checked for type and range before anything is loaded. Any value can be overridden "
        "on the command line with `--set section.key=value` (parsed as YAML, so `1e-4` is a float).",
        "",
        "## Top level",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for name, field in Recipe.model_fields.items():
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {field.description} |")
    out.append("")
    for name, field in Recipe.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            _section(name, field.annotation, out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}")
