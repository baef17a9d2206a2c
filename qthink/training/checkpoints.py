"""`qthink fit` checkpoints: read with one-line errors, and checked against the settings of the run that
uses them (a resumed fit, validate, test), so that weights are never run under settings they were not
trained with."""

import io
import json
import os
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qthink.errors import UserError, require
from qthink.files import atomic_write
from qthink.identity import fingerprint, require_same_base

HPARAM_EXTRAS = ("_instantiator", "_class_path")  # LightningCLI bookkeeping, not constructor arguments
# what the weights mean: checked whenever a checkpoint's weights are used with a config
MODEL_SETTINGS = ("lora", "latent_steps", "adaptive")
# how they are trained: checked too when a fit resumes (a different objective or schedule would silently
# continue another run than the one in the checkpoint)
BASE = "qthink_base"  # checkpoint key: the base model by fingerprint, and where it is from the checkpoint's folder
TRAINING_SETTINGS = ("distill", "teacher", "gamma", "halt_weight", "lr", "weight_decay", "warmup_ratio", "warmup_steps",
                     "min_lr_ratio", "seed")
PLAN = "qthink_fit"  # a checkpoint's record of the fit that wrote it: {"max_steps": N}


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A `qthink fit` checkpoint's contents (memory-mapped, `weights_only`); a missing, cut, foreign or
    non-qthink file is a one-line `UserError` naming it."""
    ckpt_path = Path(ckpt_path)
    require(ckpt_path.is_file(), f"checkpoint {ckpt_path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated file, not a torch file, foreign pickles
        raise UserError(f"{ckpt_path} is not a readable Lightning checkpoint ({type(e).__name__}); "
                        "give a .ckpt written by `qthink fit`") from e
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    require(isinstance(hparams, dict) and "base_model" in hparams and "state_dict" in ckpt,
            f"{ckpt_path} is not a `qthink fit` checkpoint (no QThinkModule hyperparameters)")
    return ckpt


def start_weights(ckpt_path: str | Path, base: str, lora: dict, trainable: set[str]) -> dict:
    """The trained weights of a `qthink fit` checkpoint that a new fit starts from (`model.init_from`): checked to
    be trained on the same base (by fingerprint) with the same LoRA settings; those this model lacks (a halting
    head, for a fixed-K student) are left out, and those it has but the checkpoint lacks start fresh."""
    def plain(settings: dict | None) -> dict:  # a tuple saved may read back as a list
        return {k: list(v) if isinstance(v, tuple | list) else v for k, v in (settings or {}).items()}

    ckpt = read_checkpoint(ckpt_path)
    check_base(ckpt_path, ckpt, base)
    trained = trained_hparams(ckpt).get("lora")
    require(plain(trained) == plain(lora), f"model.init_from {ckpt_path} was trained with LoRA {trained} but this "
            f"config has {lora}; use the same model.lora")
    return {k: v for k, v in ckpt["state_dict"].items() if k in trainable}


def trained_hparams(ckpt: dict) -> dict:
    """The QThinkModule constructor arguments a checkpoint was trained with."""
    return {k: v for k, v in ckpt["hyper_parameters"].items() if k not in HPARAM_EXTRAS}


def base_record(base: str, ckpt_dir: Path) -> dict:
    """What a checkpoint records of its base model: the fingerprint and, for a local base, its path
    relative to the checkpoint's folder (found there again after the project moved)."""
    record = {"fingerprint": fingerprint(base)}
    if Path(base).exists():
        record["relative"] = os.path.relpath(Path(base).resolve(), ckpt_dir.resolve())
    return record


def check_base(ckpt_path: str | Path, ckpt: dict, base: str) -> None:
    """Refuse a base model other than the one the checkpoint was trained on (by fingerprint)."""
    require_same_base((ckpt.get(BASE) or {}).get("fingerprint"), base, f"checkpoint {ckpt_path}",
                      "give the base model it was trained on")


def trained_base(ckpt_path: str | Path, ckpt: dict, base: str | None = None) -> str:
    """The base model to rebuild a checkpoint on, checked by fingerprint: `base` when given, else the one
    it was trained on, where the config named it or (a moved project) at the same place relative to the
    checkpoint."""
    if base is None:
        base = str(ckpt["hyper_parameters"]["base_model"])
        relative = (ckpt.get(BASE) or {}).get("relative")
        if not Path(base).exists() and relative is not None:
            moved = Path(ckpt_path).parent / relative
            require(moved.exists(), f"{ckpt_path} was trained on base model {base}, which is not there any more "
                    "(nor beside the checkpoint where it was); give where it is now with --base PATH")
            base = str(moved)
    check_base(ckpt_path, ckpt, base)
    return base


def flat(name: str, value) -> dict:
    """`{"model.lora.r": 32, ...}`: nested settings by dotted name, tuples as lists (YAML gives lists)."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flat(f"{name}.{key}", sub).items()}
    return {name: json.loads(json.dumps(value))}


def check_settings(ckpt_path: str | Path, ckpt: dict, settings: dict, resuming: bool) -> None:
    """Refuse, naming the first differing setting, a config whose model settings differ from the checkpoint's
    (`settings`: the QThinkModule arguments of this run). Only what the weights mean is compared for
    validate/test; a resumed fit must also train the same way."""
    trained = trained_hparams(ckpt)
    if settings.get("base_model") is not None:
        check_base(ckpt_path, ckpt, settings["base_model"])
    for key in MODEL_SETTINGS + (TRAINING_SETTINGS if resuming else ()):
        if key not in trained or key not in settings:
            continue
        have, want = flat(f"model.{key}", settings[key]), flat(f"model.{key}", trained[key])
        for name in want:
            require(have.get(name) == want[name], f"{ckpt_path} was trained with {name}={want[name]!r} but this "
                    f"config has {have.get(name)!r}; use the config it was trained with"
                    + (" (or drop --ckpt_path and start a new run in another --trainer.default_root_dir)"
                       if resuming else ""))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written like every other qthink file (`atomic_write`: a temporary name in the
    same folder, fsync, rename). Lightning's own save writes a temporary file in the system's temporary
    folder and moves it over the checkpoint, which is a copy where that is another file system: a kill
    mid-copy left a cut `last.ckpt` for `--ckpt_path last` to fail on. With `base_model`, each checkpoint
    records that base by fingerprint (`base_record`)."""

    def __init__(self, base_model: str | None = None):
        super().__init__()
        self.base_model = base_model

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.base_model is not None:
            checkpoint[BASE] = base_record(self.base_model, path.parent)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # in memory first: a failed write is then an OSError, not torch's RuntimeError
        try:
            atomic_write(path, lambda f: f.write(buffer.getbuffer()), binary=True)
        except OSError as e:
            kept = "the previous checkpoint is intact; " if path.exists() else ""
            raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}; {kept}free space (or choose "
                            "another --trainer.default_root_dir) and resume with --ckpt_path last") from e

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        checkpoint = super().load_checkpoint(path, **({} if map_location is None else {"map_location": map_location}),
                                             weights_only=weights_only)
        follow_moved_run(checkpoint, Path(path))
        return checkpoint


def follow_moved_run(checkpoint: dict, path: Path) -> None:
    """A checkpoint read from a run folder that moved (a project copied elsewhere): its ModelCheckpoint state
    names the files where the run was, so Lightning would not take `last.ckpt` for its own and would write
    `last-v1.ckpt` beside it. Where the checkpoint read is one of those files, they are renamed to where it
    is now."""
    here = str(path.resolve().parent)
    for key, state in (checkpoint.get("callbacks") or {}).items():
        was = state.get("dirpath") if isinstance(state, dict) and str(key).startswith("ModelCheckpoint") else None
        if not isinstance(was, str) or was == here:
            continue
        files = [state.get(k) for k in ("last_model_path", "best_model_path", "kth_best_model_path")]
        if os.path.join(was, path.name) not in [*files, *(state.get("best_k_models") or {})]:
            continue  # not this run's own checkpoint: left as it is

        def moved(name, was=was):
            return here + name[len(was):] if isinstance(name, str) and name.startswith(was + os.sep) else name

        state.update({k: moved(state.get(k)) for k in ("last_model_path", "best_model_path", "kth_best_model_path")})
        state["best_k_models"] = {moved(k): v for k, v in (state.get("best_k_models") or {}).items()}
        state["dirpath"] = here


class StopCheckpoint(Callback):
    """A fit stopped by SIGTERM leaves a checkpoint of where it stopped, and every checkpoint records how far its
    fit was to run (`max_steps`), so that `qthink export` can refuse one that stopped early.

    Lightning stops the loop at the end of a step on SIGTERM (`SIGTERMException`); there the state is whole,
    so this turns on the ModelCheckpoints' own `save_on_exception` for that exception only (Ctrl-C or an
    error can strike mid-step, where a checkpoint could hold half an optimizer step). They then write their
    checkpoint and `last.ckpt` (with `save_last`), which `--ckpt_path last` resumes. Must come before them
    in `trainer.callbacks`."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # After an epoch's last step Lightning would stop only once the epoch is counted complete, a state none
        # of its own checkpoints has; stopped here, it is the state of its epoch-end checkpoint
        if trainer.received_sigterm and trainer.state.fn == TrainerFn.FITTING:
            raise SIGTERMException

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    callback.save_on_exception = True

    def on_train_end(self, trainer, pl_module) -> None:
        # A callback (EarlyStopping) ended the fit before max_steps: it is finished, at the step it stopped. The
        # newest checkpoint was written before that decision, so write it again recording it.
        if trainer.should_stop and not trainer.received_sigterm and trainer.global_step < trainer.max_steps:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
                    trainer.save_checkpoint(callback.last_model_path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        stopped = trainer.should_stop and not trainer.received_sigterm  # by a callback, at the end of a check
        checkpoint[PLAN] = {"max_steps": trainer.max_steps, "stopped_early": bool(stopped)}


def require_trained(ckpt_path: str | Path, ckpt: dict) -> None:
    """Refuse a checkpoint whose fit stopped before its `max_steps` (SIGTERM, Ctrl-C, a crash, or a periodic
    checkpoint of a run); one that early stopping ended is finished. Checkpoints written before qthink recorded `max_steps`, and fits bounded by epochs
    instead, are not checked."""
    plan = ckpt.get(PLAN) or {}
    max_steps, step = plan.get("max_steps", -1), int(ckpt.get("global_step", 0))
    require(type(max_steps) is not int or max_steps < 0 or step >= max_steps or plan.get("stopped_early") is True,
            f"{ckpt_path} stopped at step {step} of {max_steps}: resume it with `qthink fit ... --ckpt_path last` "
            "to finish it, or pass --unfinished to export it as it is")
