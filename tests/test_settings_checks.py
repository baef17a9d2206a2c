"""Every setting checked at the entry, and local-or-hub decided at once, through the real CLI: exit status 2,
one line naming the setting, and nothing written (no run folder, no config.yaml, no events file, no manifest).

Cases refused while the config or the flags are parsed run in this process; a `!` runs the command in a
subprocess (those that build a Lightning Trainer or ask the hub), always with HF_HUB_OFFLINE=1 and the work
folder as the working directory, so a relative `runs/...` name has its `runs/` folder beside it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qthink.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
FIT = "fit -c {CONFIG} --model.base_model {BASE} --data.teachers {STORE} --trainer.max_steps 1 " \
      "--trainer.default_root_dir {W}/run "
ROLLOUTS = "rollouts --base {CKPT} --task synthetic --limit 2 -G 1 --max-new-tokens 4 --out {W}/r "
CASES = [
    # defect 11: ranges carried by the LightningCLI signatures' types, refused when the config is parsed
    (FIT + "--model.lr -1", 'Parser key "model.lr": -1 is not a finite number > 0'),
    (FIT + "--model.lr inf", 'Parser key "model.lr": inf is not a finite number > 0'),
    (FIT + "--model.lora.dropout 2", 'Parser key "model.lora.dropout": 2 is not a probability in [0, 1)'),
    (FIT + "--model.lora.alpha 0", 'Parser key "model.lora.alpha": 0 is not an integer in [1, 2^31)'),
    (FIT + "--model.weight_decay -1", 'Parser key "model.weight_decay": -1 is not a finite number >= 0'),
    (FIT + "--model.warmup_ratio -5", 'Parser key "model.warmup_ratio": -5 is not a number in [0, 1]'),
    (FIT + "--model.val_max_new_tokens 0", 'Parser key "model.val_max_new_tokens": 0 is not an integer in [1, 2^31)'),
    (FIT + "--model.seed 9223372036854775808", 'Parser key "model.seed": 9223372036854775808 is not a seed in [0, 2^63)'),
    (FIT + "--data.num_workers -1", 'Parser key "data.num_workers": -1 is not an integer in [0, 2^31)'),
    (FIT + "--data.val_batch_size -1", 'Parser key "data.val_batch_size": -1 is not an integer in [1, 2^31)'),
    (FIT + "--seed_everything 18446744073709551616",
     'Parser key "seed_everything": 18446744073709551616 is not a seed in [0, 2^32)'),
    # (Lightning prints "Seed set to 0" before these trainer checks: in a subprocess, whose last line is read)
    ("!" + FIT + "--trainer.accumulate_grad_batches 0", "trainer.accumulate_grad_batches: 0 is not an integer >= 1"),
    ("!" + FIT + "--trainer.gradient_clip_val -1", "trainer.gradient_clip_val: -1 is not a finite number >= 0"),
    ("!" + FIT + "--model.lora.target_modules [foo]",
     "model.lora.target_modules: 'foo' is not a linear layer of {BASE}; choose from down_proj, gate_proj, k_proj"),
    ("!" + FIT + "--trainer.enable_checkpointing false",
     "cannot set up the run: Trainer was configured with `enable_checkpointing=False` but found `ModelCheckpoint`"),
    # non-finite floats and seeds out of range in the other commands
    (ROLLOUTS + "--temperature inf", 'Parser key "temperature": inf is not a finite number > 0'),
    (ROLLOUTS + "--seed 18446744073709551616", 'Parser key "seed": 18446744073709551616 is not a seed in [0, 2^63)'),
    # defect 12: an undefined interpolation, a logger whose package is not installed
    (FIT + "--trainer.logger.init_args.name ${{nosuch.key}}",
     "Interpolation key 'nosuch.key' not found (resolved to 'fit.trainer.logger.init_args.nosuch.key')"),
    (FIT + "-c {W}/interp.yaml", "Interpolation key 'nosuch.key' not found"),
    ("!" + FIT + "--trainer.logger lightning.pytorch.loggers.WandbLogger",
     "cannot set up the run with lightning.pytorch.loggers.WandbLogger: Requirement 'wandb"),
    # defect 13: a mistyped local folder, a hub id that is not in the cache while offline
    ("!" + FIT.replace("{BASE}", "runs/tiny-bsae"), "runs/tiny-bsae: no such directory"),
    ("!eval runs/nosuch --task synthetic --limit 2 --out {W}/e", "runs/nosuch: no such directory"),
    ("!generate nobody/nosuch-model -q hi",
     "no local folder nobody/nosuch-model, and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"),
    ("!eval nobody/nosuch-model --task synthetic --limit 2 --out {W}/e",
     "no local folder nobody/nosuch-model, and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"),
]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def ckpt(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("settings") / "ckpt"
    assert main(["init", str(tiny_base), str(out)]) == 0
    return out


@pytest.mark.parametrize("command, message", CASES, ids=[c.lstrip("!").split()[0] + ":" + m[:40] for c, m in CASES])
def test_bad_setting_is_one_line_exit_2_and_writes_nothing(tiny_base, teacher_store, ckpt, tmp_path, capsys,
                                                          command, message):
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)  # `runs/<typo>` is then a local name: its first folder exists
    (work / "interp.yaml").write_text("trainer:\n  default_root_dir: ${nosuch.key}\n")
    names = {"W": str(work), "BASE": str(tiny_base), "STORE": str(teacher_store), "CKPT": str(ckpt),
             "CONFIG": str(CONFIGS / "qthink.yaml")}
    argv = command.lstrip("!").format(**names).split()
    before, ckpt_before = snapshot(work), snapshot(ckpt)
    if command.startswith("!"):
        done = subprocess.run([sys.executable, "-m", "qthink", *argv], capture_output=True, text=True, timeout=300,
                              cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        code, err = done.returncode, (done.stderr.strip().splitlines() or [""])[-1]  # after Lightning's own lines
    else:
        code, err = main(argv), capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("qthink: error: ") and "\n" not in err, err
    assert message.format(**names) in err, err
    assert snapshot(work) == before and snapshot(ckpt) == ckpt_before  # no run folder, config.yaml or events file
