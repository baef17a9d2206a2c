"""How the KV cache is held during inference, for the latent loop (`qthink.core.latent`).

- `ReservedLayer` / `reserve_cache`: the `dynamic` decode mode's cache, a `DynamicLayer` whose buffer has spare
  positions, so a token's keys and values are written in place instead of `torch.cat`-ing the whole cache.
- `static_capacity` / `static_cache`: the `static` and `compiled` modes' transformers `StaticCache`, sized in
  a few buckets and reused per model, so compiled steps see few shapes and CUDA graphs stable addresses.
"""

import weakref

from torch import Tensor, nn
from transformers import StaticCache
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in a buffer with `room` spare positions.

    Each update writes the new positions in place and returns views of exactly the shape and values a
    `DynamicLayer` returns, so attention computes the same numbers; what goes away is the `torch.cat`
    that copies the whole cache at every token (O(length) bytes per step per layer: at batch 64 and a
    thousand positions that is more memory traffic than reading the weights). Only without grad: in-place
    writes would overwrite keys/values that autograd saved for backward.
    """

    def __init__(self, room: int):
        super().__init__()
        self.room, self.length = room, 0
        self.key_buffer: Tensor | None = None
        self.value_buffer: Tensor | None = None

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def _reallocate(self, capacity: int, like_keys: Tensor, like_values: Tensor) -> None:
        keys = like_keys.new_empty(*like_keys.shape[:2], capacity, like_keys.shape[3])
        values = like_values.new_empty(*like_values.shape[:2], capacity, like_values.shape[3])
        if self.length:
            keys[:, :, : self.length] = self.keys
            values[:, :, : self.length] = self.values
        self.key_buffer, self.value_buffer = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.key_buffer is None or self.length + new > self.key_buffer.shape[-2]:
            self._reallocate(self.length + new + self.room, key_states, value_states)
        self.key_buffer[:, :, self.length : self.length + new] = key_states
        self.value_buffer[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.key_buffer = self.value_buffer = None
        self.length = 0

    def _select(self, pick) -> None:
        if self.key_buffer is not None:
            self.key_buffer, self.value_buffer = pick(self.key_buffer), pick(self.value_buffer)
            self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))


def reserve_cache(kv_cache, room: int):
    """Give each plain dynamic layer of `kv_cache` a preallocated buffer with `room` spare positions."""
    kv_cache.layers = [ReservedLayer(room) if type(layer) is DynamicLayer else layer for layer in kv_cache.layers]
    return kv_cache


def static_capacity(needed: int) -> int:
    """The static cache length for `needed` positions: the smallest of 64, 96, 128, 192, 256, 384, ... that
    holds them. Two sizes per octave: at most half the columns are spare, and a benchmark whose prompts span
    30 to 1,000 tokens needs 5 shapes, not 16 as with multiples of 64 (each shape is one compilation)."""
    size = 64
    while True:
        for capacity in (size, size * 3 // 2):
            if capacity >= needed:
                return capacity
        size *= 2


_STATIC_CACHES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def static_cache(model: nn.Module, batch: int, capacity: int) -> StaticCache:
    """A `StaticCache` of `capacity` positions for `batch` rows, the one from this model's previous static call
    when the shape, device and dtype match (reset in place): its buffers keep their addresses, so a captured
    CUDA graph is replayed rather than recorded again. One is held per model; so a static `LatentState` is
    valid until the next static `think` on the same model."""
    weight = model.get_input_embeddings().weight
    key = (batch, capacity, weight.device, weight.dtype)
    held = _STATIC_CACHES.pop(model, None)  # dropped first: the old buffers are freed before new ones exist
    if held is not None and held[0] == key:
        held[1].reset()
        kv_cache = held[1]
    else:
        del held
        kv_cache = StaticCache(config=model.config, max_cache_len=capacity)
    _STATIC_CACHES[model] = (key, kv_cache)
    return kv_cache


def release_static_cache(model: nn.Module) -> None:
    """Drop the static cache held for `model` (its buffers: batch x capacity x layers x KV heads of memory)."""
    _STATIC_CACHES.pop(model, None)
