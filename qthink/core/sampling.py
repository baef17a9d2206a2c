"""Sampling for the latent loop: temperature / top-k / top-p by the Gumbel-max trick on counter-based noise.

Temperature and top-k are transformers' logits warpers. Top-p is written here: `TopPLogitsWarper` sorts
ascending and drops a token when the mass at or below it is <= 1 - top_p, which keeps a different set where
the boundary falls on tied logits (common in bf16: the two sorts order ties differently) or on rounding of
the two cumulative sums; measured on random bf16 logits at 0.6/0.95/20, 7% of rows kept another set, so
sampled rollouts would change.

A row's noise is a splitmix64 hash of (its seed, the step, the vocabulary column), so a row's sample depends
on its seed and step only, not on its batch, its rank or how many rows came before it.
"""

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

from qthink.errors import require
from qthink.recipe import SEED

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix(x: Tensor) -> Tensor:
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def counter_uniform(seeds: Tensor, step: int, size: int) -> Tensor:
    """[B, size] uniforms in (0, 1) from a splitmix64 hash of (row seed, step, column)."""
    cols = torch.arange(size, device=seeds.device, dtype=torch.int64)
    x = _splitmix(seeds.long()[:, None] * _GOLDEN + _splitmix(torch.tensor(step, device=seeds.device)))
    x = _splitmix(x + cols[None] * _GOLDEN)
    return (_shr(x, 11).double() + 0.5) / float(1 << 53)


def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, problem index, sample index), stable across runs."""
    x = 0
    for p in parts:
        x = (x * 0x100000001B3 + (p & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        x ^= x >> 29
    return x & ((1 << 63) - 1)


HALT_STREAM = 1 << 40  # counter offset of the halting decisions: never a token step


@dataclass
class Sampler:
    """Temperature / top-k / top-p sampling by the Gumbel-max trick on per-row counter noise."""

    seeds: Tensor  # [B] int64, one per output row
    temperature: float = SEED.temperature
    top_p: float = SEED.top_p
    top_k: int = SEED.top_k

    def __post_init__(self) -> None:
        require(self.temperature > 0, f"--temperature must be > 0 (got {self.temperature})")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p}); 1 keeps every token")
        require(self.top_k >= 0, f"--top-k must be >= 0 (got {self.top_k}); 0 keeps every token")

    def bernoulli(self, prob: Tensor, step: int) -> Tensor:
        """[B] bool: True with probability `prob` per row, on the row's counter noise for latent step `step`
        (a stream apart from the token noise)."""
        return counter_uniform(self.seeds, HALT_STREAM + step, 1)[:, 0] < prob.double()

    def __call__(self, logits: Tensor, step: int) -> Tensor:
        logits = TemperatureLogitsWarper(max(float(self.temperature), 1e-6))(None, logits.float())
        if self.top_k > 0:  # the warper keeps every token when top_k >= the vocabulary
            logits = TopKLogitsWarper(self.top_k)(None, logits)
        if self.top_p < 1.0:  # not TopPLogitsWarper: it keeps another set on ties (module docstring)
            sorted_logits, order = logits.sort(-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cumulative - sorted_logits.softmax(-1) > self.top_p  # keeps at least the top token
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        gumbel = -torch.log(-torch.log(counter_uniform(self.seeds, step, logits.shape[-1])))
        return (logits.double() + gumbel).argmax(-1)
