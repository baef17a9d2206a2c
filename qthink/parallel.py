"""Independent jobs on several CPU processes, for the tiny model that gains nothing from a second thread.

- `run_jobs`: a pool of spawned processes (one torch thread each) runs module-level functions; results come
  back in the caller's process, which alone records them (so resumable bookkeeping stays in one place).
- `run_ranks`: one function on W processes that find each other as torchrun's would (RANK, WORLD_SIZE,
  MASTER_ADDR/PORT; gloo on CPU): the teacher-pipeline stages split their work by rank and write the same
  bytes as one process (`qthink.teachers.distributed`).
- `choose_threads`, `torch_threads`: how many torch threads a process uses (one for the tiny model on CPU).
Spawned, not forked: a forked child inherits the parent's OpenMP and tokenizer threads in an unknown state.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from qthink.signals import sigterm_as_interrupt

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

Job = tuple[str, Callable[..., Any], tuple]  # (name, module-level function, its arguments)


def quiet_libraries() -> None:
    """Silence per-call progress bars and advisories from transformers/hub that bury qthink's own output
    (the `qthink` command, and every worker through `quiet_worker`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def quiet_worker() -> None:
    """One torch thread and no library chatter in a worker process: `quiet_libraries`, and Lightning's
    messages and every warning too (a worker's output would interleave with its siblings')."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet_libraries()


def choose_threads(device: torch.device, config: PretrainedConfig, threads: int | None = None) -> int:
    """Set torch's CPU threads: `threads` if given, else 1 for a small model (`config.hidden_size` <= 512) on a
    CPU `device`, whose matmuls are too small for intra-op parallelism to pay (docs/findings.md, F6). Returns
    the number in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and config.hidden_size <= 512:
        torch.set_num_threads(1)
    return torch.get_num_threads()


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch on `threads` CPU threads inside the block, and on as many as before after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_workers() -> int:
    """Two processes, or one on a one-core machine: the demo's default for independent stages."""
    return min(2, os.cpu_count() or 1)


def run_jobs(jobs: Iterable[Job], workers: int, on_done: Callable[[str, Any, float], None]) -> None:
    """Run every job, at most `workers` at a time, calling `on_done(name, result, seconds)` in this process
    as each one finishes (in completion order). With one worker the jobs run here, one after another. The
    first job that raises (or Ctrl-C/SIGTERM here) starts no further job; the running ones end, and it
    re-raises here."""
    from qthink.measure import timed_call

    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for name, fn, args in jobs:
            on_done(name, *timed_call(fn, *args))
        return
    # Jobs are handed out one per free worker, never queued ahead: the pool would start a queued job after a
    # failure, Ctrl-C or SIGTERM here, which no cancel can stop (it is already "running" in the call queue).
    todo = iter(jobs)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn"),
                             initializer=quiet_worker) as pool:
        running: dict = {}

        def start_next() -> None:
            job = next(todo, None)
            if job is not None:
                name, fn, args = job
                running[pool.submit(timed_call, fn, *args)] = name

        for _ in range(min(workers, len(jobs))):
            start_next()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                result, seconds = future.result()  # a failed job raises here: nothing more starts
                on_done(running.pop(future), result, seconds)
                start_next()


def run_ranks(fn: Callable[..., Any], kwargs: dict, world: int) -> list[Any]:
    """`fn(**kwargs)` on `world` spawned ranks (in this process when `world` is 1); every rank's result, in
    rank order."""
    if world <= 1:
        return [fn(**kwargs)]
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_network_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world, port, fn, kwargs, results)) for rank in range(world)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, Any]] = {}  # rank -> ("ok" | "error", value), read before joining
    try:
        wait_for_ranks(procs, results, outcomes)
    except BaseException:  # Ctrl-C or SIGTERM here: the ranks stop too (each handles SIGTERM like Ctrl-C)
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
        raise
    for p in procs:
        p.join()
    errors = [f"rank {r}: {v}" for r, (status, v) in sorted(outcomes.items()) if status == "error"]
    if errors:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed: {'; '.join(errors)}")
    return [outcomes[r][1] for r in range(world)]


def wait_for_ranks(procs: list, results, outcomes: dict[int, tuple[str, Any]]) -> None:
    """Fill `outcomes` with every rank's report; a rank that died without one is reported for it."""
    world = len(procs)
    while len(outcomes) < world:
        try:
            rank, outcome = results.get(timeout=1.0)
            outcomes[rank] = outcome
        except queue.Empty:
            # a rank the OS killed (out of memory, SIGKILL) never reports; its peers would wait for it forever
            dead = [r for r, p in enumerate(procs) if r not in outcomes and p.exitcode not in (None, 0)]
            if dead:
                outcomes.update({r: ("error", f"exited with code {procs[r].exitcode}") for r in dead})
                for p in procs:
                    p.terminate()
                for r in range(world):
                    outcomes.setdefault(r, ("error", "stopped after another rank died"))


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], kwargs: dict, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    outcome: tuple[str, Any] = ("error", "exited before reporting")
    try:
        quiet_worker()
        from qthink.teachers import distributed

        try:
            with sigterm_as_interrupt():  # the parent's SIGTERM (or Ctrl-C) cleans up here as it does there
                outcome = ("ok", fn(**kwargs))
        finally:
            distributed.teardown()
    except BaseException as e:  # reported to the parent, which raises it with every rank's error
        outcome = ("error", f"{type(e).__name__}: {e}")
    results.put((rank, outcome))
