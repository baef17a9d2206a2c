"""Tooluse (SDPO's ToolAlpaca-derived tool-calling task): loading, prompt, reference calls and grader.

Records (SDPO `datasets/tooluse/{train,test}.json`, JSON Lines despite the extension): `prompt` (the full
user message: tool documentation, the ReAct format and the question), `answer` (a JSON-encoded list of
`{"Action": name, "Action_Input": <JSON-encoded object>}`), `idx`; `id` = str(idx). There is no Hugging
Face copy: download the files from github.com/lasgroup/SDPO and pass --data-path.

The grader reproduces SDPO's `verl/utils/reward_score/feedback/tooluse.py` rule by rule (the rules are
tagged [SDPO ...] below), including its blind spots: nested inputs are cut at the first `}` and dropped,
and action names must be `\\w+`. So even the gold calls score 66/68 exact match on the test split
(idx 4072 and 4079 can never match). `action_accuracy` (the action multiset test alone) is not in
SDPO's code; it is the definition consistent with QThink's reported numbers.

One decision of ours: a closed `<think>...</think>` block is stripped before scoring (SDPO scores the
raw text), so a thinking model is graded on its calls, not on tool names it mentions while reasoning.
An output that never closes its think block is graded as is.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from qthink.errors import UserError, require
from qthink.tasks.base import Located, Task

# [SDPO extract_actions] every "Action:" + optional whitespace + a run of word characters, anywhere.
_ACTION_RE = re.compile(r"Action:\s*(\w+)")
# [SDPO extract_action_inputs] every "Action Input:" + whitespace + the shortest {...}, across lines.
_ACTION_INPUT_RE = re.compile(r"Action Input:\s*({.*?})", re.DOTALL)

SDPO_URL = "https://github.com/lasgroup/SDPO/tree/main/datasets/tooluse"


def predicted_actions(text: str) -> list[str]:
    return _ACTION_RE.findall(text)


def predicted_inputs(text: str) -> dict[str, Any]:
    """[SDPO extract_action_inputs] each block parsed as JSON, unparseable ones ignored, all merged into
    one dict in order (later keys overwrite earlier ones)."""
    merged: dict[str, Any] = {}
    for block in _ACTION_INPUT_RE.findall(text):
        try:
            parsed = json.loads(block)
        except json.JSONDecodeError:
            continue
        merged.update(parsed)  # a block that parses starts with "{", so it is a dict
    return merged


def gold_calls(answer: str) -> list[dict[str, Any]]:
    """The gold list of `{"Action", "Action_Input"}` calls from a record's `answer` string."""
    calls = json.loads(answer)
    require(isinstance(calls, list), f"tooluse 'answer' must be a JSON list of calls, got {answer[:80]!r}")
    return calls


def gold_inputs(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """[SDPO compute_score] each `Action_Input` parsed if it is a string (unparseable or missing -> {}),
    merged with the same overwrite rule as the prediction."""
    merged: dict[str, Any] = {}
    for call in calls:
        try:
            raw = call["Action_Input"]
            parsed = json.loads(raw) if isinstance(raw, str) else raw
        except (json.JSONDecodeError, KeyError):
            parsed = {}
        if isinstance(parsed, dict):  # SDPO would crash on a non-object gold input; none exist
            merged.update(parsed)
    return merged


def score(text: str, answer: str) -> dict[str, float]:
    """Exact match and action accuracy of `text` (an output's answer, after its think block) against a
    record's `answer` string."""
    calls = gold_calls(answer)
    # [SDPO compute_score] Counter equality: order and extra text do not matter, duplicates do.
    actions_ok = Counter(predicted_actions(text)) == Counter(call["Action"] for call in calls)
    # [SDPO compute_score] plain dict equality: "1" != 1, key order irrelevant.
    inputs_ok = predicted_inputs(text) == gold_inputs(calls)
    return {"exact_match": float(actions_ok and inputs_ok), "action_accuracy": float(actions_ok)}


def format_calls(calls: list[dict[str, Any]]) -> str:
    """Calls in the canonical ReAct form the prompt asks for: "Action: name" then "Action Input: {json}"
    per call, inputs re-serialized on one line (a gold input that is not JSON is written verbatim)."""
    lines = []
    for call in calls:
        raw = call.get("Action_Input", "{}")
        try:
            text = json.dumps(json.loads(raw) if isinstance(raw, str) else raw, ensure_ascii=False)
        except json.JSONDecodeError:
            text = str(raw)
        lines += [f"Action: {call['Action']}", f"Action Input: {text}"]
    return "\n".join(lines)


class TooluseTask(Task):
    name = "tooluse"
    metrics = ("exact_match", "action_accuracy")
    files = {"train": "tooluse/train.json", "test": "tooluse/test.json"}
    fields = {"prompt": str, "answer": str, "idx": int}

    def load_hub(self, split: str) -> list[Located]:
        raise UserError(
            f"tooluse has no Hugging Face copy: download datasets/tooluse/{split}.json from {SDPO_URL} "
            "and pass it (or its folder) as --data-path"
        )

    def _records(self, located: list[Located], split: str) -> list[dict[str, Any]]:
        for where, record in located:
            try:
                calls = json.loads(record["answer"])
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{where}: tooluse 'answer' is not valid JSON ({e.msg}); fix the record"
                ) from e
            require(
                isinstance(calls, list) and all(isinstance(c, dict) and "Action" in c for c in calls),
                f'{where}: tooluse \'answer\' must be a JSON list of {{"Action", "Action_Input"}} objects; '
                "fix the record",
            )
        return [{**record, "id": str(record["idx"])} for _, record in located]

    def prompt(self, record: Mapping[str, Any]) -> str:
        return record["prompt"]

    def reference(self, record: Mapping[str, Any]) -> str:
        return format_calls(gold_calls(record["answer"]))

    def grade_answer(self, answer: str, record: Mapping[str, Any]) -> dict[str, float]:
        return score(answer, record["answer"])

    def problem_id(self, record: Mapping[str, Any]) -> str:
        if "id" not in record and "idx" in record:
            return str(record["idx"])
        return super().problem_id(record)
