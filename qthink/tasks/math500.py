"""MATH-500 (and the MATH train split in the same schema): loading, prompt, reference and grader.

Records: `problem`, `solution` (ends with a `\\boxed{}` answer), `answer` (the gold LaTeX), `subject`,
`level`, `unique_id`; `id` = `unique_id` (or "<split>-<index>" when a file lacks it).

Splits: `test` is MATH-500 (`math500/test.jsonl`, or `HuggingFaceH4/MATH-500` from the hub). `train` is
the MATH train split (`math/train_hendrycks7500.jsonl` under the data root, or `../math/...` beside a
`math500` folder, or any file passed directly); it has no hub source here, so it needs --data-path.
MATH train records whose `answer` is null (no boxed answer in the solution) are skipped and counted in a
logged warning.

Grading follows SDPO (`verl/utils/reward_score/feedback/math.py`): the content of the last
brace-matched `\\boxed{}`/`\\fbox{}` of the post-think output; correct if it equals the gold string
(whitespace-stripped), else if math-verify proves them equal. Two deliberate deviations:
- the box is searched in the whole post-think answer, not only in its last 100 characters (SDPO's window
  misses long boxed answers);
- both strings are wrapped in `$...$` before `math_verify.parse`. Unwrapped, math-verify reads LaTeX
  poorly: `2\\sqrt{2}` parses as 2 (so "2" would be accepted) and 51 of the 500 gold answers parse to
  nothing. Wrapped, every gold answer parses and verifies against itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from qthink.errors import UserError
from qthink.tasks.base import Located, Task, last_boxed, load_hub

log = logging.getLogger(__name__)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# SDPO's limit for parsing and for verifying, in seconds.
VERIFY_TIMEOUT_S = 5


def math_verify_equal(pred: str, gold: str, timeout_s: int = VERIFY_TIMEOUT_S) -> bool:
    """Whether math-verify proves the LaTeX answers `pred` and `gold` equal.

    math-verify enforces its timeouts with SIGALRM, which only works in the main thread; elsewhere (a
    DataLoader or evaluation thread) it would raise, so the timeout is disabled there.
    """
    from math_verify import parse, verify  # imports sympy; only needed when strings differ

    seconds = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold_expr = parse(f"${gold}$", parsing_timeout=seconds)
        pred_expr = parse(f"${pred}$", parsing_timeout=seconds)
        if not gold_expr or not pred_expr:
            return False
        return bool(verify(gold_expr, pred_expr, timeout_seconds=seconds))
    except Exception:  # a timeout or a sympy failure on odd LaTeX is a wrong answer, not a crash
        return False


def is_equivalent(pred: str, gold: str) -> bool:
    """Exact string match first (cheap, and what SDPO checks first), then math-verify."""
    pred, gold = pred.strip(), gold.strip()
    if not pred:
        return False
    return pred == gold or math_verify_equal(pred, gold)


class Math500Task(Task):
    name = "math500"
    metrics = ("exact_match",)
    files = {"test": "math500/test.jsonl", "train": "math/train_hendrycks7500.jsonl"}
    fields = {"problem": str, "solution": str, "answer": (str, type(None))}

    def load_hub(self, split: str) -> list[Located]:
        if split != "test":
            raise UserError(
                f"math500 has no {split!r} split on the Hugging Face Hub (MATH-500 is test only); pass "
                "--data-path with the MATH train file (e.g. data/math/train_hendrycks7500.jsonl) or the data root"
            )
        return load_hub("HuggingFaceH4/MATH-500", None, split, self.name)

    def _records(self, located: list[Located], split: str) -> list[dict[str, Any]]:
        records, skipped = [], []
        for i, (where, record) in enumerate(located):
            if record["answer"] is None:
                skipped.append(where)
                continue
            records.append({**record, "id": str(record.get("unique_id") or f"{split}-{i}")})
        if skipped:
            log.warning(
                "math500 %s: skipped %d records whose 'answer' is null (no boxed answer), first at %s",
                split,
                len(skipped),
                skipped[0],
            )
        return records

    def prompt(self, record: Mapping[str, Any]) -> str:
        return f"{record['problem']}\n\n{INSTRUCTION}"

    def reference(self, record: Mapping[str, Any]) -> str:
        return record["solution"]

    def grade_answer(self, answer: str, record: Mapping[str, Any]) -> dict[str, float]:
        pred = last_boxed(answer)
        return {"exact_match": float(pred is not None and is_equivalent(pred, record["answer"]))}

    def problem_id(self, record: Mapping[str, Any]) -> str:
        if "id" not in record and record.get("unique_id"):
            return str(record["unique_id"])
        return super().problem_id(record)
