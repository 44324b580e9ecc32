"""The `bidistill` command line: thin wrappers that parse, validate and call one stage each.

``base`` holds the app, the error handling and the helpers every command shares; ``setup``
(init, config, synth, bcnb), ``stages`` (tile, extract, encoders, train, run, evaluate, demo,
compare) and ``inference`` (predict, heatmap) register their commands on it when imported.

Heavy imports (torch, openslide, pandas) happen inside the commands so that `--help` stays fast.
Every command ends by printing the next command to run (``say_next``), on stderr and never wrapped
mid-command, so that it can be pasted.

Errors are handled once, at the top (``base._HandledGroup``): our own errors (bad config, bad table,
bad file: ``BidistillError``) print as one line and exit 1; anything else is a bug, printed as a
short message that names the log file holding its traceback, and also exits 1. Output piped
into a reader that closes early (`| head`) ends quietly with status 141. Commands therefore
just raise.
"""

from bidistill.cli.base import app

# Importing a module registers its commands; the order is the order `--help` lists them in.
# isort: off
from bidistill.cli import setup, stages, inference  # noqa: F401, E402
# isort: on

__all__ = ["app"]
