"""How ``--help`` looks: conventional metavars (``CONFIG``, ``--out DIR``, flags bare) instead of
typer's ``{config}``/``<path>``, and each docstring paragraph joined into one line (typer keeps
the source's line breaks, which break mid-sentence at any other width); ``Example:`` lines and
list items stay on their own.
"""

from __future__ import annotations

import re
from typing import Any

import typer.core

# typer's type label -> the conventional metavar.
_METAVARS = {
    "int": "INTEGER",
    "int range": "INTEGER",
    "float": "NUMBER",
    "float range": "NUMBER",
    "path": "PATH",
    "str": "TEXT",
}


def unwrap_paragraphs(text: str | None) -> str | None:
    if not text:
        return text
    import inspect

    joined = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        out: list[str] = []
        for line in (line.strip() for line in paragraph.splitlines()):
            if out and not re.match(r"(Example|Examples):|[-*] ", line):
                out[-1] = f"{out[-1]} {line}"
            else:
                out.append(line)
        joined.append("\n".join(out))
    return "\n\n".join(joined)


def _plain_argument_name(param: typer.core.TyperArgument) -> str:
    name = param.metavar or (param.name or "").upper()
    if param.nargs != 1:
        name += "..."
    return name if param.required else f"[{name}]"


def _tidy(param: Any, ctx: Any) -> None:
    """Give ``param`` a conventional metavar (once; the objects are reused between calls)."""
    if getattr(param, "_bidistill_tidy", False):
        return
    param._bidistill_tidy = True  # type: ignore[attr-defined]
    # typer vendors its own click, so the checks name typer's classes.
    if isinstance(param, typer.core.TyperOption):
        if param.is_flag or param.count:
            param.metavar = ""
        elif param.metavar is None:
            label = param.display_type(ctx).strip("<>")
            param.metavar = _METAVARS.get(label, label.upper())
    elif isinstance(param, typer.core.TyperArgument):
        name = _plain_argument_name(param)
        # The type column repeats what the name says; the usage line drops typer's braces.
        param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
        param.get_usage_pieces = lambda ctx: [name]  # type: ignore[method-assign]
        if param.metavar is None:
            param.metavar = (param.name or "").upper()


class _PlainHelp:
    """Mixed into typer's command and group classes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help = unwrap_paragraphs(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            _tidy(param, ctx)
        return params


class HelpCommand(_PlainHelp, typer.core.TyperCommand):
    pass


class HelpGroup(_PlainHelp, typer.core.TyperGroup):
    pass
