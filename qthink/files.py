"""Writing files safely: whole or not at all, and output folders checked before long work."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from qthink.errors import UserError, require


def atomic_write(path: Path, write: Callable[[IO], object], binary: bool = False) -> None:
    """Call `write(file)` on a temporary name beside `path`, flush it to disk, then rename: readers never see
    half a file; an error or Ctrl-C removes the temporary `.<name>.tmp`, and a kill -9 leaves at most that
    (overwritten by the next write)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a quota or Ctrl-C mid-write: no cut temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`text` written whole or not at all (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks (a 3.4 GB model takes seconds, not memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def local_ref(path_or_id: str | Path | None) -> str | None:
    """A model or data reference as manifests record it: an existing local path made absolute (so the
    manifest reads the same from any working folder), anything else (a hub id) as given."""
    if path_or_id is None:
        return None
    path = Path(path_or_id)
    return str(path.resolve()) if path.exists() else str(path_or_id)


def writable_dir(path: str | Path, flag: str) -> Path:
    """`path` as a folder this process can write into, or create; one line naming `flag` if not. Nothing is
    created here, so a command refused after this check leaves no empty folder behind."""
    path = Path(path)
    require(not path.exists() or path.is_dir(), f"{flag} {path} is a file; give a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    require(existing.is_dir(), f"{flag} {path} cannot be created: {existing} is a file; choose another folder")
    require(os.access(existing, os.W_OK | os.X_OK), f"{flag} {path} is not writable; choose another folder"
            if existing == path else f"{flag} {path} cannot be created: {existing} is not writable; choose another folder")
    return path


def read_json(path: Path, fix: str) -> dict:
    """A JSON file written by a previous run; one line saying what to do (`fix`) when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}); {fix}") from e


def require_same_settings(path: Path, have: dict, want: dict, what: str, unrecorded: dict | None = None) -> None:
    """A rerun into an existing output must use the settings recorded in `path` (`have`); keys missing there
    count as `unrecorded`'s value (what runs before the key existed used)."""
    unrecorded = unrecorded or {}
    for key, value in want.items():
        used = have.get(key, unrecorded.get(key))
        require(used == value, f"{path}: this run's {key} is {value!r} but the existing {what} used {used!r}; "
                f"rerun with the same {key} or choose another --out")


TEMP_MARK = "qthink-tmp"  # in the names of temporary folders that `temp_dir_beside` makes


def temp_dir_beside(dest: Path) -> Path:
    """A new temporary folder beside `dest` (to be renamed into place), named
    `.<dest name>.qthink-tmp-<host>-<pid>-<random>`. Such folders left by a process of this host that is no
    longer running (killed with -9 mid-write) are removed first; nothing else is ever touched."""
    remove_stale_temp_dirs(dest)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.{TEMP_MARK}-{socket.gethostname()}-{os.getpid()}-",
                                 dir=dest.parent))


def remove_stale_temp_dirs(dest: Path) -> list[Path]:
    """Remove the temporary folders `temp_dir_beside(dest)` made in processes of this host that have ended."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.{TEMP_MARK}-{re.escape(socket.gethostname())}-(\d+)-[a-z0-9_]{{8}}")
    removed = []
    for entry in dest.parent.iterdir() if dest.parent.is_dir() else ():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not process_alive(int(match.group(1))):
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
