"""Reading a recipe: YAML with line numbers, `--set` overrides, and errors that say where.

`load_recipe(path, overrides)` returns a validated `Recipe` or raises `RecipeError` whose message lists
every problem as `FILE:LINE: dotted.key: what is wrong` (or `--set key=value: ...` for overrides).
Imports only yaml and pydantic so that a bad recipe fails in well under a second.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from lorakit.errors import RecipeError
from lorakit.recipe.schema import DATA_SUFFIXES, DataSource, Recipe

# Names users bring from other tools (axolotl, LLaMA-Factory, older TRL) -> lorakit's name.
_SYNONYMS = {
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "micro_batch_size": "per_device_train_batch_size",
    "rank": "r",
    "lora_r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
    "lora_target": "target_modules",
    "base_model": "name_or_path",
    "model_name_or_path": "name_or_path",
    "sequence_len": "max_length",
    "cutoff_len": "max_length",
    "max_seq_length": "max_length",
    "warmup_ratio": "warmup_steps",
    "torch_dtype": "dtype",
    "evaluation_strategy": "eval_strategy",
    "quantization_config": "quantization",
}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.2 style) and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MAX_TEXT = 1 << 20  # a recipe is a few kilobytes
MAX_NODES = 100_000  # values once aliases are expanded: a recipe has hundreds; an alias bomb, billions


def parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML text into (data, node tree); malformed YAML -> RecipeError with line and column. Sizes are
    bounded before anything is expanded: the text, and the values its aliases would expand to."""
    if len(text) > MAX_TEXT:
        raise RecipeError(f"{source}: {len(text):,} characters; a recipe is limited to {MAX_TEXT:,}")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()  # composed: an alias is a reference to its anchor's node, not a copy
        _check_expansion(node, source)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise RecipeError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    finally:
        loader.dispose()
    return data, node


def _check_expansion(root: yaml.Node | None, source: str) -> None:
    """Count the values the document expands to, each node's expanded size computed once (so a billion-value
    alias bomb is counted in microseconds); refuse past MAX_NODES at the line of the node that overflows."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_NODES + 1  # a node that contains itself expands without end
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        if total > MAX_NODES:
            raise RecipeError(
                f"{source}:{node.start_mark.line + 1}: the YAML expands to more than {MAX_NODES:,} values "
                "(aliases of aliases); a recipe is far smaller"
            )
        sizes[id(node)] = total
        return total

    if root is not None:
        size(root)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], c) with c parsed as a YAML value (so `1e-4` is a float)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise RecipeError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. train.learning_rate=1e-4")
    value, _ = parse_yaml(raw, f"--set {item}") if raw.strip() else (None, None)
    return key.strip().split("."), value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate and resolve a recipe file. Raises RecipeError naming file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}" if not path.exists() else f"recipe is not a file: {path}")
    data, node = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; it needs at least `model:` and `data:` sections")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: the recipe must be a mapping of sections (model, lora, data, train)")
    set_by = {}
    for item in overrides:
        keys, value = parse_override(item)
        _assign(data, keys, value, item)
        set_by[tuple(keys)] = item
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_explain(exc, str(path), node, set_by)) from None
    return _resolve(recipe, path, node, set_by)


def _assign(data: dict, keys: list[str], value: Any, item: str) -> None:
    target = data
    for depth, key in enumerate(keys[:-1]):
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise RecipeError(f"--set {item}: `{'.'.join(keys[: depth + 1])}` is a value, not a section")
    target[keys[-1]] = value


def _resolve(recipe: Recipe, path: Path, node: yaml.Node | None, set_by: dict) -> Recipe:
    """Fill defaults that depend on the recipe's name, and make local paths absolute (runs outlive cwd)."""
    problems = []
    for key in ("train", "eval"):
        sources = getattr(recipe.data, key) or []
        for index, source in enumerate(sources):
            problem = resolve_source(source)
            if problem:
                where = _where(("data", key, index, "path"), str(path), node, set_by)
                problems.append(f"{where}: data.{key}{f'[{index}]' if len(sources) > 1 else ''}: {problem}")
    local_files = [(recipe.data, "chat_template")] if (recipe.data.chat_template or "").endswith(".jinja") else []
    local_files += [(recipe.distributed, "accelerate_config")] if recipe.distributed.accelerate_config else []
    for section, key in local_files:  # files the recipe names: absolute, or an error at their line
        dotted = ("data" if section is recipe.data else "distributed", key)
        file = Path(getattr(section, key)).expanduser()
        if not file.is_file():
            where = _where(dotted, str(path), node, set_by)
            problems.append(f"{where}: {'.'.join(dotted)}: file not found: {getattr(section, key)}")
        else:
            setattr(section, key, str(file.resolve()))
    if recipe.model.adapter is not None and Path(recipe.model.adapter).expanduser().is_dir():
        # made absolute; a missing one is refused by `train` and `check`, not here: a finished run's recipe
        # names the adapter it started from, and reading that run must not need it
        recipe.model.adapter = str(Path(recipe.model.adapter).expanduser().resolve())
    if problems:
        raise RecipeError("\n".join(problems))
    for key in ("name_or_path", "tokenizer_name_or_path"):
        value = getattr(recipe.model, key)
        local = Path(value).expanduser() if value else None
        if local is not None and (local.is_dir() or (local.suffix.lower() == ".gguf" and local.is_file())):
            setattr(recipe.model, key, str(local.resolve()))
    if recipe.train.output_dir is None:
        recipe.train.output_dir = str(Path("runs") / path.stem)
    return recipe


def missing_adapter(recipe: Recipe) -> str | None:
    """What is wrong with model.adapter's folder, for `train` and `check` before anything loads."""
    given = recipe.model.adapter
    if given is not None and not (Path(given).expanduser() / "adapter_config.json").is_file():
        return f"model.adapter: {given}: no adapter there (adapter_config.json; a lorakit run or a peft adapter)"
    return None


def resolve_source(source: DataSource) -> str | None:
    """Make a local source's path absolute; returns what is wrong with it, if anything. A path that
    names nothing local and has no data-file suffix is taken as a hub dataset id, checked when loaded."""
    raw = Path(source.path).expanduser()
    local_only = "`split`, `subset` and `revision` are for hub datasets and dataset directories"
    if raw.is_file():
        source.path = str(raw.resolve())
    elif raw.is_dir():
        source.path = str(raw.resolve())
        if source.revision is not None:
            return f"`revision` is for hub datasets; {source.path} is a local directory"
        return None
    elif glob.has_magic(source.path):
        if not glob.glob(str(raw), recursive=True):
            return f"no file matches the pattern {source.path}"
        source.path = str(Path(os.path.abspath(raw)))
    elif raw.suffix.lower() in DATA_SUFFIXES or raw.is_absolute() or source.path.startswith("."):
        return f"file not found: {source.path}"
    else:
        return None  # a hub dataset id
    if source.split is not None or source.subset is not None or source.revision is not None:
        return f"{local_only}, not for local files"
    return None


def _explain(exc: ValidationError, source: str, node: yaml.Node | None, set_by: dict) -> str:
    """Turn pydantic errors into one line per problem: where, which key, what is allowed."""
    grouped: dict[tuple, list[dict]] = {}
    for err in exc.errors():
        grouped.setdefault(_clean_loc(err["loc"]), []).append(err)
    lines = []
    for loc, errs in grouped.items():
        dotted = _dotted(loc)
        err = errs[0]
        if err["type"] == "extra_forbidden":
            where = _where(loc, source, node, set_by)
            lines.append(f"{where}: unknown key '{dotted}'{_suggest(loc)}")
        elif err["type"] == "missing":
            where = _where(loc[:-1], source, node, set_by)
            lines.append(f"{where}: missing required key '{dotted}'")
        else:
            messages = []
            for e in errs:
                msg = e["msg"].removeprefix("Value error, ")
                if msg not in messages:
                    messages.append(msg[0].lower() + msg[1:])
            got = "" if err["type"] == "value_error" else f" (got {err['input']!r})"
            label = f"{dotted}: " if dotted else ""
            named = re.match(r"([a-z_]+(?:\.[a-z_0-9]+)+): ", messages[0]) if not loc else None
            at = tuple(named.group(1).split(".")) if named else loc  # a cross-section rule names its key first
            lines.append(f"{_where(at, source, node, set_by)}: {label}{' or '.join(messages)}{got}")
    return "\n".join(lines)


def _schema_at(loc: tuple) -> type[BaseModel] | None:
    cls: Any = Recipe
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        cls = _section_in(cls.model_fields[part].annotation)
    return cls


def _section_in(annotation) -> type[BaseModel] | None:
    """The section class inside an annotation (`Section`, `list[Section] | None`, ...), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in get_args(annotation) if (found := _section_in(arg)) is not None), None)


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-member tags (`'list[str]'`, `'bool'`) from an error location."""
    clean: list = []
    cls: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            clean.append(part)
        elif cls is not None:  # a field of a section, or an unknown key in it
            clean.append(part)
            cls = _schema_at(tuple(p for p in clean if isinstance(p, str)))
        # else: a union tag below a plain field; not part of the user's key path
    return tuple(clean)


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc))


def _suggest(loc: tuple) -> str:
    key, parent = loc[-1], loc[:-1]
    cls = _schema_at(parent)
    if cls is None:
        return ""
    fields = list(cls.model_fields)
    wanted = _SYNONYMS.get(str(key), str(key))
    if wanted in fields:
        return f"; did you mean '{_dotted((*parent, wanted))}'?"
    close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{_dotted((*parent, close[0]))}'?"
    for section in Recipe.model_fields:  # a key put in the wrong section
        sub = _schema_at((section,))
        if sub is not None and wanted in sub.model_fields and (section,) != parent:
            return f"; did you mean '{section}.{wanted}'?"
    return f"; valid keys here: {', '.join(fields)}"


def _where(loc: tuple, source: str, node: yaml.Node | None, set_by: dict) -> str:
    for n in range(len(loc), 0, -1):
        if tuple(loc[:n]) in set_by:
            return f"--set {set_by[tuple(loc[:n])]}"
    line = _line_of(node, loc)
    return f"{source}:{line}" if line else source


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the key at `loc`, or of the nearest enclosing key found."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                return line
            key_node, node = match
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
