"""Version shims for transformers 5.20-5.39, kept in one place.

transformers 5.24 renamed the forward kwarg and output field `past_key_values` to `cache`; the old name
still works there with a FutureWarning and disappears in 5.40. qthink calls the decoder through
`cache_kwargs` so that the same code runs on every release in the pinned range without warnings.
"""

import inspect
from functools import cache

import torch
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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_device(name: str | None) -> torch.device:
    """`--device` as a torch device (default: CUDA when there is one); one line for a name torch does not
    know or for CUDA on a machine without it."""
    from qthink.errors import UserError

    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device torch knows; use cpu or cuda (cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU torch can use; use --device cpu")
    return device
