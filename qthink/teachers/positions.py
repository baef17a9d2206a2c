"""Where inside a rollout's think block the K teacher states are taken (ARCHITECTURE.md, contract 2).

Everything here is a pure function of token ids, text and offsets; `qthink teachers` names the scheme
it used in the store's manifest (`position_scheme`).

- The *think content* of a rollout is the tokens strictly between its `<think>` and its first
  `</think>`; positions are indices into that content (0 .. L-1).
- `linspace` (default, the seed's): `round(linspace(0, L-1, K))`, both ends included. The linspace is
  computed in float64 and rounded with `torch.round`, i.e. half to even (numpy's `np.round` rule):
  L=6, K=3 gives 0, 2.5 -> 2, 5. Positions repeat when L < K.
- `steps`: positions on reasoning-step boundaries. Candidates come from the task's own
  `step_offsets(think_text)` when it has one (synthetic: each `=`), otherwise from the general rule of
  `natural_step_offsets` (the state just before each value written after `=`, and the last token of
  each line). K are chosen evenly among the candidates (`round(linspace)` over the candidate list),
  each repeated in turn when there are fewer than K (s1,s1,s2,s2,s3,s3), and `linspace` is used when
  there are none.

Character offsets are mapped to tokens through the byte spans of the rollout's own tokens (not a
re-tokenisation of the text: sampled token sequences need not be the canonical tokenisation). A
character offset `o` names the character whose state should be used; the token chosen is the last one
that ends at or before `o + 1`, so a token that merges the `=` with the value it introduces is never
chosen (its state has already seen the value): the token before it is, whose state predicts it.
"""

import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from functools import cache

import torch

SCHEMES = ("linspace", "steps")


def linspace_positions(length: int, k: int) -> list[int]:
    """`round(linspace(0, length-1, k))` (half to even), both ends included; `length` >= 1."""
    if k == 0:
        return []
    return torch.linspace(0, length - 1, k, dtype=torch.float64).round().long().tolist()


def select_evenly(candidates: Sequence[int], k: int) -> list[int]:
    """k of the (sorted, distinct) candidates spread evenly, first and last included; when there are
    fewer than k, each candidate is repeated in turn, as evenly as k allows (3 steps, k=6:
    s1,s1,s2,s2,s3,s3), so every step keeps latent passes of its own (repeating only the last stayed at
    the SFT level: docs/findings.md, F8)."""
    n = len(candidates)
    if n >= k:
        return [candidates[i] for i in linspace_positions(n, k)]
    return [candidates[i * n // k] for i in range(k)]


def think_span(ids: Sequence[int], think_id: int, end_think_id: int, search_from: int = 0) -> tuple[int, int] | None:
    """(open, close) indices of the `<think>` and first `</think>` tokens, or None when the block is not
    closed. The opener is the last `<think>` before the close at or after `search_from` (a generation
    prompt may already hold `<think>`: pass the index where the assistant turn starts)."""
    try:
        close = ids.index(end_think_id, search_from)
    except ValueError:
        return None
    for i in range(close - 1, search_from - 1, -1):
        if ids[i] == think_id:
            return i, close
    return None


# ---- token -> text offsets ----

@cache
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table, used by byte-level BPE tokenizers (Qwen's too)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes] | None:
    """Each token's bytes for a byte-level BPE tokenizer, or None when the vocabulary is not byte level."""
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    table = _byte_decoder()
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        if i in added:
            out.append(added[i].encode())
        elif piece is not None and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        else:
            return None
    return out


def token_char_ends(tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(text, ends): the decoded text of `ids` and, per token, the character offset where it ends.

    Byte-level vocabularies are mapped exactly in one pass (a character split across tokens belongs to
    the token where it starts); other tokenizers fall back to decoding every prefix (slower, exact).
    """
    pieces = _token_bytes(tokenizer, ids)
    if pieces is None:
        ends = [len(tokenizer.decode(list(ids[: i + 1]))) for i in range(len(ids))]
        return tokenizer.decode(list(ids)), ends
    ends, chars = [], 0
    for piece in pieces:
        chars += sum(1 for b in piece if b & 0xC0 != 0x80)  # UTF-8 lead bytes start characters
        ends.append(chars)
    return b"".join(pieces).decode("utf-8", errors="replace"), ends


def offsets_to_tokens(char_offsets: Sequence[int], ends: Sequence[int]) -> list[int]:
    """Token index for each character offset (the last token ending at or before offset + 1), sorted and
    deduplicated."""
    tokens = {max(bisect_right(ends, o + 1) - 1, 0) for o in char_offsets}
    return sorted(tokens)


# ---- the general step rule for natural-language chains of thought ----

# A value written after `=` (not `==`, `<=`, `>=`, `!=`, `=>`): optional `$` / sign / `(`, then a digit or
# a LaTeX command that starts a value (`\frac{1}{2}`, `\sqrt{3}`, `\pi`).
_VALUE_AFTER_EQ = re.compile(r"(?<![=<>!])=(?![=>])[ \t]*(?:\$[ \t]*)?(?=[-−]?\(?(?:\d|\\[a-zA-Z]+))")


def natural_step_offsets(text: str) -> list[int]:
    """Offsets of the characters whose states end a reasoning step in free text, sorted and distinct.

    - the character just before each value written after `=` ("48/2 = 24" -> the space before 24):
      its state predicts the result of the computation;
    - the last non-space character of each non-empty line: a line is a step (GSM8k-style arithmetic
      lines, MATH derivations, Tooluse `Thought:` / `Action:` / `Action Input:` lines).
    """
    offsets = {m.end() - 1 for m in _VALUE_AFTER_EQ.finditer(text)}
    for line in re.finditer(r"[^\n]+", text):
        stripped = line.group().rstrip()
        if stripped.strip():
            offsets.add(line.start() + len(stripped) - 1)
    return sorted(offsets)


def step_candidates(
    tokenizer, content_ids: Sequence[int], task_offsets: Callable[[str], list[int] | None] | None = None
) -> list[int]:
    """Every step boundary of the think content as a token index (sorted, distinct): the task's own
    offsets where it has them, the general rule otherwise. Their number is the chain's step count."""
    text, ends = token_char_ends(tokenizer, content_ids)
    offsets = task_offsets(text) if task_offsets is not None else None
    if not offsets:
        offsets = natural_step_offsets(text)
    return offsets_to_tokens(offsets, ends)


def step_positions(
    tokenizer, content_ids: Sequence[int], k: int, task_offsets: Callable[[str], list[int] | None] | None = None
) -> list[int]:
    """K positions in the think content on step boundaries (rules in the module docstring)."""
    return positions_on_steps(step_candidates(tokenizer, content_ids, task_offsets), len(content_ids), k)


def positions_on_steps(candidates: Sequence[int], length: int, k: int) -> list[int]:
    """K of the step candidates (`select_evenly`), or `linspace` over the content's `length` when there are none."""
    if not candidates:
        return linspace_positions(length, k)
    return select_evenly(candidates, k)


def content_positions(
    scheme: str, tokenizer, content_ids: Sequence[int], k: int,
    task_offsets: Callable[[str], list[int] | None] | None = None,
) -> list[int]:
    """The K positions (indices into the think content, length >= 1) under `scheme`."""
    if scheme == "linspace":
        return linspace_positions(len(content_ids), k)
    if scheme == "steps":
        return step_positions(tokenizer, content_ids, k, task_offsets)
    raise ValueError(f"unknown position scheme {scheme!r}; known: {', '.join(SCHEMES)}")
