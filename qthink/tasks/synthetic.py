"""The built-in synthetic task: chains of single-digit arithmetic, generated, no files.

It exists so the whole pipeline (rollouts, teachers, latent training, eval) can run from scratch on a
CPU with a tiny model. A problem assigns a digit to `a` and derives each next variable from the previous
one with + - or * and a digit 1-9, all mod 10; the question asks for the last variable:

    question  "a=3 b=a+4 c=b*2 d=c+5 d?"      chain [7, 4, 9]
    think     "b=3+4=7 c=7*2=4 d=4+5=9"        answer "9"

The reference chain of thought writes each step out (operand, operation, result), so the hidden state at
the `=` before each result is where that step's value is computed (`step_offsets`), a natural teacher
position for the latent steps. Written out because with the short trace `b=7 c=4 d=9` the tiny model
did not learn to think better than it answered without thinking (docs/findings.md, F5).

Chains may vary in length: `steps` is a number (`3`) or an inclusive range (`"2-4"`, from
`--task-option steps=2-4`), each problem's length then drawn uniformly from it; a record keeps its own
length (`steps`), and `chain_length` lets every report score systems per length.

Splits are deterministic (seeded by split name) and disjoint whatever `n` is asked: a hash of the
question assigns every possible problem to exactly one split (about 1 in 10 to test, 1 in 10 to
validation, the rest to train), and each split only keeps problems of its own, without repeats. Budgets
are chosen on `validation`; `test` is only for the final numbers.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qthink.errors import UserError, require
from qthink.tasks.base import Located, Task

VARIABLES = "abcdefghijklmnopqrstuvwxyz"
OPS = "+-*"
SHARE = 10  # by hash, one problem in SHARE belongs to test and one to validation; the rest to train


def apply_op(value: int, op: str, operand: int) -> int:
    if op == "+":
        return (value + operand) % 10
    if op == "-":
        return (value - operand) % 10
    return (value * operand) % 10


def make_problem(rng: random.Random, steps: int) -> dict[str, Any]:
    """One random chain of `steps` operations after the initial assignment."""
    names = VARIABLES[: steps + 1]
    value = rng.randint(1, 9)
    parts = [f"{names[0]}={value}"]
    chain, values, ops = [], [value], []
    for prev, name in zip(names, names[1:], strict=False):
        op, operand = rng.choice(OPS), rng.randint(1, 9)
        value = apply_op(value, op, operand)
        chain.append(value)
        values.append(value)
        ops.append((op, operand))
        parts.append(f"{name}={prev}{op}{operand}")
    return {
        "question": " ".join(parts) + f" {names[-1]}?",
        "chain": chain,
        "answer": str(chain[-1]),
        "think": " ".join(
            f"{name}={prev}{op}{operand}={value}"
            for name, prev, (op, operand), value in zip(names[1:], values[:-1], ops, chain, strict=True)
        ),
    }


def parse_steps(steps: int | str) -> tuple[int, int]:
    """`3` -> (3, 3); `"2-4"` -> (2, 4): the inclusive range of chain lengths; one line when it is neither."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        low = high = steps
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(steps))
        require(match is not None, f"synthetic steps must be a number or a range LOW-HIGH such as 2-4 (got {steps!r})")
        low = int(match.group(1))
        high = int(match.group(2) or low)
    require(1 <= low <= high < len(VARIABLES),
            f"synthetic steps must be between 1 and {len(VARIABLES) - 1}, low before high (got {steps!r})")
    return low, high


def steps_label(steps: int | str) -> str:
    """`3` -> "3"; `"2-4"` -> "2-4" (a normalised range, for reports and file names)."""
    low, high = parse_steps(steps)
    return str(low) if low == high else f"{low}-{high}"


def split_of(question: str) -> str:
    """The split a question belongs to, fixed by a stable hash (not Python's salted `hash`)."""
    digest = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)
    return {0: "test", 1: "validation"}.get(digest % SHARE, "train")


def make_problems(split: str, n: int, steps: int | str = 3, seed: int = 0) -> list[dict[str, Any]]:
    """`n` distinct problems of `split`, the same for the same arguments; with a range of `steps`, each
    problem's length is drawn uniformly from it."""
    low, high = parse_steps(steps)
    rng = random.Random(f"qthink-synthetic-{seed}-{split}")  # str seeds are hashed deterministically
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise UserError(
                f"synthetic {split}: only {len(records)} distinct problems with steps={steps}; ask for fewer "
                "problems or more steps"
            )
        problem = make_problem(rng, low if low == high else rng.randint(low, high))
        if problem["question"] in seen or split_of(problem["question"]) != split:
            continue
        seen.add(problem["question"])
        records.append({**problem, "steps": len(problem["chain"]), "id": f"{split}-{len(records)}"})
    return records


class SyntheticTask(Task):
    name = "synthetic"
    metrics = ("exact_match",)

    def __init__(self, steps: int | str = 3, seed: int = 0, train_size: int = 2000, test_size: int = 300,
                 validation_size: int = 300) -> None:
        parse_steps(steps)  # a bad value is one line here, before any problem is made
        self.steps, self.seed = steps, seed
        self.sizes = {"train": train_size, "validation": validation_size, "test": test_size}

    def load(
        self, split: str, data_path: str | Path | None = None, n: int | None = None
    ) -> list[dict[str, Any]]:
        """`n` generated problems of `split` ("train", "validation" or "test"; default sizes 2000, 300, 300)."""
        require(
            data_path is None,
            "the synthetic task generates its problems and reads no files; drop --data-path",
        )
        require(split in self.sizes, f"synthetic has no split {split!r} (known: {', '.join(self.sizes)})")
        n = self.sizes[split] if n is None else n
        require(
            isinstance(n, int) and n >= 1, f"synthetic problem count must be a positive integer, got {n!r}"
        )
        return make_problems(split, n, self.steps, self.seed)

    def load_hub(self, split: str) -> list[Located]:
        raise UserError("the synthetic task has no hub copy; it is generated")

    def prompt(self, record: Mapping[str, Any]) -> str:
        return record["question"]

    def reference(self, record: Mapping[str, Any]) -> str:
        return record["answer"]

    def think_text(self, record: Mapping[str, Any]) -> str:
        """The reference chain of thought (the demo trains on `<think>\\n{think}\\n</think>\\n\\n{answer}`)."""
        return record["think"]

    def grade_answer(self, answer: str, record: Mapping[str, Any]) -> dict[str, float]:
        digits = re.findall(r"\d", answer)
        return {"exact_match": float(bool(digits) and digits[-1] == record["answer"])}

    def chain_length(self, record: Mapping[str, Any]) -> int:
        """The number of reasoning steps of a problem (reports score every system per length)."""
        return len(record["chain"])

    def step_offsets(self, think_text: str) -> list[int]:
        """Offsets of the `=` before each step's result (the second `=` of `b=3+4=7`): the state there
        predicts that step's value."""
        return [m.start() for m in re.finditer(r"=(?=\d(?:\s|$))", think_text)]
