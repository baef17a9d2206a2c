"""Version shims for transformers 5.20-5.39, kept in one place.

transformers 5.24 renamed the forward kwarg and output field `past_key_values` to `cache`; the old name
still works there with a FutureWarning and disappears in 5.40. qthink calls the decoder through
`cache_kwargs` so that the same code runs on every release in the pinned range without warnings.
"""

import inspect
from functools import cache

from torch import nn
from transformers import DynamicCache, PretrainedConfig


@cache
def _cache_kwarg_name(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(decoder: nn.Module, kv_cache: DynamicCache) -> dict:
    """The keyword arguments that pass `kv_cache` to `decoder.forward` in this transformers release."""
    return {_cache_kwarg_name(type(decoder)): kv_cache, "use_cache": True}


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """An empty dynamic KV cache for a model with `config`."""
    return DynamicCache(config=config)


