"""`qthink bench teachers`: the decoder-only teacher extractor (`qthink.teachers.extract.extract_states`)
against the usual full forward with `output_hidden_states=True`, on the same rollouts: speed, peak memory
and the largest difference between the states they return."""

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from qthink.core.device import parse_dtype, pick_device
from qthink.core.latent import model_parts
from qthink.core.model import load_base
from qthink.core.sequences import encode_prompts, right_pad
from qthink.errors import require
from qthink.measure import peak_memory, sync, timed
from qthink.recipe import SEED
from qthink.teachers.extract import extract_states, rollout_positions, special_ids
from qthink.teachers.rollouts import ROLLOUTS, read_rollouts, rollout_at, write_reference_rollouts


def measure(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """(result, seconds, peak MiB above the start): one timed call, then one under `peak_memory` (its
    sampler takes CPU time itself, so it is kept out of the timing)."""

    def run() -> object:
        result = fn()
        sync(device)
        return result

    seconds, result = timed(run, 1)
    with peak_memory(device) as memory:
        run()
    return result, seconds, memory["bytes"] / 2**20


@torch.inference_mode()
def naive_states(model: nn.Module, seqs: list[list[int]], positions: list[list[int]], pad_id: int,
                 batch_size: int, device: torch.device) -> list[Tensor]:
    """The usual way: full sequences, attention mask, `output_hidden_states=True`, logits everywhere."""
    out: list[Tensor | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = right_pad([seqs[i] for i in rows], pad_id)
        result = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        last = result.hidden_states[-1]
        for b, i in enumerate(rows):
            out[i] = last[b, positions[i]].float().cpu()
    return out  # type: ignore[return-value]


def bench_teachers(base_dir: str | Path, rollouts: str | Path | None = None, K: int = SEED.latent_steps, batch_size: int = 16,
                   problems: int = 64, G: int = 4, model_dtype: str = "float32", device: str | None = None) -> dict:
    """Extraction speed and peak memory of `extract_states` vs `naive_states` on the same rollouts (a
    rollouts directory, or the synthetic task's reference rollouts written to a temporary one), one
    timed run each, and the largest difference between the states they return."""
    dev = pick_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        if rollouts is None:
            rollouts = write_reference_rollouts(str(base_dir), Path(tmp) / "rollouts", n=problems, G=G)
        path = Path(rollouts) / ROLLOUTS
        loaded = [rollout_at(path, off, n) for _, off, n in read_rollouts(rollouts)[1]]
    model, tokenizer = load_base(str(base_dir), parse_dtype(model_dtype))
    model = model.to(dev)
    specials = special_ids(tokenizer)
    prompts = encode_prompts(tokenizer, [p["question"] for p in loaded], enable_thinking=True)
    full, cut, positions = [], [], []
    for problem, prompt in zip(loaded, prompts, strict=True):
        for r in problem["rollouts"]:
            status, ids, pos = rollout_positions(prompt, r["token_ids"], specials, SEED.position_scheme, K, tokenizer)
            if status == "valid":
                full.append(ids)
                cut.append(ids[: max(pos) + 1])
                positions.append(pos)
    require(len(full) > 0, f"{rollouts}: no rollout with a closed, non-empty think block to benchmark on")
    decoder = model_parts(model).decoder
    extract_states(decoder, cut[:batch_size], positions[:batch_size], tokenizer.pad_token_id, batch_size, dev)  # warm-up
    ours, ours_s, ours_mib = measure(lambda: extract_states(decoder, cut, positions, tokenizer.pad_token_id,
                                                            batch_size, dev), dev)
    naive, naive_s, naive_mib = measure(lambda: naive_states(model, full, positions, tokenizer.pad_token_id,
                                                             batch_size, dev), dev)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, naive, strict=True))
    scale = max(float(b.abs().max()) for b in naive)
    return {
        "device": str(dev), "model_dtype": model_dtype, "rollouts": len(full), "K": K, "batch_size": batch_size,
        "mean_tokens": sum(map(len, full)) / len(full),
        "extractor": {"rollouts_per_s": len(full) / ours_s, "seconds": ours_s, "peak_mib": ours_mib},
        "naive": {"rollouts_per_s": len(full) / naive_s, "seconds": naive_s, "peak_mib": naive_mib},
        "speedup": naive_s / ours_s, "memory_ratio": naive_mib / max(ours_mib, 1e-9),
        "max_abs_diff": diff, "equal": diff <= (1e-4 if model.dtype == torch.float32 else 3e-2) * max(scale, 1.0),
    }
