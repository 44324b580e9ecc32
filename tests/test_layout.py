"""The package's layout rules (DESIGN.md): imports point down the flow, no two modules import
each other (the method registry's lazy import is the one exception), the run folder's file
names are spelled in one module, and the contributors' module table matches the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bidistill"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "internal-interfaces.md"

# Packages that may not import the packages listed (DESIGN.md's import rules).
FORBIDDEN = {
    "training": {"runs", "inference", "evaluation", "experiment", "cli"},
    "inference": {"evaluation", "experiment", "cli"},
    "models": {"runs", "inference", "evaluation", "experiment", "cli", "training", "slides"},
    "cohort": {"runs", "inference", "evaluation", "experiment", "cli", "training", "models"},
    "evaluation": {"experiment", "cli"},
    "runs": {"experiment", "cli"},
}
# The registry imports every method class, and each method module registers through it.
REGISTRY_CIRCLE = "bidistill.models.registry"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module → the modules of ours it imports anywhere (also inside functions)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bidistill"):
                targets |= {resolve(f"{node.module}.{alias.name}") for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.startswith("bidistill")}
        edges[name] = {t for t in targets if t and t not in (name, "bidistill")}
    return edges


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_two_modules_import_each_other_but_the_method_registry_and_its_methods():
    edges = _imports(_modules())
    circles = sorted(
        (a, b)
        for a in edges
        for b in edges[a]
        if a < b and a in edges.get(b, ()) and REGISTRY_CIRCLE not in (a, b)
    )
    assert circles == []


def test_imports_point_down_the_flow():
    edges = _imports(_modules())
    broken = sorted(
        f"{a} imports {b}"
        for a, targets in edges.items()
        for b in targets
        if _package(b) in FORBIDDEN.get(_package(a), ())
        or (_package(b) == "cli" and _package(a) != "cli" and a != "bidistill.__main__")
    )
    assert broken == []


def test_the_run_folders_file_names_are_spelled_only_by_its_owner():
    owner = SRC / "runs" / "rundir.py"
    names = re.findall(
        r'"([\w.]+\.(?:csv|json|safetensors|pt|html|md|log|lock|yaml))"', owner.read_text()
    )
    assert {"predictions.csv", "model.json", "splits.json", "run.json"} <= set(names)
    # A synthetic cohort or a demo writes a config.yaml of its own, which is not a run folder's.
    run_only = set(names) - {"config.yaml"}
    spelled = sorted(
        f"{path.relative_to(SRC)}: {name}"
        for path in SRC.rglob("*.py")
        if path != owner
        for name in run_only
        if f'"{name}"' in path.read_text(encoding="utf-8")
    )
    assert spelled == []


def test_the_module_table_of_the_contributors_page_matches_the_tree():
    table = DOCS.read_text(encoding="utf-8").split("## Modules", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", table, flags=re.MULTILINE))
    present = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name not in ("__init__.py",)}
    assert sorted(present - listed) == [], "modules missing from the table"
    assert sorted(listed - present) == [], "the table lists modules that do not exist"
