"""The latent loop: ProjectionHead and the one implementation of prompt -> K latent steps -> answer.

Training (`think` + `answer_hidden` + `answer_token_losses`, with gradients), validation, inference, evaluation,
rollouts and benchmarks (`generate`, under `torch.inference_mode`) all run through these functions.

Sequence layout (DESIGN.md contract 1): a batch of left-padded prompts, then K latent positions, then the
answer. Every decoder call gets the running attention mask and explicit `position_ids` derived from it, so
a row's result does not depend on the padding its batch needs (CODI attends to left padding; Coconut has
no cache). The hidden state everywhere is the post-final-norm last-layer state (`last_hidden_state`).
The decoder is called without its LM head: vocabulary logits are built only where a token is predicted.
Without grad, the KV cache is preallocated (`ReservedLayer`) instead of regrown by `torch.cat` per token.
HF gradient checkpointing must stay off on this path: it silently drops the KV cache in training mode.

Decode modes (inference only): `dynamic` (the default) grows the attended width by one column per step;
`static` holds a transformers `StaticCache` and the whole preallocated mask, so every one-position step
(latent or token) has the same shapes; `compiled` runs those steps through `torch.compile` (on CUDA with
CUDA graphs, `mode="reduce-overhead"`), which is what removes the per-kernel launch cost of small-batch
decoding. All three give the same tokens (tested); hidden states agree to float rounding, because
attention then also reduces over masked columns.
"""

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import StaticCache
from transformers.cache_utils import DynamicLayer

from qthink.compat import cache_kwargs, new_cache


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


def model_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(decoder, lm_head, input embeddings) of a causal LM, PEFT-wrapped or not."""
    return model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count only attended tokens, so left padding does not shift RoPE positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in a buffer with `room` spare positions.

    Each update writes the new positions in place and returns views of exactly the shape and values a
    `DynamicLayer` returns, so attention computes the same numbers; what goes away is the `torch.cat`
    that copies the whole cache at every token (O(length) bytes per step per layer: at batch 64 and a
    thousand positions that is more memory traffic than reading the weights). Only without grad: in-place
    writes would overwrite keys/values that autograd saved for backward.
    """

    def __init__(self, room: int):
        super().__init__()
        self.room, self.length = room, 0
        self.key_buffer: Tensor | None = None
        self.value_buffer: Tensor | None = None

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def _reallocate(self, capacity: int, like_keys: Tensor, like_values: Tensor) -> None:
        keys = like_keys.new_empty(*like_keys.shape[:2], capacity, like_keys.shape[3])
        values = like_values.new_empty(*like_values.shape[:2], capacity, like_values.shape[3])
        if self.length:
            keys[:, :, : self.length] = self.keys
            values[:, :, : self.length] = self.values
        self.key_buffer, self.value_buffer = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.key_buffer is None or self.length + new > self.key_buffer.shape[-2]:
            self._reallocate(self.length + new + self.room, key_states, value_states)
        self.key_buffer[:, :, self.length : self.length + new] = key_states
        self.value_buffer[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.key_buffer = self.value_buffer = None
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)
            self._expose()

    def _select(self, pick) -> None:
        if self.key_buffer is not None:
            self.key_buffer, self.value_buffer = pick(self.key_buffer), pick(self.value_buffer)
            self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))


def reserve_cache(kv_cache, room: int):
    """Give each plain dynamic layer of `kv_cache` a preallocated buffer with `room` spare positions."""
    kv_cache.layers = [ReservedLayer(room) if type(layer) is DynamicLayer else layer for layer in kv_cache.layers]
    return kv_cache


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


def _decode_step(decoder: nn.Module, state: LatentState, embeds: Tensor) -> Tensor:
    """Append one position per row (given as input embeddings) and return its hidden state [B, H]."""
    state.length += 1
    # static modes pass the whole mask (fixed shape): causal masking hides the columns not yet written
    mask = state.attention_mask if state.decode_mode == "dynamic" else state.mask
    args = (decoder, embeds.unsqueeze(1), mask, state.next_position.unsqueeze(1), cache_kwargs(decoder, state.cache))
    if state.decode_mode == "compiled":
        torch.compiler.cudagraph_mark_step_begin()
        # clone: a CUDA graph's output buffer is overwritten by its next replay, and latents are kept
        hidden = compiled_last_hidden(embeds.device.type)(*args).clone()
    else:
        hidden = _last_hidden(*args)
    state.next_position = state.next_position + 1
    return hidden


def static_capacity(needed: int) -> int:
    """The static cache length for `needed` positions: the smallest of 64, 96, 128, 192, 256, 384, ... that
    holds them. Two sizes per octave: at most half the columns are spare, and a benchmark whose prompts span
    30 to 1,000 tokens needs 5 shapes, not 16 as with multiples of 64 (each shape is one compilation)."""
    size = 64
    while True:
        for capacity in (size, size * 3 // 2):
            if capacity >= needed:
                return capacity
        size *= 2


_STATIC_CACHES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def static_cache(model: nn.Module, batch: int, capacity: int) -> StaticCache:
    """A `StaticCache` of `capacity` positions for `batch` rows, the one from this model's previous static call
    when the shape, device and dtype match (reset in place): its buffers keep their addresses, so a captured
    CUDA graph is replayed rather than recorded again. One is held per model; so a static `LatentState` is
    valid until the next static `think` on the same model."""
    weight = model.get_input_embeddings().weight
    key = (batch, capacity, weight.device, weight.dtype)
    held = _STATIC_CACHES.pop(model, None)  # dropped first: the old buffers are freed before new ones exist
    if held is not None and held[0] == key:
        held[1].reset()
        kv_cache = held[1]
    else:
        del held
        kv_cache = StaticCache(config=model.config, max_cache_len=capacity)
    _STATIC_CACHES[model] = (key, kv_cache)
    return kv_cache


def release_static_cache(model: nn.Module) -> None:
    """Drop the static cache held for `model` (its buffers: batch x capacity x layers x KV heads of memory)."""
    _STATIC_CACHES.pop(model, None)


def think(
    model: nn.Module,
    head: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    latent_steps: int,
    reserve: int = 0,
    decode_mode: str = "dynamic",
) -> LatentState:
    """Prefill left-padded prompts, then run `latent_steps` latent passes.

    Latent step k feeds `head(h_{k-1})` back as an input embedding (h_0 = the prompt's last state) and
    records its output state h_k. `reserve` preallocates mask columns (and, without grad, KV-cache
    positions) for tokens decoded afterwards. Gradients flow through every step when called with grad enabled
    (`dynamic` mode only: the static modes write the cache in place). The prefill is never compiled.
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
    state = LatentState(kv_cache, mask, prompt_len, attention_mask.long().sum(-1), hidden, hidden[:, None, :0],
                        decode_mode)
    latents = []
    for _ in range(latent_steps):
        hidden = _decode_step(decoder, state, head(hidden).to(embed.weight.dtype))
        latents.append(hidden)
    if latents:
        state.latents = torch.stack(latents, 1)
    state.hidden = hidden
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


# ---- sampling: counter-based noise, so a row's sample depends on its seed and step, not its batch ----

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix(x: Tensor) -> Tensor:
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def counter_uniform(seeds: Tensor, step: int, size: int) -> Tensor:
    """[B, size] uniforms in (0, 1) from a splitmix64 hash of (row seed, step, column)."""
    cols = torch.arange(size, device=seeds.device, dtype=torch.int64)
    x = _splitmix(seeds.long()[:, None] * _GOLDEN + _splitmix(torch.tensor(step, device=seeds.device)))
    x = _splitmix(x + cols[None] * _GOLDEN)
    return (_shr(x, 11).double() + 0.5) / float(1 << 53)


def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, problem index, sample index), stable across runs."""
    x = 0
    for p in parts:
        x = (x * 0x100000001B3 + (p & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        x ^= x >> 29
    return x & ((1 << 63) - 1)


@dataclass
class Sampler:
    """Temperature / top-k / top-p sampling by the Gumbel-max trick on per-row counter noise."""

    seeds: Tensor  # [B] int64, one per output row
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20

    def __call__(self, logits: Tensor, step: int) -> Tensor:
        logits = logits.float() / max(self.temperature, 1e-6)
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cumulative - sorted_logits.softmax(-1) > self.top_p  # keeps at least the top token
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        gumbel = -torch.log(-torch.log(counter_uniform(self.seeds, step, logits.shape[-1])))
        return (logits.double() + gumbel).argmax(-1)


@dataclass
class Generation:
    tokens: Tensor  # [B, T] generated ids, pad after a row's EOS
    lengths: Tensor  # [B] generated tokens per row, EOS included
    finished: Tensor  # [B] whether the row emitted EOS within the budget
    latents: Tensor  # [B, K, H] latent states (logit-lens inspection, tests)


@torch.inference_mode()
def decode(
    model: nn.Module,
    state: LatentState,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    sampler: Sampler | None = None,
) -> Generation:
    """Greedy (or sampled) decoding from `state` with per-row EOS stop; one host sync per token."""
    decoder, lm_head, embed = model_parts(model)
    batch = state.hidden.shape[0]
    device = state.hidden.device
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    hidden = state.hidden
    for step in range(max_new_tokens):
        logits = lm_head(hidden)
        token = logits.argmax(-1) if sampler is None else sampler(logits, step)
        token = token.masked_fill(finished, pad_token_id)
        tokens[:, step] = token
        lengths += (~finished).long()
        finished |= token == eos_token_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if state.length >= state.mask.shape[1]:  # capacity exhausted (caller reserved too little)
            if state.decode_mode != "dynamic":
                raise ValueError("static cache full: pass reserve >= max_new_tokens to think()")
            state.mask = torch.cat([state.mask, state.mask.new_ones(batch, max_new_tokens)], 1)
        hidden = _decode_step(decoder, state, embed(token))
    width = int(lengths.max()) if batch else 0
    return Generation(tokens[:, :width], lengths, finished, state.latents)


@torch.inference_mode()
def generate(
    model: nn.Module,
    head: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    latent_steps: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    sampler: Sampler | None = None,
    num_samples: int = 1,
    decode_mode: str = "dynamic",
) -> Generation:
    """Prompt -> K latent steps -> answer, for a batch of left-padded prompts.

    K = 0 is plain decoding (the base model with or without its chain of thought, depending on the
    prompt). With `num_samples` > 1 the prompt is prefilled once and its cache expanded, rows ordered
    (prompt 0 sample 0, prompt 0 sample 1, ...); `sampler.seeds` then has one seed per output row.
    `decode_mode`: see the module docstring; the static modes prefill each of the `num_samples` copies.
    """
    if decode_mode != "dynamic" and num_samples > 1:
        input_ids = input_ids.repeat_interleave(num_samples, 0)
        attention_mask = attention_mask.repeat_interleave(num_samples, 0)
        num_samples = 1
    state = think(model, head, input_ids, attention_mask, latent_steps, max_new_tokens, decode_mode)
    state = state.repeat_interleave(num_samples)
    return decode(model, state, max_new_tokens, eos_token_id, pad_token_id, sampler)
