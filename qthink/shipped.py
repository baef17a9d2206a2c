"""The files that ship inside the qthink package: the configs users read, copy and edit.

The repository keeps them at the top level (`configs/`), and `qthink/configs` is a link to that folder, so
there is one copy of each file and the wheel carries them as package data (pyproject.toml). They are read
through `importlib.resources`, so the same call finds them in a checkout, an editable install and a
regular `pip install .`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from qthink.errors import require


def config_file(*parts: str) -> Path:
    """A shipped config file or folder, e.g. `config_file("tiny", "qthink.yaml")` for configs/tiny/qthink.yaml;
    `config_file()` is the configs folder itself. The path is resolved, so in a checkout it names the file
    under the top-level configs/ that users edit."""
    found = resources.files("qthink").joinpath("configs", *parts)
    require(found.is_file() or found.is_dir(),
            f"{'/'.join(('configs', *parts))} is not among qthink's installed configs ({resources.files('qthink')}"
            "/configs); reinstall qthink (pip install .) or pass a config file of your own")
    return Path(str(found)).resolve()
