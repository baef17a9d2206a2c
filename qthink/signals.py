"""SIGTERM handled like Ctrl-C: raised as an exception where Ctrl-C raises `KeyboardInterrupt`, so every cleanup
that runs for Ctrl-C (temporary files removed, manifests marked stopped, Lightning's graceful shutdown) runs for
it too, and the command exits with status 143 (128 + 15, what a shell reports for a process SIGTERM killed)
instead of 0 or a death without cleanup. Ctrl-C is also recorded, so that one a library swallowed (Python raises
it wherever the main thread is, a finaliser included, where it is printed and dropped) can be raised again at
the next safe point (`interrupt_pending`). After either, the process's own exit is bounded (`exit_within`)."""

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM
# How long the interpreter's shutdown may take after an interrupted command has cleaned up and returned. It takes
# well under a second; once, in a loaded test suite, it did not end within 120 s (cause not found: see exit_within).
EXIT_GRACE_S = 30.0


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A `KeyboardInterrupt`, so code that cleans up after Ctrl-C cleans up after it too."""


def raise_terminated(signum: int, frame) -> None:
    # While a Lightning Trainer runs, its `_SignalConnector` installs its own SIGTERM handler, which sets
    # `trainer.received_sigterm` and then calls the handler it replaced (this one): the loop then stops at the
    # end of the current step (`SIGTERMException`), where the run can be checkpointed, so nothing is raised here.
    if signal.getsignal(signal.SIGTERM) is raise_terminated:
        raise Terminated


@contextmanager
def handler_installed(signum: int, handler, only_over=None) -> Iterator[None]:
    """`handler` for `signum` inside this block, the previous one restored after it. Main thread only (Python
    delivers signals there); with `only_over`, only where that is the handler in place."""
    if threading.current_thread() is not threading.main_thread() or (
            only_over is not None and signal.getsignal(signum) is not only_over):
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def sigterm_as_interrupt():
    """SIGTERM raises `Terminated` inside this block."""
    return handler_installed(signal.SIGTERM, raise_terminated)


_interrupted = threading.Event()  # set by the first Ctrl-C inside `sigint_recorded`


def raise_interrupt(signum: int, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def interrupt_pending() -> bool:
    """Ctrl-C arrived (inside `sigint_recorded`). A loop that is still running after it lost the
    `KeyboardInterrupt` and should raise one."""
    return _interrupted.is_set()


def sigint_recorded():
    """Ctrl-C raises `KeyboardInterrupt` as usual and is recorded for `interrupt_pending`. Only where Ctrl-C
    has Python's default handler: a process started with SIGINT ignored (a `&` job of a script) keeps it so."""
    _interrupted.clear()
    return handler_installed(signal.SIGINT, raise_interrupt, only_over=signal.default_int_handler)


def exit_within(code: int, seconds: float = EXIT_GRACE_S) -> None:
    """Exit with `code` if the interpreter's shutdown has not ended the process within `seconds`.

    Armed once an interrupted command has returned (its cleanup done, Lightning's graceful shutdown run), so one
    Ctrl-C or SIGTERM always ends the process: shutdown joins every non-daemon thread and runs atexit handlers,
    and a thread some library left running, or a lock an interrupt left held, would otherwise keep it alive. A
    daemon thread, so it runs while shutdown waits on either; it cannot cut a wait in the finalisation after them.
    """

    def cut_short() -> None:
        time.sleep(seconds)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: nothing left to save
                pass
        os._exit(code)

    threading.Thread(target=cut_short, name="qthink-exit-within", daemon=True).start()
