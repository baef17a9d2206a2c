"""One position per row through a Qwen3 decoder's layers, without the set-up its forward repeats per call.

On every call `Qwen3Model.forward` rebuilds the attention mask (with a host sync to look for padding),
recomputes the rotary cos/sin of the positions, slices its layer list and runs its wrappers; at batch 64
on the tiny model that is about a tenth of a decoding step (docs/findings.md, F23). `LayerStep` does that
set-up once per `think`: a cos/sin table for every position the state can reach, and whether the mask has a
zero yet. It then calls the same layers and final norm with the arguments the forward would pass them
(the same 4D mask, or none where the forward skips it), so its hidden states are bit-identical (tested).
Used for the `dynamic` mode without grad; other models, attention implementations and RoPE types that
change with the length fall back to the decoder's own forward.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# RoPE types whose cos/sin at a position do not depend on the other positions of the call (a table is exact)
STATIC_ROPE = ("default", "linear", "yarn", "llama3")


def supports_layer_step(decoder: nn.Module) -> bool:
    """Whether `decoder` is a full-attention Qwen3 decoder on SDPA with a static RoPE (what `LayerStep` mirrors)."""
    config = getattr(decoder, "config", None)
    return (
        getattr(config, "model_type", None) == "qwen3"
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and not getattr(decoder, "has_sliding_layers", True)
        and getattr(getattr(decoder, "rotary_emb", None), "rope_type", None) in STATIC_ROPE
        and all(hasattr(decoder, name) for name in ("layers", "norm"))
    )


@dataclass
class LayerStep:
    """The per-call set-up of `decoder.forward` for one-position steps, done once."""

    decoder: nn.Module
    cos: Tensor  # [capacity, head_dim] rotary cos of every position the state's mask can hold
    sin: Tensor
    padded: bool  # whether a mask column is 0: the forward then passes a 4D mask, else none

    @classmethod
    def for_state(cls, decoder: nn.Module, attention_mask: Tensor, capacity: int, like: Tensor) -> "LayerStep | None":
        """For a state whose prompt mask is `attention_mask` and mask holds `capacity` columns; `like` gives the
        hidden states' dtype and device. None where the decoder is not one `LayerStep` mirrors."""
        if torch.is_grad_enabled() or not supports_layer_step(decoder):
            return None
        step = cls(decoder, like.new_empty(0, 0), like.new_empty(0, 0), not bool(attention_mask.all()))
        step.rope_table(capacity, like)
        return step

    def rope_table(self, capacity: int, like: Tensor) -> None:
        positions = torch.arange(capacity, device=like.device)[None]
        cos, sin = self.decoder.rotary_emb(like, positions)
        self.cos, self.sin = cos[0], sin[0]

    def note_live(self, live: Tensor | None) -> None:
        """A latent column written with `live` (None: all rows); a 0 in it makes the mask padded for good."""
        if live is not None and not self.padded:
            self.padded = not bool(live.all())

    def __call__(self, embeds: Tensor, mask: Tensor, positions: Tensor, cache_kw: dict, capacity: int) -> Tensor:
        """The post-norm hidden state [B, H] of one position per row: `embeds` [B, 1, H] at `positions` [B, 1],
        attending to the live columns `mask` [B, length] (`cache_kw`: the decoder's cache keyword) of a state
        whose mask holds `capacity` columns."""
        if capacity > self.cos.shape[0]:  # the caller grew the mask past the table
            self.rope_table(capacity, embeds)
        attention = mask[:, None, None, :].bool() if self.padded else None
        rope = (self.cos[positions], self.sin[positions])
        hidden = embeds
        for layer in self.decoder.layers:
            hidden = layer(hidden, attention_mask=attention, position_ids=positions, position_embeddings=rope, **cache_kw)
        return self.decoder.norm(hidden)[:, -1]
