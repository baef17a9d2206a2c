"""Finished means finished: SIGTERM is handled like Ctrl-C, `fit` leaves a resumable checkpoint and exits 143,
`export` refuses a checkpoint of a fit that stopped early, and `teachers` and `fit` refuse rollouts and teacher
stores that are still being written or were stopped part-way (through the real CLI, real processes)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qthink.cli import main
from qthink.teachers.extract import build_teachers

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny" / "qthink.yaml")

# A callback that holds training at the end of one step until SIGTERM has arrived (Lightning's handler sets
# `trainer.received_sigterm`), so the signal lands at a known step without any timing in the test.
PAUSE = '''
from pathlib import Path
import time

import lightning as L


class PauseForSigterm(L.Callback):
    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            Path(self.marker).touch()
            while not trainer.received_sigterm:
                time.sleep(0.01)
'''


def fit_args(base: Path, store: Path, root: Path) -> list[str]:
    return ["-c", CONFIG, "--model.base_model", str(base), "--data.teachers", str(store), "--data.batch_size", "4",
            "--trainer.default_root_dir", str(root), "--trainer.val_check_interval", "100000", "--trainer.max_steps", "4"]


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until `path` exists (or the process ended: the assertions after this report how)."""
    while not path.exists() and proc.poll() is None:
        time.sleep(0.01)


def last_error(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def whole_run(tiny_base, teacher_store, tmp_path_factory) -> Path:
    """`last.ckpt` of an uninterrupted 4-step fit (2 steps per epoch: 8 problems, batches of 4)."""
    root = tmp_path_factory.mktemp("whole")
    assert main(["fit", *fit_args(tiny_base, teacher_store, root)]) == 0
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("step", [3, 2], ids=["mid-epoch", "epoch-end"])
def test_sigterm_during_fit_exits_143_with_a_checkpoint_that_resumes_to_the_uninterrupted_result(
        step, whole_run, tiny_base, teacher_store, tmp_path, capsys):
    (tmp_path / "pause.py").write_text(PAUSE)
    marker, root = tmp_path / "paused", tmp_path / "stopped"
    pause = json.dumps({"class_path": "pause.PauseForSigterm", "init_args": {"step": step, "marker": str(marker)}})
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:  # a file, not a pipe: a full pipe would stall the run
        run = subprocess.Popen([sys.executable, "-m", "qthink", "fit", *fit_args(tiny_base, teacher_store, root),
                                f"--trainer.callbacks+={pause}"], stdout=subprocess.DEVNULL, stderr=err, env=env)
        wait_for(marker, run)
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=300)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 143, stderr[-3000:]
    assert last_error(stderr) == "qthink: terminated" and "Traceback" not in stderr, stderr[-3000:]
    last = root / "checkpoints" / "last.ckpt"  # no periodic checkpoint before step 100: this one is SIGTERM's
    assert torch.load(last, weights_only=True)["global_step"] == step

    # `fit && export` stops at fit; `export` alone refuses the stopped run's checkpoint too
    assert main(["export", str(last), str(tmp_path / "export")]) == 2
    assert re.search(rf"stopped at step {step} of 4: .*--ckpt_path last.*--unfinished", last_error(capsys.readouterr().err))
    assert not (tmp_path / "export").exists()

    assert main(["fit", *fit_args(tiny_base, teacher_store, root), "--ckpt_path", "last"]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == 4
    if step == 3:  # mid-epoch: exactly the uninterrupted run. At an epoch's end, resuming (from any checkpoint,
        # Lightning's periodic one too) does not yet continue the data order exactly: a known, separate defect
        resumed, whole = trainable(last), trainable(whole_run)
        assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert main(["export", str(last), str(tmp_path / "export")]) == 0


def test_teachers_refuses_rollouts_being_written_or_stopped_part_way(tiny_base, tmp_path, capsys):
    out, limit = tmp_path / "rollouts", 300
    command = [sys.executable, "-m", "qthink", "rollouts", "--base", str(tiny_base), "--task", "synthetic", "--out",
               str(out), "-G", "1", "--max-new-tokens", "2", "--batch-size", "1", "--limit", str(limit)]
    teachers = ["teachers", "--base", str(tiny_base), "--rollouts", str(out), "--out", str(tmp_path / "store")]
    with open(tmp_path / "stderr.txt", "w") as err:
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            while not ((out / "rollouts.jsonl").is_file() and (out / "rollouts.jsonl").stat().st_size) and run.poll() is None:
                time.sleep(0.01)
            run.send_signal(signal.SIGSTOP)  # alive, part-way through
            assert main(teachers) == 2
            assert last_error(capsys.readouterr().err) == (f"qthink: error: rollouts {out}: still being written by pid "
                                                            f"{run.pid}; wait for it to finish")
        finally:
            run.send_signal(signal.SIGCONT)
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=300)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 143 and "qthink: terminated\n" in stderr and "Traceback" not in stderr, stderr[-3000:]  # (a progress bar may follow)
    done = len((out / "rollouts.jsonl").read_text().splitlines())
    assert 0 < done < limit
    assert main(teachers) == 2
    assert last_error(capsys.readouterr().err) == (f"qthink: error: rollouts {out}: stopped at {done} of {limit} problems; "
                                                    "rerun `qthink rollouts` with the same settings to finish")
    assert not (tmp_path / "store").exists()


def test_fit_refuses_a_teacher_store_stopped_part_way(tiny_base, teacher_store, tmp_path, capsys):
    class Stop(Exception):
        pass

    def stop(entry: dict) -> None:
        raise Stop

    store = tmp_path / "store"
    try:
        build_teachers(str(tiny_base), teacher_store.parent / "rollouts", store, shard_size=3, model_dtype="float32",
                       device="cpu", on_shard=stop)
    except Stop:
        pass
    assert main(["fit", *fit_args(tiny_base, store, tmp_path / "run")]) == 2
    assert last_error(capsys.readouterr().err) == (f"qthink: error: teacher store {store}: stopped at 1 of 3 shards; "
                                                    "rerun `qthink teachers` with the same settings to finish")
    assert not (tmp_path / "run").exists()
    assert main(["teachers", "--base", str(tiny_base), "--rollouts", str(teacher_store.parent / "rollouts"), "--out",
                 str(store), "--shard-size", "3", "--model-dtype", "float32", "--device", "cpu"]) == 0
    assert json.loads((store / "manifest.json").read_text())["complete"] is True


def test_output_into_a_closed_pipe_ends_quietly():
    """`qthink --help | head -0`: the reader is gone before the command writes. Exit status 1 and no traceback
    (without `cli.run`'s handling: a BrokenPipeError traceback)."""
    reader, writer = os.pipe()
    os.close(reader)  # the write then fails at once with EPIPE (Python ignores SIGPIPE)
    done = subprocess.run([sys.executable, "-m", "qthink", "--help"], stdout=writer, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(writer)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
