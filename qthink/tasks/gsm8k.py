"""GSM8k (grade-school math word problems): loading, prompt, reference solution and numeric grader.

Records: `question`, `answer` (worked solution with `<<a*b=c>>` calculator annotations, last line
`#### <final>`), plus `id` = "<split>-<index>".

Grading: the gold is the number after `####` with commas
removed, sign kept (SDPO's unsigned `\\d+` extraction loses negatives and turns `1,080` into `1`). The
prediction, taken from the part after a closed think block, is the last number in the last
`\\boxed{}` if there is one, else the last number in the text; commas and `$` are ignored and values
are compared as exact decimals, so "72.0" == "72".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from qthink.errors import require
from qthink.tasks.base import Located, Task, last_boxed, load_hub

# The usual "reason then box" instruction (as in Qwen's and DeepSeek-R1's math evaluations), one newline
# after the question; the grader falls back to the last number when the model ignores it.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_GOLD_RE = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)")
# A minus sign counts only when it is not a binary minus ("10-12" is a range, its last number is 12).
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
# LaTeX thousands separators and thin spaces inside a box: 1{,}080, 1\,080, 1\!080.
_LATEX_SEPARATORS = (("{,}", ","), ("\\,", ""), ("\\!", ""))


def gold_answer(answer: str) -> str:
    """The final answer after `####`, commas removed ("1,080" -> "1080", "-3" -> "-3")."""
    match = _GOLD_RE.search(answer)
    require(match is not None, f"gsm8k answer has no '#### <number>' line: {answer[-80:]!r}")
    return match.group(1).replace(",", "")


def last_number(text: str) -> str | None:
    """The last number in `text` with commas removed, or None."""
    numbers = [m.group(0).replace(",", "") for m in _NUMBER_RE.finditer(text)]
    return numbers[-1] if numbers else None


def extract_prediction(answer_text: str) -> str | None:
    """The predicted final number: from the last `\\boxed{}` if any (nothing if that box has no number),
    else the last number of the answer (the text after the think block)."""
    boxed = last_boxed(answer_text)
    if boxed is None:
        return last_number(answer_text)
    for latex, plain in _LATEX_SEPARATORS:
        boxed = boxed.replace(latex, plain)
    return last_number(boxed)


def same_number(a: str | None, b: str | None) -> bool:
    """Exact decimal equality of two number strings; False if either is missing or malformed."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def reference_solution(answer: str) -> str:
    """The worked solution as a readable answer: calculator annotations removed and the `#### x` line
    replaced by "The answer is \\boxed{x}."."""
    lines = _CALCULATOR_RE.sub("", answer).rstrip().split("\n")
    body = [line.rstrip() for line in lines if not line.lstrip().startswith("####")]
    return "\n".join([*body, f"The answer is \\boxed{{{gold_answer(answer)}}}."]).strip()


class GSM8kTask(Task):
    name = "gsm8k"
    metrics = ("exact_match",)
    files = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
    fields = {"question": str, "answer": str}

    def load_hub(self, split: str) -> list[Located]:
        return load_hub("openai/gsm8k", "main", split, self.name)

    def _records(self, located: list[Located], split: str) -> list[dict[str, Any]]:
        for where, record in located:
            require(
                _GOLD_RE.search(record["answer"]) is not None,
                f"{where}: gsm8k 'answer' has no '#### <number>' final line; fix the record",
            )
        return super()._records(located, split)

    def prompt(self, record: Mapping[str, Any]) -> str:
        return f"{record['question'].strip()}\n{INSTRUCTION}"

    def reference(self, record: Mapping[str, Any]) -> str:
        return reference_solution(record["answer"])

    def grade_answer(self, answer: str, record: Mapping[str, Any]) -> dict[str, float]:
        correct = same_number(extract_prediction(answer), gold_answer(record["answer"]))
        return {"exact_match": float(correct)}
