"""The `bidistill` command line: thin wrappers that parse, validate and call one stage each.

Heavy imports (torch, openslide, pandas) happen inside the commands so that `--help` stays fast.
Errors are handled once, at the top (``base._HandledGroup``): commands just raise.
"""

from bidistill.cli.base import app

# Importing a module registers its commands; the order is the order `--help` lists them in.
# isort: off
from bidistill.cli import setup, stages, inference  # noqa: F401, E402
# isort: on

__all__ = ["app"]
