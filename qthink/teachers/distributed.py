"""Running a teacher-pipeline stage on several processes (`torchrun --nproc_per_node N -m qthink ...`).

Both stages split their work into fixed units (rollouts: groups of `--batch-size` consecutive problems;
teachers: shards of `--shard-size` problems) and rank r takes units r, r+W, r+2W, ... The units do not
depend on the number of processes, so 1 process and W processes compute exactly the same batches and
write the same bytes. Each rank writes its own part; rank 0 merges after a barrier.

The process group is created only when `WORLD_SIZE` > 1 (gloo on CPU, nccl on CUDA), so a plain
`qthink rollouts` needs no launcher and no rendezvous.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qthink.core.device import pick_device


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def units(self, n: int) -> list[int]:
        """The work units (0 .. n-1) this rank computes: r, r+W, ..."""
        return list(range(self.rank, n, self.world_size))


def env_ranks() -> Ranks:
    """Rank, world size and local rank from torchrun's environment (1 process when unset)."""
    return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str | None = None) -> tuple[Ranks, torch.device]:
    """Join the process group (only when WORLD_SIZE > 1) and pick this rank's device."""
    ranks = env_ranks()
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", ranks.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if ranks.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return ranks, dev


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
