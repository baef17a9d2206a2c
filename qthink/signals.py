"""SIGTERM handled like Ctrl-C: raised as an exception where Ctrl-C raises `KeyboardInterrupt`, so every cleanup
that runs for Ctrl-C (temporary files removed, manifests marked stopped, Lightning's graceful shutdown) runs for
it too, and the command exits with status 143 (128 + 15, what a shell reports for a process SIGTERM killed)
instead of 0 or a death without cleanup."""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A `KeyboardInterrupt`, so code that cleans up after Ctrl-C cleans up after it too."""


def raise_terminated(signum: int, frame) -> None:
    # While a Lightning Trainer runs, its `_SignalConnector` installs its own SIGTERM handler, which sets
    # `trainer.received_sigterm` and then calls the handler it replaced (this one): the loop then stops at the
    # end of the current step (`SIGTERMException`), where the run can be checkpointed, so nothing is raised here.
    if signal.getsignal(signal.SIGTERM) is raise_terminated:
        raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` inside this block (main thread only: Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
