"""`qthink rollouts`: G sampled chain-of-thought completions per problem, graded, on disk (contract 3).

    qthink rollouts --base Qwen/Qwen3-1.7B --task gsm8k --data-path data --out rollouts -G 16

Each prompt is the task's question as one user turn with thinking enabled; `qthink.core.latent.generate`
(with 0 latent steps) prefills it once and expands its cache G times. Row (problem i, sample j) draws its
noise from `row_seed(seed, i, j)`, and batches are fixed groups of `--batch-size` consecutive problems,
so the output does not depend on how the run was split, resumed or spread over ranks.

Output directory: `manifest.json` (the settings, written first, with `complete: false` and the writer's pid
while problems are missing, `complete: true` at the very end) and `rollouts.jsonl`, one line per problem,
appended with flush + fsync. `read_rollouts` refuses a folder that is not complete. A rerun checks the settings against the manifest, discards a
truncated last line (a run killed mid-write) and skips the problems already present. Under `torchrun`
each rank appends to `rollouts.rank-R.jsonl` and rank 0 merges the parts into `rollouts.jsonl` (ordered
by problem index) at the end.
"""

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qthink.arguments import PositiveFinite, Seed, SignatureCommand
from qthink.core.device import parse_dtype
from qthink.core.latent import generate
from qthink.core.model import check_decode_mode, check_model_ref, context_length_of, load_base, load_tokenizer
from qthink.core.sampling import Sampler, row_seed
from qthink.core.sequences import encode_prompts, left_pad, output_text, stop_ids
from qthink.errors import UserError, require
from qthink.files import (
    atomic_write,
    atomic_write_text,
    json_line,
    local_ref,
    read_json,
    require_finished,
    require_same_settings,
    unfinished,
    writable_dir,
)
from qthink.identity import comparable, fingerprint, project_ref
from qthink.ownership import claim
from qthink.recipe import SEED
from qthink.tasks.base import THINK_CLOSE, thinking_completion
from qthink.teachers import distributed

ROLLOUTS, MANIFEST = "rollouts.jsonl", "manifest.json"
FORMAT = "qthink-rollouts-v1"


def part_name(rank: int) -> str:
    return f"rollouts.rank-{rank}.jsonl"


# ---- reading and validating rollouts.jsonl ----

def parse_line(path: Path, lineno: int, line: str) -> dict:
    """One problem line, validated; a mistake is a UserError naming the file and line."""
    where = f"{path}:{lineno}"
    record = json_line(where, line, "fix or delete that line")
    require(isinstance(record, dict), f"{where}: expected a JSON object per line")
    index = record.get("problem_index")
    require(type(index) is int and index >= 0,  # `true` is an int to Python and would read as problem 1
            f"{where}: needs an integer `problem_index` >= 0 (got {json.dumps(index)})")
    require(isinstance(record.get("question"), str), f"{where}: needs a string `question` (the user message)")
    rollouts = record.get("rollouts")
    require(isinstance(rollouts, list), f"{where}: needs a list `rollouts`")
    for j, r in enumerate(rollouts):
        ok = isinstance(r, dict) and isinstance(r.get("token_ids"), list) and all(type(t) is int for t in r["token_ids"])
        require(ok, f"{where}: rollout {j} needs `token_ids`, a list of integers")
        reward = r.get("reward")
        require(isinstance(reward, int | float) and not isinstance(reward, bool) and math.isfinite(reward),
                f"{where}: rollout {j} needs a finite numeric `reward` (got {reward!r}); fix or regrade that line")
    return record


def scan(path: Path, tail: str = "error") -> list[tuple[int, int, int]]:
    """(problem_index, byte offset, byte length) of every complete line of a rollouts file, validated,
    streamed so that a large file is never held in memory.

    A last line without its newline is what a run killed mid-write leaves. `tail`: "repair" cuts it off
    the file (the rerun recomputes that problem), "ignore" skips it (another rank's file, which that rank
    repairs), "error" raises a UserError telling how to repair it.
    """
    if not path.exists():
        return []
    entries, seen, offset, cut = [], {}, 0, False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                cut = True
                break
            if raw.strip():
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not UTF-8 text; fix or delete that line") from e
                index = parse_line(path, lineno, text)["problem_index"]
                require(index not in seen, f"{path}:{lineno}: problem_index {index} already appears on line {seen.get(index)}")
                seen[index] = lineno
                entries.append((index, offset, len(raw)))
            offset += len(raw)
    if cut and tail != "ignore":
        require(tail == "repair", f"{path}: the last line is incomplete (a run killed mid-write); rerun `qthink rollouts` "
                "with the same settings to complete the file")
        with open(path, "r+b") as f:  # only the tail: every complete line stays as written
            f.truncate(offset)
            os.fsync(f.fileno())
    return entries


def read_line(path: Path, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length).decode("utf-8").rstrip("\n")


def rollout_at(path: Path, offset: int, length: int) -> dict:
    """The problem whose line `read_rollouts` found at `offset` (its scan entry's offset and length)."""
    return parse_line(path, 0, read_line(path, offset, length))


def read_rollouts(directory: str | Path) -> tuple[dict, list[tuple[int, int, int]]]:
    """(manifest or {}, scan entries ordered by problem index) of a finished rollouts directory; one that is
    still being written or was stopped part-way is refused (`require_finished`). Read a problem with
    `rollout_at(path, offset, length)`."""
    directory = Path(directory)
    path = directory / ROLLOUTS
    require(path.is_file(), f"{directory} has no {ROLLOUTS}; create it with `qthink rollouts`")
    manifest = read_json(directory / MANIFEST, "rerun `qthink rollouts`") if (directory / MANIFEST).is_file() else {}
    require_finished(manifest, f"rollouts {directory}", lambda: f"{len(problems_present(directory))} of "
                     f"{manifest.get('problems')} problems", "rerun `qthink rollouts` with the same settings")
    parts = sorted(directory.glob("rollouts.rank-*.jsonl"))
    if parts:
        raise UserError(f"{directory} still has per-rank parts ({parts[0].name}); rerun `qthink rollouts` to finish it")
    entries = sorted(scan(path))
    return manifest, entries


def problems_present(directory: Path) -> set[int]:
    """The problem indices written into `directory` so far (the merged file and every rank's part)."""
    return {e[0] for f in [directory / ROLLOUTS, *directory.glob("rollouts.rank-*.jsonl")] for e in scan(f, tail="ignore")}


# Settings added after the first manifests were written, and what those manifests' runs used.
UNRECORDED = {"decode_mode": "dynamic", "task_options": {}, "grade_unclosed": False}  # what manifests written before a key existed used


def holds_rollouts(directory: Path) -> bool:
    """Whether any rollout was written into `directory` (the merged file or a rank's part)."""
    files = [directory / ROLLOUTS, *directory.glob("rollouts.rank-*.jsonl")]
    return any(f.is_file() and f.stat().st_size > 0 for f in files)


def check_manifest(directory: Path, settings: dict, base: str, write: bool = True) -> None:
    """Write the settings as the manifest (`write`: rank 0 only), or check them against the manifest already
    there (the base by its fingerprint, so a moved project or base resumes; `base`: as given, for manifests
    from before fingerprints). A manifest without any rollout beside it (a run refused or stopped before
    its first problem) records nothing to resume, so a rerun with corrected settings replaces it."""
    path = directory / MANIFEST
    if write and (not path.is_file() or not holds_rollouts(directory)):
        require(path.is_file() or not (directory / ROLLOUTS).exists(), f"{directory / ROLLOUTS} exists but "
                f"{MANIFEST} does not; move it away or choose another --out")
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
        return
    have = read_json(path, "fix it or choose another --out")
    want = comparable(have, settings, {"base_model": local_ref(base)})
    require_same_settings(path, have, want, "rollouts", UNRECORDED)


def merge_parts(directory: Path) -> int:
    """Merge `rollouts.jsonl` and the per-rank parts into `rollouts.jsonl` ordered by problem index
    (atomic rename; parts deleted afterwards). Returns the number of problems."""
    main, parts = directory / ROLLOUTS, sorted(directory.glob("rollouts.rank-*.jsonl"))
    where = {index: (main, off, n) for index, off, n in scan(main, tail="repair")}
    in_order = list(where) == sorted(where)
    for part in parts:
        for index, off, n in scan(part, tail="repair"):
            where.setdefault(index, (part, off, n))
    order = sorted(where)
    if parts or not in_order:
        atomic_write(main, lambda f: f.writelines(read_line(*where[index]) + "\n" for index in order))
        for part in parts:
            part.unlink()
    return len(order)


def append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- building rollouts ----

def reference_rollout(tokenizer, think: str, answer: str) -> dict:
    """A completion in the rollout layout, `<think>\\n{think}\\n</think>\\n\\n{answer}<|im_end|>`, as a
    rollout entry (reward not set): how hand-written or external chains of thought are provided."""
    text = thinking_completion(think, answer)
    ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"token_ids": ids, "text": text, "finished": True}


def problem_line(problem_index: int, problem_id: str, question: str, rollouts: list[dict]) -> str:
    record = {"problem_index": problem_index, "problem_id": problem_id, "question": question, "rollouts": rollouts}
    return json.dumps(record, ensure_ascii=False)


def write_reference_rollouts(base: str, out: str | Path, task_name: str = "synthetic", split: str = "train",
                             n: int = 8, G: int = 1, data_path: str | None = None) -> Path:
    """A rollouts directory whose G rollouts per problem are the task's reference chain of thought
    (tasks with `think_text`, e.g. synthetic), graded: input for `qthink teachers` with a model too
    small to close its own think blocks (tests, demo)."""
    from qthink.tasks import get_task

    out, task = Path(out), get_task(task_name)
    require(hasattr(task, "think_text"), f"task {task_name} has no reference chain of thought (think_text)")
    tokenizer = load_tokenizer(base)
    records = task.load(split, data_path)[:n]
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "source": "reference", "base_model": project_ref(base, out),
                "base_fingerprint": fingerprint(base), "task": task_name, "split": split, "G": G,
                "problems": len(records), "complete": True}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    lines = []
    for i, record in enumerate(records):
        r = reference_rollout(tokenizer, task.think_text(record), task.reference(record))
        r["reward"] = task.grade(r["text"], record)["exact_match"]
        lines.append(problem_line(i, task.problem_id(record), task.prompt(record), [r] * G))
    atomic_write_text(out / ROLLOUTS, "".join(line + "\n" for line in lines))
    return out


def sample_group(model, tokenizer, prompts: list[list[int]], indices: list[int], G: int, seed: int,
                 max_new_tokens: int, temperature: float, top_p: float, top_k: int, device,
                 decode_mode: str = "dynamic") -> list[list[dict]]:
    """G sampled completions for each prompt: per prompt, a list of {token_ids, text, finished}."""
    batch = left_pad(prompts, tokenizer.pad_token_id, device)
    seeds = torch.tensor([row_seed(seed, i, j) for i in indices for j in range(G)], device=device)
    gen = generate(model, torch.nn.Identity(), batch.input_ids, batch.attention_mask, 0, max_new_tokens,
                   stop_ids(tokenizer, model.generation_config), tokenizer.pad_token_id,
                   Sampler(seeds, temperature, top_p, top_k), G,
                   decode_mode)
    tokens, lengths, finished = gen.tokens.cpu(), gen.lengths.cpu().tolist(), gen.finished.cpu().tolist()
    out = []
    for p in range(len(prompts)):
        samples = []
        for j in range(G):
            row = p * G + j
            ids = tokens[row, : lengths[row]].tolist()
            samples.append({"token_ids": ids, "text": output_text(tokenizer, ids, finished[row]),
                            "finished": bool(finished[row])})
        out.append(samples)
    return out


def run_rollouts(base: str, task: str, out: str | Path, split: str = "train", data_path: str | None = None,
                 G: int = SEED.G, temperature: PositiveFinite = SEED.temperature, top_p: float = SEED.top_p,
                 top_k: int = SEED.top_k, max_new_tokens: int = SEED.rollout_max_new_tokens, batch_size: int = 8,
                 seed: Seed = 0, limit: int | None = None,
                 dtype: str = "auto", device: str | None = None,
                 on_problem: Callable[[int], None] | None = None, decode_mode: str = "dynamic",
                 task_options: dict[str, Any] | None = None, grade_unclosed: bool = False) -> dict:
    """Sample, grade and append rollouts for the (first `limit`) problems of `task`/`split` not yet in
    `out`; returns a summary. `on_problem(index)` is called after each problem is on disk.

    Args:
        base: base model directory or Hugging Face repo id
        task: gsm8k | math500 | tooluse | synthetic
        out: output rollouts directory
        split: dataset split
        data_path: task data file or folder (default: the task's hub copy)
        G: rollouts per problem
        temperature: sampling temperature
        top_p: nucleus sampling mass, in (0, 1]
        top_k: keep the k most likely tokens (0: all)
        max_new_tokens: token budget per rollout
        batch_size: problems per batch (x G rows); fixed for a directory
        seed: sampling seed (per row: problem index and sample index)
        limit: only the first N problems (a rerun can extend)
        dtype: model dtype: float32 | bfloat16 | float16 | auto
        device: cpu | cuda (default: cuda if available)
        decode_mode: dynamic | static (fixed-shape StaticCache) | compiled (static + torch.compile)
        task_options: task constructor options (synthetic: steps: 6); fixed for a directory
        grade_unclosed: grade a rollout whose think block never closed on its whole text (default: no answer,
            reward 0)
    """
    from qthink.tasks import load_problems, make_task, print_note

    require(G >= 1, f"-G must be >= 1 (got {G})")
    require(batch_size >= 1, f"--batch-size must be >= 1 (got {batch_size})")
    require(max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    require(temperature > 0, f"--temperature must be > 0 (got {temperature}); rollouts are sampled")
    Sampler(torch.zeros(1, dtype=torch.long), temperature, top_p, top_k)  # its range checks, before any work
    require(limit is None or limit >= 1, f"--limit must be >= 1 (got {limit})")
    check_decode_mode(decode_mode)
    check_model_ref(base)  # before the manifest names it
    out = writable_dir(out, "--out")
    ranks, dev = distributed.setup(device)
    task_options = dict(task_options or {})
    task_obj = make_task(task, task_options)
    records = load_problems(task_obj, split, data_path, limit, print_note)
    context = context_length_of(base)
    require(max_new_tokens < context, f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in "
            f"{base}'s context of {context} tokens; lower it")
    settings = {"format": FORMAT, "base_model": project_ref(base, out), "base_fingerprint": fingerprint(base),
                "task": task, "task_options": task_options, "split": split, "data_path": local_ref(data_path),
                "G": G, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "dtype": dtype,
                "enable_thinking": True, "decode_mode": decode_mode, "grade_unclosed": grade_unclosed}
    marked = []  # rank 0 marks the manifest unfinished while problems are missing (a finished folder stays so)
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        check_manifest(out, settings, base)
        scan(out / ROLLOUTS, tail="repair")  # validate, drop a truncated last line
        if not set(range(len(records))) <= problems_present(out):
            marked = [(out, {**settings, "problems": len(records)})]
    with unfinished(marked, write_manifest):
        summary = sample_rollouts(out, base, task_obj, records, settings, context, ranks, dev, on_problem)
    if ranks.is_main:
        summary["total_problems"] = merge_parts(out)
        write_manifest(out, {**settings, "problems": summary["total_problems"], "complete": True})
    distributed.barrier()
    return summary


def write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def sample_rollouts(out: Path, base: str, task_obj, records: list, settings: dict, context: int, ranks, dev,
                    on_problem: Callable[[int], None] | None) -> dict:
    """Sample, grade and append the problems of `records` not yet in `out` (every rank its groups); returns
    this rank's counts once every rank is done."""
    from qthink.tasks import has_unclosed_think

    task, split, G, seed = settings["task"], settings["split"], settings["G"], settings["seed"]
    max_new_tokens, batch_size, decode_mode = settings["max_new_tokens"], settings["batch_size"], settings["decode_mode"]
    temperature, top_p, top_k = settings["temperature"], settings["top_p"], settings["top_k"]
    grade_unclosed = settings["grade_unclosed"]
    distributed.barrier()
    if not ranks.is_main:
        check_manifest(out, settings, base, write=False)
    mine = out / (ROLLOUTS if ranks.world_size == 1 else part_name(ranks.rank))
    done = {e[0] for e in scan(mine, tail="repair")}
    for path in [out / ROLLOUTS, *out.glob("rollouts.rank-*.jsonl")]:
        if path != mine:
            done |= {e[0] for e in scan(path, tail="ignore")}

    n_groups = (len(records) + batch_size - 1) // batch_size
    groups = [list(range(g * batch_size, min((g + 1) * batch_size, len(records)))) for g in ranks.units(n_groups)]
    groups = [g for g in groups if any(i not in done for i in g)]
    todo = sum(i not in done for g in groups for i in g)
    summary = {"problems": todo, "rollouts": 0, "correct": 0, "finished": 0, "closed_think": 0, "unclosed_think": 0}
    if groups:
        model, tokenizer = load_base(base, parse_dtype(settings["dtype"]))
        model = model.to(dev)
        end_think = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
        bar = tqdm(total=todo * G, unit="rollout", desc=f"rollouts {task}/{split}", disable=not ranks.is_main,
                   dynamic_ncols=True)
        for group in groups:
            prompts = encode_prompts(tokenizer, [task_obj.prompt(records[i]) for i in group], enable_thinking=True)
            for i, p in zip(group, prompts, strict=True):
                require(len(p) + max_new_tokens <= context, f"problem {i} ({task_obj.problem_id(records[i])}): "
                        f"{len(p)} prompt tokens + --max-new-tokens {max_new_tokens} exceed the context of {context}")
            samples = sample_group(model, tokenizer, prompts, group, G, seed, max_new_tokens, temperature, top_p,
                                   top_k, dev, decode_mode)
            for i, rollouts in zip(group, samples, strict=True):
                if i in done:
                    continue
                for r in rollouts:
                    r["reward"] = float(task_obj.grade(r["text"], records[i], grade_unclosed)["exact_match"])
                    summary["unclosed_think"] += has_unclosed_think(r["text"])
                    summary["correct"] += r["reward"] > 0
                    summary["finished"] += r["finished"]
                    summary["closed_think"] += end_think in r["token_ids"]
                summary["rollouts"] += len(rollouts)
                append_line(mine, problem_line(i, task_obj.problem_id(records[i]), task_obj.prompt(records[i]),
                                               [{k: r[k] for k in ("token_ids", "text", "reward", "finished")}
                                                for r in rollouts]))
                bar.update(G)
                if on_problem is not None:
                    on_problem(i)
        bar.close()
    distributed.barrier()
    return summary


# ---- the `qthink rollouts` subcommand ----

COMMAND = SignatureCommand(run_rollouts, skip=frozenset({"on_problem"}),
                           aliases={"-G": "--G", "--task-option": "--task_options."})


def cli_main(settings: dict) -> int:
    start = time.perf_counter()
    try:
        with claim(settings["out"], "rollouts", "--out") if distributed.env_ranks().is_main else nullcontext():
            s = run_rollouts(**settings)
    finally:
        distributed.teardown()
    if distributed.env_ranks().is_main:
        n = max(s["rollouts"], 1)
        print(f"rollouts: {s['problems']} new problems, {s['rollouts']} rollouts in {time.perf_counter() - start:.1f}s "
              f"(this rank); correct {s['correct'] / n:.1%}, finished {s['finished'] / n:.1%}, "
              f"emitted </think> {s['closed_think'] / n:.1%} (unclosed think blocks: {s['unclosed_think']}, no answer"
              f"{', graded as is' if settings['grade_unclosed'] else ''}); {settings['out']}/{ROLLOUTS} holds {s['total_problems']} problems")
    return 0
