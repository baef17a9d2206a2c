"""Writing files safely: whole or not at all, and output folders checked before long work."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qthink.errors import UserError, require


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, flush it to disk, then rename: readers never see half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def local_ref(path_or_id: str | Path | None) -> str | None:
    """A model or data reference as manifests record it: an existing local path made absolute (so the
    manifest reads the same from any working folder), anything else (a hub id) as given."""
    if path_or_id is None:
        return None
    path = Path(path_or_id)
    return str(path.resolve()) if path.exists() else str(path_or_id)


def writable_dir(path: str | Path, flag: str) -> Path:
    """`path` as a folder this process can write into (created if missing); one line naming `flag` if not."""
    path = Path(path)
    require(not path.exists() or path.is_dir(), f"{flag} {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create it ({e.strerror}); choose another folder") from e
    require(os.access(path, os.W_OK | os.X_OK), f"{flag} {path} is not writable; choose another folder")
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
