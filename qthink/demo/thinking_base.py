"""Teach the tiny base to reason with a visible chain of thought: the demo's "base model that thinks".

Qwen3-1.7B arrives able to think; the tiny Qwen3 that `qthink tiny-base` draws is random. This short
supervised stage (full fine-tuning, plain PyTorch: it is the base model's pre-training, not the method)
trains it on the synthetic task in Qwen3's two chat modes, half of the sequences each:
- thinking:     prompt(enable_thinking=True)  + `<think>\\n{trace}\\n</think>\\n\\n{answer}<|im_end|>`
- not thinking: prompt(enable_thinking=False) + `{answer}<|im_end|>`
so that, like Qwen3, it answers in both modes and thinking helps. Loss is on the completion only.
"""

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qthink.core.model import load_base
from qthink.core.sequences import encode_prompts, right_pad
from qthink.identity import write_checksums
from qthink.tasks import get_task
from qthink.tasks.base import thinking_completion
from qthink.training.module import lr_factor


def build_sequences(tokenizer, records: list[dict], task) -> list[tuple[list[int], int]]:
    """(token ids, completion start) for each record in both modes."""
    eos = tokenizer.eos_token_id
    questions = [task.prompt(r) for r in records]
    sequences = []
    for thinking in (True, False):
        prompts = encode_prompts(tokenizer, questions, enable_thinking=thinking)
        for prompt, record in zip(prompts, records, strict=True):
            text = thinking_completion(task.think_text(record), task.reference(record)) if thinking else task.reference(record)
            completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            sequences.append((prompt + completion, len(prompt)))
    return sequences


def collate(sequences: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and next-token labels (-100 outside completions)."""
    ids, mask = right_pad([seq for seq, _ in sequences], pad_id)
    labels = torch.full_like(ids, -100)
    for i, (seq, start) in enumerate(sequences):
        labels[i, start - 1 : len(seq) - 1] = torch.tensor(seq[start:])
    return ids, mask, labels


def train_thinking_base(base: str | Path, out: str | Path, steps: int = 1000, batch_size: int = 64,
                        lr: float = 2e-3, problems: int = 2000, seed: int = 0, chain_steps: int | str = 3) -> dict:
    """Fine-tune `base` on synthetic chains of `chain_steps` operations in both chat modes and save it to
    `out`; returns the curve."""
    torch.manual_seed(seed)
    model, tokenizer = load_base(str(base), torch.float32)
    task = get_task("synthetic", steps=chain_steps)
    sequences = build_sequences(tokenizer, task.load("train", n=problems), task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    # the student's schedule: linear warmup, cosine to 10%
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, steps, 0.1))
    rng = random.Random(seed)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="teach base to think", unit="step", leave=False)
    for _ in bar:
        ids, mask, labels = collate(rng.sample(sequences, batch_size), tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_checksums(Path(out))
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "problems": problems, "final_loss": losses[-1], "losses": losses}
