"""The sequence layout every stage shares (ARCHITECTURE.md contract 1): prompts as chat turns with the
generation prompt, left padding for decoding, right padding for teacher forcing, the ids that end an
answer, and the one decoding of generated ids into text."""

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def encode_prompts(tokenizer: PreTrainedTokenizerBase, questions: list[str], enable_thinking: bool = False) -> list[list[int]]:
    """Token ids of each question as one user turn with the generation prompt (ARCHITECTURE.md contract 1)."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        for q in questions
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids [B, T] padded on `side` with `pad_id`, and their mask."""
    ids = [torch.tensor(r, dtype=torch.long) for r in rows]
    return (pad_sequence(ids, batch_first=True, padding_value=pad_id, padding_side=side),
            pad_sequence([torch.ones_like(r) for r in ids], batch_first=True, padding_side=side))


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and their mask (training answers, teacher extraction, the base's pre-training)."""
    return _pad(rows, pad_id, "right")


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    ids, mask = _pad(rows, pad_id, "left")
    return Batch(ids.to(device), mask.to(device))


def length_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Positions of `prompts` in batches of at most `batch_size` prompts of similar length (less padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def output_text(tokenizer, token_ids: list[int], finished: bool) -> str:
    """The decoded output without its final EOS, with `<think>`/`</think>` kept: the graders split on them,
    and a tokenizer that marks them special (the tiny one does) would drop them with skip_special_tokens."""
    return tokenizer.decode(token_ids[:-1] if finished else token_ids, skip_special_tokens=False)


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and each EOS of the model's generation config
    (Qwen3's lists `<|im_end|>` and `<|endoftext|>`), the tokenizer's first."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return list(dict.fromkeys([tokenizer.eos_token_id, *configured]))
