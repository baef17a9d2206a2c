"""`qthink export CKPT OUT [--base B] [--dtype D]`: a `qthink fit` checkpoint -> a seed-format checkpoint.

The Lightning checkpoint holds only the trainable weights (LoRA + head) and the module's hyperparameters.
Export rebuilds the module from those hyperparameters (the base model from its original path, from the
same place relative to the checkpoint when the project moved, or `--base`; always checked by fingerprint),
loads the weights, merges LoRA into the base in float32 (`merge_and_unload(safe_merge=True)`, which
refuses to write NaN/inf), and writes the directory `qthink generate`, `qthink eval` and the seed's
own usage snippet read (ARCHITECTURE.md contract 3), with `qthink.json` recording how the model was trained.
A checkpoint of a fit that stopped before its `max_steps` (SIGTERM, Ctrl-C, a periodic checkpoint) is refused
unless `--unfinished` is given: a half-trained model is never exported by mistake.
"""

import warnings
from pathlib import Path

import torch

from qthink.arguments import SignatureCommand
from qthink.core.device import DTYPES, parse_dtype
from qthink.core.model import QThink, check_checkpoint_dir, config_of
from qthink.errors import UserError, require
from qthink.identity import fingerprint
from qthink.ownership import lock_beside
from qthink.training.checkpoints import read_checkpoint, require_trained, trained_base, trained_hparams
from qthink.training.module import QThinkModule


def load_module(ckpt_path: str | Path, base: str | None = None) -> tuple[QThinkModule, dict]:
    """The trained module (float32, CPU, eval mode) and its checkpoint."""
    ckpt = read_checkpoint(ckpt_path)
    hparams = trained_hparams(ckpt)
    hparams["base_model"] = trained_base(ckpt_path, ckpt, base)  # found after a move, checked by fingerprint
    module = QThinkModule(**hparams)
    module.configure_model()
    module.on_load_checkpoint(ckpt)  # every trainable weight must be there
    module.load_state_dict(ckpt["state_dict"], strict=False)
    return module.eval(), ckpt


def export_checkpoint(ckpt_path: str | Path, out: str | Path, base: str | None = None, dtype: str = "base",
                      unfinished: bool = False) -> Path:
    """Write the seed-format checkpoint of a `qthink fit` checkpoint to `out`; returns `out`.

    Args:
        ckpt_path: Lightning checkpoint written by `qthink fit` (e.g. RUN/checkpoints/last.ckpt)
        out: output directory (seed-format checkpoint)
        base: base model path or repo id, if it moved since training (must be the same model: checked by
            fingerprint)
        dtype: base (the base model's stored dtype, e.g. bfloat16 for Qwen3-1.7B) | float32 | bfloat16 | float16
        unfinished: export a checkpoint of a fit that stopped before its max_steps (default: refused)
    """
    with lock_beside(out, "checkpoint folder"):  # one export into `out` at a time, from the first check to the rename
        return _export_locked(ckpt_path, out, base, dtype, unfinished)


def _export_locked(ckpt_path: str | Path, out: str | Path, base: str | None, dtype: str, unfinished: bool) -> Path:
    if not unfinished:
        require_trained(ckpt_path, read_checkpoint(ckpt_path))
    check_checkpoint_dir(out, (base,))  # before the (slow) load: a wrong folder fails at once
    module, ckpt = load_module(ckpt_path, base)
    check_checkpoint_dir(out, (module.base_model,))
    model = module.model
    if hasattr(model, "merge_and_unload"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                model = model.merge_and_unload(safe_merge=True)
            except ValueError as e:  # safe_merge found NaN/inf
                raise UserError(f"{ckpt_path}: merging LoRA gives non-finite weights ({e}); export an earlier checkpoint") from e
    model = model.to(_base_dtype(module.base_model, module.trust_remote_code) if dtype == "base" else parse_dtype(dtype))
    info = {**module.training_info(), "base_fingerprint": fingerprint(module.base_model), "trained_steps": int(ckpt.get("global_step", 0)),
            "trained_epochs": int(ckpt.get("epoch", 0)), "lightning_checkpoint": str(Path(ckpt_path).resolve())}
    qt = QThink(model, module.tokenizer, module.head, module.latent_steps, info, module.halting_head)
    return qt.save_pretrained(out)


def _base_dtype(base_model: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype the base model is stored in (float32 when the config does not say)."""
    dtype = getattr(config_of(base_model, trust_remote_code), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


COMMAND = SignatureCommand(export_checkpoint, positional=True)


def cli_main(settings: dict) -> None:
    require(settings["dtype"] == "base" or settings["dtype"] in DTYPES,
            f"--dtype must be base, float32, bfloat16 or float16 (got {settings['dtype']})")
    out = export_checkpoint(**settings)
    print(f"wrote seed-format checkpoint to {out}")
