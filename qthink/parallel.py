"""Independent jobs on several CPU processes, for the tiny model that gains nothing from a second thread.

- `run_jobs`: a pool of spawned processes (one torch thread each) runs module-level functions; results come
  back in the caller's process, which alone records them (so resumable bookkeeping stays in one place).
- `run_ranks`: one function on W processes that find each other as torchrun's would (RANK, WORLD_SIZE,
  MASTER_ADDR/PORT; gloo on CPU): the teacher-pipeline stages split their work by rank and write the same
  bytes as one process (`qthink.teachers.distributed`).
Spawned, not forked: a forked child inherits the parent's OpenMP and tokenizer threads in an unknown state.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

Job = tuple[str, Callable[..., Any], tuple]  # (name, module-level function, its arguments)


def quiet_worker() -> None:
    """One torch thread and no library chatter in a worker process."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_jobs(jobs: Iterable[Job], workers: int, on_done: Callable[[str, Any, float], None]) -> None:
    """Run every job, at most `workers` at a time, calling `on_done(name, result, seconds)` in this process
    as each one finishes (in completion order). With one worker the jobs run here, one after another. The
    first job that raises stops the rest and re-raises here."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for name, fn, args in jobs:
            began = time.perf_counter()
            on_done(name, fn(*args), time.perf_counter() - began)
        return
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn"),
                             initializer=quiet_worker) as pool:
        started = {pool.submit(_timed, fn, args): name for name, fn, args in jobs}
        pending = set(started)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    result, seconds = future.result()
                    on_done(started[future], result, seconds)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _timed(fn: Callable[..., Any], args: tuple) -> tuple[Any, float]:
    began = time.perf_counter()
    return fn(*args), time.perf_counter() - began


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., Any], kwargs: dict, world: int) -> Any:
    """`fn(**kwargs)` on `world` spawned ranks (in this process when `world` is 1); rank 0's result."""
    if world <= 1:
        return fn(**kwargs)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world, port, fn, kwargs, results)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [rank for rank, p in enumerate(procs) if p.exitcode != 0]
    outcome = results.get() if not results.empty() else None
    if failed or outcome is None:
        detail = outcome[1] if outcome and outcome[0] == "error" else f"exit codes {[p.exitcode for p in procs]}"
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed on rank(s) {failed or [0]}: {detail}")
    if outcome[0] == "error":
        raise RuntimeError(outcome[1])
    return outcome[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], kwargs: dict, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    quiet_worker()
    from qthink.teachers import distributed

    try:
        result = fn(**kwargs)
    except Exception as e:  # reported to the parent, which raises it as one line
        results.put(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from e
    finally:
        distributed.teardown()
    if rank == 0:
        results.put(("ok", result))
