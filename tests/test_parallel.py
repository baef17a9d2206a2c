"""`qthink.parallel`: jobs on spawned processes come back to the caller, in any order, and a failing job
fails the call; ranks find each other like torchrun's."""

import json
import math
import os
import time

import pytest

from qthink.parallel import run_jobs, run_ranks
from qthink.teachers.distributed import env_ranks


def test_run_jobs_returns_every_result_to_the_caller_in_one_process_or_two():
    for workers in (1, 2):
        done = {}
        run_jobs([(f"f{n}", math.factorial, (n,)) for n in (3, 5, 7)], workers,
                 lambda name, result, seconds, done=done: done.__setitem__(name, result))
        assert done == {"f3": 6, "f5": 120, "f7": 5040}


def test_a_failing_job_fails_the_call():
    with pytest.raises(ValueError, match="math domain error"):
        run_jobs([("ok", math.sqrt, (4.0,)), ("bad", math.sqrt, (-1.0,))], 2, lambda *a: None)


def test_no_job_starts_after_one_failed(tmp_path):
    """A pool queues jobs ahead of its workers; one queued when the first job fails would still start (the demo
    started a fit after SIGTERM that way). Jobs are handed out one per free worker instead."""
    later = tmp_path / "later"
    with pytest.raises(ValueError, match="math domain error"):
        run_jobs([("bad", math.sqrt, (-1.0,)), ("slow", time.sleep, (2.0,)), ("later", os.mkdir, (str(later),))], 2,
                 lambda *a: None)
    assert not later.exists()


def test_run_ranks_gives_every_ranks_result_and_names_a_failing_rank():
    ranks = env_ranks().__class__
    assert run_ranks(env_ranks, {}, 2) == [ranks(0, 2, 0), ranks(1, 2, 1)]
    assert run_ranks(env_ranks, {}, 1) == [env_ranks()]
    with pytest.raises(RuntimeError, match="rank 0: JSONDecodeError.*rank 1: JSONDecodeError"):
        run_ranks(json.loads, {"s": "{"}, 2)


def test_a_rank_killed_without_reporting_fails_the_call_instead_of_hanging():
    with pytest.raises(RuntimeError, match=r"rank [01]: exited with code 9"):  # whichever the parent sees first
        run_ranks(os._exit, {"status": 9}, 2)  # both ranks die the way an out-of-memory kill leaves them
