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
