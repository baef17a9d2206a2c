"""`python -m qthink` is the `qthink` command."""

from qthink.cli import run

run()
