"""Every piece of private Lightning API qthink uses, in one place (Lightning 2.6; pyproject pins < 2.7).

Each has no public equivalent in Lightning 2.6:
- `LightningCLI._parse_ckpt_path()`: LightningCLI loads the hyperparameters of `--ckpt_path`'s checkpoint here,
  after parsing and before building anything, and silently puts them in place of the config's model settings
  (a damaged file is a traceback). qthink reads and checks the file instead: `CLIHooks.check_ckpt_path`.
- `LightningCLI._run_subcommand(subcommand)`: the one call around a whole subcommand (`before_<subcommand>`, the
  Trainer call, `after_<subcommand>`); qthink holds the run folder's claim for all of it and turns Lightning's
  exits on Ctrl-C and SIGTERM into its own: `CLIHooks.run_subcommand`.
- `Trainer._accelerator_connector.use_distributed_sampler`: the Trainer keeps its `use_distributed_sampler`
  argument only there; `TeacherDataModule` shards the training data itself and must know it is off.
- `ThroughputMonitor._throughputs`: the monitor's `Throughput` objects per stage; qthink replaces them with ones
  that report rates only (`run_logging.RateMonitor`).

tests/test_lightning_private.py checks that each exists, is called where qthink expects and takes the
parameters used here, so a Lightning upgrade that removes or renames one fails there, naming it.
"""

from collections.abc import Callable

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.cli import LightningCLI


class CLIHooks(LightningCLI):
    """LightningCLI with its two private steps turned into hooks a subclass overrides."""

    def check_ckpt_path(self) -> None:
        """Called where Lightning would load `--ckpt_path`'s hyperparameters into the config (it no longer does)."""

    def run_subcommand(self, subcommand: str, run: Callable[[str], None]) -> None:
        """Runs the subcommand by calling `run(subcommand)`; override to wrap it."""
        run(subcommand)

    def _parse_ckpt_path(self) -> None:  # private: LightningCLI.__init__ calls it after parsing
        self.check_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:  # private: LightningCLI.__init__ calls it to run
        self.run_subcommand(subcommand, super()._run_subcommand)


def uses_distributed_sampler(trainer: L.Trainer) -> bool:
    """The Trainer's `use_distributed_sampler` argument (an AttributeError naming it if Lightning moves it)."""
    return bool(trainer._accelerator_connector.use_distributed_sampler)


def throughputs(monitor: ThroughputMonitor) -> dict:
    """The monitor's `Throughput` objects by stage, filled by its `setup` (a KeyError if Lightning moves them)."""
    return monitor.__dict__["_throughputs"]
