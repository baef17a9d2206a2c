"""User mistakes through the real CLI: exit status 2, one line naming the problem, nothing on disk changed.

Each case builds what it needs under a work folder, runs one `qthink` command and compares the folder's
files (names and bytes) before and after.
"""

import pickle
from pathlib import Path

import pytest

from qthink.cli import main


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def setup_files(work: Path, ckpt: Path) -> dict[str, str]:
    (work / "bad.jsonl").write_bytes(b"\xff\xfe not utf-8")
    (work / "garbage.ckpt").write_bytes(bytes(range(256)) * 4)
    (work / "pickle.ckpt").write_bytes(pickle.dumps({"a": 1}))
    (work / "notes").mkdir()
    (work / "notes" / "keep.txt").write_text("precious")
    (work / "a-file").write_text("x")
    return {"CKPT": str(ckpt), "W": str(work)}


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
]


@pytest.fixture(scope="module")
def ckpt(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-inputs") / "ckpt"
    assert main(["init", str(tiny_base), str(out)]) == 0
    return out


@pytest.mark.parametrize("command, message", CASES, ids=[c.split()[0] + ":" + m[:30] for c, m in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ckpt, tmp_path, capsys, command, message):
    work = tmp_path / "work"
    work.mkdir()
    names = setup_files(work, ckpt)
    before, ckpt_before = snapshot(work), snapshot(ckpt)
    assert main(command.format(**names).split()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qthink: error: ") and err.count("\n") == 0 and "Traceback" not in err, err
    assert message in err, err
    assert snapshot(work) == before and snapshot(ckpt) == ckpt_before
