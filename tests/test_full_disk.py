"""A disk that fills up during `qthink fit` or `qthink export`: one line, exit status 2, and nothing cut left
visible. The full disk is real to the process: a file-size limit (RLIMIT_FSIZE) makes the kernel refuse
every write past it with EFBIG, as a full filesystem refuses with ENOSPC."""

import resource
import signal
import subprocess
import sys
from pathlib import Path

import torch

from qthink.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "qthink.yaml")


def run_with_file_limit(argv: list[str], limit: int) -> subprocess.CompletedProcess:
    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "qthink", *argv], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_writes)


def one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qthink: error:")]
    assert len(errors) == 1 and text in errors[0], proc.stderr[-2000:]


def test_a_checkpoint_write_that_fails_keeps_the_previous_one_whole(tiny_base, teacher_store, tmp_path):
    root = tmp_path / "run"
    common = ["-c", CONFIG, "--model.base_model", str(tiny_base), "--data.teachers", str(teacher_store),
              "--trainer.default_root_dir", str(root), "--data.batch_size", "4", "--trainer.val_check_interval", "100"]
    assert main(["fit", *common, "--trainer.max_steps", "2"]) == 0
    last = root / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    proc = run_with_file_limit(["fit", *common, "--trainer.max_steps", "4", "--ckpt_path", "last"], len(before) // 2)
    one_line_error(proc, f"cannot write checkpoint {root / 'checkpoints'}")
    assert "the previous checkpoint is intact" in proc.stderr
    assert last.read_bytes() == before and torch.load(last, weights_only=True)["global_step"] == 2
    assert [p.name for p in (root / "checkpoints").iterdir()] == ["last.ckpt"]  # no temporary file left


def test_an_export_that_fails_leaves_no_folder(tiny_base, teacher_store, tmp_path):
    root = tmp_path / "run"
    assert main(["fit", "-c", CONFIG, "--model.base_model", str(tiny_base), "--data.teachers", str(teacher_store),
                 "--trainer.default_root_dir", str(root), "--data.batch_size", "4", "--trainer.max_steps", "1"]) == 0
    out = tmp_path / "export"
    proc = run_with_file_limit(["export", str(root / "checkpoints" / "last.ckpt"), str(out)], 200_000)
    one_line_error(proc, "cannot write")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder either


def test_a_write_interrupted_by_ctrl_c_leaves_the_old_file_and_no_temporary(tmp_path):
    from qthink.files import atomic_write

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")

    def interrupted(f) -> None:
        f.write(b"half of a checkpoint")
        raise KeyboardInterrupt  # what SIGINT raises in the main thread, mid-write

    try:
        atomic_write(target, interrupted, binary=True)
    except KeyboardInterrupt:
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and target.read_bytes() == b"previous"
