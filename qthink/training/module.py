"""`QThinkModule`: the LightningModule that trains QThink (LoRA on a frozen base + the projection head).

    loss = CE(answer | prompt, K latents) + gamma * sum_k L1(h_k, t_k)  [+ halt_weight * BCE(stop | h_k)]

`h_k` is the student's hidden state after latent step k (`qthink.core.latent.think`), `t_k` the teacher state
for that step from the teacher store (uniform or reward-weighted mean over rollouts). With `adaptive`, each
problem runs its own number of latent steps n (the store's, at most K), batched with per-row masks, and a
halting head learns from h_k whether step k was the last (target 1 at k = n); at inference the student
stops where it says so. The latent loop,
the answer pass and the chunked cross-entropy are `qthink.core.latent`'s; this module only adds the losses,
the optimizer, metrics, and checkpoints that hold the trainable weights alone.

Precision comes from the Trainer (`bf16-mixed` on GPUs): weights are loaded in float32, so the LoRA
adapters, the head and AdamW's state stay float32 while matmuls run in bf16; the losses are float32.
HF gradient checkpointing stays off: in training mode it silently drops the KV cache the latent loop
relies on.
"""

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torchmetrics import MeanMetric

from qthink import arguments as ranges  # types whose range jsonargparse checks when it parses the config
from qthink import scoring  # the one evaluation step, shared with `qthink eval`
from qthink.core.latent import (
    HaltingHead,
    ProjectionHead,
    answer_hidden,
    answer_token_losses,
    model_parts,
    think,
)
from qthink.core.model import QThink, load_base
from qthink.errors import UserError, require
from qthink.measure import train_flops
from qthink.recipe import SEED, Distill, Teacher  # every default below is the seed's recipe
from qthink.scoring import Decoding
from qthink.training.checkpoints import start_weights
from qthink.training.run_logging import training_callbacks


@dataclass(frozen=True)
class LoraArgs:
    """LoRA adapters (peft) on the frozen base model.

    Args:
        r: Adapter rank; 0 trains the projection head alone (no adapters).
        alpha: Scaling numerator: the adapter update is scaled by alpha / r (the seed: 16 / 32).
        dropout: Dropout on the adapter input (0 keeps training deterministic).
        target_modules: Linear layers that get adapters: every attention and MLP projection of a Qwen3 block.
    """

    r: ranges.Count = SEED.lora_r
    alpha: ranges.PositiveCount = SEED.lora_alpha
    dropout: ranges.Probability = SEED.lora_dropout
    target_modules: tuple[str, ...] = SEED.lora_target_modules


class NonFiniteLossError(UserError):
    """The loss or the gradient norm became NaN/inf; raised before the optimizer step that would spread it."""


# ---- the math, as small pure functions ----


def mean_row_ce(hidden: Tensor, lm_head: nn.Module, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over each row's answer tokens, then over rows (float32).

    At batch 1 this is the token mean of the seed's recipe; at batch B it equals the seed's
    1 x B gradient accumulation exactly, so batching changes speed, not the objective.
    Rows without a labelled token do not count. One LM-head pass for the whole batch.
    """
    counts = (labels != -100).sum(-1)
    has_tokens = counts > 0
    require(bool(has_tokens.any()), "a training batch has no answer tokens; check data.max_answer_tokens")
    per_row = answer_token_losses(hidden, lm_head, labels).sum(-1)
    return (per_row[has_tokens] / counts[has_tokens]).mean()


def l1_per_step(latents: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """[K] L1 per latent step: |h_k - t_k| averaged over hidden dims, then over the rows with a valid teacher
    for that step (`valid`: [B], or [B, K] when rows take different numbers of steps).

    Steps are 0 where no row of the batch has a valid teacher (those rows train on CE alone).
    """
    per_row = (latents.float() - targets.float()).abs().mean(-1)  # [B, K]
    weight = step_weights(valid, per_row.shape)
    return (per_row * weight).sum(0) / weight.sum(0).clamp(min=1.0)


def step_weights(valid: Tensor, shape: torch.Size) -> Tensor:
    """[B, K] float32 weights from `valid`: [B] (a row's teacher counts at every step) or [B, K] (per step)."""
    return (valid[:, None] if valid.dim() == 1 else valid).float().expand(shape)


def step_mask(num_steps: Tensor, k: int) -> Tensor:
    """[B, k] bool: which of k latent steps each row takes (row i takes its first num_steps[i])."""
    return torch.arange(k, device=num_steps.device)[None] < num_steps[:, None]


def halting_loss(logits: Tensor, num_steps: Tensor, rows: Tensor) -> Tensor:
    """Binary cross-entropy of the halting logits [B, k]: stop (1) at each row's last step, go on (0) before
    it; averaged over the steps the rows take, for the rows in `rows` (those with a teacher count)."""
    live = step_mask(num_steps, logits.shape[1]) & rows[:, None]
    last = torch.arange(logits.shape[1], device=logits.device)[None] == (num_steps - 1)[:, None]
    losses = F.binary_cross_entropy_with_logits(logits.float(), last.float(), reduction="none")
    return (losses * live).sum() / live.sum().clamp(min=1)


def distill_term(l1_steps: Tensor, mode: Distill) -> Tensor:
    """What gamma multiplies: the sum over steps (per_step), the last step only (final_step, CODI), or 0."""
    if mode == "per_step":
        return l1_steps.sum()
    if mode == "final_step":
        return l1_steps[-1]
    return l1_steps.new_zeros(())


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` optimizer steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_targets(batch: dict, teacher: Teacher) -> tuple[Tensor, Tensor]:
    """The chosen teacher [B,K,H] and which rows have one (`weighted` needs a correct rollout)."""
    valid = batch["num_valid"] > 0
    if teacher == "weighted":
        return batch["teacher_weighted"], valid & batch["weighted_valid"]
    return batch["teacher_uniform"], valid


class QThinkModule(L.LightningModule):
    """LoRA + projection head trained with answer CE and per-step L1 distillation to stored teacher states.

    Args:
        base_model: Base model directory or Hugging Face repo id (e.g. Qwen/Qwen3-1.7B); loaded in float32.
        lora: LoRA adapter settings.
        latent_steps: K, the number of latent passes between the prompt and the answer (0 = plain SFT); with
            adaptive, the most a problem may take (K_max).
        adaptive: The student decides how long to think: each problem trains on its own number of latent
            steps (a store built with `qthink teachers --adaptive`), and a halting head learns where to stop.
        halt_weight: Weight of the halting head's cross-entropy (adaptive only).
        distill: Which latent steps get the L1 loss: every step, the last step only (CODI-style), or none.
        teacher: Teacher states: `uniform` = mean over all valid rollouts, `weighted` = over correct ones.
        gamma: Weight of the summed L1 distillation loss against the answer cross-entropy.
        lr: Peak AdamW learning rate (reached after warmup).
        weight_decay: AdamW weight decay on matrices (biases and LayerNorm are never decayed).
        warmup_ratio: Warmup length as a fraction of all optimizer steps (used when warmup_steps is None).
        warmup_steps: Warmup length in optimizer steps; overrides warmup_ratio.
        min_lr_ratio: The cosine decay ends at lr * min_lr_ratio.
        seed: Seed of the LoRA and head initialisation (the same on every rank).
        val_max_new_tokens: Greedy decoding budget per validation answer.
        val_task: Task whose grader scores validation; None: the datamodule's task.
        val_log_samples: Decoded validation answers written to TensorBoard as text per validation run.
        trust_remote_code: Allow custom model code from the base model's repo.
        init_from: A `qthink fit` checkpoint (.ckpt) on the same base and LoRA shape whose adapters and heads this
            fit starts from (a curriculum stage: e.g. fewer latent steps after a student with one per reasoning
            step); only the weights: the step, optimizer and schedule start anew (`--ckpt_path` resumes a run).
    """

    def __init__(
        self,
        base_model: str,
        lora: LoraArgs = LoraArgs(),  # noqa: B008 (frozen dataclass: a shared default is safe)
        latent_steps: ranges.Count = SEED.latent_steps,
        adaptive: bool = False,
        halt_weight: ranges.NonNegativeFinite = 1.0,
        distill: Distill = SEED.distill,
        teacher: Teacher = SEED.teacher,
        gamma: ranges.NonNegativeFinite = SEED.gamma,
        lr: ranges.PositiveFinite = SEED.lr,
        weight_decay: ranges.NonNegativeFinite = SEED.weight_decay,
        warmup_ratio: ranges.Fraction = SEED.warmup_ratio,
        warmup_steps: ranges.Count | None = None,
        min_lr_ratio: ranges.Fraction = SEED.min_lr_ratio,
        seed: ranges.Seed = 0,
        val_max_new_tokens: ranges.PositiveCount = SEED.max_answer_tokens,
        val_task: str | None = None,
        val_log_samples: ranges.Count = 4,
        trust_remote_code: bool = False,
        init_from: str | None = None,
    ):
        super().__init__()
        require(init_from is None or Path(init_from).is_file(),
                f"model.init_from {init_from} does not exist; give a .ckpt written by `qthink fit`")
        lora_args = LoraArgs(**lora) if isinstance(lora, dict) else lora
        lora = asdict(lora_args)  # hparams hold plain types (checkpoints load with weights_only=True)
        require(distill == "none" or latent_steps > 0,
                f"model.distill={distill} needs model.latent_steps > 0; use distill: none for K=0 (plain SFT)")
        require(not adaptive or (latent_steps > 0 and distill != "final_step"),
                "model.adaptive needs model.latent_steps > 0 (the most steps a problem may take) and distill "
                "per_step or none (each problem's last step differs)")
        self.save_hyperparameters()
        self.base_model, self.lora = base_model, lora_args
        self.latent_steps, self.distill, self.teacher, self.gamma = latent_steps, distill, teacher, gamma
        self.adaptive, self.halt_weight = adaptive, halt_weight
        self.lr, self.weight_decay, self.min_lr_ratio = lr, weight_decay, min_lr_ratio
        self.warmup_ratio, self.warmup_steps = warmup_ratio, warmup_steps
        self.seed, self.trust_remote_code, self.init_from = seed, trust_remote_code, init_from
        self.val_max_new_tokens, self.val_task, self.val_log_samples = val_max_new_tokens, val_task, val_log_samples
        self.model: nn.Module | None = None
        self.head: ProjectionHead | None = None
        self.halting_head: HaltingHead | None = None
        self.tokenizer = None
        self.eval_metrics: nn.ModuleDict | None = None
        self._task_obj = None
        self.batch_idx = 0  # the training batch in this epoch (`on_train_batch_start`)
        self.flops_per_batch: float | None = None  # read by ThroughputMonitor (model FLOPs, `train_flops`)
        self.strict_loading = False  # checkpoints hold the trainable weights only

    # ---- model ----

    def configure_model(self) -> None:
        """Load the base (float32), freeze it, add LoRA and build the head; idempotent (Lightning may call twice)."""
        if self.model is not None:
            return
        model, tokenizer = load_base(self.base_model, torch.float32, self.trust_remote_code)
        model.requires_grad_(False).train()  # train mode like the rest of the module (Qwen3 has no dropout)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft 0.21 on transformers 5.24
            torch.manual_seed(self.seed)  # identical adapters and head on every rank and every rebuild
            if self.lora.r > 0:
                from peft import LoraConfig, get_peft_model

                config = LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                                    target_modules=list(self.lora.target_modules), bias="none", task_type="CAUSAL_LM")
                model = get_peft_model(model, config)
            head = ProjectionHead(model.config.hidden_size)
            halting = HaltingHead(model.config.hidden_size) if self.adaptive else None
        head.requires_grad_(self.latent_steps > 0)  # K = 0 never calls the head: DDP must not wait for its grads
        self.model, self.head, self.halting_head, self.tokenizer = model, head, halting, tokenizer
        if self.init_from is not None:
            self.load_state_dict(start_weights(self.init_from, self.base_model, asdict(self.lora), self.trainable_names()),
                                 strict=False)

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def as_qthink(self) -> QThink:
        """The current weights as a `QThink` (adapters unmerged): generate with it exactly like an export."""
        return QThink(self.model, self.tokenizer, self.head, self.latent_steps, self.training_info(), self.halting_head)

    def training_info(self) -> dict[str, Any]:
        """How this model is trained, for qthink.json."""
        return {"base_model": self.base_model, "latent_steps": self.latent_steps, "adaptive": self.adaptive,
                "distill": self.distill, "teacher": self.teacher, "gamma": self.gamma, "lora": asdict(self.lora),
                "lr": self.lr, "seed": self.seed}

    # ---- training ----

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        """`loss`, `ce`, `distill` and, when a teacher of matching K is in the batch, per-step diagnostics."""
        k = self.latent_steps
        row_steps = batch["num_steps"] if self.adaptive else None
        state = think(self.model, self.head, batch["prompt_ids"], batch["prompt_mask"], k, row_steps=row_steps)
        hidden = answer_hidden(self.model, state, batch["answer_ids"], batch["answer_mask"])
        ce = mean_row_ce(hidden, model_parts(self.model).lm_head, batch["labels"])
        out = {"ce": ce, "distill": ce.new_zeros(())}
        has_teacher = k > 0 and "teacher_uniform" in batch and batch["teacher_uniform"].shape[1] == k
        if self.distill != "none":
            got = batch["teacher_uniform"].shape[1] if "teacher_uniform" in batch else None
            require(has_teacher, f"the batch's teacher has K={got} but model.latent_steps={k}; "
                    "use a teacher store built with the same K")
        if has_teacher:
            targets, valid = teacher_targets(batch, self.teacher)
            targets = targets[:, : state.latents.shape[1]]  # adaptive: the batch's longest row, at most K
            if self.adaptive:
                valid = valid[:, None] & step_mask(batch["num_steps"], targets.shape[1])
            l1 = l1_per_step(state.latents, targets, valid)
            out["distill"] = distill_term(l1, self.distill)
            out.update(self._diagnostics(state.latents.detach().float(), targets.float(), valid, l1.detach()))
        out["loss"] = ce + self.gamma * out["distill"]
        if self.adaptive:
            out["halt"] = halting_loss(self.halting_head(state.latents), batch["num_steps"], batch["num_valid"] > 0)
            out["loss"] = out["loss"] + self.halt_weight * out["halt"]
        return out

    @staticmethod
    def _diagnostics(latents: Tensor, targets: Tensor, valid: Tensor, l1: Tensor) -> dict[str, Tensor]:
        weight = step_weights(valid, latents.shape[:2])
        n = weight.sum(0).clamp(min=1.0)
        cos = (F.cosine_similarity(latents, targets, dim=-1) * weight).sum(0) / n
        norm_t = (targets.norm(dim=-1) * weight).sum(0) / n
        norm_h = latents.norm(dim=-1).mean(0)
        out = {}
        for k in range(latents.shape[1]):
            out |= {f"l1_step_{k + 1}": l1[k], f"cos_step_{k + 1}": cos[k],
                    f"norm_h_{k + 1}": norm_h[k], f"norm_t_{k + 1}": norm_t[k]}
        return out

    def configure_callbacks(self) -> list[Callback]:
        """`run_logging.training_callbacks` (learning rate, throughput rates, `hp_metric`); these replace
        same-type callbacks in a config. None without a logger (LearningRateMonitor refuses to run without one)."""
        if self._trainer is None or not self.trainer.loggers:
            return []
        return training_callbacks(self.latent_steps)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self.batch_idx = batch_idx  # named in a non-finite gradient's error (the optimizer hook is not given it)
        ids, answer = batch["prompt_ids"], batch["answer_ids"]
        self.flops_per_batch = train_flops(self.model.config, ids.shape[0], ids.shape[1], self.latent_steps,
                                           answer.shape[1])[0]  # padded shapes: the work the device does

    def on_validation_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.flops_per_batch = None  # decoding is not a training step; no FLOPs count for it

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        loss = losses["loss"]
        self._require_finite(loss, "loss", batch_idx)  # before backward and the optimizer step
        size = batch["prompt_ids"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=size)
        return loss

    def _require_finite(self, value: Tensor, name: str, batch_idx: int) -> None:
        finite = bool(torch.isfinite(value).all())
        if self._trainer is not None:  # every rank raises together instead of one waiting in all-reduce
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            where = f" on rank {self.global_rank}" if self._trainer is not None and self.trainer.world_size > 1 else ""
            raise NonFiniteLossError(
                f"{name} is {value.item()}{where} at global step {self.global_step}, batch {batch_idx} "
                f"(epoch {self.current_epoch}); stopped before the optimizer step, so no checkpoint holds non-finite "
                "weights. Check the teacher store for NaN/inf, lower model.lr, or train in bf16-mixed/32-true "
                "rather than 16-mixed"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norm = grad_norm(self, norm_type=2).get("grad_2.0_norm_total")  # of all gradients as one vector
        if norm is not None:
            self._require_finite(norm, "gradient norm", self.batch_idx)
            self.log("train/grad_norm", norm)  # before clipping (the Trainer clips after this hook)

    # ---- validation / test: `qthink.scoring.score_batch`, the step `qthink eval` runs ----

    def _task(self):
        if self._task_obj is None:
            from qthink.tasks import get_task

            datamodule = self._trainer.datamodule if self._trainer is not None else None
            if self.val_task is not None:
                self._task_obj = get_task(self.val_task)
            elif datamodule is not None and getattr(datamodule, "task", None) is not None:
                self._task_obj = datamodule.task
        return self._task_obj

    def setup(self, stage: str) -> None:
        task = self._task()
        if task is not None and self.eval_metrics is None:
            self.eval_metrics = nn.ModuleDict(
                {s: nn.ModuleDict({m: MeanMetric() for m in (*task.metrics, *(("latent_steps",) if self.adaptive else ()))})
                 for s in ("val", "test")}
            )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        task = self._task()
        require(task is not None and self.eval_metrics is not None,
                "validation needs a task: set model.val_task or use TeacherDataModule")
        decoding = Decoding(max_new_tokens=self.val_max_new_tokens)  # greedy; the model's K (adaptive: its choice)
        preds = scoring.score_batch(self.as_qthink(), task, batch["records"], batch["prompt_ids"], batch["prompt_mask"],
                                    decoding)
        metrics = self.eval_metrics[stage]
        for pred, scored in zip(preds, batch.get("scored", [True] * len(preds)), strict=True):
            weight = 1.0 if scored else 0.0  # padding copies that even out the ranks' shares: 0
            for name in metrics:  # the task's metrics and, adaptive, how long the student chose to think
                metrics[name].update(float(pred[name]), weight=weight)
        samples = [(p["prompt"], p["output"], p["reference"], p[task.metrics[0]]) for p in preds]
        size = len(batch["records"])
        for name, metric in metrics.items():  # torchmetrics syncs across DDP ranks at epoch end
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=size, prog_bar=True)
        if batch_idx == 0 and self.global_rank == 0:
            self._log_samples(stage, samples[: self.val_log_samples])

    def _log_samples(self, stage: str, samples: list[tuple]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        from qthink.tables import markdown_table

        table = markdown_table(["question", "output", "reference", "score"], [list(s) for s in samples])
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(f"{stage}/samples", table, self.global_step)

    # ---- optimizer ----

    def configure_optimizers(self) -> dict:
        """AdamW over the trainable parameters only; warmup + cosine stepped per optimizer step."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.weight_decay, "name": "decay"},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "name": "no_decay"}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup, total, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    # ---- checkpoints hold trainable weights only ----

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(self.trainable_names() - set(checkpoint["state_dict"]))
        require(not missing, f"checkpoint lacks {len(missing)} trainable weights (e.g. {missing[0] if missing else ''}); "
                "it was saved with other LoRA/K settings: resume with the config it was trained with")
        params = dict(self.named_parameters())
        for name in sorted(self.trainable_names()):  # a base of another size: a size-mismatch traceback otherwise
            have, saved = tuple(params[name].shape), tuple(checkpoint["state_dict"][name].shape)
            require(have == saved, f"checkpoint weight {name} has shape {saved} but base model {self.base_model} "
                    f"needs {have}: it was trained on a base of another size; use the base it was trained on")
