"""Writing files safely: whole or not at all, and output folders checked before long work."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from qthink.errors import UserError, require


def atomic_save(path: Path, save: Callable[[Path], object]) -> None:
    """Call `save(temporary path)` beside `path`, flush the file to disk, then rename: readers never see half a
    file; an error or Ctrl-C removes the temporary file (`temp_path`), and what a kill -9 leaves carries its
    owner, so only `remove_stale_temp_files` (its process has ended) ever deletes it. For writers that take a
    file name (safetensors' `save_file`); `atomic_write` for those that write to an open file."""
    tmp = temp_path(path)
    try:
        save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a quota or Ctrl-C mid-write: no cut temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[IO], object], binary: bool = False) -> None:
    """Call `write(file)` on a file written whole or not at all (`atomic_save`)."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write(f)

    atomic_save(path, save)


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


def json_line(where: str, line: str, fix: str) -> Any:
    """The JSON value on one line of a JSON lines file; not JSON: one line naming `where` (file and line) and
    what to do (`fix`)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); {fix}") from e


def jsonl_values(path: Path | str, text: str, fix: str) -> list[tuple[str, Any]]:
    """(`"PATH line N"`, value) for each non-blank line of `text`, the JSON lines file `path` (`json_line`)."""
    return [(f"{path} line {n}", json_line(f"{path} line {n}", line, fix))
            for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def require_same_settings(path: Path, have: dict, want: dict, what: str, unrecorded: dict | None = None) -> None:
    """A rerun into an existing output must use the settings recorded in `path` (`have`); keys missing there
    count as `unrecorded`'s value (what runs before the key existed used)."""
    unrecorded = unrecorded or {}
    for key, value in want.items():
        used = have.get(key, unrecorded.get(key))
        require(used == value, f"{path}: this run's {key} is {value!r} but the existing {what} used {used!r}; "
                f"rerun with the same {key} or choose another --out")


TEMP_MARK = "qthink-tmp"  # in the names of temporary files and folders, followed by their owner


def owner_tag() -> str:
    """`<host>-<pid>-<random>`: whose temporary file or folder this is (a pid alone is reused across hosts)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def temp_path(path: Path) -> Path:
    """The temporary name `path` is written under before its rename: `.<name>.qthink-tmp-<owner>.tmp`."""
    return path.with_name(f".{path.name}.{TEMP_MARK}-{owner_tag()}.tmp")


def temp_dir_beside(dest: Path) -> Path:
    """A new temporary folder beside `dest` (to be renamed into place), named
    `.<dest name>.qthink-tmp-<host>-<pid>-<random>`. Such folders left by a process of this host that is no
    longer running (killed with -9 mid-write) are removed first; nothing else is ever touched."""
    remove_stale_temp_dirs(dest)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.{TEMP_MARK}-{socket.gethostname()}-{os.getpid()}-",
                                 dir=dest.parent))


def _stale_temps(folder: Path, name: str, suffix: str) -> list[Path]:
    """Entries of `folder` named like a temporary of `name` (any name for `.+`) made by a process of this
    host that has ended."""
    pattern = re.compile(rf"\.{name}\.{TEMP_MARK}-{re.escape(socket.gethostname())}-(\d+)-[a-z0-9_]{{8}}{suffix}")
    found = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = pattern.fullmatch(entry.name)
        if match and not entry.is_symlink() and not process_alive(int(match.group(1))):
            found.append(entry)
    return found


def remove_stale_temp_dirs(dest: Path) -> list[Path]:
    """Remove the temporary folders `temp_dir_beside(dest)` made in processes of this host that have ended."""
    removed = [entry for entry in _stale_temps(dest.parent, re.escape(dest.name), "") if entry.is_dir()]
    for entry in removed:
        shutil.rmtree(entry)
    return removed


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files (`temp_path`) in `folder` of processes of this host that have ended;
    another process's, a live one's or a user's `.tmp` file is never touched."""
    removed = [entry for entry in _stale_temps(folder, ".+", r"\.tmp") if entry.is_file()]
    for entry in removed:
        entry.unlink()
    return removed


@contextlib.contextmanager
def unfinished(outputs: list[tuple[Path, dict]], write: Callable[[Path, dict], None]) -> Iterator[None]:
    """Inside: each output's manifest (`write(folder, manifest)`) says `complete: false` and names this process
    as its writer (pid, host); the writer rewrites it with `complete: true` at the very end. On an error,
    Ctrl-C or SIGTERM it is rewritten without the writer, so the next stage says where it stopped (a kill -9
    leaves the pid of a process that has ended, which reads the same)."""
    writer = {"pid": os.getpid(), "host": socket.gethostname()}
    for folder, manifest in outputs:
        write(folder, {**manifest, "complete": False, "writer": writer})
    try:
        yield
    except BaseException:
        for folder, manifest in outputs:
            with contextlib.suppress(OSError):  # a full disk: the original error matters more
                write(folder, {**manifest, "complete": False, "writer": None})
        raise


def require_finished(manifest: dict, what: str, progress: Callable[[], str], rerun: str) -> None:
    """Refuse an unfinished output, in one line: "`what`: still being written by pid N" while its writer runs,
    "`what`: stopped at `progress()`; `rerun` to finish" otherwise. A manifest without `complete` was written
    before qthink recorded completion and is read as finished, as it was then."""
    if manifest.get("complete", True) is True:
        return
    writer = manifest.get("writer") if isinstance(manifest.get("writer"), dict) else {}
    pid, host = writer.get("pid"), writer.get("host")
    if type(pid) is int and host == socket.gethostname() and process_alive(pid):
        raise UserError(f"{what}: still being written by pid {pid}; wait for it to finish")
    if type(pid) is int and isinstance(host, str) and host != socket.gethostname():  # cannot be asked from here
        raise UserError(f"{what}: being written by pid {pid} on {host}, or stopped there at {progress()}; wait for "
                        f"it, or {rerun} to finish")
    raise UserError(f"{what}: stopped at {progress()}; {rerun} to finish")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
