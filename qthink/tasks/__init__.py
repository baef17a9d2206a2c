"""Tasks: datasets with a prompt, a reference answer and a grader each (the contract in DESIGN.md, 4).

    task = get_task("gsm8k")
    records = task.load("test", data_path="data")      # data root, task folder or file; None: the hub
    task.prompt(r), task.reference(r), task.grade(output, r)["exact_match"], task.problem_id(r)

Names: gsm8k, math500, tooluse, synthetic (generated, no files).
"""

from __future__ import annotations

from typing import Any

from qthink.errors import UserError
from qthink.tasks.base import Task, split_think
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


__all__ = ["TASKS", "Task", "get_task", "split_think"]
