"""The task interface and the helpers every task shares.

A task turns a dataset into records (plain dicts), a record into the user message the model sees
(`prompt`) and into a reference answer (`reference`), and grades a model output against a record
(`grade`). Loading rules, think-block handling and `\\boxed{}` extraction live here so that all tasks
treat them the same way.

Where a split comes from (`Task.load(split, data_path)`):
- `data_path` is a file: it is read as that split (JSON Lines or one JSON array, whatever the extension).
- `data_path` is a directory: each task names its split files relative to a *data root* laid out like
  the benchmark data folder (`gsm8k/`, `math500/`, `math/`, `tooluse/`; `Task.files`, e.g. `gsm8k/test.jsonl`). With that relative path `rel`, the
  candidates are, in order, `<dir>/<rel>` (dir is the data root), `<dir>/<basename of rel>` (dir is the
  task's own folder) and `<dir>/../<rel>` (dir is a task folder inside a data root, which is how
  math500's train split finds `../math/train_hendrycks7500.jsonl`).
- `data_path` is None: the task's public Hugging Face copy, if it has one (`Task.load_hub`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from qthink.errors import UserError, require
from qthink.files import jsonl_values

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def thinking_completion(think: str, answer: str) -> str:
    """A completion in Qwen3's layout after a thinking-mode generation prompt:
    `<think>\\n{think}\\n</think>\\n\\n{answer}` (the model's end-of-turn token not included)."""
    return f"{THINK_OPEN}\n{think}\n{THINK_CLOSE}\n\n{answer}"

# (where, record): `where` names the source for error messages, e.g. "data/test.jsonl line 17".
Located = tuple[str, dict[str, Any]]


def split_think(output: str) -> tuple[str | None, str, bool]:
    """Split a model output into `(think_text, answer_text, closed)`.

    - A closed block (`</think>` present): think_text is the text between the first `<think>` and the
      first `</think>` (or everything before `</think>` when the output starts inside the block, as
      when the generation prompt already holds `<think>`); answer_text is everything after `</think>`.
    - `<think>` opened but never closed (a truncated rollout): think_text is what follows `<think>` and
      answer_text is the whole output, because there is no committed answer to cut out (`Task.grade`
      scores such an output 0 unless asked to grade it as is).
    - No think tags: `(None, output, False)`.
    Graders grade answer_text, so a model that mentions candidate answers (or tool names) while
    reasoning is graded on what it answers, not on what it considered.
    """
    end = output.find(THINK_CLOSE)
    start = output.find(THINK_OPEN)
    if end >= 0:
        body_start = start + len(THINK_OPEN) if 0 <= start < end else 0
        return output[body_start:end], output[end + len(THINK_CLOSE) :], True
    if start >= 0:
        return output[start + len(THINK_OPEN) :], output, False
    return None, output, False


def has_unclosed_think(output: str) -> bool:
    """The output opened a think block and never closed it (a truncated rollout or thinking answer)."""
    think, _, closed = split_think(output)
    return think is not None and not closed


def last_boxed(text: str) -> str | None:
    """Content of the last brace-matched `\\boxed{...}` or `\\fbox{...}` in `text`, or None.

    Brace matching (rather than a regex) is what keeps `\\boxed{\\frac{1}{2}}` whole. An unclosed
    last box counts as no box.
    """
    starts = [(text.rfind(cmd), cmd) for cmd in ("\\boxed{", "\\fbox{")]
    idx, cmd = max(starts)
    if idx < 0:
        return None
    depth = 0
    for i in range(idx + len(cmd) - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx + len(cmd) : i]
    return None


def read_records(path: str | Path) -> list[Located]:
    """Read a JSON Lines file or a file holding one JSON array of objects.

    The extension is not trusted (SDPO's tooluse `test.json` is JSON Lines): a file whose first
    non-blank character is `[` is read as an array, anything else line by line. Blank lines are skipped.
    """
    path = Path(path).expanduser()
    require(path.is_file(), f"{path}: no such file; pass --data-path pointing at an existing file or folder")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({e}); pass a JSON or JSONL data file") from e
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}); fix the file"
            ) from e
        located = [(f"{path} record {i}", item) for i, item in enumerate(items)]
    else:
        located = jsonl_values(path, text, "each line must be one JSON object, fix or remove that line")
    for where, item in located:
        require(
            isinstance(item, dict),
            f"{where}: expected a JSON object, got {type(item).__name__}; each record must be an object",
        )
    require(len(located) > 0, f"{path}: no records in the file; pass a non-empty data file")
    return located


def check_fields(
    where: str, record: Mapping[str, Any], fields: Mapping[str, type | tuple[type, ...]], task: str
) -> None:
    """Raise a one-line `UserError` naming `where` and the field when `record` lacks a field or has the
    wrong type for it."""
    expected = ", ".join(fields)
    for field, types in fields.items():
        require(
            field in record,
            f"{where}: {task} record is missing field '{field}' (expected fields: {expected}); "
            f"fix the record or point --data-path at a {task} file",
        )
        # JSON's true/false are ints to Python: a bool passes only where bool is expected
        wrong_bool = isinstance(record[field], bool) and bool not in (types if isinstance(types, tuple) else (types,))
        require(
            isinstance(record[field], types) and not wrong_bool,
            f"{where}: {task} record field '{field}' is {type(record[field]).__name__}, expected "
            f"{_type_names(types)}; fix the record or point --data-path at a {task} file",
        )


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def resolve_split_file(data_path: str | Path, files: Mapping[str, str], split: str, task: str) -> Path:
    """The file holding `split`: `data_path` itself if it is a file, else the first existing candidate
    under the directory (rules in the module docstring)."""
    path = Path(data_path).expanduser()
    if path.is_file():
        return path
    require(path.is_dir(), f"{path}: no such file or folder; pass --data-path pointing at {task} data")
    require(
        split in files,
        f"{task} has no split {split!r} (known: {', '.join(files)}); pass one of those or a file as --data-path",
    )
    rel = Path(files[split])
    candidates = [path / rel, path / rel.name, path.parent / rel]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise UserError(
        f"no {task} {split} file under {path} (tried {tried}); pass the file itself as --data-path"
    )


def load_hub(dataset_id: str, config: str | None, split: str, task: str) -> list[Located]:
    """Rows of a public Hugging Face dataset split; any hub failure (e.g. no network) becomes a UserError
    that says to pass a local copy."""
    try:
        import datasets  # heavy import, only needed on this path

        rows = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # network, auth, cache and unknown-split errors all mean the same to the user
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise UserError(
            f"could not load {task} split {split!r} from the Hugging Face Hub ({dataset_id}): {reason}; "
            f"pass --data-path with a local copy of the {task} data"
        ) from e
    return [(f"{dataset_id} {split} row {i}", dict(row)) for i, row in enumerate(rows)]


class Task:
    """Base class: subclasses set `name`, `metrics`, `files`, `fields` and implement `_records`,
    `prompt`, `reference` and `grade_answer`. `grade` is the one grading entry point and is not
    overridden: it applies the think-block rules every task shares, then calls `grade_answer`."""

    name: ClassVar[str] = ""
    # Names `grade` returns; the first is the headline metric.
    metrics: ClassVar[tuple[str, ...]] = ("exact_match",)
    # split -> file path relative to a data root (gsm8k/, math500/, math/, tooluse/).
    files: ClassVar[dict[str, str]] = {}
    # Fields every raw record must have, with their allowed types.
    fields: ClassVar[dict[str, type | tuple[type, ...]]] = {}

    def load(self, split: str, data_path: str | Path | None = None) -> list[dict[str, Any]]:
        """Records of `split`, read from `data_path` (file, task folder or data root) or, when None, from
        the task's public Hugging Face copy. Each record gains an `id` (see `problem_id`)."""
        if data_path is None:
            require(
                split in self.files,
                f"{self.name} has no split {split!r} (known: {', '.join(self.files)}); pass one of those",
            )
            located = self.load_hub(split)
        else:
            located = read_records(resolve_split_file(data_path, self.files, split, self.name))
        for where, record in located:
            check_fields(where, record, self.fields, self.name)
        return self._records(located, split)

    def load_hub(self, split: str) -> list[Located]:
        raise UserError(f"{self.name} has no public Hugging Face copy; pass --data-path with a local copy")

    def _records(self, located: list[Located], split: str) -> list[dict[str, Any]]:
        """Turn validated raw records into task records (add `id`, drop unusable ones)."""
        return [{**record, "id": f"{split}-{i}"} for i, (_, record) in enumerate(located)]

    def prompt(self, record: Mapping[str, Any]) -> str:
        """The user message the model sees (one user turn)."""
        raise NotImplementedError

    def reference(self, record: Mapping[str, Any]) -> str:
        """The reference answer text (an SFT target)."""
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # one entry point: a task that overrode `grade` would skip the unclosed-think rule
        if "grade" in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides Task.grade; implement grade_answer instead")

    def grade(self, output: str, record: Mapping[str, Any], grade_unclosed: bool = False) -> dict[str, float]:
        """Metrics for one model output; keys are `self.metrics`, values 0.0 or 1.0. The answer is the text
        after `</think>` (the whole output when there is no think block), so a model is graded on what it
        answers, not on what it considered. An output whose think block never closed has no answer and
        scores 0 on every metric: its reasoning may mention the right value without committing to it.
        `grade_unclosed` grades such an output on its whole text instead (the old behaviour, for
        comparison)."""
        think, answer, closed = split_think(output)
        if think is not None and not closed and not grade_unclosed:
            return dict.fromkeys(self.metrics, 0.0)
        return self.grade_answer(answer, record)

    def grade_answer(self, answer: str, record: Mapping[str, Any]) -> dict[str, float]:
        """Metrics for `answer`, the output's text after its think block (see `grade`)."""
        raise NotImplementedError

    def problem_id(self, record: Mapping[str, Any]) -> str:
        """A stable id for the problem, set by `load`."""
        require("id" in record, f"{self.name} record has no 'id'; load records with get_task(...).load(...)")
        return str(record["id"])

    def step_offsets(self, think_text: str) -> list[int] | None:
        """Character offsets in `think_text` of the characters whose hidden state computes each
        intermediate result, or None when the task has no such notion (a general position rule
        applies instead)."""
        return None

    def chain_length(self, record: Mapping[str, Any]) -> int | None:
        """How many reasoning steps the problem takes, where the task knows it (synthetic chains); reports
        then score every system per length. None elsewhere."""
        return None
