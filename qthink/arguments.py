"""Command-line pieces shared by several subcommands; the library side of the CLI (nothing here imports
`qthink.cli`)."""

from __future__ import annotations

import argparse

from qthink.core.latent import DECODE_MODES
from qthink.errors import UserError, require


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, bad choice, missing argument) are a `UserError`: one line
    and exit status 2 like every other bad input, instead of a usage block. `--help` is unchanged."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def add_decode_mode_argument(p: argparse.ArgumentParser) -> None:
    """`--decode-mode`, shared by generate, eval and rollouts (the modes are `qthink.core.latent.DECODE_MODES`)."""
    p.add_argument("--decode-mode", default="dynamic", choices=DECODE_MODES,
                   help="dynamic (default) | static (fixed-shape StaticCache) | compiled (static + torch.compile, "
                        "CUDA graphs on CUDA; the first batch of each shape compiles, ~30 s or more)")


def parse_decode_modes(text: str) -> tuple[str, ...]:
    """`--decode-modes`: a comma-separated subset of `qthink.core.latent.DECODE_MODES`, in the order given."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    require(bool(modes) and set(modes) <= set(DECODE_MODES),
            f"--decode-modes: {text!r} is not a comma-separated subset of {','.join(DECODE_MODES)}")
    return modes


def require_positive(flags: dict[str, int | float | None]) -> None:
    """Counts and budgets given on the command line must be > 0; checked before any model loads."""
    for flag, value in flags.items():
        require(value is None or value > 0, f"{flag} must be > 0 (got {value})")
