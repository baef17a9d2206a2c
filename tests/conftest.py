"""Shared test fixtures: the tiny real Qwen3 base (built once per session) and small teacher stores."""

import json
from pathlib import Path

import pytest
import torch

from qthink.core.tiny import build_tiny_base
from qthink.teachers.store import write_manifest, write_shard

# The tiny models are far too small for intra-op parallelism to pay; with a second thread, a busy 2-core
# machine makes OpenMP threads wait on each other (a step went from 0.1 s to 4 s when measured).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Qwen3 base model directory (`qthink tiny-base`), seed 0."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"), seed=0)


def write_test_store(out: Path, base: Path, n: int = 8, K: int = 6, hidden: int | None = None, G: int = 2,
                     base_name: str | None = None, poison: dict[int, float] | None = None, seed: int = 0,
                     no_valid: bool = False, adaptive: bool = False) -> Path:
    """A synthetic-task rollouts dir (`out/rollouts`) and teacher store (`out/teachers`) of `n` problems.

    Rollout 0 of each problem is wrong, rollout 1 correct, except: problem 1 has no correct rollout (so
    `weighted_valid` is false and the answer falls back to the reference), problem 2's correct rollout is
    unfinished (no EOS: falls back too), problem 3 has no valid rollout (`num_valid` 0). Teacher rows are
    seeded Gaussians; `poison` sets all of problem i's teacher values to a value (NaN/inf tests); `no_valid`
    gives no problem a valid rollout. `adaptive`: problem i is taught (i % K) + 1 latent steps, its later
    teacher slots zero, as `qthink teachers --adaptive` writes.
    """
    from transformers import AutoTokenizer

    from qthink.tasks import get_task

    tok = AutoTokenizer.from_pretrained(base)
    task = get_task("synthetic")
    records = task.load("train", n=n)
    hidden = hidden or json.loads((base / "config.json").read_text())["hidden_size"]
    rollouts_dir, store_dir = out / "rollouts", out / "teachers"
    rollouts_dir.mkdir(parents=True)
    store_dir.mkdir(parents=True)
    lines = []
    for i, record in enumerate(records):
        right = record["answer"]
        wrong = str((int(right) + 1) % 10)
        rollouts = []
        for g in range(G):
            answer = right if g % 2 == 1 and i != 1 else wrong
            text = f"<think>\n{record['think']}\n</think>\n\n{answer}"
            ids = tok(text + ("" if i == 2 else tok.eos_token), add_special_tokens=False)["input_ids"]
            rollouts.append({"token_ids": ids, "text": text, "reward": float(answer == right), "finished": i != 2})
        lines.append(json.dumps({"problem_index": i, "problem_id": task.problem_id(record),
                                 "question": task.prompt(record), "rollouts": rollouts}))
    (rollouts_dir / "rollouts.jsonl").write_text("\n".join(lines) + "\n")
    (rollouts_dir / "manifest.json").write_text(json.dumps({"base_model": str(base), "task": "synthetic",
                                                            "split": "train", "G": G}))
    g = torch.Generator().manual_seed(seed)
    uniform, weighted = torch.randn(n, K, hidden, generator=g), torch.randn(n, K, hidden, generator=g)
    for i, value in (poison or {}).items():
        uniform[i] = value
        weighted[i] = value
    weighted_valid = torch.tensor([i != 1 for i in range(n)])
    num_valid = torch.tensor([0 if i == 3 or no_valid else G for i in range(n)], dtype=torch.int32)
    num_steps = torch.tensor([(i % K) + 1 if adaptive else K for i in range(n)], dtype=torch.int32)
    for i, steps in enumerate(num_steps.tolist()):
        uniform[i, steps:], weighted[i, steps:] = 0, 0
    entry = write_shard(store_dir, 0, {"problem_index": torch.arange(n), "uniform": uniform, "weighted": weighted,
                                       "weighted_valid": weighted_valid, "num_valid": num_valid,
                                       "num_steps": num_steps})
    write_manifest(store_dir, {"base_model": base_name or str(base), "hidden_size": hidden, "K": K, "G": G,
                               "adaptive": adaptive,
                               "position_scheme": "linspace", "hidden_state": "post-norm last layer",
                               "dtype": "float32", "task": "synthetic", "split": "train",
                               "rollouts": str(rollouts_dir), "shards": [entry]})
    return store_dir


@pytest.fixture(scope="session")
def teacher_store(tiny_base, tmp_path_factory) -> Path:
    """The default test store: 8 synthetic problems, K=6, for `tiny_base`."""
    return write_test_store(tmp_path_factory.mktemp("store"), tiny_base)


@pytest.fixture
def store_factory(tiny_base, tmp_path):
    """Build a variant store: `store_factory(K=4)`, `store_factory(base_name="Qwen/Qwen3-1.7B")`, ..."""
    count = iter(range(1000))

    def make(**kwargs) -> Path:
        return write_test_store(tmp_path / f"store{next(count)}", tiny_base, **kwargs)

    return make
