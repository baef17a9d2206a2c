"""Lightning checkpoints written whole or not at all, on local disks.

Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp
folder; when that is another filesystem than the run folder, the final move is a copy into the
checkpoint's own name, and a full disk leaves a cut `last.ckpt` behind. Here the checkpoint is written to
a temporary name beside its destination, flushed, and renamed over it: a reader (or `--ckpt_path last`)
sees the previous checkpoint or the new one, never part of one. A failed write is one line.
"""

import io
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qthink.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):  # remote stores: Lightning's own upload
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # in memory first, so only the file write can meet a full disk
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            kept = "the previous checkpoint is intact; " if target.exists() else ""
            raise UserError(f"cannot write checkpoint {target}: {e.strerror or e}; {kept}free space (or choose "
                            "another --trainer.default_root_dir) and resume with --ckpt_path last") from e
        return None
