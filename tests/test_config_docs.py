"""docs/config.md is generated from the pydantic models and documents every key."""

from __future__ import annotations

from pathlib import Path

from bidistill.config_docs import render

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_reference_is_up_to_date():
    assert DOCS.read_text(encoding="utf-8") == render(), (
        "docs/config.md is stale: regenerate it with `make docs`"
    )


def test_every_key_has_a_type_a_default_and_a_meaning():
    rows = [line for line in render().splitlines() if line.startswith("| `")]
    assert len(rows) > 60
    for row in rows:
        key, type_text, default, meaning = (cell.strip() for cell in row.strip("|").split(" | "))
        assert type_text and default and meaning, f"undocumented: {row}"


def test_every_section_and_method_is_covered():
    text = render()
    for section in ("cohort", "cohort.clinical[]", "slides", "tiling", "features", "training"):
        assert f"## `{section}`" in text
    from bidistill.models import list_methods

    for method in list_methods():
        assert f"### `{method}`" in text
