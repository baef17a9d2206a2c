"""The wheel carries the configs: built offline from a copy of the checkout, installed by unpacking it, and
read back through `qthink.shipped.config_file` from the installed copy (not the checkout)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from qthink.shipped import config_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*")
                 if p.suffix in (".yaml", ".json"))


def test_the_helper_finds_every_config_of_the_checkout():
    assert any(name.endswith(".yaml") for name in SHIPPED)
    for name in SHIPPED:
        assert config_file(*name.split("/")).read_bytes() == (ROOT / "configs" / name).read_bytes(), name


def test_the_wheel_carries_every_config_and_an_installed_qthink_reads_them(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing (build/, *.egg-info) in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "qthink", src / "qthink", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "configs", src / "configs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist")], cwd=src, check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("qthink-*.whl")
    with zipfile.ZipFile(wheel) as z:
        in_wheel = {n.removeprefix("qthink/configs/") for n in z.namelist() if n.startswith("qthink/configs/")}
        z.extractall(tmp_path / "site")  # a pure-Python wheel installs by unpacking
    assert in_wheel == set(SHIPPED)

    # the unpacked copy alone on the path (PYTHONPATH comes before the venv's editable install of a checkout)
    script = """
import json, sys
import qthink
from qthink.bench.gpu import QWEN3_1P7B
from qthink.demo.stages import DemoSettings, fit_argv
from qthink.shipped import config_file
names = json.loads(sys.argv[1])
argv = fit_argv(__import__("pathlib").Path("w"), DemoSettings(), "sft.yaml", "store", 4, 0, __import__("pathlib").Path("r"))
print(json.dumps({"qthink": qthink.__file__, "files": {n: str(config_file(*n.split("/"))) for n in names},
                  "gpu": str(QWEN3_1P7B), "demo": [a for a in argv if a.endswith(".yaml")]}))
"""
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(SHIPPED)], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    found = json.loads(out)
    site = (tmp_path / "site" / "qthink").resolve()
    assert Path(found["qthink"]).resolve().parent == site
    for name, path in found["files"].items():
        assert Path(path) == site / "configs" / name
        assert Path(path).read_bytes() == (ROOT / "configs" / name).read_bytes(), name
    assert Path(found["gpu"]) == site / "configs" / "qwen3-1.7b" / "model.json"
    assert found["demo"] == [str(site / "configs" / "tiny" / n) for n in ("qthink.yaml", "sft.yaml")]
