"""No message, help text or document names a `bidistill` command that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from typer.testing import CliRunner

from bidistill.cli import app

ROOT = Path(__file__).resolve().parents[1]
# A command as code and docs quote it: `bidistill x`, "next: bidistill x", "Example: bidistill x",
# or a line of a shell block that starts with it.
QUOTED = re.compile(
    r"(?:`|next: |then |Example: |^\s*|\(|-m )bidistill ([a-z][\w-]*)(?: ([a-z][\w-]*))?",
    re.MULTILINE,
)


def _commands() -> dict[str, set[str] | None]:
    """Command name → its subcommands (None for a plain command)."""
    click_app = typer.main.get_command(app)
    return {
        name: set(command.commands) if hasattr(command, "commands") else None
        for name, command in click_app.commands.items()
    }


def _texts() -> list[tuple[Path, str]]:
    files = [*ROOT.glob("src/bidistill/**/*.py"), *ROOT.glob("src/bidistill/**/*.yaml")]
    files += [ROOT / "README.md", *ROOT.glob("docs/*.md"), ROOT / "Makefile"]
    return [(path, path.read_text(encoding="utf-8")) for path in files if path.is_file()]


def test_every_quoted_command_exists():
    commands = _commands()
    wrong = []
    for path, text in _texts():
        for match in QUOTED.finditer(text):
            name, sub = match.group(1), match.group(2)
            if name not in commands:
                wrong.append(f"{path.relative_to(ROOT)}: bidistill {name}")
            elif commands[name] is not None and sub not in commands[name]:
                wrong.append(f"{path.relative_to(ROOT)}: bidistill {name} {sub}")
    assert not wrong, wrong
    assert {"tile", "extract", "encoders", "run"} <= set(commands)


def test_encoders_lists_the_registry():
    result = CliRunner().invoke(app, ["encoders"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for name in ("resnet50-trunc", "vgg16-bn", "uni2-h", "virchow2", "h-optimus-1", "phikon-v2"):
        assert name in result.output
    assert "hf-hub:prov-gigapath/prov-gigapath" in result.output
    output = " ".join(result.output.split())
    assert "set features.encoder" in output and "next: bidistill extract CONFIG" in output
