"""Who owns an output folder, and one writer per folder at a time.

Every output folder a command creates holds `.qthink-output.json`, naming the kind of command that wrote
it and the files it wrote there. `claim(folder, kind, flag)` lets a command into a folder only when it is
new, empty, already marked as this kind's, or an output of this kind made before markers existed
(recognised by its files, `LEGACY`, and adopted whole); `Output.take(name)` lets it write `folder/name`
only when that name is new or its own. Anything else is one line (`UserError`) before anything is written.

`claim` also holds an exclusive `fcntl.flock` on `folder/.qthink-lock` for the whole run; the lock file
names its holder, so a second run is refused naming the holder's pid and command. The kernel drops the
lock when its process ends (even by kill -9), so a dead holder's lock is simply taken over. Checkpoint
folders, which are replaced whole by a rename, are locked beside themselves (`lock_beside`).
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qthink.errors import UserError, require
from qthink.files import atomic_write_text, read_json, writable_dir

MARKER = ".qthink-output.json"
LOCK = ".qthink-lock"
FORMAT = "qthink-output-v1"
OURS = (MARKER, LOCK)  # never counted as the folder's content

_held: dict[Path, Output] = {}  # lock file -> the claim this process holds (claims nest, flock does not)


def _names(folder: Path) -> set[str]:
    """The folder's content: everything but the lock and the marker (and the marker's temporary name, seen
    while a holder is writing it)."""
    return {p.name for p in folder.iterdir() if p.name not in OURS and not p.name.startswith(f".{MARKER}.")} \
        if folder.is_dir() else set()


def _only(names: set[str], patterns: tuple[str, ...]) -> bool:
    return all(any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names)


def _manifest(folder: Path) -> dict:
    try:
        data = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _legacy_rollouts(folder: Path, names: set[str]) -> bool:
    return (_only(names, ("manifest.json", "rollouts.jsonl", "rollouts.rank-*.jsonl", ".*.tmp"))
            and ("rollouts.jsonl" in names or any(n.startswith("rollouts.rank-") for n in names)
                 or _manifest(folder).get("format") == "qthink-rollouts-v1"))


def _legacy_teachers(folder: Path, names: set[str]) -> bool:
    return (_only(names, ("manifest.json", "progress.json", "progress-rank*.json", "shard-*.safetensors", ".*.tmp"))
            and ("progress.json" in names or any(n.startswith("shard-") for n in names) or "shards" in _manifest(folder)))


def _legacy_eval(folder: Path, names: set[str]) -> bool:
    return all(n == "comparison.md" or (folder / n).is_dir() and _names(folder / n) <= {"predictions.jsonl", "summary.json"}
               and _names(folder / n) for n in names)


# Outputs made before markers existed, recognised by their files (an output of another kind, a model or a
# user's folder is not recognised, so it is refused)
LEGACY: dict[str, Callable[[Path, set[str]], bool]] = {
    "rollouts": _legacy_rollouts,
    "teachers": _legacy_teachers,
    "fit": lambda folder, names: "config.yaml" in names or "checkpoints" in names,
    "eval": _legacy_eval,
    "demo": lambda folder, names: "stages.json" in names,
}


def plain_name(name: str, what: str) -> str:
    """`name` as one file name inside an output folder: no separator, `..`, absolute path or qthink's own names."""
    require(bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name
            and not name.startswith(".qthink"), f"{what} {name!r} must be a plain name (no '/', '..' or leading "
            "'.qthink'): what a command writes stays inside its output folder")
    return name


class Output:
    """An output folder this process holds: its kind and the names written there by that kind."""

    def __init__(self, folder: Path, kind: str, flag: str, owned: set[str], persist: bool = True):
        self.folder, self.kind, self.flag, self.owned = folder, kind, flag, owned
        self.persist = persist  # whether `take` records a name on disk at once (before it is written)
        self.saved = False  # whether `take` has rewritten the marker

    def save(self) -> None:
        atomic_write_text(self.folder / MARKER, json.dumps(
            {"format": FORMAT, "command": self.kind, "files": sorted(self.owned)}, indent=2) + "\n")

    def take(self, *names: str, what: str = "output name") -> list[Path]:
        """`folder/name` for each name, recorded as this kind's before anything is written there; a name
        that exists and was not written by this kind of command is refused, as is a symbolic link."""
        paths = []
        for name in names:
            path = self.folder / plain_name(name, what)
            require(not path.is_symlink(), f"{path} is a symbolic link; nothing was written: remove it or choose "
                    f"another {self.flag}")
            require(name in self.owned or not path.exists(), f"{path} exists and was not written by `qthink "
                    f"{self.kind}`; nothing was written: move it away or choose another {self.flag}")
            paths.append(path)
        if not set(names) <= self.owned:
            self.owned |= set(names)
            if self.persist:
                self.save()
                self.saved = True
        return paths


def recorded(folder: Path, kind: str, flag: str) -> set[str]:
    """The names in `folder` that `kind` wrote (empty for a new or empty folder); a folder of another kind
    or with files no `kind` run wrote is refused."""
    names = _names(folder)
    if (folder / MARKER).is_file():
        data = read_json(folder / MARKER, f"delete it only if {folder} holds nothing else, or choose another {flag}")
        wrote = data.get("command") if isinstance(data, dict) else None
        require(wrote == kind, f"{folder} was written by `qthink {wrote}`, not `qthink {kind}`; nothing was "
                f"written: choose another {flag}")
        return {n for n in data.get("files", []) if isinstance(n, str)}
    require(not names or LEGACY[kind](folder, names), f"{folder} holds files `qthink {kind}` did not write "
            f"({', '.join(sorted(names)[:3])}); nothing was written: choose a new or empty {flag}")
    return names  # an output of this kind from before markers existed, adopted whole


def holder(lock: Path) -> str:
    """Who holds `lock`, as its file records it."""
    try:
        data = json.loads(lock.read_text())
        return f"pid {data['pid']} on {data['host']} (`{data['command']}`)"
    except (OSError, ValueError, KeyError, TypeError):  # being written this instant
        return "another process"


@contextmanager
def _locked(lock: Path, where: Path, flag: str, command: str) -> Iterator[None]:
    """Hold an exclusive flock on `lock` (created, with its folders); a second holder is one line naming the
    first. The lock file is removed on the way out, and so are the folders created for it if still empty."""
    created = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{where} is being written by {holder(lock)}; wait for it to finish or choose another "
                            f"{flag}") from None
        try:  # the holder before us removed the file between our open and our lock: lock the one there now
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command}).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)  # still held, so the next run's inode check sees it go
        for folder in created:  # innermost first: what this run created and left empty goes
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        os.close(fd)


@contextmanager
def claim(folder: str | Path, kind: str, flag: str) -> Iterator[Output]:
    """Hold `folder` as `kind`'s output for the duration (see the module docstring); nested claims of one
    folder in one process share the first. The names written meanwhile are recorded in the marker; a run
    refused before writing anything leaves the folder as it found it."""
    folder = writable_dir(folder, flag)
    lock = folder.resolve() / LOCK
    held = _held.get(lock)
    if held is not None:
        require(held.kind == kind, f"{folder} is this run's `qthink {held.kind}` output; choose another {flag}")
        yield held
        return
    recorded(folder, kind, flag)  # refused before anything is created
    had_marker = (folder / MARKER).is_file()
    with _locked(lock, folder, flag, f"qthink {kind}"):
        original = recorded(folder, kind, flag)  # again, under the lock
        before = _names(folder)
        # a new or empty folder is marked from the start (a run killed later leaves it marked); an output
        # from before markers is adopted only once a run into it has written or finished
        out = Output(folder, kind, flag, set(original), persist=had_marker or not before)
        if not before:
            out.save()
        _held[lock] = out
        finished = False
        try:
            yield out
            finished = True
        finally:
            del _held[lock]
            now = _names(folder)
            out.owned = original | (out.owned & now) | (now - before)  # names taken but never written are dropped
            if not now and not had_marker:  # nothing written into a new or empty folder: left as it was found
                (folder / MARKER).unlink(missing_ok=True)
            elif finished or out.owned != original or out.saved:
                out.save()


@contextmanager
def lock_beside(dest: str | Path, flag: str, kind: str = "checkpoint") -> Iterator[None]:
    """Hold the lock of a folder that is replaced whole by a rename (a checkpoint): `.<name>.qthink-lock`
    beside it, which the rename cannot carry away. Nested calls in one process share the first."""
    dest = Path(dest).resolve()
    lock = dest.parent / f".{dest.name}{LOCK}"
    if lock in _held:
        yield
        return
    with _locked(lock, dest, flag, f"qthink {kind}"):
        _held[lock] = Output(dest, kind, flag, set())
        try:
            yield
        finally:
            del _held[lock]


def write_marker(folder: Path, kind: str) -> None:
    """Mark a folder about to be renamed into place (a checkpoint) as `kind`'s, listing all its files."""
    Output(folder, kind, "", _names(folder)).save()
