"""The teacher hidden-state store (ARCHITECTURE.md contract 3): writing shards safely, reading rows lazily.

Layout of a store directory:
- `manifest.json`: `format_version`, `base_model`, `hidden_size`, `K`, `G`, `position_scheme`,
  `hidden_state`, `dtype`, `counts`, ... and `shards`: a list of `{file, rows, sha256}`.
- `shard-NNNNN.safetensors`: `problem_index` [n] int64, `uniform` [n,K,H], `weighted` [n,K,H],
  `weighted_valid` [n] bool, `num_valid` [n] int32, `num_steps` [n] int32 (the latent steps each problem
  is taught: K everywhere in a fixed-K store; its own step count, at most K, in an `adaptive` one, whose
  slots from `num_steps` on are zero).
Every file is written under a temporary name and renamed, so a reader never sees half a shard. While shards
are missing the manifest holds the settings, `complete: false` and the writer's pid (the reader refuses it:
"still being written by pid N" or "stopped at 2 of 5 shards"); the finished manifest, written last, lists
the shards, which are whole. The reader checks format, shapes and sha256 on
open and refuses a store that does not match what the caller expects, naming the field and both values.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qthink.errors import UserError, require
from qthink.files import atomic_save, atomic_write_text, read_json, require_finished, sha256_file

FORMAT_VERSION = 2  # 2: `num_steps` per row and `adaptive` in the manifest
MANIFEST = "manifest.json"
FIELDS = ("problem_index", "uniform", "weighted", "weighted_valid", "num_valid", "num_steps")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(directory: Path, index: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one shard atomically and return its manifest entry `{file, rows, sha256}`."""
    missing = [f for f in FIELDS if f not in tensors]
    assert not missing, f"shard tensors lack {missing}"
    path = directory / shard_name(index)
    atomic_save(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp)))
    return {"file": path.name, "rows": int(tensors["problem_index"].numel()), "sha256": sha256_file(path)}


def write_manifest(directory: Path, manifest: dict) -> None:
    """The store's manifest; `complete: true` unless `manifest` says otherwise (a store being built)."""
    manifest = {"format_version": FORMAT_VERSION, "complete": True, **manifest}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")


class TeacherStore:
    """Read-only view of a teacher store; rows are read on demand from memory-mapped safetensors.

    `expect` names manifest fields the caller relies on (e.g. `hidden_size`, `K`, `base_model`); a
    mismatch is a `UserError` naming the field and both values. Checksums are verified on open.
    """

    def __init__(self, path: str | Path, expect: dict | None = None, verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        require(self.path.is_dir(), f"teacher store {self.path} does not exist; build it with `qthink teachers`")
        require(manifest_path.is_file(), f"{self.path} has no {MANIFEST}: not a finished teacher store "
                "(rerun `qthink teachers` to complete it)")
        self.manifest = read_json(manifest_path, "rebuild the store")
        require_finished(self.manifest, f"teacher store {self.path}", lambda: f"{len(list(self.path.glob('shard-*.safetensors')))} "
                         f"of {self.manifest.get('shards_total')} shards", "rerun `qthink teachers` with the same settings")
        version = self.manifest.get("format_version")
        require(version == FORMAT_VERSION, f"{manifest_path}: format_version is {version}, this qthink reads "
                f"{FORMAT_VERSION}; rebuild the store with this version of `qthink teachers`")
        for field in ("K", "hidden_size"):  # `true` would compare equal to 1
            require(type(self.manifest.get(field)) is int, f"{manifest_path}: {field} must be an integer (got "
                    f"{json.dumps(self.manifest.get(field))}); rebuild the store")
        for field, want in (expect or {}).items():
            have = self.manifest.get(field)
            require(have == want, f"teacher store {self.path}: {field} is {have!r} but the trainer expects "
                    f"{want!r}; rebuild the store for this model or change the config")
        self.K, self.hidden_size = int(self.manifest["K"]), int(self.manifest["hidden_size"])
        self.adaptive = self.manifest.get("adaptive") is True
        self._where: dict[int, tuple[int, int]] = {}
        self._files = []
        for s, entry in enumerate(self.manifest["shards"]):
            file = self.path / entry["file"]
            require(file.is_file(), f"{file} is listed in {manifest_path} but missing; rebuild the store")
            if verify:
                require(sha256_file(file) == entry["sha256"], f"{file}: checksum mismatch (corrupt or modified); "
                        "rebuild the store with `qthink teachers`")
            try:
                self._check_shapes(file, entry["rows"])
                with safe_open(str(file), framework="pt") as f:
                    indices = f.get_tensor("problem_index").tolist()
            except SafetensorError as e:  # a cut or damaged shard (opened without the checksum pass)
                raise UserError(f"{file} is not a readable shard ({str(e).splitlines()[0]}); rebuild the store "
                                "with `qthink teachers`") from e
            for row, problem in enumerate(indices):
                self._where[int(problem)] = (s, row)
            self._files.append(file)
        self._handles: dict[int, object] = {}

    def _check_shapes(self, file: Path, rows: int) -> None:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            require(set(FIELDS) <= keys, f"{file}: missing tensors {sorted(set(FIELDS) - keys)}")
            for name in ("uniform", "weighted"):
                shape = tuple(f.get_slice(name).get_shape())
                require(shape == (rows, self.K, self.hidden_size), f"{file}: {name} has shape {shape}, manifest says "
                        f"{(rows, self.K, self.hidden_size)}")
            for name in ("problem_index", "weighted_valid", "num_valid", "num_steps"):
                shape = tuple(f.get_slice(name).get_shape())
                require(shape == (rows,), f"{file}: {name} has shape {shape}, expected ({rows},)")

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, problem_index: int) -> bool:
        return problem_index in self._where

    @property
    def problem_indices(self) -> list[int]:
        return sorted(self._where)

    def _handle(self, shard: int):
        # Opened lazily per process: DataLoader workers fork after __init__ and must not share handles.
        key = (os.getpid(), shard)
        if key not in self._handles:
            self._handles[key] = safe_open(str(self._files[shard]), framework="pt")
        return self._handles[key]

    def row(self, problem_index: int) -> dict[str, torch.Tensor]:
        """`uniform` [K,H] and `weighted` [K,H] (float32), `weighted_valid` (bool), `num_valid` and
        `num_steps` (int)."""
        require(problem_index in self._where, f"teacher store {self.path} has no row for problem {problem_index}")
        shard, row = self._where[problem_index]
        f = self._handle(shard)
        return {
            "uniform": f.get_slice("uniform")[row : row + 1][0].float(),
            "weighted": f.get_slice("weighted")[row : row + 1][0].float(),
            "weighted_valid": bool(f.get_slice("weighted_valid")[row : row + 1][0]),
            "num_valid": int(f.get_slice("num_valid")[row : row + 1][0]),
            "num_steps": int(f.get_slice("num_steps")[row : row + 1][0]),
        }

    def __getstate__(self):  # picklable for DataLoader workers: handles are reopened lazily
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
