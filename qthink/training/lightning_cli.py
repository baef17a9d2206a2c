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
store check) from `model.base_model`, `data.store_K` (the store's K) from `model.latent_steps`
when distilling. The optimizer is the module's own (`auto_configure_optimizers=False`): the CLI's would
hand AdamW every frozen base weight and step its scheduler per epoch.

Bad input is one line (`UserError`): a config file that is missing or not YAML names the file, a refused
key names the file that sets it, and a `--ckpt_path` checkpoint is read here and compared with the config
(`qthink.training.checkpoints`) where Lightning would load it unchecked and silently put its model settings
in place of the config's. Ctrl-C exits with status 130 after Lightning's graceful shutdown. SIGTERM is
Lightning's: its `_SignalConnector` stops the loop at the end of the current step, `StopCheckpoint` has the
ModelCheckpoints save there (`last.ckpt`, so `--ckpt_path last` continues exactly), and qthink exits 143.
"""

import argparse
import logging
import math
import re
import warnings
from contextlib import ExitStack
from pathlib import Path

from jsonargparse import ArgumentError, set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf.errors import OmegaConfBaseException

from qthink.arguments import GlobalSeed, one_line, read_config_file
from qthink.core.model import linear_layer_names
from qthink.errors import UserError, require
from qthink.files import writable_dir
from qthink.ownership import claim
from qthink.signals import Terminated, interrupt_pending
from qthink.training.checkpoints import AtomicCheckpointIO, StopCheckpoint, check_settings, read_checkpoint
from qthink.training.data import TeacherDataModule
from qthink.training.lightning_private import CLIHooks
from qthink.training.module import QThinkModule

TRAINER_DEFAULTS = {"use_distributed_sampler": False}  # TeacherDataModule shards the data itself, resumably
CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path values Lightning resolves itself
EXTENDS = "extends"  # the top-level config-file key naming the file it builds on
# trainer settings and their ranges (`QThinkCLI.before_instantiate_classes`)
TRAINER_RANGES = {
    "accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "check_val_every_n_epoch": (lambda v: v >= 1, "an integer >= 1 or null"),
    "val_check_interval": (lambda v: 0 < v < math.inf, "a number > 0 or null"),
    "gradient_clip_val": (lambda v: 0 <= v < math.inf, "a finite number >= 0 or null"),
}


def store_K_of(latent_steps: int, distill: str, adaptive: bool = False) -> int | None:
    """The K the teacher store must have: the model's when it distils or reads the store's step counts
    (adaptive), unchecked otherwise (SFT, K=0)."""
    return None if distill == "none" and not adaptive else latent_steps


class RaiseLostInterrupt(Callback):
    """Ctrl-C stops the fit even when its `KeyboardInterrupt` was swallowed (raised inside a finaliser, which
    Python prints and drops): at the end of the step, the recorded Ctrl-C is raised again."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if interrupt_pending():
            raise KeyboardInterrupt


class QThinkCLI(CLIHooks):
    def add_default_arguments_to_parser(self, parser) -> None:
        """`seed_everything` as Lightning has it (an integer, or true for a random seed), with the range
        numpy takes checked when the config is parsed rather than at `seed_everything` after it."""
        parser.add_argument("--seed_everything", type=bool | GlobalSeed, default=self.seed_everything_default,
                            help="seed python, numpy and torch with this value (true: a random one) before anything is built")

    def add_arguments_to_parser(self, parser) -> None:
        # `expand_extends` acts on the key before parsing; here it is only accepted, and kept out of
        # --print_config and the saved config.yaml (jsonargparse drops SUPPRESSed keys from dumps)
        parser.add_argument(f"--{EXTENDS}", type=str | None, default=None, help=argparse.SUPPRESS)
        parser.link_arguments("model.base_model", "data.base_model")
        parser.link_arguments(("model.latent_steps", "model.distill", "model.adaptive"), "data.store_K",
                              compute_fn=store_K_of)
        parser.link_arguments("model.adaptive", "data.adaptive")

    def check_ckpt_path(self) -> None:
        """Lightning would load --ckpt_path here (a traceback for a damaged file) and silently replace the
        config's model settings with the checkpoint's; instead a named file is checked (before anything is
        built) and a mismatch refused. `last` is checked in `before_fit`, once the run folder is known."""
        given = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if given is not None and given not in CKPT_NAMES:
            self.check_checkpoint(Path(given))

    def before_fit(self) -> None:
        """Refusals before the model loads or anything is written: precision, output folders, a second fit
        into a run folder (it would write `last-v1.ckpt` beside the old `last.ckpt`, which export and
        `--ckpt_path last` would then disagree on: resume it or choose another folder), the checkpoint
        `--ckpt_path last` resumes, and the teacher store."""
        # fp16's grad scaler skips steps whose gradients overflow; the module's finite-gradient guard stops
        # the run at the first such step instead, so fp16 cannot train here
        precision = str(self.config["fit"]["trainer"].get("precision"))  # as asked (on CPU Lightning swaps it)
        require(not precision.startswith("16"), f"trainer.precision {precision} is "
                "not supported (its overflow-skipping conflicts with the finite-gradient guard): use bf16-mixed or 32-true")
        for flag, folder in self.output_dirs().items():  # before the model loads, not at the first checkpoint
            writable_dir(folder, flag)
        root = self.config["fit"]["trainer"].get("default_root_dir")
        if root is not None and self.trainer.is_global_zero:  # a named run folder is this fit's alone (without
            # one, Lightning versions its logs); rank 0 holds it for every rank
            self.outputs.enter_context(claim(root, "fit", "--trainer.default_root_dir"))
        last = self.last_checkpoint()
        require(last is None or not last.exists() or self.config["fit"].get("ckpt_path") is not None,
                f"{last} exists from an earlier fit: add --ckpt_path last to resume it, or set another "
                "--trainer.default_root_dir")
        if self.config["fit"].get("ckpt_path") == "last" and last is not None and last.exists():
            self.check_checkpoint(last)
        self.check_lora_targets()
        self.datamodule.open_store()  # a bad store is refused before the logger writes its first file

    def before_validate(self) -> None:
        self.check_lora_targets()
        self.datamodule.open_store()

    def before_test(self) -> None:
        self.check_lora_targets()
        self.datamodule.open_store()

    def check_lora_targets(self) -> None:
        """`model.lora.target_modules` must name linear layers of the base (peft would refuse them only once
        the base is loaded, after the logger and config.yaml are written); checked from the base's config."""
        model = self.config[self.config.subcommand]["model"]
        targets, base = list(model.lora.target_modules), model.base_model
        if model.lora.r == 0:
            return  # no adapters: the head trains alone
        require(bool(targets), "model.lora.target_modules is empty; name the linear layers that get adapters "
                "(or set model.lora.r 0 to train the head alone)")
        names = linear_layer_names(base, model.trust_remote_code)
        for target in targets:  # peft's rule for a list of names: the whole dotted name or its last parts
            require(any(n == target or n.endswith(f".{target}") for n in names),
                    f"model.lora.target_modules: {target!r} is not a linear layer of {base}; choose from "
                    f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}")

    def output_dirs(self) -> dict[str, str]:
        """The folders a fit writes into, by the setting that names them."""
        dirs = {"trainer.default_root_dir": self.trainer.default_root_dir}
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            dirs["ModelCheckpoint dirpath"] = callback.dirpath
        for logger in self.trainer.loggers:
            if getattr(logger, "save_dir", None):
                dirs[f"{type(logger).__name__} save_dir"] = logger.save_dir
        return dirs

    def last_checkpoint(self) -> Path | None:
        callback = self.trainer.checkpoint_callback
        return Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None

    def check_checkpoint(self, path: Path) -> None:
        """A checkpoint given to this run must be a readable `qthink fit` checkpoint trained with the config's
        model settings (and, resuming a fit, its training settings)."""
        subcommand = self.config.subcommand
        settings = self.config[subcommand]["model"].as_dict()
        check_settings(path, read_checkpoint(path), settings, resuming=subcommand == "fit")

    def before_instantiate_classes(self) -> None:
        """Trainer settings Lightning checks only once training runs, after the logger has written (a
        ZeroDivisionError), or not at all (a negative clip value flips the gradients)."""
        trainer = self.config[self.config.subcommand]["trainer"]
        for key, (within, meaning) in TRAINER_RANGES.items():
            value = trainer.get(key)
            number = isinstance(value, int | float) and not isinstance(value, bool)  # not a time or a dict
            require(not number or within(value), f"trainer.{key}: {value} is not {meaning}")

    def instantiate_classes(self) -> None:
        """Build the model, data and trainer; one that cannot be built from the settings (a logger or callback
        whose package is not installed, trainer settings Lightning refuses) is one line, before any file."""
        try:
            super().instantiate_classes()
        except (ValueError, ImportError, MisconfigurationException) as e:
            named = re.search(r"class_path '([\w.]+)'", str(e))
            while e.__cause__ is not None:  # jsonargparse wraps the class's own error: that says what to do
                e = e.__cause__
            reason = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"cannot set up the run{' with ' + named.group(1) if named else ''}: {reason}") from e

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The Trainer, saving checkpoints atomically in place (unless the config names its own CheckpointIO)."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO(getattr(self.model, "base_model", None)))
        trainer = super().instantiate_trainer(**{**kwargs, "plugins": plugins})
        trainer.callbacks.insert(0, StopCheckpoint())  # before the ModelCheckpoints, whose on_exception it enables
        trainer.callbacks.append(RaiseLostInterrupt())
        return trainer

    def run_subcommand(self, subcommand: str, run) -> None:
        try:
            with ExitStack() as self.outputs:  # the run folder claimed in before_fit is held until the run ends
                run(subcommand)
        except SIGTERMException:  # Lightning stopped the loop at the end of a step (a SystemExit with code 0)
            raise Terminated from None
        except SystemExit as e:
            # Lightning turns Ctrl-C (and SIGTERM before its loop started) into exit(1) after its graceful
            # shutdown; qthink exits 130 (143) for it, as every other subcommand does
            if e.code == 1 and self.trainer.interrupted:
                raise (e.__context__ if isinstance(e.__context__, Terminated) else KeyboardInterrupt()) from None
            raise


def check_paths(argv: list[str]) -> None:
    """One-line errors for checkpoints that do not exist (jsonargparse prints a usage dump without the
    file's name); config files are read, and checked the same way, by `expand_extends`."""
    given = [value for flag, value in zip(argv, argv[1:], strict=False) if flag == "--ckpt_path"]
    for value in given + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--ckpt_path=")]:
        require(value in CKPT_NAMES or Path(value).is_file(),
                f"checkpoint {value} does not exist (use --ckpt_path last to resume)")


def read_extends(path: Path) -> str | None:
    """The `extends` value of a config file, None when it has none."""
    parent = read_config_file(str(path)).get(EXTENDS)
    require(parent is None or (isinstance(parent, str) and parent.strip() != ""),
            f"config file {path}: {EXTENDS} must name one config file (got {parent!r})")
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


def no_tips(record: logging.LogRecord) -> bool:
    """Drop Lightning's "💡 Tip" advertisements (for its cloud logger) from every run's output."""
    return not record.getMessage().startswith("💡 Tip")


def run_lightning_cli(argv: list[str]) -> QThinkCLI:
    """Run `fit|validate|test` (argv[0]) with the rest of argv; user mistakes raise `UserError`."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        if no_tips not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(no_tips)
    check_paths(argv)
    argv = expand_extends(argv)
    # `${trainer.default_root_dir}` in a file means the same subcommand's key (fit, validate or test).
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # argv is given on purpose
            return QThinkCLI(
                QThinkModule,
                TeacherDataModule,
                args=argv,
                trainer_defaults=TRAINER_DEFAULTS,
                # a mistake raises ArgumentError (one line below) instead of printing the whole usage
                parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False},
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
            )
    except ArgumentError as e:
        raise UserError(f"{one_line(str(e), argv)} (see `qthink {argv[0]} --help`)") from e
    except OmegaConfBaseException as e:  # `${...}` naming no setting, or not a valid interpolation
        first = re.sub(r"key '\.+", "key '", str(e).splitlines()[0])  # relative-path dots jsonargparse adds
        raise UserError(f"{first}: a ${{...}} in a config file or flag names no setting; "
                        "fix it or set that key") from e
