"""`qthink teachers`: the store against an independent plain-transformers recomputation, kill-and-resume,
bad input, the benchmark, and 1 vs 2 processes (torchrun, gloo) for both pipeline stages."""

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qthink.bench.teachers import bench_teachers
from qthink.cli import main
from qthink.errors import UserError
from qthink.files import TEMP_MARK
from qthink.tasks import get_task
from qthink.teachers.extract import build_teachers
from qthink.teachers.rollouts import ROLLOUTS, reference_rollout, run_rollouts
from qthink.teachers.store import TeacherStore

N, G = 6, 3


def hand_rollouts(base: Path, out: Path) -> Path:
    """Synthetic problems with hand-written rollouts in the rollout layout. Per problem: the reference
    chain with the right answer, the same chain with a wrong answer, a longer chain (right answer);
    except problem 2 (all truncated: no `</think>`), problem 3 (an empty think block and a truncated
    one: no valid rollout) and problem 4 (all answers wrong: weighted_valid false)."""
    tok = AutoTokenizer.from_pretrained(base)
    task = get_task("synthetic")
    out.mkdir(parents=True)
    lines = []
    for i, record in enumerate(task.load("train", n=N)):
        right, think = record["answer"], record["think"]
        wrong = str((int(right) + 1) % 10)

        def closed(text: str, answer: str, right: str = right) -> dict:
            return {**reference_rollout(tok, text, answer), "reward": float(answer == right)}

        def raw(text: str, reward: float) -> dict:
            return {"token_ids": tok(text, add_special_tokens=False)["input_ids"], "text": text, "reward": reward,
                    "finished": False}

        rollouts = [closed(think, right), closed(think, wrong), closed(f"{think} so {think}", right)]
        if i == 2:
            rollouts = [raw(f"<think>\n{think[: 2 + j]}", 0.0) for j in range(G)]
        if i == 3:
            rollouts = [raw(f"<think></think>\n\n{right}<|im_end|>", 1.0), raw(f"<think>\n{think}", 1.0)]
        if i == 4:
            rollouts = [closed(think, wrong), closed(f"{think} so", wrong)]
        lines.append(json.dumps({"problem_index": i, "problem_id": record["id"], "question": task.prompt(record),
                                 "rollouts": rollouts}))
    (out / ROLLOUTS).write_text("\n".join(lines) + "\n")
    (out / "manifest.json").write_text(json.dumps({"base_model": str(base), "task": "synthetic", "split": "train",
                                                   "G": G}))
    return out


def teachers(base: Path, rollouts: Path, out: Path, **kw) -> dict:
    return build_teachers(str(base), rollouts, out, **{"K": 4, "shard_size": 2, "batch_size": 4, **kw})


@pytest.fixture(scope="module")
def hand(tiny_base, tmp_path_factory) -> Path:
    return hand_rollouts(tiny_base, tmp_path_factory.mktemp("hand") / "rollouts")


@pytest.fixture(scope="module")
def store_f32(tiny_base, hand, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "f32"
    teachers(tiny_base, hand, out, dtype="float32")
    return out


def recompute(base: Path, rollouts: Path, K: int, positions_of) -> dict[int, tuple]:
    """Plain transformers, one rollout at a time, no padding: (uniform, weighted, weighted_valid, num_valid)."""
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    think, end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    result = {}
    for line in (rollouts / ROLLOUTS).read_text().splitlines():
        problem = json.loads(line)
        text = tok.apply_chat_template([{"role": "user", "content": problem["question"]}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        states, rewards = [], []
        for r in problem["rollouts"]:
            ids = r["token_ids"]
            if think not in ids or end not in ids or ids.index(end) - ids.index(think) <= 1:
                continue
            start = len(prompt) + ids.index(think) + 1
            content = ids[ids.index(think) + 1 : ids.index(end)]
            with torch.no_grad():
                hidden = model(torch.tensor([prompt + ids]), output_hidden_states=True).hidden_states[-1][0]
            states.append(hidden[[start + p for p in positions_of(tok, content, K)]].float())
            rewards.append(r["reward"])
        if not states:
            result[problem["problem_index"]] = (None, None, False, 0)
            continue
        correct = [s for s, r in zip(states, rewards, strict=True) if r > 0]
        weighted = torch.stack(correct).mean(0) if correct else None
        result[problem["problem_index"]] = (torch.stack(states).mean(0), weighted, bool(correct), len(states))
    return result


def numpy_linspace(tok, content, K):
    return np.round(np.linspace(0, len(content) - 1, K)).astype(int).tolist()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def check_against_recomputation(store_dir: Path, expected: dict, K: int) -> None:
    store = TeacherStore(store_dir, expect={"K": K, "hidden_size": 128})
    assert store.problem_indices == list(range(N))
    for i, (uniform, weighted, weighted_valid, num_valid) in expected.items():
        row = store.row(i)
        assert row["num_valid"] == num_valid and row["weighted_valid"] == weighted_valid
        assert torch.isfinite(row["uniform"]).all() and torch.isfinite(row["weighted"]).all()
        if uniform is None:
            assert not row["uniform"].any()
        else:
            assert close(row["uniform"], uniform)
        if weighted is None:
            assert not row["weighted"].any()
        else:
            assert close(row["weighted"], weighted)


def test_store_matches_independent_recomputation(tiny_base, hand, store_f32):
    check_against_recomputation(store_f32, recompute(tiny_base, hand, 4, numpy_linspace), 4)
    manifest = json.loads((store_f32 / "manifest.json").read_text())
    assert manifest["counts"] == {"problems": 6, "rollouts": 16, "valid": 11, "excluded_unclosed": 4,
                                  "excluded_empty": 1, "correct_valid": 6, "weighted_valid": 3, "without_valid": 2,
                                  "num_steps": {"4": 6}}
    assert manifest["problems_without_valid"] == [2, 3]
    assert (manifest["position_scheme"], manifest["dtype"], manifest["G"], manifest["task"]) == \
        ("linspace", "float32", 3, "synthetic")
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]


def test_steps_scheme_takes_the_equals_tokens(tiny_base, hand, tmp_path):
    out = tmp_path / "steps"
    teachers(tiny_base, hand, out, K=3, dtype="float32", position_scheme="steps")

    def equals_tokens(tok, content, K):
        # `b=3+4=7`: the second `=` of each step is the one before its result
        eq = [i for i, t in enumerate(content) if tok.decode([t]) == "="][1::2]
        return [eq[round(j * (len(eq) - 1) / (K - 1))] for j in range(K)] if len(eq) > 3 else eq

    check_against_recomputation(out, recompute(tiny_base, hand, 3, equals_tokens), 3)
    assert TeacherStore(out).manifest["position_scheme"] == "steps"


def test_cli_summary_reports_problems_without_valid_rollouts(tiny_base, hand, tmp_path, capsys):
    assert main(["teachers", "--base", str(tiny_base), "--rollouts", str(hand), "--out", str(tmp_path / "t"),
                 "-K", "2", "--shard-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "excluded 4 without a closed think block and 1 with an empty one" in out
    assert "2 problems have no valid rollout" in out and ": 2, 3" in out
    assert load_file(tmp_path / "t" / "shard-00000.safetensors")["uniform"].dtype == torch.bfloat16


class Killed(Exception):
    pass


def listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_kill_and_resume_gives_the_same_store(tiny_base, hand, tmp_path):
    whole = tmp_path / "whole"
    teachers(tiny_base, hand, whole)
    out = tmp_path / "resumed"

    def kill(entry: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        teachers(tiny_base, hand, out, on_shard=kill)
    assert json.loads((out / "manifest.json").read_text())["complete"] is False  # TeacherStore refuses it
    dead = subprocess.Popen(["true"])
    dead.wait()
    half = out / f".shard-00001.safetensors.{TEMP_MARK}-{socket.gethostname()}-{dead.pid}-0123abcd.tmp"
    half.write_bytes(b"half a shard")  # what a kill mid-write leaves (its owner's pid in the name)
    teachers(tiny_base, hand, out)
    assert listing(out) == listing(whole)
    # losing the last shard and the manifest: the rerun recomputes that shard only
    (out / "shard-00002.safetensors").unlink()
    (out / "manifest.json").unlink()
    teachers(tiny_base, hand, out, on_shard=lambda e: None if e["file"] == "shard-00002.safetensors" else 1 / 0)
    assert listing(out) == listing(whole)
    assert not any(s["file"].endswith(".tmp") for s in TeacherStore(out).manifest["shards"])


def test_bad_inputs(tiny_base, hand, store_f32, tmp_path):
    with pytest.raises(UserError, match=r"K is 4 but the trainer expects 6"):
        TeacherStore(store_f32, expect={"K": 6})
    with pytest.raises(UserError, match=r"hidden_size is 128 but the trainer expects 2048"):
        TeacherStore(store_f32, expect={"hidden_size": 2048})
    with pytest.raises(UserError, match=r"K is 6 but the existing store used 4"):
        teachers(tiny_base, hand, store_f32, K=6, dtype="float32")
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for name, data in listing(store_f32).items():
        (flipped / name).write_bytes(data)
    data = bytearray((flipped / "shard-00001.safetensors").read_bytes())
    data[-5] ^= 0x01
    (flipped / "shard-00001.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard-00001.safetensors: checksum mismatch"):
        TeacherStore(flipped)
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (hand / ROLLOUTS).read_text().splitlines()
    (bad / ROLLOUTS).write_text("\n".join([*lines[:3], lines[3][:-2], *lines[4:]]) + "\n")
    with pytest.raises(UserError, match=rf"{bad / ROLLOUTS}:4: not valid JSON"):
        teachers(tiny_base, bad, tmp_path / "t")
    (bad / ROLLOUTS).write_text("\n".join(lines) + "\n" + lines[0][:50])
    with pytest.raises(UserError, match="last line is incomplete"):
        teachers(tiny_base, bad, tmp_path / "t")


def test_bench_teachers(tiny_base):
    result = bench_teachers(tiny_base, problems=8, G=2, K=4, batch_size=4)
    assert result["equal"] and result["rollouts"] == 16
    for side in ("extractor", "naive"):
        assert result[side]["rollouts_per_s"] > 0 and result[side]["peak_mib"] >= 0
    assert result["speedup"] > 0


def both_stages(base: str, hand: str, out: str) -> None:
    run_rollouts(base, "synthetic", out + "/rollouts", G=2, max_new_tokens=8, batch_size=1, seed=5, limit=5)
    build_teachers(base, hand, out + "/teachers", K=4, dtype="float32", batch_size=4, shard_size=2)


SCRIPT = """
import sys
from qthink.teachers import distributed
from tests.test_teachers import both_stages
both_stages(*sys.argv[1:4])
distributed.teardown()
"""


@pytest.mark.slow
def test_two_processes_match_one(tiny_base, hand, tmp_path):
    """torchrun, 2 CPU processes over gloo: each rank takes every other group / shard, rank 0 merges."""
    script = tmp_path / "stages.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "np1", tmp_path / "np2"
    both_stages(str(tiny_base), str(hand), str(one))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tiny_base), str(hand), str(two)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((two / "rollouts").glob("rollouts.rank-*")) and not list((two / "teachers").glob("progress-rank*"))
    assert (one / "rollouts" / ROLLOUTS).read_bytes() == (two / "rollouts" / ROLLOUTS).read_bytes()
    assert listing(one / "teachers") == listing(two / "teachers")


def test_manifests_record_project_paths_relative_so_a_store_works_from_any_folder(tiny_base, tmp_path, monkeypatch):
    """Built with relative paths from one folder, the store records its base and rollouts relative to itself
    (and the base's fingerprint) and trains from another folder (the data module finds its rollouts)."""
    import shutil

    from qthink.teachers.extract import build_teachers
    from qthink.teachers.rollouts import write_reference_rollouts
    from qthink.training.data import TeacherDataModule

    shutil.copytree(tiny_base, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    write_reference_rollouts("base", "rollouts", n=4)
    manifest = build_teachers("base", "rollouts", "teachers", K=2, dtype="float32")
    assert manifest["base_model"] == "../base" and manifest["rollouts"] == "../rollouts"
    assert len(manifest["base_fingerprint"]) == 64
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dm = TeacherDataModule(str(tmp_path / "teachers"), base_model=str(tmp_path / "base"), store_K=2)
    dm.setup("fit")
    assert dm.stats["from_rollout"] == 4


def test_adaptive_store_teaches_each_problem_its_own_step_count(tiny_base, tmp_path):
    """Chains of 2 to 4 steps, each with the reference, a wrong answer and a twice-as-long chain: every problem
    is taught its own count (the most common among its rollouts), at the `=` before each result (the long
    chain: that many chosen evenly), later slots zero; against the plain-transformers recomputation at that K."""
    tok = AutoTokenizer.from_pretrained(tiny_base)
    task = get_task("synthetic", steps="2-4")
    records = task.load("train", n=N)
    lengths = [len(r["chain"]) for r in records]
    assert set(lengths) == {2, 3, 4}, "the test must see every length"
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    lines = []
    for i, record in enumerate(records):
        right, think = record["answer"], record["think"]
        wrong = str((int(right) + 1) % 10)
        made = [{**reference_rollout(tok, text, answer), "reward": float(answer == right)}
                for text, answer in ((think, right), (think, wrong), (f"{think} so {think}", right))]
        lines.append(json.dumps({"problem_index": i, "problem_id": record["id"], "question": task.prompt(record),
                                 "rollouts": made}))
    (rollouts / ROLLOUTS).write_text("\n".join(lines) + "\n")
    (rollouts / "manifest.json").write_text(json.dumps({"base_model": str(tiny_base), "task": "synthetic",
                                                        "split": "train", "G": G, "task_options": {"steps": "2-4"}}))
    out = tmp_path / "adaptive"
    teachers(tiny_base, rollouts, out, K=4, dtype="float32", position_scheme="steps", adaptive=True)

    def equals_tokens(tok, content, K):
        eq = [i for i, t in enumerate(content) if tok.decode([t]) == "="][1::2]
        return [eq[round(j * (len(eq) - 1) / (K - 1))] for j in range(K)]

    expected = {n: recompute(tiny_base, rollouts, n, equals_tokens) for n in (2, 3, 4)}
    store = TeacherStore(out, expect={"K": 4})
    assert store.adaptive
    for i, n in enumerate(lengths):
        row = store.row(i)
        assert row["num_steps"] == n
        uniform, weighted, _, num_valid = expected[n][i]
        assert row["num_valid"] == num_valid == 3
        assert close(row["uniform"][:n], uniform) and close(row["weighted"][:n], weighted)
        assert not row["uniform"][n:].any() and not row["weighted"][n:].any()
    counts = json.loads((out / "manifest.json").read_text())["counts"]["num_steps"]
    assert counts == {str(n): lengths.count(n) for n in (2, 3, 4)}


def test_several_stores_in_one_pass_equal_each_built_alone(tiny_base, hand, tmp_path):
    """`build_stores` gathers every store's positions from one forward pass per rollout; each store equals
    the one `build_teachers` builds alone (same rows, counts and manifest but for float rounding)."""
    from qthink.teachers.extract import StoreSpec, build_stores

    specs = [StoreSpec(tmp_path / "together" / "lin", 4, "linspace"), StoreSpec(tmp_path / "together" / "st", 3, "steps"),
             StoreSpec(tmp_path / "together" / "ad", 4, "steps", adaptive=True)]
    together = build_stores(str(tiny_base), hand, specs, dtype="float32", batch_size=4, shard_size=2)
    for spec, manifest in zip(specs, together, strict=True):
        alone = teachers(tiny_base, hand, tmp_path / "alone" / spec.out.name, K=spec.K, dtype="float32",
                         position_scheme=spec.position_scheme, adaptive=spec.adaptive)
        assert manifest["counts"] == alone["counts"] and manifest["adaptive"] == spec.adaptive
        a, b = TeacherStore(spec.out), TeacherStore(tmp_path / "alone" / spec.out.name)
        for i in range(N):
            x, y = a.row(i), b.row(i)
            assert (x["num_valid"], x["num_steps"], x["weighted_valid"]) == (y["num_valid"], y["num_steps"], y["weighted_valid"])
            assert torch.allclose(x["uniform"], y["uniform"], atol=1e-5) and torch.allclose(x["weighted"], y["weighted"], atol=1e-5)


def test_print_config_is_the_whole_configuration_and_reads_back(tmp_path, capsys):
    """`qthink teachers --print_config` prints every setting of `build_teachers` (its defaults), `-K` and a
    bare `--adaptive` are `K` and `adaptive: true`, and `-c` of the printed file reproduces it."""
    def printed(*argv: str) -> str:
        with pytest.raises(SystemExit) as stopped:
            main(["teachers", *argv, "--print_config"])
        assert stopped.value.code == 0
        return capsys.readouterr().out

    text = printed("--base", "b", "--rollouts", "r", "--out", "t", "-K", "4", "--position-scheme", "steps", "--adaptive")
    defaults = {name: p.default for name, p in inspect.signature(build_teachers).parameters.items()
                if p.default is not inspect.Parameter.empty and name != "on_shard"}
    assert yaml.safe_load(text) == {**defaults, "base": "b", "rollouts": "r", "out": "t", "K": 4,
                                    "position_scheme": "steps", "adaptive": True}
    (tmp_path / "teachers.yaml").write_text(text)
    assert printed("-c", str(tmp_path / "teachers.yaml")) == text
