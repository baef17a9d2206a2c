"""What the benchmarks and training measure: wall time (device-synchronised), peak memory, model FLOPs,
and result files."""

from __future__ import annotations

import ctypes
import json
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch

from qthink.files import atomic_write_text


def timed_call(fn: Callable[..., Any], /, *args, **kwargs) -> tuple[Any, float]:
    """`fn(*args, **kwargs)`'s result and the wall seconds it took (module-level, so a process pool can run it)."""
    began = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - began


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall seconds of `repeats` calls of `fn` and the last call's result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        result, seconds = timed_call(fn)
        times.append(seconds)
    return statistics.median(times), result


def write_json(rows: list[dict] | dict, path: str | None) -> None:
    """Write `rows` to `path` (nothing without one), through a temporary file so no half-written file shows."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(rows, indent=2) + "\n")
        print(f"wrote {path}")


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued kernels, so wall time covers them (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _host_bytes_in_use():
    """A function giving the bytes malloc has handed out and not taken back (glibc), else the process RSS.

    torch's CPU allocator is malloc, so this counts live tensors and not memory merely kept by the process.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2

        def in_use() -> int:
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        return in_use
    except (OSError, AttributeError):
        process = psutil.Process()
        return lambda: process.memory_info().rss


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose `bytes` is, afterwards, the peak memory above the start: the CUDA allocator's peak
    on a GPU; on CPU, malloc's bytes in use sampled every 0.5 ms (short spikes can be missed)."""
    result = {"bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - start
        return
    in_use, stop = _host_bytes_in_use(), threading.Event()
    start = in_use()
    peak = [start]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], in_use())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["bytes"] = max(0, peak[0] - start)


def train_flops(config, batch: int, prompt: int, latents: int, answer: int) -> tuple[float, float]:
    """(model FLOPs of one LoRA training step, the same counted PaLM-style as 3 x forward).

    Forward: 2 FLOPs per weight per token for the block projections, causal attention (QK^T and AV over
    the keys each query sees) and the LM head over answer tokens only (`answer_token_losses`). Backward of frozen
    weights needs input gradients only (1 x forward); attention needs dQ, dK and dV (2 x forward). LoRA's
    rank-r matmuls (a few % at r=32) and the head's are left out, and so is recomputation.
    """
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads  # configs without it split the hidden size
    per_token = 2 * layers * (2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * config.intermediate_size)
    seq = prompt + latents + answer
    attention = 4 * layers * heads * head_dim * seq * (seq + 1) / 2
    lm_head = 2 * h * vocab * answer
    linear = seq * per_token + lm_head
    return batch * (2 * linear + 3 * attention), batch * 3 * (linear + attention)
