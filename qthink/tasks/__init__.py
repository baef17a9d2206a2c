"""Tasks: datasets with a prompt, a reference answer and a grader each (ARCHITECTURE.md, contract 4).

    task = get_task("gsm8k")
    records = task.load("test", data_path="data")      # data root, task folder or file; None: the hub
    task.prompt(r), task.reference(r), task.grade(output, r)["exact_match"], task.problem_id(r)

`task.grade` is the one grading entry point: an output whose think block never closed scores 0 there
(`grade_unclosed=True` grades its whole text instead).

Names: gsm8k, math500, tooluse, synthetic (generated, no files).
"""

from __future__ import annotations

import inspect
import json
import sys
import typing
from collections.abc import Callable
from typing import Any

from qthink.errors import UserError, require
from qthink.tasks.base import Task, has_unclosed_think, split_think
from qthink.tasks.gsm8k import GSM8kTask
from qthink.tasks.math500 import Math500Task
from qthink.tasks.synthetic import SyntheticTask
from qthink.tasks.tooluse import TooluseTask

TASKS: dict[str, type[Task]] = {
    "gsm8k": GSM8kTask,
    "math500": Math500Task,
    "tooluse": TooluseTask,
    "synthetic": SyntheticTask,
}


def get_task(name: str, **kwargs: Any) -> Task:
    """A task by name; keyword arguments go to its constructor (e.g. `steps` for synthetic)."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)


def load_problems(task: Task, split: str, data_path: str | None = None, limit: int | None = None,
                  note: Callable[[str], None] | None = None) -> list[dict]:
    """The first `limit` records of `split` (all without a limit). A generated task (synthetic) makes exactly
    `limit` problems, so a limit above its default split size is honoured instead of silently capped. A split
    with fewer problems than `limit` gives all of them, and `note` is told how many (eval's --limit and
    validation's data.val_limit alike)."""
    require(limit is None or (type(limit) is int and limit > 0), f"--limit must be a positive integer (got {limit!r})")
    if "n" in inspect.signature(task.load).parameters:
        return task.load(split, data_path, n=limit)
    records = task.load(split, data_path)
    if limit is not None and len(records) < limit and note is not None:
        note(f"{task.name} {split} has {len(records)} problems, fewer than the limit of {limit}: using all {len(records)}")
    return records[:limit]


def print_note(message: str) -> None:
    """A note on stderr that does not stop the command (e.g. a limit larger than the split)."""
    print(f"qthink: note: {message}", file=sys.stderr, flush=True)


def parse_task_options(pairs: list[str] | None) -> dict[str, Any]:
    """`--task-option KEY=VALUE` pairs as a dict; VALUE is read as JSON where it parses (`steps=6` -> 6),
    else kept as text."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        require(bool(sep) and key.strip() != "", f"--task-option must be KEY=VALUE (got {pair!r}), e.g. steps=6")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def check_option_types(name: str, options: dict[str, Any]) -> None:
    """Integer options must be integers: JSON's `true` is an int to Python (steps=true would mean 1 step)
    and 2.5 would slip through a range check."""
    hints = typing.get_type_hints(TASKS[name].__init__) if name in TASKS else {}
    for key, value in options.items():
        takes_int = hints.get(key) is int or int in typing.get_args(hints.get(key))
        require(not takes_int or (type(value) is not bool and (hints.get(key) is not int or type(value) is int)),
                f"task option {key}={json.dumps(value)}: {name} takes an integer {key}")


def make_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """`get_task` with constructor options from a command line or a manifest; a wrong option is one line."""
    check_option_types(name, options or {})
    try:
        return get_task(name, **(options or {}))
    except TypeError as e:
        params = [p for p in inspect.signature(TASKS[name].__init__).parameters if p != "self"]
        raise UserError(f"task {name} does not take the options {options} ({e}); it takes: "
                        f"{', '.join(params) or 'none'}") from e


__all__ = ["TASKS", "Task", "get_task", "has_unclosed_think", "load_problems", "make_task",
           "parse_task_options", "print_note", "split_think"]
