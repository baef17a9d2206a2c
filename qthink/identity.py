"""Identity by content: model folders carry checksums, and base models are known by a fingerprint.

A model folder qthink writes (`qthink tiny-base`, `init`, `export`, the demo's thinking base) gets
`qthink-checksums.json`: the sha256 of every file in it, recorded once at write time and verified every
time the folder is loaded, so a damaged or swapped file is refused naming it (instead of loading and
answering differently). The *fingerprint* of a model is the sha256 of its config, tokenizer and weight
files' hashes: rollouts, stores, Lightning checkpoints and `qthink.json` record it, and a later stage
compares it with the base it is given, so a project works wherever it is moved and a different base of
the same shape is refused. Where it comes from, cheapest first:
- a folder with `qthink-checksums.json`: the recorded value (nothing is hashed; the load verifies);
- a hub id in the local Hugging Face cache: the cache's blob names, which are the sha256 of the large
  (LFS) files, and a hash of the small ones; no network, and the same value as a local copy of the files;
- any other local folder (a downloaded model): its files are hashed, once per process (about 2 s per
  GB read).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

from qthink.errors import require
from qthink.files import atomic_write_text, read_json, sha256_file

CHECKSUMS = "qthink-checksums.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


def fingerprinted(name: str) -> bool:
    """The files that make a model what it is: config, tokenizer and weights (safetensors, torch, index)."""
    return name in ("config.json", "tokenizer.json") or name.endswith((".safetensors", ".bin", ".safetensors.index.json"))


def fingerprint_of(digests: dict[str, str]) -> str:
    """The fingerprint of a model whose files have these sha256 digests (only `fingerprinted` files count)."""
    h = hashlib.sha256()
    for name in sorted(n for n in digests if fingerprinted(n)):
        h.update(f"{name} {digests[name]}\n".encode())
    return h.hexdigest()


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every file in `folder` (and the model's fingerprint) in `qthink-checksums.json`."""
    # qthink's own markers and locks (dot files) are not the model's
    digests = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
               if p.is_file() and p.name != CHECKSUMS and not p.name.startswith(".")}
    record = {"format": 1, "fingerprint": fingerprint_of(digests), "sha256": digests}
    atomic_write_text(folder / CHECKSUMS, json.dumps(record, indent=2) + "\n")


def read_checksums(folder: Path) -> dict | None:
    """The checksum record of `folder`, None where it has none (a model qthink did not write)."""
    path = folder / CHECKSUMS
    if not path.is_file():
        return None
    record = read_json(path, "write the model again with the qthink command that made it")
    require(isinstance(record.get("sha256"), dict) and isinstance(record.get("fingerprint"), str),
            f"{path} is not a qthink checksum record; write the model again with the qthink command that made it")
    return record


def verify_checksums(folder: Path) -> None:
    """Refuse, naming the file, a model folder whose files differ from the checksums recorded when it was
    written (every listed file is read once: a 3.4 GB export takes a few seconds)."""
    record = read_checksums(folder)
    for name, digest in (record or {}).get("sha256", {}).items():
        file = folder / name
        require(file.is_file(), f"{file} is missing (listed in {folder / CHECKSUMS}); restore it or write the "
                "model again with the qthink command that made it")
        require(sha256_file(file) == digest, f"{file}: checksum mismatch (damaged or changed since qthink wrote "
                "it); restore it or write the model again with the qthink command that made it")


def model_folder(ref: str | Path) -> Path | None:
    """The folder holding a model's files: the local folder, or a hub id's snapshot in the local cache
    (never the network); None where neither is there."""
    local = Path(ref)
    if local.is_dir():
        return local
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(str(ref), "config.json")
    except Exception:  # not a valid repo id
        return None
    return Path(config).parent if isinstance(config, str) else None


def file_digest(path: Path) -> str:
    """A file's sha256; in the hub cache, a large file's blob is named by its sha256, which is taken as is."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and SHA256.fullmatch(target.name):
        return target.name
    return sha256_file(target)


@lru_cache(maxsize=16)
def _hashed_fingerprint(folder: str, stamp: tuple) -> str:
    """Keyed by the files' names, sizes and times too, so a file changed within a process is hashed anew."""
    return fingerprint_of({name: file_digest(Path(folder) / name) for name, *_ in stamp})


def fingerprint(ref: str | Path) -> str | None:
    """The fingerprint of the model `ref` (a local folder or a hub id in the local cache); None where its
    files are not here (a hub id not yet downloaded)."""
    folder = model_folder(ref)
    if folder is None:
        return None
    record = read_checksums(folder)
    if record is not None:
        return record["fingerprint"]
    files = sorted(p for p in folder.iterdir() if p.is_file() and fingerprinted(p.name))
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hashed_fingerprint(str(folder.resolve()), stamp)


def require_same_base(recorded: str | None, base: str | Path, what: str, fix: str) -> None:
    """Refuse `base` unless its fingerprint is the one `what` recorded. Nothing to compare (files written
    before fingerprints were recorded, a hub id not in the cache) passes."""
    have = fingerprint(base) if recorded is not None else None
    require(have is None or have == recorded, f"{what} was made from a different base model than {base} "
            f"(fingerprint {recorded[:12] if recorded else ''}, this one {have[:12] if have else ''}); {fix}")


def project_ref(path_or_id: str | Path | None, manifest_dir: Path) -> str | None:
    """A model or data reference as a manifest in `manifest_dir` records it: a local path inside the same
    project (under the manifest folder's parent) relative to the manifest folder (`../base`), so the
    project can move; another local path absolute; anything else (a hub id) as given."""
    if path_or_id is None:
        return None
    path = Path(path_or_id)
    if not path.exists():
        return str(path_or_id)
    target, anchor = path.resolve(), manifest_dir.resolve()
    if not target.is_relative_to(anchor.parent):
        return str(target)
    relative = os.path.relpath(target, anchor)
    return relative if relative.startswith("..") else f"./{relative}"


def resolve_ref(ref: str, manifest_dir: Path) -> str:
    """A reference from a manifest in `manifest_dir` as a usable path or id: `./x` and `../x` relative to
    the manifest folder; an absolute path, a hub id or a path that exists from here as recorded; another
    relative path (a hand-written manifest) relative to the manifest folder where it exists there."""
    if ref.startswith(("./", "../")):
        return str(manifest_dir / ref)
    given = Path(ref)
    return str(manifest_dir / ref) if not given.is_absolute() and not given.exists() and (manifest_dir / ref).exists() else ref


def comparable(have: dict, want: dict, paths: dict[str, str | None]) -> dict:
    """The settings of a rerun to compare with those an earlier run recorded (`have`). Where `have`
    records the base's fingerprint, the paths (`paths`: key -> this run's reference) are left out: the
    fingerprint (and content checksums) say whether it is the same input wherever it now is. Where it does
    not (written by an earlier qthink), the paths are compared as that version recorded them and the
    fingerprint is left out."""
    if "base_fingerprint" in have:
        return {k: v for k, v in want.items() if k not in paths}
    return {**{k: v for k, v in want.items() if k != "base_fingerprint"}, **paths}
