"""User mistakes through the real CLI: exit status 2, one line naming the problem, nothing on disk changed.

Each case builds what it needs under a work folder, runs one `qthink` command and compares the folder's
files (names and bytes) before and after.
"""

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qthink.cli import main


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cut(file: Path) -> None:
    """Keep the first half of `file`, as a full disk or a killed copy leaves it."""
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def setup_files(work: Path, ckpt: Path, store: Path) -> dict[str, str]:
    (work / "bad.jsonl").write_bytes(b"\xff\xfe not utf-8")
    (work / "garbage.ckpt").write_bytes(bytes(range(256)) * 4)
    (work / "pickle.ckpt").write_bytes(pickle.dumps({"a": 1}))
    (work / "notes").mkdir()
    (work / "notes" / "keep.txt").write_text("precious")
    (work / "a-file").write_text("x")
    shutil.copytree(ckpt, work / "cut-ckpt")
    cut(work / "cut-ckpt" / "model.safetensors")
    shutil.copytree(store, work / "cut-store")
    cut(next((work / "cut-store").glob("shard-*.safetensors")))
    configs = Path(__file__).resolve().parents[1] / "configs" / "tiny"
    return {"CKPT": str(ckpt), "W": str(work), "CONFIG": str(configs / "qthink.yaml"),
            "RUN": str(work.parent / "run")}


CASES = [
    ("generate {CKPT} --input {W}/bad.jsonl", "is not UTF-8 text"),
    ("generate {CKPT} -q hi --device tpu", "--device 'tpu' is not a device torch knows"),
    ("eval {CKPT} --task synthetic --limit 2 --out {W}/a-file", "is a file"),
    ("eval {CKPT} --task nosuchtask", "unknown task 'nosuchtask'"),
    ("export {W}/garbage.ckpt {W}/out", "is not a readable Lightning checkpoint"),
    ("export {W}/pickle.ckpt {W}/out", "is not a readable Lightning checkpoint"),
    ("export {W}/missing.ckpt {W}/out", "does not exist"),
    ("init {CKPT} {W}/notes", "not a qthink checkpoint"),
    ("init {CKPT} {CKPT}", "also the model this reads"),
    ("tiny-base {W}/tb --hidden-size 0", "--hidden-size must be a positive multiple of 32"),
    ("tiny-base {W}/tb --layers 0", "--layers must be >= 1"),
    ("rollouts --base {CKPT} --task synthetic --out {W}/r --top-p 0", "--top-p must be in (0, 1]"),
    ("rollouts --base {CKPT} --task synthetic --out {W}/r --top-k -5", "--top-k must be >= 0"),
    ("rollouts --base {CKPT} --task synthetic --out {W}/r --task-option colour=red", "does not take the options"),
    ("rollouts --base {CKPT} --task synthetic --out {W}/r --limit 0", "--limit must be"),
    ("generate {W}/cut-ckpt -q hi", "cannot load model"),
    # fit in a subprocess: Lightning's loggers keep the stream of the first test that configured them
    ("!fit -c {CONFIG} --model.base_model {BASEMODEL} --data.teachers {W}/cut-store --trainer.default_root_dir {RUN} "
     "--trainer.max_steps 1", "is not a readable shard"),
]


@pytest.fixture(scope="module")
def ckpt(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-inputs") / "ckpt"
    assert main(["init", str(tiny_base), str(out)]) == 0
    return out


@pytest.mark.parametrize("command, message", CASES, ids=[c.split()[0] + ":" + m[:30] for c, m in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ckpt, tiny_base, teacher_store, tmp_path, capsys,
                                                         command, message):
    work = tmp_path / "work"
    work.mkdir()
    names = {**setup_files(work, ckpt, teacher_store), "BASEMODEL": str(tiny_base)}
    before, ckpt_before = snapshot(work), snapshot(ckpt)
    argv = command.lstrip("!").format(**names).split()
    if command.startswith("!"):
        done = subprocess.run([sys.executable, "-m", "qthink", *argv], capture_output=True, text=True, timeout=300)
        # Lightning's own start-up lines come first on stderr; the error is the last line, alone
        code, err = done.returncode, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        assert "Traceback" not in done.stderr
    else:
        code, err = main(argv), capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("qthink: error: ") and err.count("\n") == 0 and "Traceback" not in err, err
    assert message in err, err
    assert snapshot(work) == before and snapshot(ckpt) == ckpt_before
