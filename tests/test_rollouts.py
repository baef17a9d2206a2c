"""`qthink rollouts`: sampled, graded rollouts on disk; resumable, batch-independent, strict about input."""

import inspect
import json
from pathlib import Path

import pytest
import yaml

from qthink.cli import main
from qthink.errors import UserError
from qthink.teachers.rollouts import ROLLOUTS, read_rollouts, run_rollouts, scan

SETTINGS = {"task": "synthetic", "G": 2, "max_new_tokens": 12, "batch_size": 2, "seed": 3, "limit": 5}


class Killed(Exception):
    pass


def rollouts(base: Path, out: Path, **overrides) -> dict:
    return run_rollouts(str(base), out=out, **{**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def reference(tiny_base, tmp_path_factory) -> Path:
    """One uninterrupted run: 5 problems, G=2, groups of 2 problems."""
    out = tmp_path_factory.mktemp("rollouts") / "ref"
    rollouts(tiny_base, out)
    return out


def test_layout_and_contents(reference):
    manifest, entries = read_rollouts(reference)
    assert [e[0] for e in entries] == [0, 1, 2, 3, 4]
    assert manifest["G"] == 2 and manifest["temperature"] == 0.6 and manifest["max_new_tokens"] == 12
    lines = [json.loads(line) for line in (reference / ROLLOUTS).read_text().splitlines()]
    assert lines[0]["question"].startswith("a=") and lines[0]["problem_id"] == "train-0"
    for line in lines:
        assert len(line["rollouts"]) == 2
        for r in line["rollouts"]:
            assert set(r) == {"token_ids", "text", "reward", "finished"}
            assert r["reward"] in (0.0, 1.0) and 1 <= len(r["token_ids"]) <= 12
    # the two samples of a problem draw different noise
    assert any(line["rollouts"][0]["token_ids"] != line["rollouts"][1]["token_ids"] for line in lines)


def test_kill_and_resume_gives_the_same_file(tiny_base, reference, tmp_path):
    out = tmp_path / "r"

    def kill_after_three(index: int) -> None:
        if index == 2:  # mid-way through the second group of problems
            raise Killed

    with pytest.raises(Killed):
        rollouts(tiny_base, out, on_problem=kill_after_three)
    assert len(scan(out / ROLLOUTS)) == 3
    # a kill in the middle of writing the next line leaves a line without its newline
    with open(out / ROLLOUTS, "a") as f:
        f.write((reference / ROLLOUTS).read_text().splitlines()[3][:40])
    with pytest.raises(UserError, match=r": stopped at 3 of 5 problems; rerun `qthink rollouts`"):
        read_rollouts(out)  # not finished: refused before its lines are read
    summary = rollouts(tiny_base, out)
    assert summary["problems"] == 2 and summary["total_problems"] == 5
    assert (out / ROLLOUTS).read_bytes() == (reference / ROLLOUTS).read_bytes()
    assert rollouts(tiny_base, out)["problems"] == 0  # finished: nothing to do


def test_limit_then_extend_and_batch_independence(tiny_base, reference, tmp_path):
    out = tmp_path / "r"
    rollouts(tiny_base, out, limit=2)
    rollouts(tiny_base, out)
    assert (out / ROLLOUTS).read_bytes() == (reference / ROLLOUTS).read_bytes()
    # another batching draws the same samples: each row's noise depends on (seed, problem, sample) only
    other = tmp_path / "b3"
    rollouts(tiny_base, other, batch_size=3)
    ids = [[r["token_ids"] for r in json.loads(line)["rollouts"]] for line in (other / ROLLOUTS).open()]
    assert ids == [[r["token_ids"] for r in json.loads(line)["rollouts"]] for line in (reference / ROLLOUTS).open()]


def test_static_decode_mode_samples_the_same_rollouts(tiny_base, reference, tmp_path):
    """`--decode-mode static` (the fixed-shape path that `compiled` runs) draws the same samples; the mode is
    fixed for a directory, and a manifest from before the setting existed counts as `dynamic`."""
    out = tmp_path / "s"
    rollouts(tiny_base, out, decode_mode="static")
    assert json.loads((out / "manifest.json").read_text())["decode_mode"] == "static"
    ids = [[r["token_ids"] for r in json.loads(line)["rollouts"]] for line in (out / ROLLOUTS).open()]
    assert ids == [[r["token_ids"] for r in json.loads(line)["rollouts"]] for line in (reference / ROLLOUTS).open()]
    with pytest.raises(UserError, match="decode_mode is 'dynamic' but the existing rollouts used 'static'"):
        rollouts(tiny_base, out)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    manifest = json.loads((reference / "manifest.json").read_text())
    del manifest["decode_mode"]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    (legacy / ROLLOUTS).write_text((reference / ROLLOUTS).read_text())
    assert rollouts(tiny_base, legacy)["problems"] == 0


def test_rerun_with_other_settings_names_the_setting(tiny_base, reference, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("manifest.json", ROLLOUTS):
        (out / name).write_bytes((reference / name).read_bytes())
    with pytest.raises(UserError, match=r"temperature is 0\.7 but the existing rollouts used 0\.6"):
        rollouts(tiny_base, out, temperature=0.7)
    with pytest.raises(UserError, match="G is 3"):
        rollouts(tiny_base, out, G=3)


def test_a_refused_run_does_not_block_the_corrected_rerun(tiny_base, reference, tmp_path):
    """A run refused before its first problem (here: answers longer than the model's context) wrote only
    its manifest; rerunning with the setting fixed replaces it instead of refusing the new setting."""
    out = tmp_path / "r"
    with pytest.raises(UserError, match="leaves no room for a prompt in .*context of 2048 tokens"):
        rollouts(tiny_base, out, max_new_tokens=4096)
    rollouts(tiny_base, out)
    assert (out / ROLLOUTS).read_bytes() == (reference / ROLLOUTS).read_bytes()
    assert json.loads((out / "manifest.json").read_text())["max_new_tokens"] == SETTINGS["max_new_tokens"]


def test_malformed_line_names_file_and_line(tiny_base, reference, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "manifest.json").write_text((reference / "manifest.json").read_text())
    lines = (reference / ROLLOUTS).read_text().splitlines()
    (out / ROLLOUTS).write_text("\n".join([lines[0], '{"problem_index": 1, "rollouts": [', *lines[2:]]) + "\n")
    with pytest.raises(UserError, match=rf"{out / ROLLOUTS}:2: not valid JSON"):
        rollouts(tiny_base, out)
    # through the command: one line, exit status 2, no traceback
    argv = ["rollouts", "--base", str(tiny_base), "--task", "synthetic", "--out", str(out), "-G", "2",
            "--max-new-tokens", "12", "--batch-size", "2", "--seed", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qthink: error: ") and f"{ROLLOUTS}:2:" in err and "Traceback" not in err
    (out / ROLLOUTS).write_text(lines[0] + "\n" + json.dumps({"problem_index": 1, "question": "q",
                                                              "rollouts": [{"token_ids": ["x"], "reward": 1}]}) + "\n")
    with pytest.raises(UserError, match=r":2: rollout 0 needs `token_ids`"):
        read_rollouts(out)
    # a NaN reward would become a NaN teacher: refused, naming the line (json writes it as NaN)
    (out / ROLLOUTS).write_text(lines[0] + "\n" + json.dumps({"problem_index": 1, "question": "q",
                                                              "rollouts": [{"token_ids": [1], "reward": float("nan")}]}) + "\n")
    with pytest.raises(UserError, match=r":2: rollout 0 needs a finite numeric `reward` \(got nan\)"):
        read_rollouts(out)


def test_task_options_are_recorded_and_limits_above_the_default_split_are_honoured(tiny_base, tmp_path):
    """`--task-option steps=2` reaches the task and the manifest; `--limit` beyond the synthetic split's
    default size (2,000) gives that many problems instead of silently 2,000; the data module reads the
    rollouts' task options back."""
    from qthink.tasks import get_task, load_problems
    from qthink.teachers.extract import build_teachers
    from qthink.training.data import TeacherDataModule

    assert len(load_problems(get_task("synthetic"), "train", None, 2500)) == 2500
    out = tmp_path / "r"
    run_rollouts(str(tiny_base), "synthetic", out, G=1, max_new_tokens=4, batch_size=4, limit=3,
                 task_options={"steps": 2})
    manifest, entries = read_rollouts(out)
    assert manifest["task_options"] == {"steps": 2}
    lines = [json.loads(line) for line in (out / ROLLOUTS).read_text().splitlines()]
    assert all(line["question"].count("=") == 3 for line in lines)  # a=.. b=.. c=..: two steps
    with pytest.raises(UserError, match="task_options"):  # a rerun with other options names the setting
        run_rollouts(str(tiny_base), "synthetic", out, G=1, max_new_tokens=4, batch_size=4, limit=3)
    store = build_teachers(str(tiny_base), out, tmp_path / "t", K=2, dtype="float32")
    assert store["counts"]["problems"] == 3
    dm = TeacherDataModule(str(tmp_path / "t"), answer_source="reference", val_limit=2)
    dm.setup("validate")
    assert dm.task.steps == 2


def test_task_option_errors_are_one_line(tiny_base, tmp_path, capsys):
    for flag, message in (("steps", "must be KEY=VALUE"), ("colour=red", "does not take the options")):
        code = main(["rollouts", "--base", str(tiny_base), "--task", "synthetic", "--out", str(tmp_path / "r"),
                     "--task-option", flag, "--limit", "1"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.strip().count("\n") == 0, err


def test_print_config_is_the_whole_configuration_and_reads_back(tmp_path, capsys):
    """`qthink rollouts --print_config` prints every setting (defaults from `run_rollouts`' signature); `-c` of
    that file gives the same configuration; old and new spellings (`-G`, `--top-p`, `--task-option`, a bare
    bool flag) are the same settings."""
    def printed(*argv: str) -> str:
        with pytest.raises(SystemExit) as stopped:
            main(["rollouts", *argv, "--print_config"])
        assert stopped.value.code == 0
        return capsys.readouterr().out

    old = printed("--base", "b", "--task", "synthetic", "--out", "o", "-G", "2", "--top-p", "0.9",
                  "--task-option", "steps=3", "--grade-unclosed", "--data-path", "d")
    new = printed("--base", "b", "--task", "synthetic", "--out", "o", "--G", "2", "--top_p", "0.9",
                  "--task_options.steps", "3", "--grade_unclosed", "true", "--data_path", "d")
    assert old == new
    config = yaml.safe_load(old)
    defaults = {name: p.default for name, p in inspect.signature(run_rollouts).parameters.items()
                if p.default is not inspect.Parameter.empty and name != "on_problem"}
    assert set(config) == {"base", "task", "out", *defaults}
    assert config | {"G": 16, "top_p": 0.95, "task_options": None, "grade_unclosed": False, "data_path": None} == \
        {"base": "b", "task": "synthetic", "out": "o", **defaults}
    assert config["task_options"] == {"steps": 3} and config["grade_unclosed"] is True
    (tmp_path / "rollouts.yaml").write_text(old)
    assert printed("-c", str(tmp_path / "rollouts.yaml")) == old
    assert yaml.safe_load(printed("-c", str(tmp_path / "rollouts.yaml"), "-G", "4"))["G"] == 4
