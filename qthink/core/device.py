"""Where and in what precision to run: `--device` and `--dtype` as torch objects, with one-line errors."""

import torch

from qthink.errors import UserError, require

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    require(name in DTYPES, f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_device(name: str | None) -> torch.device:
    """`--device` as a torch device (default: CUDA when there is one); one line for a name torch does not
    know or for CUDA on a machine without it."""

    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device torch knows; use cpu or cuda (cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU torch can use; use --device cpu")
    return device
