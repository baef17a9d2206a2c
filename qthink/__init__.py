"""qthink: QThink latent reasoning for Qwen3 (K latent passes through a projection head instead of a
visible chain of thought), trained by per-step distillation of multi-rollout teacher states."""

__version__ = "0.1.0"
