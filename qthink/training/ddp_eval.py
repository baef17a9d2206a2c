"""`qthink eval --devices N`: the evaluation step (`qthink.scoring.score_batch`) on N devices under Lightning DDP.

Each rank takes a `DistributedSampler` share of the problems (padded so that the shares are equal), batches its
share by prompt length as the one-process path does (`length_batches`), and scores it with `score_batch` under
`Trainer.test`; the ranks' records are gathered to every rank and the padding's duplicates dropped by problem
index, so the result is the one-process `score_all`'s list, in order (greedy decoding: the same outputs).

Lightning's ddp launcher starts ranks 1..N-1 by re-running the command; `launched_rank` tells `qthink eval`
which process it is before any Trainer exists, so that only rank 0 claims and writes its output folder.
"""

import os
import sys
import time

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from qthink.core.model import QThink
from qthink.core.sequences import left_pad, length_batches
from qthink.errors import require
from qthink.scoring import Decoding, encode_problems, score_batch
from qthink.tasks import Task


def launched_rank() -> int:
    """This process's global rank as its launcher set it: Lightning's ddp launcher gives the processes it starts
    `LOCAL_RANK` 1..N-1 (the command's own process has none until its first Trainer runs), torchrun sets `RANK`."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def check_command_line(command: str) -> None:
    """Lightning starts the other ranks by re-running `sys.argv`, so the process that launches them must be the
    `qthink COMMAND` command itself (not a program calling `qthink.cli.main` with other arguments)."""
    launcher = "RANK" not in os.environ and "LOCAL_RANK" not in os.environ
    require(not launcher or sys.argv[1:2] == [command], f"--devices N runs as the command `qthink {command} ...` "
            f"(Lightning re-runs the command line on the other ranks), not from within {sys.argv[0]}")


def check_devices(devices: int, device: torch.device) -> str:
    """Lightning's accelerator for `devices` processes of `device`'s type; one line if the machine has fewer
    devices (CPU: cores) or `device` names one GPU or a kind DDP does not run on."""
    require(device.type in ("cpu", "cuda"), f"--devices {devices} runs on cpu or cuda, not {device.type}; "
            "use --device cpu or cuda, or --devices 1")
    require(device.index is None, f"--device {device} names one GPU; with --devices {devices} give --device cuda "
            "(the first N GPUs are used; set CUDA_VISIBLE_DEVICES to choose them)")
    have = torch.cuda.device_count() if device.type == "cuda" else os.cpu_count() or 1
    what = "CUDA GPUs" if device.type == "cuda" else "CPU cores"
    require(devices <= have, f"--devices {devices}: this machine has {have} {what}; use --devices 1 to {have}")
    return "gpu" if device.type == "cuda" else "cpu"


class EvalData(L.LightningDataModule):
    """This rank's share of the problems, in batches of prompts of similar length: {"index", "input_ids",
    "attention_mask"} (left-padded)."""

    def __init__(self, prompts: list[list[int]], pad_id: int, batch_size: int):
        super().__init__()
        self.prompts, self.pad_id, self.batch_size = prompts, pad_id, batch_size

    def collate(self, positions: list[int]) -> dict:  # positions: problem indices (the dataset is their range)
        batch = left_pad([self.prompts[i] for i in positions], self.pad_id)
        return {"index": positions, "input_ids": batch.input_ids, "attention_mask": batch.attention_mask}

    def test_dataloader(self) -> DataLoader:
        trainer = self.trainer
        share = list(DistributedSampler(range(len(self.prompts)), trainer.world_size, trainer.global_rank, shuffle=False))
        batches = [[share[i] for i in b] for b in length_batches([self.prompts[i] for i in share], self.batch_size)]
        return DataLoader(range(len(self.prompts)), batch_sampler=batches, collate_fn=self.collate)


class EvalModule(L.LightningModule):
    """`score_batch` as a test step; after the epoch, `preds` holds every problem's record (all ranks'), in
    order, and `wall` the seconds from the ranks' common start to the last rank's end."""

    def __init__(self, qt: QThink, task: Task, records: list[dict], decoding: Decoding):
        super().__init__()
        self.qt, self.task, self.records, self.decoding = qt, task, records, decoding
        self.scored: dict[int, dict] = {}
        self.preds: list[dict] = []
        self.began = self.wall = 0.0

    def on_test_epoch_start(self) -> None:
        self.trainer.strategy.barrier()  # the clock starts once every rank has loaded and set up, as in one process
        self.began = time.perf_counter()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        preds = score_batch(self.qt, self.task, [self.records[i] for i in batch["index"]], batch["input_ids"],
                            batch["attention_mask"], self.decoding)
        self.scored.update(zip(batch["index"], preds, strict=True))

    def on_test_epoch_end(self) -> None:
        parts = [self.scored]
        if dist.is_available() and dist.is_initialized():
            parts = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, self.scored)
        merged = {i: pred for part in parts for i, pred in part.items()}  # a padding copy repeats an index: one kept
        require(len(merged) == len(self.records), f"the ranks scored {len(merged)} of {len(self.records)} problems")
        self.preds = [merged[i] for i in range(len(self.records))]
        self.wall = time.perf_counter() - self.began


def score_on_devices(qt: QThink, task: Task, records: list[dict], decoding: Decoding, batch_size: int,
                     enable_thinking: bool, devices: int, accelerator: str,
                     progress: bool = False) -> tuple[list[dict], float, str]:
    """`score_all`'s records on `devices` DDP processes (this process is one of them; Lightning's launcher starts
    the others by re-running the command). Returns the records, the scoring's wall seconds and rank 0's device."""
    require(batch_size > 0, f"--batch-size must be > 0 (got {batch_size})")
    prompts = encode_problems(qt, task, records, decoding, enable_thinking)  # checked on every rank, before launch
    module = EvalModule(qt, task, records, decoding)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                        use_distributed_sampler=False)  # EvalData deals the shares itself
    trainer.test(module, datamodule=EvalData(prompts, qt.tokenizer.pad_token_id, batch_size), verbose=False)
    return module.preds, module.wall, str(trainer.strategy.root_device)
