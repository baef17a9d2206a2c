"""What a fit logs besides its losses: learning rate, throughput rates and TensorBoard's `hp_metric`
(the callbacks `QThinkModule.configure_callbacks` adds when the Trainer has a logger)."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ThroughputMonitor

from qthink.training.lightning_private import throughputs

THROUGHPUT_WINDOW = 10  # batches per throughput reading (ThroughputMonitor logs nothing until it has this many)
COUNTERS = ("time", "batches", "samples", "lengths")  # Throughput's running totals: not rates, read by no one
HP_METRIC_SOURCE = "val/exact_match"  # what TensorBoard's HPARAMS tab compares runs on


def batch_problems(batch: dict) -> int:
    return int(batch["prompt_ids"].shape[0])


def batch_tokens(batch: dict, latent_steps: int) -> int:
    """Positions the batch runs through the model: prompt + K latent steps + answer, padding excluded."""
    answer = int(batch["answer_mask"].sum()) if "answer_mask" in batch else 0
    return int(batch["prompt_mask"].sum()) + answer + batch_problems(batch) * latent_steps


class Rates(Throughput):
    """Lightning's `Throughput` reporting its rates only (`device/samples_per_sec`, ...), not its counters."""

    def compute(self) -> dict[str, Any]:
        return {k: v for k, v in super().compute().items() if k not in COUNTERS}


class RateMonitor(ThroughputMonitor):
    """ThroughputMonitor without `train/time`, `train/batches`, `train/samples`, `train/lengths` (and their
    `validate/` twins), which crowd TensorBoard's scalars. It replaces the monitor's `Throughput` objects
    (private: `lightning_private.throughputs`; tests/test_module.py checks the logged names)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        monitors = throughputs(self)
        for key in monitors:
            monitors[key] = Rates(available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs)


class HpMetric(Callback):
    """`hp_metric` = the run's latest validation exact match, so TensorBoard's HPARAMS tab compares runs on it
    (Lightning registers the module's and data's hyperparameters with a placeholder `hp_metric` of -1). The
    value is kept in checkpoints, so a resumed run puts it back over the placeholder its restart logs."""

    def __init__(self) -> None:
        self.value: float | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(HP_METRIC_SOURCE)
        if trainer.sanity_checking or value is None:
            return
        self.value = float(value)
        self._log(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.value is not None:  # resumed: after Lightning's -1 for this start
            self._log(trainer)

    def _log(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"hp_metric": self.value}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"hp_metric": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = state_dict.get("hp_metric")


def training_callbacks(latent_steps: int) -> list[Callback]:
    """Learning rate (`lr/<param group>`), throughput rates (`train/device/*`: problems, tokens and model FLOPs
    per second; MFU on GPUs Lightning knows) and `hp_metric`."""
    tokens = partial(batch_tokens, latent_steps=latent_steps)
    return [LearningRateMonitor(logging_interval="step"),
            RateMonitor(batch_problems, tokens, window_size=THROUGHPUT_WINDOW), HpMetric()]
