"""`python -m bidistill` runs the command line."""

from bidistill.cli import app

app(prog_name="bidistill")
