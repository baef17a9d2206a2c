"""`qthink eval`: runs of checkpoints and base models in each mode, their files, the comparison table,
determinism, unclosed think blocks, and one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qthink.bench.inference import spread_weights
from qthink.cli import main
from qthink.core.model import QThink, init_checkpoint
from qthink.core.sequences import output_text
from qthink.evaluate import (
    default_mode,
    evaluate,
    format_table,
    resolve_targets,
    split_mode,
    summarize,
)
from qthink.scoring import prediction
from qthink.tasks import get_task

PRED_FIELDS = {"problem_id", "prompt", "output", "tokens", "correct", "exact_match", "seconds", "finished"}
SUMMARY_FIELDS = {"task", "split", "system", "mode", "K", "metrics", "mean_tokens", "wall_seconds",
                  "seconds_per_problem", "unclosed_think", "markdown_row"}


@pytest.fixture(scope="module")
def ckpt(tiny_base, tmp_path_factory):
    return init_checkpoint(str(tiny_base), tmp_path_factory.mktemp("eval") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def spread_qt(ckpt) -> QThink:
    """Weights spread (see `spread_weights`) so outputs depend on the prompt and batching errors would show."""
    qt = QThink.from_pretrained(ckpt, torch.float32)
    spread_weights(qt.model, 0)
    spread_weights(qt.head, 1)
    return qt


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_cli_three_modes_one_table(ckpt, tiny_base, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval", str(ckpt), f"{tiny_base}:think", f"{tiny_base}:nothink", "--task", "synthetic",
                 "--limit", "5", "--max-new-tokens", "6", "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    stdout = capsys.readouterr().out
    names = ["ckpt", f"{tiny_base.name}-think", f"{tiny_base.name}-nothink"]
    for name, mode, k in zip(names, ["qthink", "think", "nothink"], [6, 0, 0], strict=True):
        preds = read_jsonl(out / name / "predictions.jsonl")
        summary = json.loads((out / name / "summary.json").read_text())
        assert len(preds) == 5 and all(PRED_FIELDS <= set(p) for p in preds)
        assert all(1 <= p["tokens"] <= 6 for p in preds)
        assert SUMMARY_FIELDS <= set(summary)
        assert (summary["mode"], summary["K"], summary["task"], summary["problems"]) == (mode, k, "synthetic", 5)
        assert summary["markdown_row"] in stdout
    table = (out / "comparison.md").read_text()
    assert table.splitlines()[0] == "| Model | Exact Match | Mean tokens | Unclosed think | s/problem |"
    assert table.strip() in stdout and len(table.strip().splitlines()) == 2 + 3


def test_evaluate_in_process_is_deterministic_and_batch_independent(spread_qt, tmp_path):
    runs = [evaluate(spread_qt, "synthetic", limit=10, max_new_tokens=8, batch_size=b, out=tmp_path / str(b),
                     name="qt", progress=False) for b in (4, 4, 10)]
    preds = [[{k: v for k, v in p.items() if k != "seconds"} for p in read_jsonl(tmp_path / str(b) / "qt" / "predictions.jsonl")]
             for b in (4, 4, 10)]
    assert preds[0] == preds[1] == preds[2]
    assert runs[0]["metrics"] == runs[2]["metrics"] and runs[0]["mean_tokens"] == runs[2]["mean_tokens"]
    assert len({p["output"] for p in preds[0]}) > 3, "outputs do not depend on the problem"


TIMING = {"seconds", "wall_seconds", "seconds_per_problem", "problems_per_s", "markdown_row"}


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def test_eval_on_two_ddp_processes_writes_what_one_process_writes(ckpt, tiny_base, tmp_path, capsys):
    """`--devices 2` (Lightning DDP, 2 CPU processes over gloo; the launcher re-runs the command for rank 1):
    5 problems in batches of 2 give one rank a padding copy, which must not be counted twice. Two targets, so
    the second Trainer runs in the processes the first started. Rank 1 neither claims, writes nor prints."""
    argv = ["eval", str(ckpt), f"{tiny_base}:nothink", "--task", "synthetic", "--limit", "5", "--max-new-tokens", "6",
            "--batch-size", "2", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    qthink = Path(sys.executable).parent / "qthink"
    done = subprocess.run([sys.executable, str(qthink), *argv, "--devices", "2", "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr  # two processes really ran
    for name in ("ckpt", f"{tiny_base.name}-nothink"):
        one, two = (tmp_path / "one" / name, tmp_path / "two" / name)
        preds = [[untimed(p) for p in read_jsonl(run / "predictions.jsonl")] for run in (one, two)]
        assert preds[0] == preds[1] and len(preds[0]) == 5
        assert len({p["output"] for p in preds[0]}) > 3, "outputs do not depend on the problem"
        summaries = [untimed(json.loads((run / "summary.json").read_text())) for run in (one, two)]
        assert summaries[0] == summaries[1]
        assert done.stdout.count(f"{name}: wrote") == 1  # rank 0 only
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert (tmp_path / "two" / "comparison.md").read_text().count("\n") == (tmp_path / "one" / "comparison.md").read_text().count("\n")


def test_think_and_nothink_modes_use_their_prompts(spread_qt, tmp_path):
    """`think` decodes after the enable_thinking=True prompt, `nothink` after the empty think block, both K=0."""
    task = get_task("synthetic")
    questions = [task.prompt(r) for r in task.load("test", n=6)]
    for mode, thinking in (("think", True), ("nothink", False)):
        summary = evaluate(spread_qt, task, mode=mode, limit=6, max_new_tokens=6, out=tmp_path, name=mode,
                           progress=False)
        assert (summary["mode"], summary["K"]) == (mode, 0)
        got = [p["output"] for p in read_jsonl(tmp_path / mode / "predictions.jsonl")]
        want = [output_text(spread_qt.tokenizer, r["token_ids"], r["finished"])
                for r in spread_qt.generate(questions, 0, 6, enable_thinking=thinking)]
        assert got == want


def test_unclosed_think_has_no_answer_and_is_counted():
    task = get_task("synthetic")
    record = task.load("test", n=1)[0]
    answer = record["answer"]
    result = {"token_ids": [1, 2, 3], "finished": False, "answer": f"<think>\nso the answer is {answer}"}
    unclosed = prediction(task, record, result, 0.1)
    closed = prediction(task, record, {**result, "finished": True, "answer": f"<think>\n{answer}\n</think>\n\n0"}, 0.1)
    assert unclosed["unclosed_think"] and not unclosed["correct"]  # its reasoning mentions the answer: no credit
    as_is = prediction(task, record, result, 0.1, grade_unclosed=True)
    assert as_is["correct"]  # --grade-unclosed: graded on the whole output
    assert not closed["unclosed_think"] and (closed["correct"] == (answer == "0"))  # graded after </think>
    target = resolve_targets(["base:think"])[0]
    summary = summarize([unclosed, closed], task, "test", target, 0, 1.0, {})
    assert summary["unclosed_think"] == 1 and summary["unfinished"] == 1


def test_format_table_layouts():
    def summary(system, task, **metrics):
        return {"system": system, "task": task, "metrics": metrics, "mean_tokens": 10.0, "unclosed_think": 0,
                "seconds_per_problem": 0.5}

    one = format_table([summary("qthink", "tooluse", exact_match=0.485, action_accuracy=0.676),
                        summary("base", "tooluse", exact_match=0.471, action_accuracy=0.75)])
    assert one.splitlines()[0] == "| Model | Exact Match | Action Accuracy | Mean tokens | Unclosed think | s/problem |"
    assert one.splitlines()[2] == "| qthink | 48.5% | 67.6% | 10.0 | 0 | 0.5 |"
    many = format_table([summary("QThink", "gsm8k", exact_match=0.832), summary("Base", "gsm8k", exact_match=0.773),
                         summary("QThink", "math500", exact_match=0.436)])
    assert many.splitlines() == ["| Benchmark | QThink | Base |", "|---|---|---|",
                                 "| gsm8k | 83.2% | 77.3% |", "| math500 | 43.6% |  |"]


def test_target_specs(ckpt, tiny_base):
    assert split_mode("Qwen/Qwen3-1.7B:nothink") == ("Qwen/Qwen3-1.7B", "nothink")
    assert split_mode("dir:with:colons") == ("dir:with:colons", None)
    assert default_mode(str(ckpt)) == "qthink" and default_mode(str(tiny_base)) == "think"
    targets = resolve_targets([str(ckpt), str(tiny_base)], modes=["qthink", "nothink"], names=["a", "b"])
    assert [(t.mode, t.name) for t in targets] == [("qthink", "a"), ("nothink", "b")]


def test_eval_bad_input(ckpt, tiny_base, tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    common = ["--limit", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "out"), "--no-progress"]
    cases = {
        "unknown task": ([str(ckpt), "--task", "gsm9k"], "known tasks: gsm8k, math500, tooluse, synthetic"),
        "record without field": ([str(ckpt), "--task", "gsm8k", "--data-path", str(data)], f"{data} line 2"),
        "modes vs targets": ([str(ckpt), str(tiny_base), "--task", "synthetic", "--mode", "think", "think", "think"],
                             "--mode"),
        "same names": ([f"{tiny_base}:think", f"{tiny_base}:think", "--task", "synthetic"], "--name"),
        "base model with K": ([f"{tiny_base}:qthink", "--task", "synthetic"], "base model"),
        "bad limit": ([str(ckpt), "--task", "synthetic", "--limit", "0"], "--limit"),
    }
    for name, (args, expect) in cases.items():
        extra = common if name != "bad limit" else common[2:]
        code = main(["eval", *args, *extra])
        err = capsys.readouterr().err
        assert code != 0, name
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, f"{name}: {err}"
        assert expect in err, f"{name}: {err}"


def test_init_and_export_never_delete_what_they_did_not_write(tiny_base, tmp_path, capsys):
    """A folder with other files is refused before anything is written; an earlier checkpoint is replaced;
    a checkpoint cannot be written over the model it reads."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x")
    assert main(["init", str(tiny_base), str(precious)]) == 2
    err = capsys.readouterr().err
    assert "not a qthink checkpoint" in err and err.strip().count("\n") == 0
    assert (precious / "notes.txt").read_text() == "x" and sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    ckpt = tmp_path / "ckpt"
    assert main(["init", str(tiny_base), str(ckpt)]) == 0
    assert main(["init", str(tiny_base), str(ckpt), "--seed", "1"]) == 0  # an earlier checkpoint: replaced
    assert json.loads((ckpt / "qthink.json").read_text())["seed"] == 1
    assert main(["init", str(ckpt), str(ckpt)]) == 2
    assert "also the model this reads" in capsys.readouterr().err


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tiny_base, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from qthink.identity import write_checksums

    ckpt = tmp_path / "ckpt"
    assert main(["init", str(tiny_base), str(ckpt)]) == 0
    state = load_file(ckpt / "projection_head.safetensors")
    state["mlp.0.weight"][0, 0] = float("nan")
    save_file(state, str(ckpt / "projection_head.safetensors"))
    write_checksums(ckpt)  # as if written so (a diverged run): the checksums hold, the NaN check refuses it
    assert main(["generate", str(ckpt), "-q", "a=1 b=a+2 b?"]) == 2
    err = capsys.readouterr().err
    assert "weight mlp.0.weight holds NaN or inf" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("flag, value, message", [("--top-p", "0", "--top-p must be in (0, 1]"),
                                                  ("--top-p", "7", "--top-p must be in (0, 1]"),
                                                  ("--top-k", "-5", "--top-k must be >= 0")])
def test_sampling_settings_out_of_range_are_one_line_errors(tiny_base, tmp_path, capsys, flag, value, message):
    out = tmp_path / "r"
    assert main(["rollouts", "--base", str(tiny_base), "--task", "synthetic", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0 and not out.exists()


def test_eval_checks_its_output_folder_before_generating(tiny_base, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert main(["eval", str(tiny_base), "--task", "synthetic", "--limit", "2", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err and err.strip().count("\n") == 0
    assert taken.read_text() == "not a folder"


def test_a_limit_larger_than_the_split_says_how_many_it_evaluates(tiny_base, tmp_path, capsys):
    """Not silently capped: eval says it evaluates all 3 of 3 problems for --limit 10, and validation's
    data.val_limit reads the split through the same `load_problems` (the same 3 records, the same note)."""
    from qthink.tasks import load_problems

    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"{n}+1?", "answer": f"#### {n + 1}"}) + "\n" for n in range(3)))
    out = tmp_path / "out"
    assert main(["eval", f"{tiny_base}:nothink", "--task", "gsm8k", "--data-path", str(data), "--limit", "10",
                 "--max-new-tokens", "2", "--out", str(out), "--no-progress"]) == 0
    note = "gsm8k test has 3 problems, fewer than the limit of 10: using all 3"
    assert capsys.readouterr().err.strip() == f"qthink: note: {note}"
    assert json.loads((out / f"{tiny_base.name}-nothink" / "summary.json").read_text())["problems"] == 3
    notes = []
    records = load_problems(get_task("gsm8k"), "test", str(data), 10, notes.append)
    assert len(records) == 3 and notes == [note]


def test_validation_and_eval_run_one_scoring_step_with_the_same_records(teacher_store, tiny_base, monkeypatch):
    """Validation (`QThinkModule` under `Trainer.validate`) and `qthink eval` both go through
    `qthink.scoring.score_batch`, and on the same weights, batched differently, every problem's record (output,
    scores, tokens, latent steps) is the same and `val/exact_match` is eval's exact match. Fails if either path
    decodes or grades its own way."""
    import lightning as L

    from qthink import scoring
    from qthink.training.data import TeacherDataModule
    from qthink.training.module import QThinkModule

    seen = {"validation": [], "eval": []}
    stage, real = ["validation"], scoring.score_batch

    def spy(*args, **kwargs):
        preds = real(*args, **kwargs)
        seen[stage[0]].extend({k: v for k, v in p.items() if k != "seconds"} for p in preds)
        return preds

    monkeypatch.setattr(scoring, "score_batch", spy)
    module = QThinkModule(str(tiny_base), val_max_new_tokens=8)
    module.configure_model()
    spread_weights(module.model, 0)  # outputs that depend on the prompt, so a batching or decoding error shows
    spread_weights(module.head, 1)
    data = TeacherDataModule(str(teacher_store), base_model=str(tiny_base), val_split="validation", val_limit=6,
                             val_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    logged = trainer.validate(module, data)[0]
    stage[0] = "eval"
    records = [ex.record for ex in data.datasets["val"]]
    summary = evaluate(module.as_qthink(), data.task, "validation", records=records, max_new_tokens=8, batch_size=3,
                       progress=False)
    assert len(seen["validation"]) == len(seen["eval"]) == 6
    by_id = {p["problem_id"]: p for p in seen["eval"]}
    assert [by_id[p["problem_id"]] for p in seen["validation"]] == seen["validation"]
    assert len({p["output"] for p in seen["eval"]}) > 2, "outputs do not depend on the problem"
    assert logged["val/exact_match"] == pytest.approx(summary["metrics"]["exact_match"])
