"""`bench_train`: the batched training step against the seed's batch-1 x B accumulation, on the same problems.

The seed trains at batch 1 with 16-step gradient accumulation. `QThinkModule` runs the latent loop on a
left-padded batch (`qthink.core.latent.think`), so B problems take one prompt pass, K latent passes and one
answer pass instead of B of each. Its CE is a per-row mean, so at equal data both schedules compute the
same gradient (exactly when every row has a valid teacher: the batched L1 averages over valid rows, the
seed's over all rows). This measures samples/s and peak memory of one optimizer step each way, and the
largest relative gradient difference between them.
"""

import time

import torch

from qthink.core.device import pick_device
from qthink.measure import peak_memory, sync
from qthink.recipe import SEED
from qthink.training.data import TeacherDataModule, collate_train
from qthink.training.module import QThinkModule


def bench_train(base_dir: str, store_dir: str, batch_size: int = 8, repeats: int = 3,
                latent_steps: int = SEED.latent_steps, distill: str = SEED.distill, device: str | None = None, precision: str = "32-true") -> dict:
    """Samples/s and peak memory of one optimizer step on `batch_size` problems: batched vs 1 x B accumulation.

    Both schedules run forward + backward on the same problems from the store and one AdamW step (lr 0);
    the fastest of `repeats` timed runs counts (after one warm-up run of each), and one more run measures
    peak memory. `precision` is `32-true` or `bf16-mixed` (autocast, as the Trainer does).
    """
    dev = pick_device(device)
    dm = TeacherDataModule(str(store_dir), base_model=str(base_dir), batch_size=batch_size, shuffle=False,
                           store_K=None if distill == "none" else latent_steps)
    dm.setup("fit")
    module = QThinkModule(str(base_dir), latent_steps=latent_steps, distill=distill)
    module.configure_model()
    module.to(dev).train()
    dataset = dm.datasets["train"]
    items = [dataset[i % len(dataset)] for i in range(batch_size)]
    pad = dm.tokenizer.pad_token_id

    def to_device(batch: dict) -> dict:
        return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}

    schedules = {"batched": [to_device(collate_train(items, pad))],
                 "seed_accumulated": [to_device(collate_train([item], pad)) for item in items]}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.0)  # lr 0: weights stay
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step(batches: list[dict]) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            with autocast:
                loss = module.compute_losses(batch)["loss"] / len(batches)  # as Lightning's accumulation scales it
            loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in module.named_parameters() if p.grad is not None}
        optimizer.step()
        return grads

    results, grads = {}, {}
    for name, batches in schedules.items():
        grads[name] = step(batches)  # warm-up (allocator, kernels)
        times = []
        for _ in range(repeats):  # timed without the memory sampler, which takes CPU time itself
            sync(dev)
            start = time.perf_counter()
            step(batches)
            sync(dev)
            times.append(time.perf_counter() - start)
        with peak_memory(dev) as mem:
            step(batches)
        results[name] = {"seconds_per_step": min(times), "samples_per_s": batch_size / min(times),
                         "peak_memory_mib": mem["bytes"] / 2**20}
    worst = max(float((grads["batched"][n] - g).norm() / g.norm().clamp(min=1e-12))
                for n, g in grads["seed_accumulated"].items())
    return {"device": str(dev), "precision": precision, "batch_size": batch_size, "latent_steps": latent_steps,
            "distill": distill, **results,
            "speedup": results["batched"]["samples_per_s"] / results["seed_accumulated"]["samples_per_s"],
            "memory_ratio": results["batched"]["peak_memory_mib"] / max(results["seed_accumulated"]["peak_memory_mib"], 1e-9),
            "max_relative_grad_difference": worst}
