"""`qthink fit|validate|export` end to end on the tiny configs: layering, resume, TensorBoard, one-line
errors, every shipped config parsing (task files = the seed's recipe + their task, `extends`), and DDP on
two CPU processes ending with identical weights."""

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
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qthink.cli import main
from qthink.signals import EXIT_GRACE_S

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny")
QWEN = str(ROOT / "configs" / "qwen3-1.7b")


def hparams_logged(logdir: Path) -> dict:
    """The hyperparameters TensorBoard's HPARAMS tab shows for a run (its last session start)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    found = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == metadata.SESSION_START_INFO_TAG:
                    info = metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
                    found = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    return found


def tiny_args(base, store, root, *extra) -> list[str]:
    return ["-c", f"{TINY}/qthink.yaml", *extra, "--model.base_model", str(base), "--data.teachers", str(store),
            "--trainer.default_root_dir", str(root), "--data.batch_size", "4"]


@pytest.mark.parametrize("files", [
    ["tiny/qthink.yaml", "tiny/sft.yaml"], ["tiny/qthink.yaml", "tiny/codi.yaml"],
    ["tiny/qthink.yaml", "tiny/rw-per-step.yaml"], ["tiny/qthink.yaml", "tiny/uniform-per-step.yaml"],
    ["tiny/qthink.yaml", "tiny/steps.yaml"], ["tiny/qthink.yaml", "tiny/adaptive.yaml"],
    ["qwen3-1.7b/gsm8k.yaml", "qwen3-1.7b/adaptive.yaml"],
    ["qwen3-1.7b/tooluse.yaml", "qwen3-1.7b/sft.yaml"], ["qwen3-1.7b/gsm8k.yaml", "qwen3-1.7b/codi.yaml"],
    ["qwen3-1.7b/math.yaml", "qwen3-1.7b/rw-per-step.yaml"], ["qwen3-1.7b/tooluse.yaml", "qwen3-1.7b/steps.yaml"],
])
def test_every_config_parses_and_paths_follow_default_root_dir(files, capsys):
    args = sum((["-c", str(ROOT / "configs" / f)] for f in files), ["fit"])
    with pytest.raises(SystemExit) as e:
        main([*args, "--trainer.default_root_dir", "/r", "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "dirpath: /r/checkpoints" in printed and "save_dir: /r" in printed
    variant = Path(files[1]).stem
    distill = {"sft": "none", "codi": "final_step"}.get(variant, "per_step")
    assert f"distill: {distill}" in printed
    assert f"teacher: {'weighted' if variant in ('codi', 'rw-per-step') else 'uniform'}" in printed
    assert f"adaptive: {'true' if variant == 'adaptive' else 'false'}" in printed


def print_config(capsys, *args: str) -> str:
    """`qthink fit ARGS --print_config` in process: the merged config as YAML (defaults included)."""
    with pytest.raises(SystemExit) as e:
        main(["fit", *args, "--print_config"])
    assert e.value.code in (0, None)
    return capsys.readouterr().out


# what each task file adds to recipe.yaml, as command-line flags
TASKS = {"gsm8k": ("gsm8k", "256"), "math": ("math500", "256"), "tooluse": ("tooluse", "null")}


@pytest.mark.parametrize("task", TASKS)
def test_task_files_are_the_seed_recipe_plus_their_task(task, capsys):
    name, val_limit = TASKS[task]
    printed = print_config(capsys, "-c", f"{QWEN}/{task}.yaml")
    assert printed == print_config(capsys, "-c", f"{QWEN}/recipe.yaml", "--data.task", name, "--data.val_limit", val_limit)
    config = yaml.safe_load(printed)
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert (trainer["devices"], trainer["strategy"], trainer["precision"]) == (8, "ddp", "bf16-mixed")
    assert (trainer["max_epochs"], trainer["accumulate_grad_batches"], data["batch_size"]) == (3, 16, 1)
    assert trainer["use_distributed_sampler"] is False  # the CLI's default: TeacherDataModule shards itself
    assert (model["lora"]["r"], model["lora"]["alpha"], model["latent_steps"], model["gamma"]) == (32, 16, 6, 2.0)
    assert (model["lr"], model["teacher"], model["distill"]) == (2e-4, "uniform", "per_step")
    assert (data["max_prompt_tokens"], data["max_answer_tokens"], model["val_max_new_tokens"]) == (1024, 256, 256)
    assert trainer["default_root_dir"] == f"runs/qwen3-1.7b/{name}-qthink" and data["task"] == name
    assert "extends" not in printed


def test_tiny_config_is_the_seed_method_at_demo_size(capsys):
    config = yaml.safe_load(print_config(capsys, "-c", f"{TINY}/qthink.yaml"))
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"], trainer["max_steps"]) == ("cpu", 1, "32-true", 1000)
    assert trainer["use_distributed_sampler"] is False
    assert (model["lr"], model["latent_steps"], model["gamma"], model["teacher"], model["distill"]) == (
        3e-3, 6, 2.0, "uniform", "per_step")
    assert (data["task"], data["batch_size"], data["val_split"], data["val_limit"]) == ("synthetic", 32, "validation", 64)


def test_extends_layers_the_parent_first_relative_to_the_file(tmp_path, monkeypatch, capsys):
    """A file's `extends` is read as if its parent were the -c before it, key by key, along a chain."""
    (tmp_path / "mid").mkdir()
    (tmp_path / "mid" / "mid.yaml").write_text(f"extends: {TINY}/qthink.yaml\nmodel:\n  lr: 0.01\ndata:\n  batch_size: 8\n")
    (tmp_path / "leaf.yaml").write_text("extends: mid/mid.yaml\ndata:\n  batch_size: 4\n")
    monkeypatch.chdir(ROOT)  # mid/mid.yaml exists only relative to leaf.yaml
    printed = print_config(capsys, "-c", str(tmp_path / "leaf.yaml"), "-c", f"{TINY}/sft.yaml")
    assert printed == print_config(capsys, "-c", f"{TINY}/qthink.yaml", "-c", f"{TINY}/sft.yaml",
                                   "--model.lr", "0.01", "--data.batch_size", "4")
    assert "extends" not in printed


def test_extends_mistakes_are_one_line_errors_naming_the_file(tmp_path, capsys):
    files = {"cycle_a.yaml": "extends: cycle_b.yaml\n", "cycle_b.yaml": "extends: cycle_a.yaml\n",
             "self.yaml": "extends: ./self.yaml\n", "orphan.yaml": "extends: gone.yaml\n",
             "list.yaml": "extends: [a.yaml, b.yaml]\n", "broken.yaml": "extends: self.yaml\nmodel: [\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cases = [
        (["-c", str(tmp_path / "cycle_a.yaml")], r"cycle_b.yaml extends cycle_a.yaml, a cycle: .*cycle_a.yaml -> "
         r".*cycle_b.yaml -> .*cycle_a.yaml$"),
        (["-c", str(tmp_path / "self.yaml")], r"self.yaml extends ./self.yaml, a cycle"),
        (["-c", str(tmp_path / "orphan.yaml")], r"orphan.yaml extends gone.yaml, but .*gone.yaml does not exist"),
        (["-c", str(tmp_path / "list.yaml")], r"list.yaml: extends must name one config file"),
        (["-c", str(tmp_path / "broken.yaml")], r"config file .*broken.yaml is not valid YAML at line 3"),
        (["-c", f"{TINY}/qthink.yaml", "--extends", f"{TINY}/sft.yaml"], "extends is a config-file key"),
    ]
    for args, message in cases:
        assert main(["fit", *args, "--print_config"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qthink: error: ") and re.search(message, err[0]), err


def test_fit_resume_validate_and_export_from_the_command_line(tiny_base, teacher_store, tmp_path):
    root = tmp_path / "run"
    common = tiny_args(tiny_base, teacher_store, root, "--trainer.val_check_interval", "2", "--data.val_limit", "4")
    assert main(["fit", *common, "--trainer.max_steps", "2"]) == 0
    last = root / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert main(["fit", *common, "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == 4  # resumed, not restarted
    assert (root / "tensorboard" / "config.yaml").is_file()
    events = EventAccumulator(str(root / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/l1_step_1", "train/cos_step_6", "train/norm_h_3", "train/norm_t_3",
            "train/grad_norm", "lr/decay", "lr/no_decay", "val/exact_match", "hp_metric"} <= scalars
    assert not {"train/time", "train/batches", "train/samples", "train/lengths"} & scalars  # rates only
    # hp_metric is validation's exact match, not Lightning's -1 placeholder: after each validation, and put back
    # at once when the resumed run starts (the -1 at step 0 is what Lightning logs with the hyperparameters)
    val = [e.value for e in events.Scalars("val/exact_match")]
    assert [(e.step, e.value) for e in events.Scalars("hp_metric")] == \
        [(0, -1.0), (2, val[0]), (0, -1.0), (2, val[0]), (4, val[-1])]
    assert hparams_logged(root / "tensorboard")["latent_steps"] == 6  # the HPARAMS tab compares runs on these
    steps = [e.step for e in events.Scalars("train/loss")]  # one log continues across the resume
    assert len(steps) == 4 and steps == sorted(set(steps))  # (Lightning may skip one step number there)
    assert "val/samples/text_summary" in events.Tags()["tensors"]
    assert main(["fit", *common, "--trainer.max_steps", "6"]) == 2  # no second "last": resume or refuse
    assert main(["fit", *common, "--trainer.max_steps", "5", "--ckpt_path", "last", "--trainer.precision", "16-mixed"]) == 2
    assert not (root / "checkpoints" / "last-v1.ckpt").exists()
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert main(["validate", *common, "--ckpt_path", str(last)]) == 0
    assert main(["export", str(last), str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "projection_head.pt").is_file()


def test_a_fit_ended_by_early_stopping_is_finished_and_exports(tiny_base, teacher_store, tmp_path):
    """EarlyStopping ending a fit before max_steps (the demo stops at 100% or a plateau on validation) leaves
    a finished last.ckpt at its step, which export takes (a fit stopped by SIGTERM is refused: test_signals)."""
    root = tmp_path / "run"
    common = tiny_args(tiny_base, teacher_store, root, "--trainer.val_check_interval", "2", "--data.val_limit", "4")
    early = ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping", "--trainer.callbacks.monitor",
             "val/exact_match", "--trainer.callbacks.mode", "min", "--trainer.callbacks.stopping_threshold", "1.01"]
    assert main(["fit", *common, "--trainer.max_steps", "6", *early]) == 0  # every score is < 1.01: stops at step 2
    last = root / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["qthink_fit"] == {"max_steps": 6, "stopped_early": True}
    assert main(["export", str(last), str(tmp_path / "export")]) == 0


def test_validation_and_eval_decode_and_score_the_same_on_the_same_weights(tiny_base, teacher_store, tmp_path):
    """One decoding path: the validation samples logged during `qthink fit` are, text for text, what
    `qthink eval` writes for the exported weights, and `val/exact_match` equals eval's exact match."""
    from qthink.evaluate import evaluate
    from qthink.tasks import make_task

    root = tmp_path / "run"
    common = tiny_args(tiny_base, teacher_store, root, "--trainer.val_check_interval", "3", "--data.val_limit", "6",
                       "--model.val_log_samples", "6", "--data.val_batch_size", "6", "--trainer.max_steps", "3")
    assert main(["fit", *common]) == 0
    assert main(["export", str(root / "checkpoints" / "last.ckpt"), str(tmp_path / "export")]) == 0
    summary = evaluate(str(tmp_path / "export"), make_task("synthetic"), "validation", limit=6, max_new_tokens=16,
                       batch_size=6, out=tmp_path / "eval", progress=False)
    predictions = [json.loads(line) for line in (tmp_path / "eval" / summary["system"] / "predictions.jsonl").open()]
    events = EventAccumulator(str(root / "tensorboard")).Reload()
    assert events.Scalars("val/exact_match")[-1].value == pytest.approx(summary["metrics"]["exact_match"])
    table = events.Tensors("val/samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    logged = [row.split(" | ")[1] for row in table.splitlines()[2:]]  # | question | output | reference | score |
    assert len(logged) == 6 and any(logged)
    assert logged == [p["output"].replace("|", "\\|").replace("\n", " ") for p in predictions]


def test_user_mistakes_are_one_line_errors(tiny_base, teacher_store, store_factory, tmp_path, capsys):
    cases = [
        (tiny_args(tiny_base, tmp_path / "missing", tmp_path / "a"), "teacher store .*missing does not exist"),
        (tiny_args(tiny_base, store_factory(K=4), tmp_path / "b"), "K is 4 but the trainer expects 6"),
        (tiny_args(tiny_base, store_factory(base_name="Qwen/Qwen3-1.7B"), tmp_path / "c"),
         "built from base model 'Qwen/Qwen3-1.7B'"),
        (["-c", str(tmp_path / "nope.yaml")], "config file .*nope.yaml does not exist"),
    ]
    for args, message in cases:
        assert main(["fit", *args, "--trainer.max_steps", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("qthink: error: ") and __import__("re").search(message, err[-1]), err[-1]
    assert not (tmp_path / "b" / "checkpoints").exists()


def ctrl_c_fit(tmp_path: Path, args: list[str], ready: Path, sends: int = 1, wait_s: float = 90) -> tuple[int | None, str]:
    """`qthink fit ARGS` in a subprocess (modules in `tmp_path` importable, for callbacks), Ctrl-C once `ready`
    exists, sent again up to `sends` times in all, `wait_s` apart, until it exits (killed after the last): its exit
    status (None if killed) and its stderr."""
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    code = None
    with open(tmp_path / "stderr.txt", "w") as err:  # a file, not a pipe: a full pipe would stall the run
        run = subprocess.Popen([sys.executable, "-m", "qthink", "fit", *args], stdout=subprocess.DEVNULL, stderr=err,
                               env=env)
        deadline = time.monotonic() + 240
        while not ready.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(sends):
            run.send_signal(signal.SIGINT)
            try:
                code = run.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                pass
        else:
            run.kill()
    return code, (tmp_path / "stderr.txt").read_text()


def test_ctrl_c_during_fit_exits_130_and_leaves_a_run_that_resumes(tiny_base, teacher_store, tmp_path):
    """SIGINT once training runs (its first checkpoint is on disk, one is saved every step): Lightning's
    graceful shutdown, then exit status 130 like every other subcommand; every checkpoint left is whole
    (no temporary or cut file) and `--ckpt_path last` continues the run."""
    root = tmp_path / "run"
    args = tiny_args(tiny_base, teacher_store, root, "--trainer.val_check_interval", "100000",
                     "--trainer.callbacks.every_n_train_steps", "1")
    last = root / "checkpoints" / "last.ckpt"
    # Ctrl-C again if the process has not ended: in two loaded full suites the first one was handled (graceful
    # shutdown ran, "qthink: interrupted" printed, so `main` returned 130) and the interpreter then did not
    # exit within 120 s; where it waited was not found (17 direct tries under load exited at once).
    # `exit_within` now cuts such a wait short after EXIT_GRACE_S (tested below); a resend stays for a wait
    # it cannot cut (one in the interpreter's finalisation)
    code, stderr = ctrl_c_fit(tmp_path, [*args, "--trainer.max_steps", "100000"], last, sends=3, wait_s=60)
    assert code == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "qthink: interrupted" and "Traceback" not in stderr
    assert "GPU available" in stderr and "💡 Tip" not in stderr  # Lightning's advertisement filtered, its info kept
    files = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert "last.ckpt" in files and all(name.endswith(".ckpt") and not name.startswith(".") for name in files), files
    step = torch.load(last, weights_only=True)["global_step"]
    assert all(torch.load(root / "checkpoints" / name, weights_only=True)["global_step"] <= step for name in files)
    assert main(["fit", *args, "--trainer.max_steps", str(step + 1), "--ckpt_path", "last"]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == step + 1


SWALLOW = '''
import time
from pathlib import Path

import lightning as L


class SwallowCtrlC(L.Callback):
    """At step 2 waits for Ctrl-C and swallows its KeyboardInterrupt, as a finaliser or a careless library does."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 2:
            (self.out / "waiting").touch()
            try:
                time.sleep(120)
            except KeyboardInterrupt:
                (self.out / "swallowed").touch()
'''


def test_ctrl_c_that_something_swallowed_still_stops_the_fit_at_the_end_of_the_step(tiny_base, teacher_store, tmp_path):
    """One Ctrl-C whose KeyboardInterrupt never reaches Lightning (swallowed mid-step): the recorded interrupt is
    raised again at the step's end, so the fit stops with Lightning's graceful shutdown and exit status 130."""
    (tmp_path / "swallow.py").write_text(SWALLOW)
    args = tiny_args(tiny_base, teacher_store, tmp_path / "run", "--trainer.max_steps", "100000",
                     "--trainer.val_check_interval", "100000", "--trainer.callbacks+=swallow.SwallowCtrlC",
                     "--trainer.callbacks.out", str(tmp_path))
    code, stderr = ctrl_c_fit(tmp_path, args, tmp_path / "waiting", wait_s=90)
    assert (tmp_path / "swallowed").exists(), stderr[-3000:]
    assert code == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "qthink: interrupted" and "Traceback" not in stderr


STUCK = '''
import threading

import lightning as L


class StuckShutdown(L.Callback):
    """On the interrupt, leaves a non-daemon thread that never ends, as a library's writer thread might: the
    interpreter's shutdown waits for every such thread."""

    def on_exception(self, trainer, module, exception):
        threading.Thread(target=threading.Event().wait, name="stuck").start()
'''


def test_ctrl_c_ends_the_process_even_when_its_shutdown_would_wait_forever(tiny_base, teacher_store, tmp_path):
    """After the interrupted fit has cleaned up and printed "qthink: interrupted", a thread left running would keep
    the interpreter from exiting (as once seen in a loaded suite); the process still ends with status 130, within
    EXIT_GRACE_S of it. Without `exit_within` it never ends."""
    (tmp_path / "stuck.py").write_text(STUCK)
    root = tmp_path / "run"
    args = tiny_args(tiny_base, teacher_store, root, "--trainer.max_steps", "100000", "--trainer.val_check_interval",
                     "100000", "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks+=stuck.StuckShutdown")
    code, stderr = ctrl_c_fit(tmp_path, args, root / "checkpoints" / "last.ckpt", wait_s=EXIT_GRACE_S + 90)
    assert code == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "qthink: interrupted" and "Traceback" not in stderr


RANK_DUMP = '''
import lightning as L
import torch


class RankDump(L.Callback):
    """Each rank writes its trainable weights and the problems it trained on."""

    def __init__(self, out: str):
        self.out, self.seen = out, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen += batch["problem_index"].tolist()

    def on_train_end(self, trainer, module):
        weights = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
        torch.save({"weights": weights, "seen": self.seen}, f"{self.out}/rank{trainer.global_rank}.pt")
'''


def test_ddp_on_two_cpu_processes_ends_with_identical_weights(tiny_base, teacher_store, tmp_path):
    """Also validates one problem on two ranks: the rank without one gets an unscored copy instead of
    never logging the metric while the other waits in the sync (a hang before)."""
    (tmp_path / "rank_dump.py").write_text(RANK_DUMP)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    args = tiny_args(tiny_base, teacher_store, tmp_path / "run", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     "--trainer.max_steps", "2", "--trainer.callbacks+=rank_dump.RankDump",
                     "--data.val_limit", "1", "--trainer.val_check_interval", "2",  # one validation problem, two ranks
                     "--trainer.callbacks.out", str(tmp_path))
    qthink = Path(sys.executable).parent / "qthink"
    done = subprocess.run([sys.executable, str(qthink), "fit", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for epoch in (slice(0, 4), slice(4, 8)):  # 8 problems = one batch of 4 per rank per epoch; 2 steps = 2 epochs
        assert sorted(ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]) == list(range(8))
    a, b = ranks[0]["weights"], ranks[1]["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.default.weight") and a[k].abs().sum() > 0 for k in a)


def test_init_from_starts_a_new_fit_from_a_checkpoints_weights_only(tiny_base, teacher_store, tmp_path, capsys):
    """`model.init_from`: the adapters and head of a finished fit start another one (a curriculum stage), with
    step, optimizer and schedule anew; another LoRA shape is one line naming the setting."""
    from qthink.errors import UserError
    from qthink.training.module import QThinkModule

    first = tmp_path / "first"
    assert main(["fit", *tiny_args(tiny_base, teacher_store, first, "--trainer.max_steps", "2")]) == 0
    ckpt = first / "checkpoints" / "last.ckpt"
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    started = QThinkModule(str(tiny_base), init_from=str(ckpt))
    started.configure_model()
    fresh = QThinkModule(str(tiny_base))
    fresh.configure_model()
    params, fresh_params = dict(started.named_parameters()), dict(fresh.named_parameters())
    assert set(trained) == started.trainable_names()
    assert all(torch.equal(params[k], v) for k, v in trained.items())
    assert not all(torch.equal(fresh_params[k], v) for k, v in trained.items())  # trained weights differ from init
    second = tmp_path / "second"
    assert main(["fit", *tiny_args(tiny_base, teacher_store, second, "--trainer.max_steps", "1",
                                   "--model.init_from", str(ckpt))]) == 0
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1  # a new run
    with pytest.raises(UserError, match="model.init_from .* LoRA"):
        QThinkModule(str(tiny_base), lora={"r": 8}, init_from=str(ckpt)).configure_model()
