"""User mistakes through the real CLI: exit status 2, one line naming the problem, nothing on disk changed.

Each case builds what it needs under a work folder, runs one `qthink` command and compares the folder's
files and folders (names and bytes) before and after. A `!` runs the command in a subprocess (those that
build a Lightning Trainer). `{W}/ro` is a read-only folder; as root, where chmod does not stop writes, those
cases run in a subprocess under `setpriv` without root's override (and skip where setpriv is missing).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qthink.cli import main
from qthink.core.tiny import build_tiny_base
from qthink.files import TEMP_MARK, remove_stale_temp_dirs

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def cut(file: Path) -> None:
    """Keep the first half of `file`, as a full disk or a killed copy leaves it."""
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def edit_line(file: Path, lineno: int, edit) -> None:
    """Replace line `lineno` (1-based) of `file` with `edit(line)`."""
    lines = file.read_text().splitlines()
    lines[lineno - 1] = edit(lines[lineno - 1])
    file.write_text("\n".join(lines) + "\n")


def setup_files(work: Path, ckpt: Path, store: Path, fit_ckpt: Path) -> None:
    (work / "bad.jsonl").write_bytes(b"\xff\xfe not utf-8")
    (work / "empty.jsonl").write_text("")
    (work / "garbage.ckpt").write_bytes(bytes(range(256)) * 4)
    (work / "pickle.ckpt").write_bytes(pickle.dumps({"a": 1}))
    (work / "notes").mkdir()
    (work / "notes" / "keep.txt").write_text("precious")
    (work / "a-file").write_text("x")
    shutil.copytree(ckpt, work / "cut-ckpt")
    cut(work / "cut-ckpt" / "model.safetensors")
    shutil.copytree(store, work / "cut-store")
    cut(next((work / "cut-store").glob("shard-*.safetensors")))
    # rollouts whose second line reads `"problem_index": true` (Python's 1) and one cut mid-line
    for name, edit in (("bool-rollouts", lambda line: json.dumps({**json.loads(line), "problem_index": True})),
                       ("broken-rollouts", lambda line: line[: len(line) // 2])):
        shutil.copytree(store.parent / "rollouts", work / name)
        edit_line(work / name / "rollouts.jsonl", 2, edit)
    calls = json.dumps([{"Action": "get_weather", "Action_Input": "{}"}])
    (work / "tooluse.json").write_text(json.dumps({"prompt": "weather?", "answer": calls, "idx": True}) + "\n")
    (work / "bad-syntax.yaml").write_text("trainer:\n  max_steps: [1\n")
    (work / "unknown-key.yaml").write_text("trainer:\n  max_stepz: 1\n")
    (work / "bool-k.yaml").write_text("model:\n  latent_steps: true\n")
    (work / "list.yaml").write_text("- trainer\n- model\n")
    (work / "run6" / "checkpoints").mkdir(parents=True)
    shutil.copy(fit_ckpt, work / "run6" / "checkpoints" / "last.ckpt")
    shutil.copytree(store, work / "old-store")  # a store written before per-problem step counts (format 1)
    manifest = json.loads((work / "old-store" / "manifest.json").read_text())
    (work / "old-store" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    (work / "ro").mkdir()
    (work / "ro").chmod(0o555)


FIT = "fit -c {CONFIG} --model.base_model {BASEMODEL} --data.teachers {STORE} --trainer.max_steps 1 "
ROLLOUTS = "rollouts --base {CKPT} --task synthetic --limit 2 -G 1 --max-new-tokens 4 "
TEACHERS = "teachers --base {BASEMODEL} --rollouts {ROLLOUTS} "
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
    ("generate {W}/cut-ckpt -q hi", "cut-ckpt/model.safetensors: checksum mismatch"),
    # fit in a subprocess: Lightning's loggers keep the stream of the first test that configured them
    ("!" + FIT + "--data.teachers {W}/cut-store --trainer.default_root_dir {RUN}", "is not a readable shard"),
    # Lightning's checkpoints and configs
    (FIT + "--trainer.default_root_dir {RUN} --ckpt_path {W}/garbage.ckpt", "garbage.ckpt is not a readable Lightning"),
    (FIT + "--trainer.default_root_dir {RUN} --ckpt_path {W}/pickle.ckpt", "pickle.ckpt is not a readable Lightning"),
    (FIT + "--trainer.default_root_dir {RUN} --ckpt_path {W}/missing.ckpt", "missing.ckpt does not exist"),
    (FIT + "-c {SFT} --trainer.default_root_dir {RUN} --ckpt_path {W}/run6/checkpoints/last.ckpt",
     "trained with model.latent_steps=6 but this config has 0"),
    ("!" + FIT + "-c {CODI} --trainer.default_root_dir {W}/run6 --ckpt_path last",
     "trained with model.distill='per_step' but this config has 'final_step'"),
    ("validate -c {CONFIG} -c {SFT} --model.base_model {BASEMODEL} --data.teachers {STORE} --trainer.default_root_dir "
     "{RUN} --ckpt_path {W}/run6/checkpoints/last.ckpt", "trained with model.latent_steps=6 but this config has 0"),
    ("fit -c {W}/missing.yaml", "config file {W}/missing.yaml does not exist"),
    ("fit -c {W}/bad-syntax.yaml", "config file {W}/bad-syntax.yaml is not valid YAML at line 3"),
    ("fit -c {CONFIG} -c {W}/list.yaml", "config file {W}/list.yaml holds a list, not a mapping of settings"),
    ("fit -c {CONFIG} -c {W}/unknown-key.yaml", "does not accept option 'trainer.max_stepz' (in {W}/unknown-key.yaml)"),
    ("fit -c {CONFIG} -c {W}/bool-k.yaml", "model.latent_steps\": True is not an integer in [0, 2^31) (in {W}/bool-k.yaml)"),
    (FIT + "--trainer.max_steps many", "expected int. Got value: many (see `qthink fit --help`)"),
    ("!" + FIT + "--data.teachers {W}/missing --trainer.default_root_dir {RUN}", "teacher store {W}/missing does not exist"),
    ("!" + FIT + "--data.teachers {K4STORE} --trainer.default_root_dir {RUN}", "K is 4 but the trainer expects 6"),
    ("!" + FIT + "--trainer.default_root_dir {W}/ro/run", "trainer.default_root_dir {W}/ro/run cannot be created"),
    # export
    ("export {W}/run6/checkpoints/last.ckpt {W}/out --base {OTHERBASE}", "it was trained on a base of another size"),
    ("export {W}/run6/checkpoints/last.ckpt {W}/notes", "folder with other files in it"),
    ("export {W}/run6/checkpoints/last.ckpt {W}/ro", "checkpoint folder {W}/ro is not writable"),
    # output folders that are files, read-only or hold something else
    (ROLLOUTS + "--out {W}/a-file", "--out {W}/a-file is a file"),
    (ROLLOUTS + "--out {W}/ro", "--out {W}/ro is not writable"),
    ("rollouts --base {CKPT} --task synthetic --limit 2 --out {W}/r", "--max-new-tokens 4096 leaves no room for a prompt"),
    (TEACHERS + "--out {W}/a-file", "--out {W}/a-file is a file"),
    (TEACHERS + "--out {W}/ro/teachers", "--out {W}/ro/teachers cannot be created"),
    ("eval {CKPT} --task synthetic --limit 2 --out {W}/ro", "--out {W}/ro is not writable"),
    ("tiny-base {W}/ro", "output folder {W}/ro is not writable"),
    ("tiny-base {W}/notes", "holds files a tiny base does not (keep.txt)"),
    ("tiny-base {CKPT}", "holds files a tiny base does not (projection_head.pt"),
    # records: a bool where an integer belongs is refused, not read as 1
    (TEACHERS + "--rollouts {W}/bool-rollouts --out {W}/t", "bool-rollouts/rollouts.jsonl:2: needs an integer `problem_index`"),
    (TEACHERS + "--rollouts {W}/broken-rollouts --out {W}/t", "broken-rollouts/rollouts.jsonl:2: not valid JSON"),
    (TEACHERS + "--rollouts {W}/missing --out {W}/t", "has no rollouts.jsonl"),
    ("eval {CKPT} --task tooluse --data-path {W}/tooluse.json --out {W}/e", "field 'idx' is bool, expected int"),
    (ROLLOUTS + "--out {W}/r --task-option steps=true", "task option steps=true: synthetic takes an integer steps"),
    (ROLLOUTS + "--out {W}/r --task-option steps=4-2", "synthetic steps must be between 1 and 25, low before high"),
    (ROLLOUTS + "--out {W}/r --task-option steps=2-x", "synthetic steps must be a number or a range LOW-HIGH"),
    ("demo --workdir {W}/d --chain-steps 2-x", "--chain-steps must be a number or a range LOW-HIGH such as 2-4"),
    ("demo --workdir {W}/d --systems qthink,nosuch", "--systems: unknown nosuch; choose from sft, codi"),
    ("demo --workdir {W}/d --fit-steps 0", "--fit-steps must be >= 1 (got 0)"),
    # adaptive latent steps: the store must hold each problem's own step count, in this format
    (TEACHERS + "--out {W}/t --adaptive", "--adaptive teaches each problem its own step count: it needs "
     "--position-scheme steps"),
    ("!" + FIT + "-c {ADAPTIVE} --data.teachers {STORE} --model.latent_steps 6 --trainer.default_root_dir {RUN}",
     "but model.adaptive needs each problem's own step count"),
    ("!" + FIT + "--data.teachers {W}/old-store --trainer.default_root_dir {RUN}",
     "format_version is 1, this qthink reads 2; rebuild the store"),
    # flags
    ("generate {CKPT} --input {W}/empty.jsonl", "no questions given"),
    ("generate {CKPT} -q hi --batch-size -1", "--batch-size must be > 0 (got -1)"),
    ("generate {CKPT} -q hi --batch-size x", 'Parser key "batch_size": expected int. Got value: x'),
    ("generate {CKPT} -q hi --decode-mode foo", "--decode-mode must be one of dynamic, static, compiled (got 'foo')"),
    (TEACHERS + "--out {W}/t --position-scheme foo", "--position-scheme 'foo': use one of linspace"),
    ("eval {CKPT} --task synthetic --limit -3", "--limit must be a positive integer (got -3)"),
    ("eval {CKPT} --task synthetic --limit 2 --batch-size 0 --out {W}/e", "--batch-size must be > 0 (got 0)"),
    ("eval {CKPT} --task synthetic --limit 2 --devices 0 --out {W}/e", "--devices must be > 0 (got 0)"),
    ("eval {CKPT} --task synthetic --limit 2 --device cpu --devices 100000 --out {W}/e",
     "--devices 100000: this machine has"),
    ("eval {CKPT} --task synthetic --limit 2 --device cpu --devices 2 --out {W}/e",  # in process: not the command line
     "--devices N runs as the command `qthink eval ...`"),
    ("eval {CKPT} --limit 2", "--task is required"),
    ("init {W}/missing-base {W}/out", "{W}/missing-base: no such directory"),
    (ROLLOUTS.replace("{CKPT}", "{W}/missing-base") + "--out {W}/r", "{W}/missing-base: no such directory"),
]


@pytest.fixture(scope="module")
def ckpt(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-inputs") / "ckpt"
    assert main(["init", str(tiny_base), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def fit_ckpt(tiny_base, tmp_path_factory) -> Path:
    """A K=6 `qthink fit` checkpoint of the tiny config as Lightning writes it for QThinkModule (its
    hyperparameters and trainable weights), made without a training run."""
    from qthink.training.module import QThinkModule

    module = QThinkModule(str(tiny_base), lr=3e-3)  # configs/tiny/qthink.yaml's model settings
    module.configure_model()
    keep = module.trainable_names()
    path = tmp_path_factory.mktemp("fit") / "last.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "global_step": 0, "epoch": 0,
                "state_dict": {k: v for k, v in module.state_dict().items() if k in keep}}, path)
    return path


@pytest.fixture(scope="module")
def names(ckpt, fit_ckpt, tiny_base, teacher_store, tmp_path_factory) -> dict[str, str]:
    from conftest import write_test_store

    extra = tmp_path_factory.mktemp("bad-inputs-extra")
    return {"CKPT": str(ckpt), "CONFIG": str(CONFIGS / "qthink.yaml"), "SFT": str(CONFIGS / "sft.yaml"),
            "CODI": str(CONFIGS / "codi.yaml"), "ADAPTIVE": str(CONFIGS / "adaptive.yaml"), "BASEMODEL": str(tiny_base), "STORE": str(teacher_store),
            "ROLLOUTS": str(teacher_store.parent / "rollouts"),
            "OTHERBASE": str(build_tiny_base(extra / "base-64", hidden_size=64)),
            "K4STORE": str(write_test_store(extra / "k4", tiny_base, K=4))}


# Root writes into a chmod 555 folder anyway (CAP_DAC_OVERRIDE); `setpriv` runs a command without that
# capability, so the read-only cases run as root too where util-linux's setpriv is installed.
WITHOUT_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]


def run_qthink(argv: list[str], subprocess_run: bool, capsys, prefix: list[str] = ()) -> tuple[int, str]:
    """(exit status, what it printed on stderr: in a subprocess, its last line)."""
    if not subprocess_run:
        return main(argv), capsys.readouterr().err.strip()
    done = subprocess.run([*prefix, sys.executable, "-m", "qthink", *argv], capture_output=True, text=True,
                          timeout=300)
    # Lightning's own start-up lines come first on stderr; the error is the last line, alone
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.returncode, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""


@pytest.mark.parametrize("command, message", CASES, ids=[c.lstrip("!").split()[0] + ":" + m[:40] for c, m in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(names, ckpt, fit_ckpt, teacher_store, tmp_path, capsys,
                                                         command, message):
    work = tmp_path / "work"
    work.mkdir()
    setup_files(work, ckpt, teacher_store, fit_ckpt)
    prefix, in_subprocess = [], command.startswith("!")
    if "{W}/ro" in command and os.access(work / "ro", os.W_OK):
        if shutil.which("setpriv") is None:
            pytest.skip("chmod 555 does not stop this user's writes (root) and setpriv is not installed")
        prefix, in_subprocess = WITHOUT_DAC_OVERRIDE, True
    names = {**names, "W": str(work), "RUN": str(tmp_path / "run")}
    before, ckpt_before = snapshot(work), snapshot(ckpt)
    code, err = run_qthink(command.lstrip("!").format(**names).split(), in_subprocess, capsys, prefix)
    assert code == 2, err
    assert err.startswith("qthink: error: ") and err.count("\n") == 0 and "Traceback" not in err, err
    assert message.format(**names) in err, err
    assert snapshot(work) == before and snapshot(ckpt) == ckpt_before


def test_export_clears_the_temporary_folder_of_an_export_killed_mid_write(fit_ckpt, tmp_path):
    """Export writes into `.<out>.qthink-tmp-<host>-<pid>-<random>` and renames it; a kill -9 leaves that
    folder behind. The next export to the same place removes it, and nothing else: not a folder of a process
    still running, not another name."""
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".model.{TEMP_MARK}-{host}-{dead.pid}-abcdefgh"
    running = tmp_path / f".model.{TEMP_MARK}-{host}-{os.getpid()}-abcdefgh"
    others = [tmp_path / ".model.keep", tmp_path / f".other.{TEMP_MARK}-{host}-{dead.pid}-abcdefgh",
              tmp_path / f".model.{TEMP_MARK}-elsewhere-{dead.pid}-abcdefgh"]
    for folder in (stale, running, *others):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    assert main(["export", str(fit_ckpt), str(tmp_path / "model")]) == 0
    assert not stale.exists() and running.exists() and all(f.exists() for f in others)
    assert (tmp_path / "model" / "projection_head.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if TEMP_MARK in p.name and p.name.startswith(".model.")) == \
        sorted([running.name, others[2].name])  # the export's own temporary folder is gone too
    assert remove_stale_temp_dirs(tmp_path / "model") == []
