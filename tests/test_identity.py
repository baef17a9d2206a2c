"""Identity by content: damaged weights are refused, a base is never silently replaced, and a project is
tied to its base model by fingerprint (config + weight hashes), not by path, so it works from a new folder
and refuses a different base of the same shape."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qthink.cli import main
from qthink.core.tiny import build_tiny_base
from qthink.teachers.rollouts import write_reference_rollouts

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def fit_args(base, store, root, *extra) -> list[str]:
    return ["fit", "-c", str(TINY / "qthink.yaml"), "--model.base_model", str(base), "--data.teachers", str(store),
            "--trainer.default_root_dir", str(root), "--data.batch_size", "4", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def zero_4k(file: Path) -> None:
    """4 KiB of zeros in the middle of `file` (in the tensor data, past the safetensors header)."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    file.write_bytes(bytes(data))


def last_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project: `base` (qthink tiny-base), `rollouts` (reference chains), `store` (qthink teachers)
    and `run` (two fit steps)."""
    p = tmp_path_factory.mktemp("project")
    assert main(["tiny-base", str(p / "base")]) == 0
    write_reference_rollouts(str(p / "base"), p / "rollouts", n=8, G=1)
    assert main(["teachers", "--base", str(p / "base"), "--rollouts", str(p / "rollouts"), "--out",
                 str(p / "store"), "--dtype", "float32"]) == 0
    assert main(fit_args(p / "base", p / "store", p / "run", "--trainer.max_steps", "2")) == 0
    return p


def test_damaged_weights_are_refused_naming_the_file(tiny_base, tmp_path, capsys):
    """Defect 8: a base or checkpoint whose model.safetensors has 4 KiB zeroed is refused in one line."""
    base = tmp_path / "base"
    assert main(["tiny-base", str(base)]) == 0
    assert main(["init", str(base), str(tmp_path / "ckpt")]) == 0
    for folder in (base, tmp_path / "ckpt"):
        zero_4k(folder / "model.safetensors")
    before = snapshot(tmp_path)
    assert main(["generate", str(tmp_path / "ckpt"), "-q", "a=1+2 a?", "--max-new-tokens", "2"]) == 2
    line = last_line(capsys)
    assert f"{tmp_path / 'ckpt' / 'model.safetensors'}" in line and "checksum" in line
    assert main(["init", str(base), str(tmp_path / "ckpt2")]) == 2
    line = last_line(capsys)
    assert f"{base / 'model.safetensors'}" in line and "checksum" in line
    assert snapshot(tmp_path) == before and not (tmp_path / "ckpt2").exists()


def test_tiny_base_over_an_existing_base_is_refused(tmp_path, capsys):
    """Defect 9: `tiny-base OUT` over a base is refused (exit 2, nothing changed) unless --force."""
    base = tmp_path / "base"
    assert main(["tiny-base", str(base)]) == 0
    before = snapshot(base)
    assert main(["tiny-base", str(base), "--seed", "1"]) == 2
    assert "--force" in last_line(capsys)
    assert snapshot(base) == before
    assert main(["tiny-base", str(base), "--seed", "1", "--force"]) == 0
    assert snapshot(base)["model.safetensors"] != before["model.safetensors"]


def test_a_moved_project_works_from_its_new_place(project, tmp_path, monkeypatch, capsys):
    """Defect 10: the project copied elsewhere and the original gone (parked under another name for the
    test, then put back for the other tests); from the new place, with paths relative to it, fit resumes
    and export and eval work; a base moved on its own is named with --base."""
    moved, parked = tmp_path / "moved here", tmp_path / "parked"
    shutil.copytree(project, moved)
    shutil.move(project, parked)
    try:
        monkeypatch.chdir(moved)
        last = Path("run/checkpoints/last.ckpt")
        assert main(["export", str(last), "export0"]) == 0  # the base, found where it is beside the checkpoint
        shutil.move("base", tmp_path / "elsewhere")
        assert main(["export", str(last), "export1"]) == 2
        assert "--base" in last_line(capsys)
        assert main(["export", str(last), "export1", "--base", str(tmp_path / "elsewhere")]) == 0
        shutil.move(tmp_path / "elsewhere", "base")
        assert main(fit_args("base", "store", "run", "--trainer.max_steps", "3", "--ckpt_path", "last")) == 0
        assert not Path("run/checkpoints/last-v1.ckpt").exists()  # the moved run continued its own last.ckpt
        assert main(["export", str(last), "export"]) == 0
        assert json.loads(Path("export/qthink.json").read_text())["trained_steps"] == 3
        assert main(["eval", "export", "--task", "synthetic", "--limit", "2", "--max-new-tokens", "4",
                     "--out", "eval"]) == 0
        assert any(Path("eval").rglob("summary.json"))
    finally:
        shutil.move(parked, project)


def test_a_store_from_a_different_base_of_the_same_shape_is_refused(project, tmp_path, capsys):
    """Defects 9 and 10: a base replaced in place (same path, same shape) or another base of the same
    shape is refused by fit and export in one line, by fingerprint."""
    p = tmp_path / "p"
    shutil.copytree(project, p)
    other = build_tiny_base(tmp_path / "other", seed=1)
    assert main(fit_args(other, p / "store", tmp_path / "run-other", "--trainer.max_steps", "1")) == 2
    assert "different base model" in last_line(capsys)
    assert main(["export", str(p / "run/checkpoints/last.ckpt"), str(tmp_path / "e"), "--base", str(other)]) == 2
    assert "different base model" in last_line(capsys)
    assert main(["tiny-base", str(p / "base"), "--seed", "1", "--force"]) == 0  # same path, other weights
    before = snapshot(p)
    assert main(fit_args(p / "base", p / "store", tmp_path / "run-new", "--trainer.max_steps", "1")) == 2
    assert "different base model" in last_line(capsys)
    assert main(fit_args(p / "base", p / "store", p / "run", "--trainer.max_steps", "3", "--ckpt_path", "last")) == 2
    assert "different base model" in last_line(capsys)
    assert snapshot(p) == before and not (tmp_path / "run-new").exists() and not (tmp_path / "e").exists()


def test_a_hub_id_in_the_local_cache_has_the_fingerprint_of_its_files(tiny_base, tmp_path):
    """A hub id is fingerprinted from the cached files (blob names are the files' sha256), offline: a
    checkpoint made from it records the same fingerprint as one made from a local copy."""
    cache = tmp_path / "hub"
    repo = cache / "models--qthink-test--tiny"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot_dir = repo / "snapshots" / revision
    snapshot_dir.mkdir(parents=True)
    (repo / "blobs").mkdir()
    import hashlib

    for file in tiny_base.iterdir():
        if file.name.startswith("qthink"):
            continue  # a hub repo holds the model's own files only
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        (snapshot_dir / file.name).symlink_to(Path("../../blobs") / digest)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for ref, out in (("qthink-test/tiny", "from-hub"), (str(tiny_base), "from-local")):
        done = subprocess.run([sys.executable, "-m", "qthink", "init", ref, str(tmp_path / out)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    hub, local = (json.loads((tmp_path / out / "qthink.json").read_text()) for out in ("from-hub", "from-local"))
    assert hub["base_fingerprint"] == local["base_fingerprint"] and len(hub["base_fingerprint"]) == 64
