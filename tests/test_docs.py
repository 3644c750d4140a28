"""docs/recipe.md is generated from the schema; it must not go stale."""

from __future__ import annotations

from conftest import ROOT

from scripts.gen_recipe_docs import DOC, render


def test_recipe_reference_is_current():
    assert DOC.read_text() == render(), "docs/recipe.md is stale: run `make docs`"


def test_every_field_documented():
    from lorakit.recipe.schema import Recipe

    text = render()
    for section, field in Recipe.model_fields.items():
        assert field.description, f"{section} has no description"
        assert f"`{section}`" in text
        if not hasattr(field.annotation, "model_fields"):  # a top-level value (`method`)
            continue
        for name, sub in field.annotation.model_fields.items():
            assert sub.description, f"{section}.{name} has no description"
            assert f"| `{name}` |" in text


def test_readme_links_reference():
    assert "docs/recipe.md" in (ROOT / "README.md").read_text()


def test_plan_page_is_current():
    from scripts.gen_plan_docs import DOC as PLAN_DOC
    from scripts.gen_plan_docs import render as render_plan

    assert PLAN_DOC.read_text() == render_plan(), "docs/plan.md is stale: run `make docs`"


def _architecture() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme[readme.index("### Architecture") :]


def test_readme_architecture_lists_every_module():
    """The README's architecture section is the plan: every module, in its folder, with a line of its own."""
    import re

    section = _architecture()
    block = section[section.index("```") : section.index("```", section.index("```") + 3)]
    listed, folder = set(), None
    for line in block.splitlines():
        name = line.strip().split(" ")[0]
        if re.fullmatch(r"\w+/", name):
            folder = name if line.startswith("  ") and not line.startswith("    ") else folder
            if not line.startswith("  "):
                folder = None
        elif name.endswith(".py"):
            listed.add((folder or "") + name if line.startswith("    ") else name)
    modules = {str(p.relative_to(ROOT / "lorakit")) for p in (ROOT / "lorakit").rglob("*.py")}
    expected = {m for m in modules if m.count("/") == 1 and not m.endswith("__init__.py")} | {
        m for m in modules if "/" not in m and m not in ("__init__.py", "__main__.py")
    }
    expected |= {"data/__init__.py"}  # the one package whose __init__ holds code (data.prepare)
    assert not expected - listed, f"modules missing from the README's architecture: {sorted(expected - listed)}"
    assert not listed - modules, f"the README lists modules that do not exist: {sorted(listed - modules)}"


# Which folders each folder may import (the README's import order); errors, console, upstream and the
# package's version are shared by all.
ALLOWED = {
    "recipe": set(),
    "rundir": {"recipe"},
    "data": {"recipe"},
    "model": {"recipe"},
    "preflight": {"recipe", "rundir", "data", "model"},
    "train": {"recipe", "rundir", "data", "model", "preflight"},
    "merge": {"recipe", "rundir", "data", "model"},
    "evaluate": {"recipe", "rundir", "data", "model"},
    "export": {"recipe", "rundir", "data", "model", "merge"},
    "cli": {"recipe", "rundir", "data", "model", "preflight", "train", "merge", "export", "evaluate"},
}
SHARED = {"errors", "console", "upstream", "locations", "digest", "staging", "__version__"}


def test_imports_follow_the_readme_order():
    import re

    wrong = []
    for path in (ROOT / "lorakit").rglob("*.py"):
        parts = path.relative_to(ROOT / "lorakit").parts
        source = parts[0] if len(parts) > 1 else path.stem
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"^\s*from lorakit(?:\.(\w+))?(?:\.\w+)* import ([\w, ]+)", text, re.M):
            target = match.group(1) or match.group(2).split(",")[0].split(" as ")[0].strip()
            if target == source or target in SHARED:
                continue
            if source in SHARED and source != "__main__":
                wrong.append(f"{path.name} (shared) imports lorakit.{target}")
            elif source in ALLOWED and target not in ALLOWED[source]:
                wrong.append(f"lorakit/{'/'.join(parts)} imports lorakit.{target}")
    assert not wrong, "imports against the README's order:\n" + "\n".join(wrong)


def test_the_readmes_cpu_4bit_opt_out_names_the_attribute_bitsandbytes_reads():
    """The README's one-line opt-out (use the adapter anywhere) must name what bitsandbytes' Linear4bit reads
    before repacking on AVX512-BF16 CPUs, and what lorakit's own workaround sets."""
    import inspect

    import bitsandbytes as bnb

    from lorakit import upstream

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    attribute = "support_avx512bf16_for_cpu"
    assert f"m.{attribute} = False" in readme
    assert attribute in vars(bnb.nn.Linear4bit(8, 8))
    assert attribute in inspect.getsource(bnb.nn.Linear4bit.forward)
    assert attribute in inspect.getsource(upstream.keep_cpu_4bit_weights_exact)


def test_every_test_the_fault_table_names_exists():
    """docs/reliability.md's fault table is the walk through every fault (issue 20): each row names tests
    that exist, with their parameter where it names one."""
    import re

    text = (ROOT / "docs" / "reliability.md").read_text()
    rows = [
        line for line in text.split("## Faults and the tests that show them")[1].splitlines() if line.startswith("| ")
    ]
    named = [re.findall(r"`(test_\w+\.py)::(test_\w+)(?:\[([^\]]+)\])?`", row.rsplit("|", 2)[-2]) for row in rows[1:]]
    assert len(rows) > 25 and all(named), [r for r, n in zip(rows[1:], named) if not n]
    for file, test, param in (t for found in named for t in found):
        source = (ROOT / "tests" / file).read_text()
        assert f"def {test}(" in source, f"{file}::{test}"
        assert param is None or param == "" or f'"{param}"' in source, f"{file}::{test}[{param}]"
