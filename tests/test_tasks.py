"""Tests for qthink.tasks: loaders, prompts, references and graders, on the real data when it is present."""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import pytest

from qthink.errors import UserError
from qthink.tasks import TASKS, Task, get_task, split_think
from qthink.tasks.base import last_boxed

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")
# Strings that would end a turn or open a block if a prompt or reference carried them into the chat template.
TEMPLATE_BREAKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>")


# ---------------------------------------------------------------- registry and shared helpers


def test_unknown_task_lists_known_names():
    with pytest.raises(
        UserError, match="unknown task 'gsm9k'; known tasks: gsm8k, math500, tooluse, synthetic"
    ):
        get_task("gsm9k")


def test_every_task_names_its_metrics_headline_first():
    for name in TASKS:
        task = get_task(name)
        assert task.name == name
        assert task.metrics[0] == "exact_match"
    assert get_task("tooluse").metrics == ("exact_match", "action_accuracy")


def _one_record(name: str) -> dict:
    """A hand-written record of each task, so the rule is tested without the data folder."""
    if name == "gsm8k":
        return {"question": "2+3?", "answer": "2 + 3 = 5\n#### 5", "id": "t-0"}
    if name == "math500":
        return _math("\\frac{1}{2}")
    if name == "tooluse":
        return TOOL_RECORD
    return get_task(name).load("test", n=1)[0]


@pytest.mark.parametrize("name", list(TASKS))
def test_task_grade_gives_an_unclosed_think_block_no_answer(name):
    task = get_task(name)
    record = _one_record(name)
    right = task.reference(record)
    assert task.grade(right, record)["exact_match"] == 1.0
    assert task.grade(f"<think>\nwork\n</think>\n\n{right}", record)["exact_match"] == 1.0
    # the right answer inside a think block that never closed is reasoning, not an answer: 0 on every metric
    unclosed = f"<think>\nwork, maybe {right}"
    assert task.grade(unclosed, record) == dict.fromkeys(task.metrics, 0.0)
    assert task.grade(unclosed, record, grade_unclosed=True)["exact_match"] == 1.0


def test_no_task_overrides_the_grading_entry_point():
    assert all(cls.grade is Task.grade for cls in TASKS.values())
    with pytest.raises(TypeError, match="implement grade_answer"):
        type("Bypass", (Task,), {"grade": lambda self, output, record: {"exact_match": 1.0}})


@pytest.mark.parametrize(
    "output, expected",
    [
        ("<think>\nhmm\n</think>\n\n42", ("\nhmm\n", "\n\n42", True)),
        ("hmm</think>42", ("hmm", "42", True)),  # generation prompt already opened the block
        ("<think>\nstill going", ("\nstill going", "<think>\nstill going", False)),  # graded as is
        ("just 42", (None, "just 42", False)),
    ],
)
def test_split_think(output, expected):
    assert split_think(output) == expected


def test_last_boxed_is_brace_matched_and_takes_the_last_box():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\fbox{2}") == "2"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed") is None


# ---------------------------------------------------------------- loading errors


def test_jsonl_record_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"answer": "#### 2"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl line 2: gsm8k record is missing field 'question'") as e:
        get_task("gsm8k").load("test", path)
    assert "\n" not in str(e.value) and "fix the record" in str(e.value)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q", "answer": \n')
    with pytest.raises(UserError, match=r"broken\.jsonl line 3: not valid JSON"):
        get_task("gsm8k").load("test", path)


def test_wrong_field_type_and_non_object_lines_are_user_errors(tmp_path):
    path = tmp_path / "types.jsonl"
    path.write_text('{"question": 7, "answer": "#### 1"}\n')
    with pytest.raises(UserError, match=r"line 1: gsm8k record field 'question' is int, expected str"):
        get_task("gsm8k").load("test", path)
    path.write_text('{"question": "q", "answer": "#### 1"}\n["question", "answer"]\n')
    with pytest.raises(UserError, match=r"line 2: expected a JSON object, got list"):
        get_task("gsm8k").load("test", path)


def test_json_array_files_load_and_ids_follow_the_split(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(
        json.dumps([{"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "#### -2"}])
    )
    task = get_task("gsm8k")
    records = task.load("train", path)
    assert [task.problem_id(r) for r in records] == ["train-0", "train-1"]


def test_missing_split_file_lists_what_was_tried(tmp_path):
    with pytest.raises(UserError, match=r"no tooluse train file under .*tried .*tooluse/train\.json"):
        get_task("tooluse").load("train", tmp_path)
    with pytest.raises(UserError, match=r"gsm8k has no split 'dev' \(known: train, test\)"):
        get_task("gsm8k").load("dev", tmp_path)


def test_hub_failures_become_user_errors(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"openai/gsm8k.*ConnectionError: no network; pass --data-path"):
        get_task("gsm8k").load("test")
    with pytest.raises(UserError, match=r"HuggingFaceH4/MATH-500.*pass --data-path"):
        get_task("math500").load("test")
    with pytest.raises(UserError, match=r"math500 has no 'train' split on the Hugging Face Hub"):
        get_task("math500").load("train")
    with pytest.raises(
        UserError, match=r"download datasets/tooluse/test\.json from .*lasgroup/SDPO.*--data-path"
    ):
        get_task("tooluse").load("test")


# ---------------------------------------------------------------- GSM8k


@needs_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_references_and_raw_answers_grade_correct(split):
    task = get_task("gsm8k")
    records = task.load(split, DATA)
    assert len(records) == {"train": 7473, "test": 1319}[split]
    for record in records:
        reference = task.reference(record)
        assert "<<" not in reference and "####" not in reference
        assert reference.endswith("}.")
        assert task.grade(reference, record) == {"exact_match": 1.0}, record["id"]
        assert task.grade(record["answer"], record) == {"exact_match": 1.0}, record["id"]
    # The cases SDPO's unsigned, comma-blind gold regex gets wrong are among those checked above.
    finals = [r["answer"].split("####")[-1].strip() for r in records]
    assert sum(f.startswith("-") for f in finals) == {"train": 3, "test": 2}[split]
    assert sum("," in f for f in finals) == {"train": 79, "test": 14}[split]


@needs_data
def test_gsm8k_data_root_task_folder_and_file_give_the_same_records():
    task = get_task("gsm8k")
    by_root = task.load("test", DATA)
    assert by_root == task.load("test", DATA / "gsm8k") == task.load("test", DATA / "gsm8k" / "test.jsonl")
    assert task.problem_id(by_root[17]) == "test-17"
    assert task.prompt(by_root[0]).endswith(
        "market?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


GSM_RECORD = {"question": "How many?", "answer": "3 * 360 = <<3*360=1080>>1080\n#### 1,080", "id": "t-0"}
GSM_NEGATIVE = {"question": "Change?", "answer": "2 - 5 = <<2-5=-3>>-3\n#### -3", "id": "t-1"}


@pytest.mark.parametrize(
    "output, record, correct",
    [
        ("So she needs \\boxed{1080} tiles.", GSM_RECORD, True),
        ("So she needs \\boxed{1{,}080}.", GSM_RECORD, True),
        ("The total is $1,080.00", GSM_RECORD, True),
        ("\\boxed{1080} (checked in 3 steps)", GSM_RECORD, True),  # the box wins over later numbers
        ("The answer is 1080.0", GSM_RECORD, True),
        ("The answer is 1081", GSM_RECORD, False),
        ("\\boxed{108}", GSM_RECORD, False),
        ("I think \\boxed{} is 1080", GSM_RECORD, False),  # an empty box is the answer, and it is empty
        ("<think>maybe 1080</think>\nThe answer is 1000.", GSM_RECORD, False),  # think block not graded
        ("<think>maybe 999</think>\n\\boxed{1080}", GSM_RECORD, True),
        ("<think>no closing tag, 1080", GSM_RECORD, False),  # unclosed: no answer
        ("It changes by \\boxed{-3}", GSM_NEGATIVE, True),
        ("It changes by -3.", GSM_NEGATIVE, True),
        ("It changes by 3.", GSM_NEGATIVE, False),
        ("x = 10-3", GSM_NEGATIVE, False),  # a binary minus is not a sign: the last number is 3
        ("no number at all", GSM_NEGATIVE, False),
    ],
)
def test_gsm8k_grader(output, record, correct):
    assert get_task("gsm8k").grade(output, record) == {"exact_match": float(correct)}


def test_gsm8k_grades_an_unclosed_block_as_is_only_when_asked():
    assert get_task("gsm8k").grade("<think>no closing tag, 1080", GSM_RECORD, grade_unclosed=True) == {"exact_match": 1.0}


def test_gsm8k_reference_strips_calculator_annotations():
    assert get_task("gsm8k").reference(GSM_RECORD) == "3 * 360 = 1080\nThe answer is \\boxed{1080}."


# ---------------------------------------------------------------- MATH-500


@needs_data
def test_math500_references_grade_correct_and_ids_are_unique_ids():
    task = get_task("math500")
    records = task.load("test", DATA)
    assert len(records) == 500
    for record in records:
        assert task.grade(task.reference(record), record) == {"exact_match": 1.0}, record["id"]
        assert (
            task.grade(f"<think>\nwork\n</think>\n\n\\boxed{{{record['answer']}}}", record)["exact_match"]
            == 1.0
        )
    assert task.problem_id(records[0]) == records[0]["unique_id"]
    assert task.prompt(records[0]) == records[0]["problem"] + (
        "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


@needs_data
def test_math_train_split_skips_null_answers_with_a_warning(caplog):
    task = get_task("math500")
    with caplog.at_level(logging.WARNING, logger="qthink.tasks.math500"):
        records = task.load("train", DATA)
    assert len(records) == 7498  # 7,500 minus the 2 records without a boxed answer
    assert (
        "skipped 2 records whose 'answer' is null" in caplog.text
        and "train_hendrycks7500.jsonl line " in caplog.text
    )
    assert all(r["answer"] is not None for r in records)
    assert len(task.load("train", DATA / "math500")) == 7498  # ../math beside the math500 folder


def _math(answer: str) -> dict:
    return {"problem": "p", "solution": f"\\boxed{{{answer}}}", "answer": answer, "id": "x"}


@pytest.mark.parametrize(
    "boxed, gold",
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\sqrt{8}", "2\\sqrt{2}"),
        ("x^2+2x", "2x+x^2"),
        ("C", "\\text{(C)}"),
        ("\\{2,1\\}", "\\{1,2\\}"),
        ("10.0", "10"),
    ],
)
def test_math500_equivalent_forms_pass_via_math_verify(boxed, gold):
    assert get_task("math500").grade(f"so \\boxed{{{boxed}}}", _math(gold)) == {"exact_match": 1.0}


@pytest.mark.parametrize(
    "output, gold",
    [
        # Unwrapped, math-verify would parse this gold as 2 and accept the box.
        ("\\boxed{2}", "2\\sqrt{2}"),
        ("\\boxed{3}", "4"),
        ("\\boxed{(1,2)}", "[1,2]"),
        ("\\boxed{1/3}", "0.333"),
        ("The answer is 4 (no box).", "4"),
        # A box inside a closed think block is not the answer.
        ("<think>\\boxed{4}</think>\nI am not sure.", "4"),
        ("\\boxed{}", "4"),
    ],
)
def test_math500_wrong_answers_fail(output, gold):
    assert get_task("math500").grade(output, _math(gold)) == {"exact_match": 0.0}


def test_math500_grades_off_the_main_thread():
    # math-verify's SIGALRM timeout cannot run in a worker thread; the grader disables it there.
    results = []
    worker = threading.Thread(
        target=lambda: results.append(get_task("math500").grade("\\boxed{0.5}", _math("\\frac12")))
    )
    worker.start()
    worker.join()
    assert results == [{"exact_match": 1.0}]


# ---------------------------------------------------------------- Tooluse


@needs_data
def test_tooluse_gold_calls_score_66_of_68_exact_and_67_of_68_actions():
    task = get_task("tooluse")
    records = task.load("test", DATA)  # test.json is JSON Lines despite its extension
    assert len(records) == 68
    scores = {int(task.problem_id(r)): task.grade(task.reference(r), r) for r in records}
    assert sum(s["exact_match"] for s in scores.values()) == 66
    assert sum(s["action_accuracy"] for s in scores.values()) == 67
    # SDPO's scorer can never give these two items exact match:
    # - 4072: the gold input holds a nested object ({"profileData": {...}}); the non-greedy `{.*?}` cuts the
    #   written input at the first "}", the cut text is not JSON and is dropped, so the inputs never match.
    #   Its action name is fine, so it keeps action accuracy.
    # - 4079: the gold action is literally "[Optional]updateUserProfile"; `Action:\s*(\w+)` cannot read a
    #   name starting with "[", so the action multisets differ (and its input is nested too).
    assert [i for i, s in scores.items() if s["exact_match"] == 0] == [4072, 4079]
    assert [i for i, s in scores.items() if s["action_accuracy"] == 0] == [4079]
    assert task.load("test", DATA / "tooluse") == records == task.load("test", DATA / "tooluse" / "test.json")


@needs_data
def test_tooluse_prompt_reference_and_format_pitfalls():
    task = get_task("tooluse")
    record = next(r for r in task.load("test", DATA) if r["idx"] == 4047)
    reference = task.reference(record)
    assert reference == (
        'Action: searchAxolotlImages\nAction Input: {"color": "wild", "gender": "", "size": "medium", "page": 1}'
    )
    assert task.prompt(record) == record["prompt"]
    assert task.grade(f"Thought: I should search.\n{reference}", record) == {
        "exact_match": 1.0,
        "action_accuracy": 1.0,
    }
    # Echoing the format text adds a spurious action "the".
    echoed = "Action: the action to take, should be one of the tool names.\n" + reference
    assert task.grade(echoed, record) == {"exact_match": 0.0, "action_accuracy": 0.0}
    # A closed think block that mentions other tools is stripped before scoring; an unclosed one is not.
    musing = '<think>\nMaybe Action: getRandomAxolotlImage with Action Input: {"page": 2}?\n</think>\n\n'
    assert task.grade(musing + reference, record) == {"exact_match": 1.0, "action_accuracy": 1.0}
    unclosed = musing.replace("</think>", "") + reference
    assert task.grade(unclosed, record) == {"exact_match": 0.0, "action_accuracy": 0.0}


TOOL_RECORD = {
    "prompt": "p",
    "idx": 7,
    "answer": json.dumps(
        [
            {"Action": "getUser", "Action_Input": '{"id": 1}'},
            {"Action": "listPosts", "Action_Input": '{"user": "ann", "limit": 3}'},
        ]
    ),
}


GET_USER = 'Action: getUser\nAction Input: {"id": 1}'
LIST_POSTS = 'Action: listPosts\nAction Input: {"user": "ann", "limit": 3}'


@pytest.mark.parametrize(
    "output, exact, actions",
    [
        # Order and key order do not matter.
        ('Action: listPosts\nAction Input: {"limit": 3, "user": "ann"}\n' + GET_USER, 1, 1),
        # Python equality: "1" != 1.
        ('Action: getUser\nAction Input: {"id": "1"}\n' + LIST_POSTS, 0, 1),
        ('Action: getUser\nAction Input: {"id": 1, "user": "ann", "limit": 3}', 0, 0),  # one call missing
        # Duplicates count.
        (f"{GET_USER}\nAction: getUser\nAction Input: {{}}\n{LIST_POSTS}", 0, 0),
        ("I cannot help with that.", 0, 0),
    ],
)
def test_tooluse_hand_written_answers(output, exact, actions):
    task = get_task("tooluse")
    assert task.grade(output, TOOL_RECORD) == {"exact_match": float(exact), "action_accuracy": float(actions)}
    assert task.problem_id(TOOL_RECORD) == "7"


# ---------------------------------------------------------------- synthetic


def _evaluate(question: str) -> list[int]:
    """An independent evaluator for the synthetic questions: the value of each derived variable."""
    values: dict[str, int] = {}
    chain = []
    for name, expr in re.findall(r"(\w)=(\S+)", question):
        values[name] = eval(expr, {}, dict(values)) % 10  # expressions are only "x+7"-style and digits
        if len(values) > 1:
            chain.append(values[name])
    return chain


def test_synthetic_is_deterministic_disjoint_and_correct():
    task = get_task("synthetic")
    train, test = task.load("train"), task.load("test")
    assert (len(train), len(test)) == (2000, 300)
    assert train == get_task("synthetic").load("train") and test == task.load("test")
    assert [task.problem_id(r) for r in (test[0], test[17])] == ["test-0", "test-17"]
    big_train = {r["question"] for r in task.load("train", n=10_000)}
    big_test, validation = {r["question"] for r in task.load("test", n=1000)}, {r["question"] for r in task.load("validation", n=1000)}
    assert not big_train & big_test and not big_train & validation and not big_test & validation
    assert len({r["question"] for r in train}) == len(train)
    for record in train + test:
        assert re.fullmatch(r"a=[1-9]( [b-z]=[a-y][-+*][1-9]){3} d\?", record["question"])
        assert record["chain"] == _evaluate(record["question"])
        assert record["answer"] == str(record["chain"][-1]) == task.reference(record)
        assert task.prompt(record) == record["question"]
        a = int(record["question"][2])
        (b, c, d), ops = record["chain"], re.findall(r"([-+*])([1-9])", record["question"])
        (o1, x1), (o2, x2), (o3, x3) = ops
        assert task.think_text(record) == f"b={a}{o1}{x1}={b} c={b}{o2}{x2}={c} d={c}{o3}{x3}={d}"


def test_synthetic_steps_size_and_step_offsets():
    task = get_task("synthetic", steps=5)
    records = task.load("test", n=7)
    assert len(records) == 7
    for record in records:
        think = task.think_text(record)
        offsets = task.step_offsets(think)
        assert len(offsets) == 5
        # The character at each offset is the `=` before a result, and the value after it is that step's.
        assert [think[o] for o in offsets] == ["="] * 5
        assert [int(think[o + 1]) for o in offsets] == record["chain"]
    assert task.step_offsets("b=3+4=7 c=7*2=4 d=4+5=9") == [5, 13, 21]
    assert get_task("gsm8k").step_offsets("x = 1") is None


def test_synthetic_grader_and_its_errors():
    task = get_task("synthetic")
    record = {"question": "a=3 b=a+4 c=b*2 d=c+5 d?", "chain": [7, 4, 9], "answer": "9", "id": "x"}
    assert task.grade("9", record) == {"exact_match": 1.0}
    assert task.grade("<think>\nb=3+4=7 c=7*2=4 d=4+5=9\n</think>\n\n9", record) == {"exact_match": 1.0}
    assert task.grade("<think>\nb=3+4=7 c=7*2=4 d=4+5=9\n</think>\n\n4", record) == {"exact_match": 0.0}
    assert task.grade("d is 4, no wait 9", record) == {"exact_match": 1.0}
    assert task.grade("nine", record) == {"exact_match": 0.0}
    with pytest.raises(UserError, match="drop --data-path"):
        task.load("test", data_path="somewhere")
    with pytest.raises(UserError, match="no split 'dev'"):
        task.load("dev")


# ---------------------------------------------------------------- chat-template safety


@needs_data
def test_prompts_and_references_are_chat_template_safe():
    for name, split in [("gsm8k", "test"), ("math500", "test"), ("tooluse", "test"), ("synthetic", "test")]:
        task = get_task(name)
        records = task.load(split) if name == "synthetic" else task.load(split, DATA)
        for record in records:
            text = task.prompt(record) + task.reference(record)
            assert not any(marker in text for marker in TEMPLATE_BREAKERS), (name, task.problem_id(record))
            assert set(task.grade(task.reference(record), record)) == set(task.metrics)


def test_load_problems_limits_and_task_options():
    from qthink.tasks import load_problems, make_task, parse_task_options

    synthetic = make_task("synthetic", parse_task_options(["steps=5", "test_size=40"]))
    assert synthetic.steps == 5
    assert len(load_problems(synthetic, "test")) == 40
    assert len(load_problems(synthetic, "test", limit=500)) == 500  # generated: as many as asked
    assert load_problems(synthetic, "test", limit=10) == load_problems(synthetic, "test", limit=500)[:10]
    with pytest.raises(UserError, match="positive integer"):
        load_problems(synthetic, "test", limit=0)
    assert parse_task_options(["name=a=b", "flag=true"]) == {"name": "a=b", "flag": True}
