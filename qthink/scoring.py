"""The one evaluation step: decode a batch of problems and grade each output with its task.

`score_batch` is what validation and test in `qthink fit|validate|test` (`QThinkModule`) and `qthink eval`
(`qthink.evaluate`, in one process or on N devices) run on every batch, so both decode (`QThink.decode`,
greedy) and grade (`Task.grade`) the same way and report the same numbers on the same weights
(tests/test_train_cli.py, tests/test_evaluate.py). Each problem's record is a line of eval's
`predictions.jsonl`.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qthink.core.model import QThink, check_decode_mode
from qthink.core.sequences import encode_prompts, left_pad, length_batches
from qthink.errors import require
from qthink.recipe import SEED
from qthink.tasks import Task, split_think


@dataclass(frozen=True)
class Decoding:
    """How a batch is decoded and graded.

    Args:
        latent_steps: K; None: the model's, and an adaptive model chooses each problem's (at most K).
        max_new_tokens: Generated-token budget per problem.
        decode_mode: dynamic | static | compiled (`qthink.core.latent.DECODE_MODES`).
        grade_unclosed: Grade an output whose think block never closed on its whole text (default: no answer, 0).
    """

    latent_steps: int | None = None
    max_new_tokens: int = SEED.max_answer_tokens
    decode_mode: str = "dynamic"
    grade_unclosed: bool = False


def prediction(task: Task, record: dict, result: dict, seconds: float, grade_unclosed: bool = False) -> dict:
    """One problem's record: its prompt, reference, output, scores, tokens, latent steps and seconds."""
    text = result["answer"]
    think, _, closed = split_think(text)
    scores = task.grade(text, record, grade_unclosed)
    return {"problem_id": task.problem_id(record), "prompt": task.prompt(record), "reference": task.reference(record),
            "output": text, "tokens": len(result["token_ids"]), "latent_steps": result.get("latent_steps", 0),
            "chain_length": task.chain_length(record), "correct": scores[task.metrics[0]] == 1.0,
            **{m: float(scores[m]) for m in task.metrics}, "seconds": seconds, "finished": result["finished"],
            "unclosed_think": think is not None and not closed}


def score_batch(qt: QThink, task: Task, records: list[dict], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoding: Decoding = Decoding()) -> list[dict]:  # noqa: B008 (frozen dataclass)
    """Decode the left-padded prompts of `records` (a latent student, or a base model with K = 0) and grade
    each output: one `prediction` per record, in order; `seconds` is each problem's share of the batch's time."""
    began = time.perf_counter()
    results = qt.decode(input_ids, attention_mask, decoding.latent_steps, decoding.max_new_tokens,
                        decode_mode=decoding.decode_mode)  # returns host lists: the device has finished
    seconds = (time.perf_counter() - began) / max(1, len(records))
    return [prediction(task, record, result, seconds, decoding.grade_unclosed)
            for record, result in zip(records, results, strict=True)]


def encode_problems(qt: QThink, task: Task, records: list[dict], decoding: Decoding,
                    enable_thinking: bool = False) -> list[list[int]]:
    """Each record's prompt ids (the student's layout; `enable_thinking` for a base model's visible chain of
    thought), checked against the model's context before anything is decoded."""
    require(len(records) > 0, "no problems to evaluate")
    check_decode_mode(decoding.decode_mode)
    prompts = encode_prompts(qt.tokenizer, [task.prompt(r) for r in records], enable_thinking)
    k = qt.latent_steps if decoding.latent_steps is None else decoding.latent_steps
    qt.check_request([len(p) for p in prompts], k, decoding.max_new_tokens)
    return prompts


def score_problems(qt: QThink, task: Task, records: list[dict], prompts: list[list[int]], batches: list[list[int]],
                   decoding: Decoding = Decoding(),  # noqa: B008 (frozen dataclass)
                   on_batch: Callable[[int], object] | None = None) -> dict[int, dict]:
    """`score_batch` over `batches` (positions in `records`/`prompts`, e.g. `length_batches`): position -> record."""
    preds = {}
    for idx in batches:
        batch = left_pad([prompts[i] for i in idx], qt.tokenizer.pad_token_id, qt.device)
        preds |= dict(zip(idx, score_batch(qt, task, [records[i] for i in idx], batch.input_ids, batch.attention_mask,
                                           decoding), strict=True))
        if on_batch is not None:
            on_batch(len(idx))
    return preds


def score_all(qt: QThink, task: Task, records: list[dict], decoding: Decoding = Decoding(),  # noqa: B008
              batch_size: int = 16, enable_thinking: bool = False,
              on_batch: Callable[[int], object] | None = None) -> list[dict]:
    """Every record's prediction, in order, in one process: batches of prompts of similar length."""
    require(batch_size > 0, f"--batch-size must be > 0 (got {batch_size})")
    prompts = encode_problems(qt, task, records, decoding, enable_thinking)
    preds = score_problems(qt, task, records, prompts, length_batches(prompts, batch_size), decoding, on_batch)
    return [preds[i] for i in range(len(records))]
