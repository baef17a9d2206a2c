"""User-facing errors: one line that names the file, record or setting and says what to do.

`qthink.cli.main` catches `UserError` and prints `qthink: error: <message>` with exit status 2 and no
traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (file, record, flag or config), not a bug in qthink."""


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds."""
    if not condition:
        raise UserError(message)
