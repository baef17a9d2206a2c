"""The latent loop: ProjectionHead and the one implementation of prompt -> K latent steps -> answer.

Training (`think` + `answer_hidden` + `answer_token_losses`, with gradients), validation, inference, evaluation,
rollouts and benchmarks (`generate`, under `torch.inference_mode`) all run through these functions.

Sequence layout (ARCHITECTURE.md contract 1): a batch of left-padded prompts, then K latent positions, then the
answer. Every decoder call gets the running attention mask and explicit `position_ids` derived from it, so
a row's result does not depend on the padding its batch needs (CODI attends to left padding; Coconut has
no cache). The hidden state everywhere is the post-final-norm last-layer state (`last_hidden_state`).
The decoder is called without its LM head: vocabulary logits are built only where a token is predicted.
Without grad, the KV cache is preallocated (`kv_cache.ReservedLayer`) instead of regrown by `torch.cat` per token,
and `dynamic` steps run the decoder's layers directly, its mask and RoPE set up once (`decoder_step.LayerStep`).
HF gradient checkpointing must stay off on this path: it silently drops the KV cache in training mode.

Decode modes (inference only): `dynamic` (the default) grows the attended width by one column per step;
`static` holds a transformers `StaticCache` and the whole preallocated mask, so every one-position step
(latent or token) has the same shapes; `compiled` runs those steps through `torch.compile` (on CUDA with
CUDA graphs, `mode="reduce-overhead"`), which is what removes the per-kernel launch cost of small-batch
decoding. All three give the same tokens (tested); hidden states agree to float rounding, because
attention then also reduces over masked columns.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from qthink.core.compat import cache_kwargs, new_cache
from qthink.core.decoder_step import LayerStep
from qthink.core.kv_cache import reserve_cache, static_cache, static_capacity
from qthink.core.sampling import Sampler


class ProjectionHead(nn.Module):
    """Linear(H,H) -> GELU -> Linear(H,H) -> LayerNorm(H); state-dict keys `mlp.0.*`, `mlp.2.*`, `mlp.3.*`
    as in the seed's published checkpoint."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
            nn.LayerNorm(hidden_size),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class HaltingHead(nn.Module):
    """Linear(H, 1) on a latent step's output state: the logit that this step was the chain's last, so the
    student stops thinking there (the adaptive student; trained from each problem's own step count)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.proj = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).squeeze(-1)


def halting_rule(halting_head: nn.Module, sampler: Sampler | None = None) -> "Callable[[Tensor, int], Tensor]":
    """Whether each row stops after latent step k: greedy (logit > 0, i.e. probability > 1/2), or sampled
    (Bernoulli on the row's counter noise, so a row's choice depends on its seed and step only)."""

    def stop(hidden: Tensor, k: int) -> Tensor:
        logit = halting_head(hidden.to(halting_head.proj.weight.dtype)).float()
        if sampler is None:
            return logit > 0
        return sampler.bernoulli(torch.sigmoid(logit), k)

    return stop


class ModelParts(NamedTuple):
    """The pieces of a causal LM that the latent loop calls directly."""

    decoder: nn.Module  # the transformer body: embeddings in, last hidden states out
    lm_head: nn.Module  # hidden states -> vocabulary logits
    embed: nn.Module  # token ids -> input embeddings


def model_parts(model: nn.Module) -> ModelParts:
    """(decoder, lm_head, embed) of a causal LM, PEFT-wrapped or not."""
    return ModelParts(model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings())


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count only attended tokens, so left padding does not shift RoPE positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class LatentState:
    """What the prompt and the latent steps leave behind for the answer."""

    cache: object  # transformers DynamicCache holding prompt + latent keys/values
    mask: Tensor  # [B, capacity] preallocated attention mask; columns < length are live
    length: int  # number of live columns (prompt + latents [+ decoded tokens])
    next_position: Tensor  # [B] RoPE position of the next token of each row
    hidden: Tensor  # [B, H] the state the next token is predicted from
    latents: Tensor  # [B, K, H] hidden state of each latent step (what the per-step L1 is taken on)
    decode_mode: str = "dynamic"  # one of DECODE_MODES
    steps: Tensor | None = None  # [B] latent steps each row took (rows stop one by one when adaptive)
    layer_step: LayerStep | None = None  # `dynamic` steps without grad: the decoder's per-call set-up done once

    @property
    def attention_mask(self) -> Tensor:
        return self.mask[:, : self.length]

    def repeat_interleave(self, n: int) -> "LatentState":
        """Each row repeated n times (rows 0,0,..,1,1,..): G samples share one prompt prefill."""
        if n == 1:
            return self
        if self.decode_mode != "dynamic":
            raise ValueError("a static cache cannot be expanded in place; repeat the prompts instead (`generate` does)")
        self.cache.batch_repeat_interleave(n)
        return LatentState(
            self.cache,
            self.mask.repeat_interleave(n, 0),
            self.length,
            self.next_position.repeat_interleave(n, 0),
            self.hidden.repeat_interleave(n, 0),
            self.latents.repeat_interleave(n, 0),
            self.decode_mode,
            None if self.steps is None else self.steps.repeat_interleave(n, 0),
            self.layer_step,
        )


DECODE_MODES = ("dynamic", "static", "compiled")
# torch.compile specialises the step on its shapes (batch, capacity) and compiles again for each new pair; a
# benchmark's batches (sorted by length, capacities bucketed by `static_capacity`) need a handful. Dynamo's
# default limit of 8 per function would silently fall back to eager beyond that, so compiled mode raises it.
RECOMPILE_LIMIT = 64
_COMPILED: dict[str, object] = {}


def _last_hidden(decoder: nn.Module, embeds: Tensor, mask: Tensor, positions: Tensor, cache_kw: dict) -> Tensor:
    """One decoder call on one position per row: its post-norm hidden state, [B, H]."""
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **cache_kw)
    return out.last_hidden_state[:, -1]


def compiled_last_hidden(device_type: str):
    """`_last_hidden` under `torch.compile`, made once per process and device type. Shapes are static
    (`dynamic=False`): a `static` state's shapes do not change from step to step. On CUDA the step is
    captured as a CUDA graph (`reduce-overhead`): one launch per step instead of one per kernel."""
    if device_type not in _COMPILED:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(_last_hidden, mode=mode, dynamic=False)
    return _COMPILED[device_type]


def _decode_step(decoder: nn.Module, state: LatentState, embeds: Tensor, live: Tensor | None = None) -> Tensor:
    """Append one position per row (given as input embeddings) and return its hidden state [B, H].

    `live` [B] bool: rows where the position counts; elsewhere its mask column is 0 and the row's RoPE
    position does not advance, so later positions never see it (a row that has stopped thinking)."""
    if live is not None:
        state.mask[:, state.length] = live.to(state.mask.dtype)
    state.length += 1
    # static modes pass the whole mask (fixed shape): causal masking hides the columns not yet written
    mask = state.attention_mask if state.decode_mode == "dynamic" else state.mask
    args = (decoder, embeds.unsqueeze(1), mask, state.next_position.unsqueeze(1), cache_kwargs(decoder, state.cache))
    if state.layer_step is not None:
        state.layer_step.note_live(live)
        hidden = state.layer_step(*args[1:], state.mask.shape[1])
    elif state.decode_mode == "compiled":
        torch.compiler.cudagraph_mark_step_begin()
        # clone: a CUDA graph's output buffer is overwritten by its next replay, and latents are kept
        hidden = compiled_last_hidden(embeds.device.type)(*args).clone()
    else:
        hidden = _last_hidden(*args)
    state.next_position = state.next_position + (1 if live is None else live.long())
    return hidden


def think(
    model: nn.Module,
    head: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    latent_steps: int,
    reserve: int = 0,
    decode_mode: str = "dynamic",
    row_steps: Tensor | None = None,
    halting: Callable[[Tensor, int], Tensor] | None = None,
) -> LatentState:
    """Prefill left-padded prompts, then run `latent_steps` latent passes.

    Latent step k feeds `head(h_{k-1})` back as an input embedding (h_0 = the prompt's last state) and
    records its output state h_k. `reserve` preallocates mask columns (and, without grad, KV-cache
    positions) for tokens decoded afterwards. Gradients flow through every step when called with grad enabled
    (`dynamic` mode only: the static modes write the cache in place). The prefill is never compiled.

    Rows may think for different numbers of steps, up to `latent_steps` (K_max): `row_steps` [B] gives each
    row's count (training, from the teacher), or `halting(h_k, k)` -> [B] bool says which rows stop after
    step k (inference). A stopped row's later latent positions are masked out and do not advance its
    positions, so its answer follows its own last latent exactly as if it had run alone with that K;
    `state.hidden` is each row's last live state and `state.steps` its count. The loop ends when every row
    has stopped.
    """
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES} (got {decode_mode!r})")
    if decode_mode != "dynamic" and torch.is_grad_enabled():
        raise ValueError(f"decode_mode={decode_mode!r} is for inference; run it under torch.inference_mode()")
    decoder, _, embed = model_parts(model)
    batch, prompt_len = input_ids.shape
    capacity = prompt_len + latent_steps + reserve
    if decode_mode == "dynamic":
        kv_cache = new_cache(model.config)
        if not torch.is_grad_enabled():
            reserve_cache(kv_cache, latent_steps + reserve)
    else:
        capacity = static_capacity(capacity)
        kv_cache = static_cache(model, batch, capacity)
    mask = attention_mask.new_ones(batch, capacity)
    mask[:, :prompt_len] = attention_mask
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        **cache_kwargs(decoder, kv_cache),
    )
    hidden = out.last_hidden_state[:, -1]
    no_latents = hidden.new_zeros(batch, 0, hidden.shape[-1])  # [B, K=0, H] until latent steps are taken
    state = LatentState(kv_cache, mask, prompt_len, attention_mask.long().sum(-1), hidden, no_latents,
                        decode_mode)
    if decode_mode == "dynamic":
        state.layer_step = LayerStep.for_state(decoder, attention_mask, capacity, hidden)
    latents = []
    adaptive = row_steps is not None or halting is not None
    live = torch.ones(batch, dtype=torch.bool, device=hidden.device)
    taken = torch.zeros(batch, dtype=torch.long, device=hidden.device)
    if row_steps is not None:
        latent_steps = min(latent_steps, int(row_steps.max()) if batch else 0)
    for k in range(latent_steps):
        if row_steps is not None:
            live = row_steps > k
        out = _decode_step(decoder, state, head(hidden).to(embed.weight.dtype), live if adaptive else None)
        hidden = torch.where(live[:, None], out, hidden) if adaptive else out
        latents.append(out)
        taken += live.long()
        if halting is not None:
            live = live & ~halting(out, k)
            if not bool(live.any()):  # one host sync per latent step, as decoding has per token
                break
    if latents:
        state.latents = torch.stack(latents, 1)
    state.hidden, state.steps = hidden, taken
    return state


def answer_hidden(model: nn.Module, state: LatentState, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Teacher-forced answer pass after `think`: the states that predict each answer token, [B, A, H].

    Token j of the answer is predicted from the state before it: the last latent (or prompt) state for
    j = 0, the answer's own state j-1 after that, so the last answer token is never fed in.
    """
    decoder, _, embed = model_parts(model)
    if answer_ids.shape[1] <= 1:
        return state.hidden[:, None]
    fed = answer_ids[:, :-1]
    mask = torch.cat([state.attention_mask, answer_mask[:, :-1].to(state.mask.dtype)], 1)
    positions = state.next_position[:, None] + torch.arange(fed.shape[1], device=fed.device)
    out = decoder(
        inputs_embeds=embed(fed),
        attention_mask=mask,
        position_ids=positions,
        **cache_kwargs(decoder, state.cache),
    )
    return torch.cat([state.hidden[:, None], out.last_hidden_state], 1)


def _token_ce(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="none")


def answer_token_losses(hidden: Tensor, lm_head: nn.Module, targets: Tensor, chunk_tokens: int = 4096) -> Tensor:
    """Float32 cross-entropy of every target token, shaped like `targets`, 0 where the target is -100.

    Only the counted tokens reach the LM head, `chunk_tokens` at a time and recomputed in backward
    (checkpointed), so the [tokens, vocab] matrix (151,936 columns for Qwen3) never exists whole.
    """
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    keep = flat_targets != -100
    kept_hidden, kept_targets = flat_hidden[keep], flat_targets[keep]
    pieces = []
    for start in range(0, kept_targets.numel(), chunk_tokens):
        h, t = kept_hidden[start : start + chunk_tokens], kept_targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_ce, h, lm_head.weight, t, use_reentrant=False))
        else:
            pieces.append(_token_ce(h, lm_head.weight, t))
    losses = flat_hidden.new_zeros(flat_targets.shape, dtype=torch.float32)
    if pieces:
        losses = losses.masked_scatter(keep, torch.cat(pieces))
    return losses.view(targets.shape)


@dataclass
class Generation:
    tokens: Tensor  # [B, T] generated ids, pad after a row's EOS
    lengths: Tensor  # [B] generated tokens per row, EOS included
    finished: Tensor  # [B] whether the row emitted EOS within the budget
    latents: Tensor  # [B, K, H] latent states (logit-lens inspection, tests)
    latent_steps: Tensor | None = None  # [B] latent steps each row took


@torch.inference_mode()
def decode(
    model: nn.Module,
    state: LatentState,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    sampler: Sampler | None = None,
) -> Generation:
    """Greedy (or sampled) decoding from `state`; a row stops at any of the EOS ids (Qwen3 stops on both
    `<|im_end|>` and `<|endoftext|>`); one host sync per token."""
    decoder, lm_head, embed = model_parts(model)
    batch = state.hidden.shape[0]
    device = state.hidden.device
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    hidden = state.hidden
    for step in range(max_new_tokens):
        logits = lm_head(hidden)
        token = logits.argmax(-1) if sampler is None else sampler(logits, step)
        token = token.masked_fill(finished, pad_token_id)
        tokens[:, step] = token
        lengths += (~finished).long()
        finished |= torch.isin(token, stop)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if state.length >= state.mask.shape[1]:  # capacity exhausted (caller reserved too little)
            if state.decode_mode != "dynamic":
                raise ValueError("static cache full: pass reserve >= max_new_tokens to think()")
            state.mask = torch.cat([state.mask, state.mask.new_ones(batch, max_new_tokens)], 1)
        hidden = _decode_step(decoder, state, embed(token))
    width = int(lengths.max()) if batch else 0
    return Generation(tokens[:, :width], lengths, finished, state.latents, state.steps)


@torch.inference_mode()
def generate(
    model: nn.Module,
    head: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    latent_steps: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    sampler: Sampler | None = None,
    num_samples: int = 1,
    decode_mode: str = "dynamic",
    halting_head: nn.Module | None = None,
) -> Generation:
    """Prompt -> K latent steps -> answer, for a batch of left-padded prompts.

    K = 0 is plain decoding (the base model with or without its chain of thought, depending on the
    prompt). With `num_samples` > 1 the prompt is prefilled once and its cache expanded, rows ordered
    (prompt 0 sample 0, prompt 0 sample 1, ...); `sampler.seeds` then has one seed per output row.
    `decode_mode`: see the module docstring; the static modes prefill each of the `num_samples` copies.
    With a `halting_head` the student chooses each row's number of latent steps (at most `latent_steps`),
    greedily or, with a sampler, by sampling its stop decisions; G samples then think apart (prefilled
    per copy) since each may stop at its own step.
    """
    if (decode_mode != "dynamic" or halting_head is not None) and num_samples > 1:
        input_ids = input_ids.repeat_interleave(num_samples, 0)
        attention_mask = attention_mask.repeat_interleave(num_samples, 0)
        num_samples = 1
    halting = None if halting_head is None else halting_rule(halting_head, sampler)
    state = think(model, head, input_ids, attention_mask, latent_steps, max_new_tokens, decode_mode,
                  halting=halting)
    state = state.repeat_interleave(num_samples)
    return decode(model, state, max_new_tokens, eos_token_id, pad_token_id, sampler)
