"""`qthink eval`: accuracy, answer tokens and speed of checkpoints and base models on a benchmark.

    qthink eval CKPT BASE:think BASE:nothink --task gsm8k --data-path data --out runs/eval

A target is evaluated in one of three modes:
- `qthink`:  a seed-format checkpoint, K latent steps, then the answer (`enable_thinking=False` prompt);
- `think`:   a base model with its visible chain of thought (`enable_thinking=True`, K = 0);
- `nothink`: a base model answering at once (`enable_thinking=False`, K = 0).
Give the mode as `TARGET:MODE` or with `--mode` (once for all targets or once per target); by default a
directory with a projection head is `qthink` and anything else `think`. Every batch is
`qthink.scoring.score_batch`, the step validation runs too (greedy, so a rerun writes the same predictions). Each run writes
`OUT/<name>/predictions.jsonl` and `OUT/<name>/summary.json`; several targets also print (and write to
`OUT/comparison.md`) one table in the seed model card's layout. `--devices N` scores the problems on N processes
(GPUs, or CPU processes) under Lightning DDP (`qthink.training.ddp_eval`); the files are the same, rank 0 writes them.
"""

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from qthink.arguments import SignatureCommand, require_positive
from qthink.core.device import parse_dtype, pick_device
from qthink.core.model import HEAD_PT, HEAD_ST, QThink, check_decode_mode
from qthink.errors import require
from qthink.files import atomic_write_text
from qthink.ownership import Output, claim, plain_name
from qthink.parallel import choose_threads
from qthink.recipe import SEED
from qthink.scoring import Decoding, score_all
from qthink.tables import markdown_table
from qthink.tasks import (
    Task,
    get_task,
    load_problems,
    make_task,
    print_note,
)

MODES = ("qthink", "think", "nothink")


@dataclass(frozen=True)
class Target:
    path: str
    mode: str
    name: str


def split_mode(spec: str) -> tuple[str, str | None]:
    """`DIR:think` -> (`DIR`, `think`); a spec without a known mode suffix is all path."""
    path, sep, mode = spec.rpartition(":")
    return (path, mode) if sep and mode in MODES else (spec, None)


def default_mode(path: str) -> str:
    """`qthink` for a checkpoint (a head file beside the model), `think` for a local base model; a hub
    repo id is taken for a seed checkpoint (the seed's repos are)."""
    local = Path(path)
    if local.is_dir():
        return "qthink" if (local / HEAD_ST).is_file() or (local / HEAD_PT).is_file() else "think"
    return "qthink"


def default_name(path: str, mode: str) -> str:
    stem = Path(path.rstrip("/")).name or path
    return stem if mode == "qthink" else f"{stem}-{mode}"


def resolve_targets(specs: Sequence[str], modes: Sequence[str] = (), names: Sequence[str] = ()) -> list[Target]:
    """Targets from `TARGET[:MODE]` specs, `--mode` (one, or one per target) and `--name` labels."""
    require(len(specs) > 0, "no targets: give one or more checkpoints or base models")
    require(len(modes) in (0, 1, len(specs)), f"--mode takes one mode for all targets or one per target "
            f"({len(specs)}); got {len(modes)}")
    require(len(names) in (0, len(specs)), f"--name takes one label per target ({len(specs)}); got {len(names)}")
    targets = []
    for i, spec in enumerate(specs):
        path, mode = split_mode(spec)
        flag = modes[0] if len(modes) == 1 else modes[i] if modes else None
        require(flag is None or flag in MODES, f"unknown mode {flag!r}; use one of {', '.join(MODES)}")
        require(mode is None or flag is None or mode == flag, f"{spec}: mode :{mode} contradicts --mode {flag}")
        mode = mode or flag or default_mode(path)
        name = plain_name(names[i], "--name") if names else default_name(path, mode)
        targets.append(Target(path, mode, plain_name(name, f"{spec}: the default --name")))
    labels = [t.name for t in targets]
    require(len(set(labels)) == len(labels), f"two targets share the name {labels}; label them with --name")
    return targets


def load_target(path: str, mode: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                trust_remote_code: bool = False) -> QThink:
    """A checkpoint with its head (`qthink`) or the model alone (`think`/`nothink`: no head needed)."""
    if mode == "qthink":
        return QThink.from_pretrained(path, dtype, device, trust_remote_code)
    return QThink.for_base(path, dtype, device, trust_remote_code)


def by_length(preds: list[dict], task: Task) -> dict:
    """Where the task knows each problem's number of reasoning steps: the headline metric per length
    (`by_length`: {"3": {"problems", metric, "mean_latent_steps"}}) and how often the latent steps taken equal
    the problem's length (`latent_steps_match`). Empty otherwise."""
    lengths = sorted({p["chain_length"] for p in preds if p["chain_length"] is not None})
    if not lengths:
        return {}
    metric, groups = task.metrics[0], {}
    for n in lengths:
        group = [p for p in preds if p["chain_length"] == n]
        groups[str(n)] = {"problems": len(group), metric: sum(p[metric] for p in group) / len(group),
                          "mean_latent_steps": sum(p["latent_steps"] for p in group) / len(group)}
    counted = [p for p in preds if p["chain_length"] is not None]
    return {"by_length": groups, "mean_chain_length": sum(p["chain_length"] for p in counted) / len(counted),
            "latent_steps_match": sum(p["latent_steps"] == p["chain_length"] for p in counted) / len(counted)}


def summarize(preds: list[dict], task: Task, split: str, target: Target, k: int, wall: float, settings: dict) -> dict:
    n = len(preds)
    summary = {"system": target.name, "target": target.path, "task": task.name, "split": split, "mode": target.mode,
               "K": k, "problems": n, "metrics": {m: sum(p[m] for p in preds) / n for m in task.metrics},
               "mean_tokens": sum(p["tokens"] for p in preds) / n, "wall_seconds": wall,
               "seconds_per_problem": wall / n, "problems_per_s": n / wall,
               "unclosed_think": sum(p["unclosed_think"] for p in preds),
               "unfinished": sum(not p["finished"] for p in preds),
               "mean_latent_steps": sum(p["latent_steps"] for p in preds) / n, **by_length(preds, task), **settings}
    summary["markdown_row"] = format_table([summary]).splitlines()[-1]
    return summary


def evaluate(target: str | Path | QThink, task: str | Task, split: str = "test", data_path: str | None = None,
             mode: str | None = None, name: str | None = None, latent_steps: int | None = None,
             max_new_tokens: int = SEED.max_answer_tokens, batch_size: int = 16, limit: int | None = None,
             out: str | Path | None = None, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             records: list[dict] | None = None, progress: bool = True, trust_remote_code: bool = False,
             model: QThink | None = None, decode_mode: str = "dynamic", grade_unclosed: bool = False,
             devices: int = 1) -> dict:
    """Evaluate one target and return its summary; with `out`, write `out/<name>/predictions.jsonl` and
    `summary.json`. An output whose think block never closed scores 0 unless `grade_unclosed`. `target` is a path (loaded here, or given already loaded as `model`) or, in process, a
    `QThink` (mode default: `qthink` if it has a head). `devices` > 1: DDP processes of `device`'s type
    (`qthink.training.ddp_eval`; run as a command, which Lightning re-runs on the other ranks), the same
    records; only rank 0 writes `out`."""
    task = get_task(task) if isinstance(task, str) else task
    records = load_problems(task, split, data_path, limit, print_note) if records is None else records
    if isinstance(target, QThink):
        model, path = target, str(target.info.get("base_model", "in-memory"))
        mode = mode or ("qthink" if model.head is not None else "think")
    else:
        path = str(target)
        mode = mode or default_mode(path)
    spec = resolve_targets([f"{path}:{mode}"], names=[name] if name else ())[0]
    require(devices > 0, f"--devices must be > 0 (got {devices})")
    accelerator, writer = None, True
    if devices > 1:  # Lightning is imported only here: `qthink eval` on one device does without it
        from qthink.training.ddp_eval import check_devices, launched_rank, score_on_devices

        accelerator, writer = check_devices(devices, pick_device(device and str(device))), launched_rank() == 0
    # on N devices each rank loads on the CPU and Lightning moves the model to the rank's own device
    qt = model or load_target(path, mode, dtype, "cpu" if accelerator else device, trust_remote_code)
    k = (qt.latent_steps if latent_steps is None else latent_steps) if mode == "qthink" else 0
    decoding = Decoding(latent_steps if mode == "qthink" else 0, max_new_tokens, decode_mode, grade_unclosed)
    # latent_steps None: the checkpoint's K, or each problem's own where the model chooses (adaptive)
    if accelerator:
        preds, wall, where = score_on_devices(qt, task, records, decoding, batch_size, mode == "think", devices,
                                              accelerator, progress)
    else:
        bar = tqdm(total=len(records), unit="problem", desc=spec.name, disable=not progress, dynamic_ncols=True)
        began = time.perf_counter()
        with bar:
            preds = score_all(qt, task, records, decoding, batch_size, mode == "think", bar.update)
        wall, where = time.perf_counter() - began, str(qt.device)
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "dtype": str(qt.model.dtype),
                "device": where, "decode_mode": decode_mode, "grade_unclosed": grade_unclosed}
    summary = summarize(preds, task, split, spec, k, wall, settings)
    if out is not None and writer:  # the other ranks leave --out to rank 0
        with claim(out, "eval", "--out") as owned:  # already held by `qthink eval` for its whole run
            write_run(owned.take(spec.name, what="--name")[0], preds, summary)
    return summary


def write_run(run_dir: Path, preds: list[dict], summary: dict) -> None:
    """predictions.jsonl, then summary.json, each whole or not at all (a summary never describes other
    predictions than the ones beside it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)
    atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


# ---- the comparison table ----


def metric_title(metric: str) -> str:
    return metric.replace("_", " ").title()


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def format_table(summaries: list[dict]) -> str:
    """The seed model card's layout: for one task, a row per system and a column per metric (plus mean
    answer tokens, unclosed think blocks and seconds per problem); for several tasks, a row per benchmark
    and a column per system, holding each task's headline metric."""
    tasks = list(dict.fromkeys(s["task"] for s in summaries))
    if len(tasks) == 1:
        metrics = list(summaries[0]["metrics"])
        head = ["Model", *map(metric_title, metrics), "Mean tokens", "Unclosed think", "s/problem"]
        rows = [[s["system"], *(_pct(s["metrics"].get(m)) for m in metrics), f"{s['mean_tokens']:.1f}",
                 str(s["unclosed_think"]), f"{s['seconds_per_problem']:.3g}"] for s in summaries]
    else:
        systems = list(dict.fromkeys(s["system"] for s in summaries))
        cell = {(s["task"], s["system"]): next(iter(s["metrics"].values())) for s in summaries}
        head = ["Benchmark", *systems]
        rows = [[task, *(_pct(cell.get((task, system))) for system in systems)] for task in tasks]
    return markdown_table(head, rows)


# ---- CLI ----


def eval_command(targets: list[str] | None = None, task: str | None = None, task_options: dict[str, Any] | None = None, split: str = "test",
                 data_path: str | None = None, mode: list[str] | None = None, name: list[str] | None = None,
                 latent_steps: int | None = None, max_new_tokens: int = SEED.max_answer_tokens, batch_size: int = 16,
                 decode_mode: str = "dynamic", limit: int | None = None, grade_unclosed: bool = False,
                 out: str = "runs/eval", dtype: str = "auto", device: str | None = None, devices: int = 1,
                 threads: int | None = None, no_progress: bool = False, trust_remote_code: bool = False) -> None:
    """Evaluate checkpoints and base models on a benchmark: OUT/<name>/predictions.jsonl and summary.json per
    target, and a comparison table.

    Args:
        targets: checkpoint or base model (directory or hub repo id), optionally TARGET:qthink|think|nothink;
            several may follow the command (`qthink eval A B:nothink`)
        task: gsm8k | math500 | tooluse | synthetic
        task_options: task constructor options (synthetic: steps=6, test_size=1000); `--task-option KEY=VALUE`
        split: dataset split
        data_path: data root, task folder or split file (default: the hub)
        mode: qthink | think | nothink: one mode for all targets or one per target
        name: one label per target (default: from the path and mode)
        latent_steps: K in qthink mode (default: the checkpoint's)
        max_new_tokens: generated-token budget per problem
        batch_size: problems decoded together
        decode_mode: dynamic | static (fixed-shape StaticCache) | compiled (static + torch.compile)
        limit: evaluate the first N problems only
        grade_unclosed: grade an output whose think block never closed on its whole text (default: no answer, 0)
        out: output directory; each run writes OUT/<name>/
        dtype: float32 | bfloat16 | float16 | auto (the checkpoint's)
        device: cpu | cuda (default: cuda if available)
        devices: processes, one per device (GPU or, on cpu, core), under Lightning DDP; each scores a share of
            the problems, the first writes --out (default: 1, in process)
        threads: torch CPU threads (default: 1 for a small model on CPU)
        no_progress: no progress bar
        trust_remote_code: allow custom model code from the repo
    """
    require(task is not None, "--task is required: gsm8k | math500 | tooluse | synthetic")
    args = SimpleNamespace(**locals())  # these settings, as `run_targets` reads them
    args.task_options = task_options or {}
    check_decode_mode(decode_mode)
    resolved = resolve_targets(targets or [], mode or [], name or [])
    require_positive({"--batch-size": batch_size, "--max-new-tokens": max_new_tokens, "--threads": threads,
                      "--devices": devices})
    if devices > 1:
        from qthink.training.ddp_eval import check_command_line, check_devices, launched_rank

        check_devices(devices, pick_device(device))
        check_command_line("eval")
        if launched_rank() != 0:  # a rank Lightning's launcher started by re-running this command: rank 0 writes
            run_targets(args, resolved, None)
            return
    with claim(out, "eval", "--out") as owned:  # before any generation: a bad --out must not throw a run away
        owned.take(*[t.name for t in resolved], what="--name")
        if len(resolved) > 1:
            owned.take("comparison.md")
        run_targets(args, resolved, owned)


# bare arguments are targets; `--mode A B`, `--name A B` and `--task-option K=V` as argparse had them
COMMAND = SignatureCommand(eval_command, aliases={"--mode": "--mode+", "--name": "--name+",
                                                  "--task-option": "--task_options."}, rest="--targets+")


def cli_main(settings: dict) -> None:
    eval_command(**settings)


def run_targets(args: SimpleNamespace, targets: list[Target], owned: Output | None) -> None:
    """Evaluate each target; `owned` None: one of the other ranks of `--devices N`, which writes and prints nothing."""
    task = make_task(args.task, args.task_options)
    note = print_note if owned is not None else lambda *_: None  # said once, by rank 0
    records = load_problems(task, args.split, args.data_path, args.limit, note)  # bad data fails before any model loads
    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype)
    summaries = []
    for t in targets:  # on N devices each rank loads on the CPU and Lightning moves the model to its device
        qt = load_target(t.path, t.mode, dtype, device if args.devices == 1 else "cpu", args.trust_remote_code)
        choose_threads(qt.device, qt.model.config, args.threads)
        summary = evaluate(t.path, task, args.split, mode=t.mode, name=t.name, latent_steps=args.latent_steps,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           out=args.out if owned is not None else None, device=device, records=records,
                           progress=not args.no_progress and owned is not None, model=qt, decode_mode=args.decode_mode,
                           grade_unclosed=args.grade_unclosed, devices=args.devices)
        summaries.append(summary)
        if owned is not None:
            print(f"{t.name}: wrote {Path(args.out) / t.name} ({summary['problems_per_s']:.2f} problems/s, "
                  f"{summary['unclosed_think']} unclosed think)", flush=True)
    if owned is None:
        return
    table = format_table(summaries)
    print(table)
    if len(summaries) > 1:
        atomic_write_text(owned.folder / "comparison.md", table + "\n")
