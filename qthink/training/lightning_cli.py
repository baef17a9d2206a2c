"""`qthink fit|validate|test -c CONFIG.yaml [-c VARIANT.yaml] [--key value ...]`: LightningCLI over
`QThinkModule` and `TeacherDataModule`.

    qthink fit -c configs/tiny/qthink.yaml -c configs/tiny/sft.yaml --trainer.default_root_dir runs/sft
    qthink fit -c configs/qwen3-1.7b/tooluse.yaml --ckpt_path last        # resume where it stopped

Config files are layered left to right, then command-line keys. The parser runs in `omegaconf+` mode:
`${...}` interpolations are resolved after every file and flag is merged, so the configs can write
checkpoint and log folders as `${trainer.default_root_dir}/...` and one `--trainer.default_root_dir`
moves them all. Links fill what the data must agree on with the model: `data.base_model` (tokenizer,
store check) from `model.base_model`, `data.teacher_steps` (the store's K) from `model.latent_steps`
when distilling. The optimizer is the module's own (`auto_configure_optimizers=False`): the CLI's would
hand AdamW every frozen base weight and step its scheduler per epoch.
"""

import warnings
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from qthink.errors import require
from qthink.training.data import TeacherDataModule
from qthink.training.module import QThinkModule

TRAINER_DEFAULTS = {"use_distributed_sampler": False}  # TeacherDataModule shards the data itself, resumably


def teacher_steps(latent_steps: int, distill: str) -> int | None:
    """The K the teacher store must have: the model's when it distils, unchecked otherwise (SFT, K=0)."""
    return None if distill == "none" else latent_steps


class QThinkCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.base_model", "data.base_model")
        parser.link_arguments(("model.latent_steps", "model.distill"), "data.teacher_steps", compute_fn=teacher_steps)

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


def run_lightning_cli(argv: list[str]) -> QThinkCLI:
    """Run `fit|validate|test` (argv[0]) with the rest of argv; user mistakes raise `UserError`."""
    check_paths(argv)
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
