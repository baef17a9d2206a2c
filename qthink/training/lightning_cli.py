"""`qthink fit|validate|test -c CONFIG.yaml [-c VARIANT.yaml] [--key value ...]`: LightningCLI over
`QThinkModule` and `TeacherDataModule`.

    qthink fit -c configs/tiny/qthink.yaml -c configs/tiny/sft.yaml --trainer.default_root_dir runs/sft
    qthink fit -c configs/qwen3-1.7b/tooluse.yaml --ckpt_path last        # resume where it stopped

Config files are layered left to right, then command-line keys. A file may build on another with a
top-level `extends: PARENT.yaml` (relative to that file; the parent may extend in turn): `-c FILE` reads
as `-c PARENT -c FILE`, so jsonargparse layers the parent first and the file's own keys win, key by key.
jsonargparse has no such key: it does apply a `config: PARENT.yaml` inside a file, but the file's sections
then replace the parent's whole (a task file's `data: {task: ...}` would drop every other data key).
The parser runs in `omegaconf+` mode: `${...}` interpolations are resolved after every file and flag
is merged, so the configs can write checkpoint and log folders as `${trainer.default_root_dir}/...` and
one `--trainer.default_root_dir` moves them all. Links fill what the data must agree on with the model: `data.base_model` (tokenizer,
store check) from `model.base_model`, `data.teacher_steps` (the store's K) from `model.latent_steps`
when distilling. The optimizer is the module's own (`auto_configure_optimizers=False`): the CLI's would
hand AdamW every frozen base weight and step its scheduler per epoch.
"""

import argparse
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from qthink.errors import UserError, require
from qthink.training.checkpoint_io import AtomicCheckpointIO
from qthink.training.data import TeacherDataModule
from qthink.training.module import QThinkModule

# TeacherDataModule shards the data itself, resumably; set here, not in the configs, so no config can miss it
TRAINER_DEFAULTS = {"use_distributed_sampler": False}
EXTENDS = "extends"  # the top-level config-file key naming the file it builds on


def teacher_steps(latent_steps: int, distill: str) -> int | None:
    """The K the teacher store must have: the model's when it distils, unchecked otherwise (SFT, K=0)."""
    return None if distill == "none" else latent_steps


class QThinkCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # `expand_extends` acts on the key before parsing; here it is only accepted, and kept out of
        # --print_config and the saved config.yaml (jsonargparse drops SUPPRESSed keys from dumps)
        parser.add_argument(f"--{EXTENDS}", type=str | None, default=None, help=argparse.SUPPRESS)
        parser.link_arguments("model.base_model", "data.base_model")
        parser.link_arguments(("model.latent_steps", "model.distill"), "data.teacher_steps", compute_fn=teacher_steps)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, saving checkpoints atomically unless the config brings its own CheckpointIO."""
        plugins = kwargs.get("plugins", self._get(self.config_init, "trainer", default={}).get("plugins")) or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """A second fit into a run folder would write `last-v1.ckpt` beside the old `last.ckpt` (which export
        and `--ckpt_path last` would then disagree on): resume it or choose another folder."""
        # fp16's grad scaler skips steps whose gradients overflow; the module's finite-gradient guard stops
        # the run at the first such step instead, so fp16 cannot train here
        precision = str(self.config["fit"]["trainer"].get("precision"))  # as asked (on CPU Lightning swaps it)
        require(not precision.startswith("16"), f"trainer.precision {precision} is "
                "not supported (its overflow-skipping conflicts with the finite-gradient guard): use bf16-mixed or 32-true")
        callback = self.trainer.checkpoint_callback
        last = Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None
        require(last is None or not last.exists() or self.config["fit"].get("ckpt_path") is not None,
                f"{last} exists from an earlier fit: add --ckpt_path last to resume it, or set another "
                "--trainer.default_root_dir")


def check_paths(argv: list[str]) -> None:
    """One-line errors for config files and checkpoints that do not exist (jsonargparse prints a usage dump)."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in ("-c", "--config"):
            require(Path(value).is_file(), f"config file {value} does not exist")
        if flag == "--ckpt_path" and value not in ("last", "best", "hpc", "registry"):
            require(Path(value).is_file(), f"checkpoint {value} does not exist (use --ckpt_path last to resume)")
    for arg in argv:
        for prefix in ("--config=", "-c="):
            if arg.startswith(prefix):
                require(Path(arg[len(prefix):]).is_file(), f"config file {arg[len(prefix):]} does not exist")


def read_extends(path: Path) -> str | None:
    """The `extends` value of a config file, None when it has none (or is not a mapping: the parser says so)."""
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if not isinstance(content, dict) or content.get(EXTENDS) is None:
        return None
    parent = content[EXTENDS]
    require(isinstance(parent, str) and parent.strip() != "", f"config file {path}: {EXTENDS} must name one "
            f"config file (got {parent!r})")
    return parent


def config_chain(path: str) -> list[str]:
    """`path` after the files it extends, the root first; each `extends` is relative to the file naming it."""
    chain = [Path(path)]
    while (parent := read_extends(chain[-1])) is not None:
        target = chain[-1].parent / parent
        require(target.is_file(), f"config file {chain[-1]} extends {parent}, but {target} does not exist")
        seen = [p.resolve() for p in chain]
        if target.resolve() in seen:
            cycle = [*chain[seen.index(target.resolve()):], target]
            raise UserError(f"config file {chain[-1]} extends {parent}, a cycle: {' -> '.join(map(str, cycle))}")
        chain.append(target)
    return [str(p) for p in reversed(chain)]


def expand_extends(argv: list[str]) -> list[str]:
    """Every `-c FILE` (or `--config FILE`, `--config=FILE`) as `-c ROOT ... -c FILE` along its `extends`."""
    require(not any(a == f"--{EXTENDS}" or a.startswith(f"--{EXTENDS}=") for a in argv),
            f"{EXTENDS} is a config-file key (the file it builds on); on the command line, layer files with -c")
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("-c", "--config"):
            value = next(args, None)
            if value is None:  # the parser reports the missing value
                out.append(arg)
                continue
        elif arg.startswith(("--config=", "-c=")):
            value = arg.split("=", 1)[1]
        else:
            out.append(arg)
            continue
        for file in config_chain(value):
            out += ["-c", file]
    return out


def run_lightning_cli(argv: list[str]) -> QThinkCLI:
    """Run `fit|validate|test` (argv[0]) with the rest of argv; user mistakes raise `UserError`."""
    check_paths(argv)
    argv = expand_extends(argv)
    # `${trainer.default_root_dir}` in a file means the same subcommand's key (fit, validate or test).
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # argv is given on purpose
        return QThinkCLI(
            QThinkModule,
            TeacherDataModule,
            args=argv,
            trainer_defaults=TRAINER_DEFAULTS,
            parser_kwargs={"parser_mode": "omegaconf+"},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
