"""Ownership and one writer per output folder, through the real CLI (issue 20, defects 1-5).

A command writes only into a new or empty folder or one its own kind wrote (`.qthink-output.json`), only
names that are new or its own, deletes only its own temporary files, and holds the folder's lock for the
whole run: a second run is refused naming the first's pid. Refusals are one line, exit 2, nothing touched.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qthink.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "qthink.yaml"


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def run(argv: list) -> int:
    return main([str(a) for a in argv])


def refused(argv: list[str], capsys, expect: str) -> None:
    """`qthink argv` exits 2 with one line containing `expect`."""
    capsys.readouterr()
    assert run([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert expect in err, err


def rollouts_argv(base: Path, out: Path, *extra: str) -> list[str]:
    return ["rollouts", "--base", str(base), "--task", "synthetic", "--out", str(out), "-G", "1",
            "--max-new-tokens", "4", "--device", "cpu", *extra]


def qthink_process(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qthink", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_once_locked(proc: subprocess.Popen, folder: Path) -> dict:
    """Wait until `proc` holds `folder`'s lock (its lock file names it), then stop it (SIGSTOP) there; the
    lock file's record. Fails if `proc` ends without ever taking the lock."""
    lock = folder / ".qthink-lock"
    while proc.poll() is None:
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            time.sleep(0.01)
            continue
        if holder.get("pid") == proc.pid:
            os.kill(proc.pid, signal.SIGSTOP)
            return holder
    pytest.fail(f"the first run ended (status {proc.returncode}) without holding {lock}: {proc.communicate()[1][-2000:]}")


def resume(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate()
    return proc.returncode, err


# ---- defect 1: a folder of another kind ----

def test_rollouts_refuses_a_teacher_store_folder(tiny_base, teacher_store, tmp_path, capsys):
    store = shutil.copytree(teacher_store, tmp_path / "store")
    before = snapshot(store)
    refused(rollouts_argv(tiny_base, store, "--limit", "1"), capsys, "did not write")
    assert snapshot(store) == before


def test_a_marked_folder_is_refused_to_another_kind(tiny_base, tmp_path, capsys):
    rollouts = tmp_path / "r"
    assert run(rollouts_argv(tiny_base, rollouts, "--limit", "1")) == 0
    assert json.loads((rollouts / ".qthink-output.json").read_text())["command"] == "rollouts"
    before = snapshot(rollouts)
    refused(["teachers", "--base", tiny_base, "--rollouts", rollouts, "--out", rollouts], capsys,
            "was written by `qthink rollouts`")
    assert snapshot(rollouts) == before
    assert run(rollouts_argv(tiny_base, rollouts, "--limit", "2")) == 0  # its own kind extends it
    assert len((rollouts / "rollouts.jsonl").read_text().splitlines()) == 2


# ---- defect 2: the demo's stage folders ----

def test_demo_refuses_a_workdir_holding_a_users_model(tiny_base, tmp_path, capsys):
    work = tmp_path / "w"
    shutil.copytree(tiny_base, work / "base")
    before = snapshot(work)
    refused(["demo", "--workdir", work, "--quick"], capsys, "did not write")
    assert snapshot(work) == before


def test_demo_refuses_a_stage_folder_it_did_not_record(tiny_base, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / ".qthink-output.json").write_text(json.dumps({"format": "qthink-output-v1", "command": "demo",
                                                          "files": ["stages.json"]}))
    (work / "stages.json").write_text("{}")
    shutil.copytree(tiny_base, work / "base")
    before = snapshot(work)
    refused(["demo", "--workdir", work, "--quick"], capsys, "was not written by `qthink demo`")
    assert snapshot(work) == before


# ---- defect 3: eval stays inside --out and replaces only its own files ----

@pytest.fixture(scope="module")
def ckpt(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    assert run(["init", str(tiny_base), str(out), "--latent-steps", "2"]) == 0
    return out


EVAL = ["--task", "synthetic", "--limit", "2", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("name", ["../victim", "ABSOLUTE", "a/b", ".."])
def test_eval_name_must_stay_inside_out(ckpt, tmp_path, capsys, name):
    name = str(tmp_path / "victim") if name == "ABSOLUTE" else name
    before = snapshot(tmp_path)
    refused(["eval", ckpt, *EVAL, "--out", tmp_path / "out", "--name", name], capsys, "must be a plain name")
    assert snapshot(tmp_path) == before


def test_eval_refuses_to_write_into_a_checkpoint_folder(ckpt, tmp_path, capsys):
    parent = tmp_path / "models"
    shutil.copytree(ckpt, parent / "ckpt")
    before = snapshot(parent)
    refused(["eval", parent / "ckpt", *EVAL, "--out", parent], capsys, "did not write")
    assert snapshot(parent) == before


def test_eval_does_not_replace_a_comparison_it_did_not_write(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["eval", ckpt, *EVAL, "--out", out]) == 0
    (out / "comparison.md").write_text("my notes\n")  # not recorded as eval's
    before = snapshot(out)
    refused(["eval", ckpt, f"{ckpt}:nothink", *EVAL, "--out", out], capsys, "was not written by `qthink eval`")
    assert snapshot(out) == before
    (out / "comparison.md").unlink()
    assert run(["eval", ckpt, f"{ckpt}:nothink", *EVAL, "--out", out]) == 0
    assert "ckpt-nothink" in (out / "comparison.md").read_text()
    assert "comparison.md" in json.loads((out / ".qthink-output.json").read_text())["files"]


# ---- defect 4: only its own temporary files, never a `.<out>.old` ----

def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_teachers_deletes_only_its_own_temporary_files(tiny_base, teacher_store, tmp_path):
    rollouts = shutil.copytree(teacher_store.parent / "rollouts", tmp_path / "rollouts")
    out = tmp_path / "store"
    argv = ["teachers", "--base", str(tiny_base), "--rollouts", str(rollouts), "--out", str(out), "--device", "cpu"]
    assert run(argv) == 0
    host = socket.gethostname()
    mine = out / ".notes.tmp"  # a user's
    live = out / f".shard-00000.safetensors.qthink-tmp-{host}-{os.getpid()}-0123abcd.tmp"  # a running writer's
    dead = out / f".shard-00000.safetensors.qthink-tmp-{host}-{dead_pid()}-0123abcd.tmp"  # a killed run's
    for path in (mine, live, dead):
        path.write_text("x")
    assert run(argv) == 0
    assert mine.exists() and live.exists() and not dead.exists()


def test_init_keeps_a_dot_old_folder_that_is_not_its_own(tiny_base, tmp_path):
    out = tmp_path / "ck"
    assert run(["init", str(tiny_base), str(out)]) == 0
    old = tmp_path / ".ck.old"
    old.mkdir()
    (old / "keep.txt").write_text("precious")
    assert run(["init", str(tiny_base), str(out), "--seed", "1"]) == 0
    assert (old / "keep.txt").read_text() == "precious"
    assert json.loads((out / "qthink.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.old", "ck"]  # no lock or temporary folder left


# ---- defect 5: one writer per folder ----

def test_second_rollouts_into_a_busy_folder_is_refused_and_nothing_mixes(tiny_base, tmp_path, capsys):
    out = tmp_path / "r"
    first = qthink_process(rollouts_argv(tiny_base, out, "--limit", "4", "--batch-size", "1"))
    try:
        holder = stop_once_locked(first, out)
        assert holder["command"] == "qthink rollouts"
        refused(rollouts_argv(tiny_base, out, "--limit", "4", "--seed", "1"), capsys, f"pid {first.pid}")
    finally:
        status, err = resume(first)
    assert status == 0, err
    assert json.loads((out / "manifest.json").read_text())["seed"] == 0  # the first run's settings only
    lines = (out / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(line)["problem_index"] for line in lines] == [0, 1, 2, 3]
    assert not (out / ".qthink-lock").exists()


def test_second_fit_into_one_fresh_run_folder_is_refused(tiny_base, teacher_store, tmp_path):
    run = tmp_path / "run"
    fit = ["fit", "-c", CONFIG, "--model.base_model", tiny_base, "--data.teachers", teacher_store,
           "--trainer.max_steps", "1", "--trainer.default_root_dir", run, "--trainer.accelerator", "cpu"]
    first = qthink_process(fit)
    try:
        stop_once_locked(first, run)
        second = subprocess.run([sys.executable, "-m", "qthink", *map(str, fit)], capture_output=True, text=True)
    finally:
        status, err = resume(first)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is being written by pid {first.pid}" in second.stderr
    assert status == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt


def test_a_dead_holders_lock_is_taken_over(tiny_base, tmp_path):
    out = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from qthink.ownership import claim\n"
                               "with claim(sys.argv[1], 'rollouts', '--out'):\n"
                               "    print('held', flush=True); sys.stdin.read()", str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    holder.kill()  # kill -9: no cleanup ran, the lock file stays
    holder.wait()
    assert (out / ".qthink-lock").exists()
    assert run(rollouts_argv(tiny_base, out, "--limit", "1")) == 0
