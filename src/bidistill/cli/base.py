"""The app, its error handling, and the helpers every command shares."""

from __future__ import annotations

import contextlib
import errno
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from bidistill._cli_help import HelpGroup
from bidistill.errors import BidistillError, ConfigError

console = Console(stderr=True)


# What a shell reports for a program whose reader went away (128 + SIGPIPE), as `cat` does.
CLOSED_PIPE_EXIT = 141


class _HandledGroup(HelpGroup):
    """The root command group: turns every exception of a command into one clear message."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, **kwargs)
        except SystemExit as stop:
            # click and rich end quietly when the reader of the output closed it early
            # (`bidistill ... | head`), with status 1; the shell's convention is 141.
            if _closed_pipe(stop.__context__):
                raise SystemExit(CLOSED_PIPE_EXIT) from None
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BidistillError as err:
            print_error(str(err))
        except KeyboardInterrupt:
            print_error("interrupted; run the same command again to resume")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            raise  # the reader closed the output early: click ends quietly
        except Exception as err:
            if type(err).__module__.split(".")[0] in ("typer", "click"):
                raise  # exits, usage errors and --help: typer prints them itself
            log_path = _write_traceback(err)  # keep the traceback, but in a file
            print_error(_describe_unexpected(err, log_path))
        raise typer.Exit(1)


# The machine's doing, not a bug: a full disk, a read-only or forbidden folder, no memory.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _closed_pipe(err: BaseException | None) -> bool:
    return isinstance(err, OSError) and err.errno == errno.EPIPE


def _describe_unexpected(err: Exception, log_path: Path) -> str:
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
        where = f"{err.filename}: " if err.filename else ""
        return (
            f"{where}{err.strerror}; free space or fix the folder's permissions, then run the "
            f"same command again to resume (details in {log_path})"
        )
    if isinstance(err, MemoryError):
        return (
            "out of memory; close other programs, or set training.in_memory: no, then run the "
            f"same command again to resume (details in {log_path})"
        )
    return (
        f"unexpected {type(err).__name__}: {err}. This is a bug in bidistill; the traceback is "
        f"in {log_path} (please attach it to a bug report)"
    )


def print_error(message: str) -> None:
    from rich.text import Text

    console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)


def _write_traceback(err: BaseException) -> Path:
    """Where the traceback is: the stage's own log when the stage logged it there and said so
    (``err.log_path``), else a new file in the temporary folder, written here."""
    log_path = getattr(err, "log_path", None)
    if log_path is not None and Path(log_path).is_file():
        return Path(log_path)
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fd, name = tempfile.mkstemp(prefix=f"bidistill-error-{stamp}-", suffix=".log")
    with open(fd, "w", encoding="utf-8") as log_file:
        log_file.write(f"bidistill {' '.join(sys.argv[1:])}\n{text}")
    return Path(name)


app = typer.Typer(
    cls=_HandledGroup,
    name="bidistill",
    help="Whole-slide image + clinical models that keep working when clinical data is missing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
synth_app = typer.Typer(
    cls=HelpGroup, help="Make synthetic cohorts for tests, demos and benchmarks."
)
bcnb_app = typer.Typer(
    cls=HelpGroup, help="The BCNB breast-cancer cohort (axillary lymph node metastasis)."
)
app.add_typer(synth_app, name="synth")
app.add_typer(bcnb_app, name="bcnb")


def _version(value: bool) -> None:
    if value:
        from bidistill import __version__

        typer.echo(f"bidistill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Whole-slide image + clinical models that keep working when clinical data is missing.

    Start with `bidistill init --synthetic -o first/exp.yaml`, or `bidistill demo`.
    """


def fail(message: str) -> NoReturn:
    """Stop a command with one error line (for checks made in the CLI itself)."""
    print_error(message)
    raise typer.Exit(code=1)


def load_experiment(config_path: Path):
    from bidistill.config import load_config

    return load_config(config_path)


def shell_arg(path: Path | str) -> str:
    """A path as the user would type it in a shell (quoted when it needs to be)."""
    import shlex

    return shlex.quote(str(path))


def say_next(command: str) -> None:
    """The last line of a command: what to run next, never wrapped, so it can be pasted."""
    from rich.text import Text

    console.print(Text.assemble(("next: ", "bold green"), command), soft_wrap=True, highlight=False)


def say(message: str) -> None:
    console.print(message, soft_wrap=True, highlight=False, markup=False)


@contextlib.contextmanager
def warnings_shown(*, python_warnings: bool = False) -> Iterator[None]:
    """Show the package's warnings as `warning:` lines while a command runs, each once (a stage
    that loads the cohort again must not repeat it); without it they would go only to the run's
    ``run.log``. ``python_warnings``: Python's warnings too, after the command's work."""
    import logging
    import warnings

    from rich.text import Text

    shown: set[str] = set()

    def show(message: str) -> None:
        if message not in shown:
            shown.add(message)
            line = Text.assemble(("warning: ", "bold yellow"), message)
            console.print(line, soft_wrap=True, highlight=False)

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            show(record.getMessage())

    handler, package_log = Lines(logging.WARNING), logging.getLogger("bidistill")
    old_level = package_log.level
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    caught: list = []
    try:
        with contextlib.ExitStack() as stack:
            if python_warnings:
                caught = stack.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
            yield
        for warning in caught:
            show(str(warning.message))
    finally:
        package_log.removeHandler(handler)
        package_log.setLevel(old_level)


def default_run_dir(config: Path, loaded=None) -> Path:
    """``runs/<the config's name>`` (its file name when the name has unusual characters)."""
    import re

    name = (loaded or load_experiment(config)).name
    return Path("runs") / (name if re.fullmatch(r"[\w.+-]+", name) else config.stem)


def free_run_dir(config: Path, loaded=None) -> Path:
    """The run folder that `next: bidistill run` hints name: ``default_run_dir``, unless another
    config file made it (`run` would refuse it): then a folder named after this file."""
    from bidistill.experiment.checks import check_config_origin

    run_dir = default_run_dir(config, loaded)
    try:
        check_config_origin(run_dir, config)
    except ConfigError:
        return run_dir.parent / config.stem
    return run_dir
