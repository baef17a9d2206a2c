"""The seed's recipe: every method setting of the published QThink model card, in one frozen object.

Every default that restates one of these values points here (function signatures, argparse flags, and the
`QThinkModule`/`TeacherDataModule` signatures that LightningCLI reads its defaults from), so the recipe is
written once; `tests/test_recipe.py` checks the object against the card's values and the entry points'
defaults against the object. The published generation code itself stays verbatim in
`qthink/bench/seed_recipe.py`. Hardware and schedule (8 GPUs, accumulation 16, 3 epochs, bf16) are trainer
settings and live in `configs/qwen3-1.7b/recipe.yaml`.

Each field's comment says what it is and where it comes from: "seed:" is the model card's value as this
project records it (the card's usage code for K; its training setup, restated in recipe.yaml's header, for
the rest), "qthink:" a value the card does not give.

Imports nothing heavy: `cli.py` reads it to build `--help` without importing torch.
"""

from dataclasses import dataclass
from typing import Literal

Distill = Literal["per_step", "final_step", "none"]
Teacher = Literal["uniform", "weighted"]
QWEN3_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """The QThink method's settings; `SEED` holds the seed's (Qwen3-1.7B model card)."""

    # -- latent reasoning --
    latent_steps: int = 6  # K: latent passes between the prompt and the answer (seed: K=6, also seed_generate's default)
    position_scheme: str = "linspace"  # teacher positions round(linspace(0, L-1, K)) in the think block (seed)

    # -- teachers: the base model's own rollouts --
    G: int = 16  # rollouts sampled per training problem, thinking on (seed: G=16)
    temperature: float = 0.6  # rollout sampling temperature (seed: 0.6)
    top_p: float = 0.95  # nucleus sampling mass (seed: 0.95)
    top_k: int = 20  # candidates kept before top-p (seed: 20)
    rollout_max_new_tokens: int = 4096  # token budget per rollout, think block and answer (qthink: the card gives none)
    teacher: Teacher = "uniform"  # mean of the teacher states over all valid rollouts (seed: uniform)

    # -- loss --
    distill: Distill = "per_step"  # L1 on every latent step against its teacher state (seed: per-step)
    gamma: float = 2.0  # weight of the summed L1 against the answer cross-entropy (seed: 2)

    # -- LoRA on the frozen base --
    lora_r: int = 32  # adapter rank (seed: 32)
    lora_alpha: int = 16  # adapter scale numerator, update scaled by alpha / r (seed: 16)
    lora_dropout: float = 0.0  # dropout on the adapter input (qthink: 0 keeps training deterministic)
    lora_target_modules: tuple[str, ...] = QWEN3_PROJECTIONS  # every attention and MLP projection (seed)

    # -- optimizer: AdamW, warmup then cosine decay --
    lr: float = 2e-4  # peak learning rate (seed: 2e-4)
    weight_decay: float = 0.0  # AdamW weight decay on matrices (qthink: the card gives none)
    warmup_ratio: float = 0.03  # warmup as a fraction of all optimizer steps (seed: 3%)
    min_lr_ratio: float = 0.0  # the cosine ends at lr * this (seed: decay to 0)

    # -- lengths and batch --
    max_prompt_tokens: int = 1024  # longer training prompts are dropped (seed: 1024)
    max_answer_tokens: int = 256  # answers are cut to this many tokens; also the decoding budget (seed: 256)
    batch_size: int = 1  # problems per GPU per micro-batch (seed: 1, x 16 accumulation x 8 GPUs = 128 per step)


SEED = Recipe()
