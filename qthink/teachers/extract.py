"""`qthink teachers`: the teacher hidden-state store, extracted from rollouts (contracts 2 and 3).

    qthink teachers --base Qwen/Qwen3-1.7B --rollouts rollouts --out teachers -K 6

One teacher-forced pass per rollout over prompt (thinking on) + the rollout's own tokens, under
`torch.inference_mode()`, through the decoder only (no [tokens, vocab] logits), kept cheap: a sequence stops
at its last think token; batches are length-bucketed and right-padded with no attention mask (causal: a
real token never sees the padding after it, and SDPA keeps its mask-free kernels); only the K rows per
rollout are gathered from `last_hidden_state` (post-norm), in float32.
Per problem, `uniform` is the mean over its valid rollouts and `weighted` the reward-weighted mean
(binary rewards: the mean over the correct ones), both in float32, stored in `--dtype`.

Problems are cut into fixed shards of `--shard-size` (problem-index order), each written atomically and
recorded in a progress file: a rerun skips whole shards and rebuilds the same bytes. Until the manifest
written last says `complete: true`, it names the writer's pid and `fit` refuses the store. Under `torchrun`
rank r computes shards r, r+W, ...; rank 0 writes the manifest.
"""

import json
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from qthink.arguments import SignatureCommand
from qthink.core.device import parse_dtype
from qthink.core.latent import model_parts
from qthink.core.model import check_model_ref, hidden_size_of, load_base
from qthink.core.sequences import encode_prompts, right_pad
from qthink.errors import require
from qthink.files import (
    atomic_write_text,
    local_ref,
    read_json,
    remove_stale_temp_files,
    require_same_settings,
    sha256_file,
    unfinished,
    writable_dir,
)
from qthink.identity import comparable, fingerprint, project_ref
from qthink.ownership import claim
from qthink.recipe import SEED
from qthink.tasks.base import THINK_CLOSE, THINK_OPEN
from qthink.teachers import distributed
from qthink.teachers.positions import (
    SCHEMES,
    content_positions,
    positions_on_steps,
    step_candidates,
    think_span,
)
from qthink.teachers.rollouts import ROLLOUTS, read_rollouts, rollout_at
from qthink.teachers.store import MANIFEST, shard_name, write_manifest, write_shard

STORE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
HIDDEN_STATE = "post-norm last layer (last_hidden_state)"
PROGRESS = "progress.json"
COUNT_KEYS = ("problems", "rollouts", "valid", "excluded_unclosed", "excluded_empty", "correct_valid",
              "weighted_valid", "without_valid")


def special_ids(tokenizer) -> tuple[int, int, int]:
    """Ids of `<think>`, `</think>` and `<|im_start|>` (which opens the assistant turn)."""
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN, THINK_CLOSE, "<|im_start|>"))


def rollout_content(prompt: list[int], rollout: list[int], specials: tuple[int, int, int],
                    tokenizer) -> tuple[str, list[int], int, int]:
    """("valid" | "unclosed" | "empty", prompt + rollout ids, start, end) of the think content ids[start:end].
    A think block holding only whitespace (Qwen3 writes an empty one as `<think>\n\n</think>`) is empty.

    The think block is looked for from the start of the assistant turn, so a generation prompt that
    already opens `<think>` works too; its close must be in the rollout.
    """
    think_id, end_id, im_start = specials
    ids = prompt + rollout
    turn = max((i for i, t in enumerate(prompt) if t == im_start), default=len(prompt))
    span = think_span(ids, think_id, end_id, turn)
    if span is None or span[1] < len(prompt):
        return "unclosed", ids, 0, 0
    start, end = span[0] + 1, span[1]
    if end == start or not tokenizer.decode(ids[start:end]).strip():  # Qwen3's empty block holds "\n\n"
        return "empty", ids, 0, 0
    return "valid", ids, start, end


def rollout_positions(prompt: list[int], rollout: list[int], specials: tuple[int, int, int], scheme: str, k: int,
                      tokenizer, task_offsets=None) -> tuple[str, list[int], list[int]]:
    """("valid" | "unclosed" | "empty", prompt + rollout ids, absolute positions of the K teacher states)."""
    status, ids, start, end = rollout_content(prompt, rollout, specials, tokenizer)
    if status != "valid":
        return status, ids, []
    return "valid", ids, [start + p for p in content_positions(scheme, tokenizer, ids[start:end], k, task_offsets)]


def problem_steps(step_counts: list[int], k_max: int) -> int:
    """The latent steps an adaptive store teaches a problem: the most common step count among its valid
    rollouts (the larger on a tie), between 1 and K_max; K_max when it has no valid rollout."""
    if not step_counts:
        return k_max
    freq = Counter(step_counts)
    return min(max(max(freq, key=lambda c: (freq[c], c)), 1), k_max)


def adaptive_positions(prompt: list[int], rollouts: list[dict], specials: tuple[int, int, int], k_max: int,
                       tokenizer, task_offsets=None) -> tuple[int, list[tuple[str, list[int], list[int]]]]:
    """(n, per rollout (status, ids, K_max positions)) of one problem in an adaptive store: every valid rollout
    gets n positions on its step boundaries (`positions_on_steps`), the last repeated up to K_max (those
    slots are zeroed in the store and never trained on)."""
    contents = [rollout_content(prompt, r["token_ids"], specials, tokenizer) for r in rollouts]
    candidates = [step_candidates(tokenizer, ids[start:end], task_offsets) if status == "valid" else []
                  for status, ids, start, end in contents]
    n = problem_steps([len(c) for c, (status, *_) in zip(candidates, contents, strict=True) if status == "valid"], k_max)
    out = []
    for cands, (status, ids, start, end) in zip(candidates, contents, strict=True):
        pos = [start + p for p in positions_on_steps(cands, end - start, n)] if status == "valid" else []
        out.append((status, ids, pos + pos[-1:] * (k_max - n) if pos else pos))
    return n, out


@torch.inference_mode()
def extract_states(decoder: nn.Module, seqs: list[list[int]], positions: list[list[int]], pad_id: int,
                   batch_size: int, device: torch.device) -> list[Tensor]:
    """Post-norm last-layer states [K, H] (float32, CPU) of each sequence at its positions."""
    out: list[Tensor | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # longest first: an OOM shows at once
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, _ = right_pad([seqs[i] for i in rows], pad_id)  # causal: padding after a row never reaches it
        width = ids.shape[1]
        pos = torch.arange(width).expand(len(rows), -1)
        hidden = decoder(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False).last_hidden_state
        index = torch.tensor([positions[i] for i in rows], device=device)
        gathered = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])).float().cpu()
        for b, i in enumerate(rows):
            out[i] = gathered[b]
    return out  # type: ignore[return-value]


def aggregate(states: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(uniform, weighted, weighted_valid) from the valid rollouts' states [n, K, H] and rewards [n].

    float32; zeros (never NaN) where there is nothing to average. Negative rewards count as 0.
    """
    states = states.float()
    if states.shape[0] == 0:
        zeros = states.new_zeros(states.shape[1:])
        return zeros, zeros.clone(), False
    weights = rewards.float().clamp(min=0)
    uniform = states.mean(0)
    if float(weights.sum()) <= 0:
        return uniform, torch.zeros_like(uniform), False
    return uniform, (weights[:, None, None] * states).sum(0) / weights.sum(), True


def task_step_offsets(task_name: str | None) -> Callable | None:
    """The task's `step_offsets` (synthetic's `=` rule), or None to use the general step rule."""
    if not task_name:
        return None
    from qthink.tasks import TASKS, get_task

    return get_task(task_name).step_offsets if task_name in TASKS else None


@dataclass(frozen=True)
class StoreSpec:
    """One teacher store to build: its folder, K, position scheme and whether each problem is taught its own
    step count (`adaptive`, steps positions)."""

    out: Path
    K: int = SEED.latent_steps
    position_scheme: str = SEED.position_scheme
    adaptive: bool = False


def place(problem: dict, prompt: list[int], spec: StoreSpec, specials: tuple[int, int, int], tokenizer,
          task_offsets=None) -> tuple[int, list[tuple[str, list[int], list[int]]]]:
    """(latent steps taught, per rollout (status, ids, K positions)) of one problem in one store."""
    if spec.adaptive:
        return adaptive_positions(prompt, problem["rollouts"], specials, spec.K, tokenizer, task_offsets)
    return spec.K, [rollout_positions(prompt, r["token_ids"], specials, spec.position_scheme, spec.K, tokenizer,
                                      task_offsets) for r in problem["rollouts"]]


def build_shards(decoder, tokenizer, problems: list[dict], specs: list[StoreSpec], batch_size: int, device,
                 store_dtype: torch.dtype, task_offsets=None, where: str = "") -> list[tuple[dict, dict]]:
    """The shard tensors and counts of each store in `specs` for `problems` (parsed rollouts lines, in
    problem-index order), from ONE forward pass per rollout: the stores differ only in the positions they
    gather, so several are built for the price of one."""
    specials = special_ids(tokenizer)
    vocab = decoder.get_input_embeddings().num_embeddings
    prompts = encode_prompts(tokenizer, [p["question"] for p in problems], enable_thinking=True)
    counts = [dict.fromkeys(COUNT_KEYS, 0) for _ in specs]
    seqs, positions, owner = [], [], []
    num_steps: list[list[int]] = [[] for _ in specs]
    for slot, (problem, prompt) in enumerate(zip(problems, prompts, strict=True)):
        for j, r in enumerate(problem["rollouts"]):
            require(all(0 <= t < vocab for t in r["token_ids"]), f"{where}: problem {problem['problem_index']} "
                    f"rollout {j} has token ids outside the model's vocabulary of {vocab}; were the rollouts made "
                    "with another tokenizer?")
        placed = []
        for i, spec in enumerate(specs):
            n, per_rollout = place(problem, prompt, spec, specials, tokenizer, task_offsets)
            num_steps[i].append(n)
            placed.append(per_rollout)
        for j, r in enumerate(problem["rollouts"]):
            status, ids, _ = placed[0][j]  # whether a think block is valid does not depend on the store
            for c in counts:
                c["rollouts"] += 1
                if status != "valid":
                    c[f"excluded_{status}"] += 1
            if status != "valid":
                continue
            pos = [p for per_rollout in placed for p in per_rollout[j][2]]  # every store's positions, in order
            seqs.append(ids[: max(pos) + 1])  # nothing after the last position can change it (causal)
            positions.append(pos)
            owner.append((slot, float(r["reward"])))
    states = extract_states(decoder, seqs, positions, tokenizer.pad_token_id, batch_size, device)
    out, first = [], 0
    for i, spec in enumerate(specs):
        own = [s[first : first + spec.K] for s in states]
        first += spec.K
        out.append(aggregate_shard(problems, owner, own, num_steps[i], spec.K, decoder.config.hidden_size,
                                   store_dtype, counts[i]))
    return out


def aggregate_shard(problems: list[dict], owner: list[tuple[int, float]], states: list[Tensor], num_steps: list[int],
                    k: int, hidden: int, store_dtype: torch.dtype, counts: dict) -> tuple[dict, dict]:
    """Per problem, the uniform and reward-weighted means of its valid rollouts' states, as shard tensors."""
    per_problem: list[list[tuple[Tensor, float]]] = [[] for _ in problems]
    for (slot, reward), s in zip(owner, states, strict=True):
        per_problem[slot].append((s, reward))
    uniform, weighted, valid_w, num_valid, without = [], [], [], [], []
    for slot, items in enumerate(per_problem):
        st = torch.stack([s for s, _ in items]) if items else torch.zeros(0, k, hidden)
        u, w, ok = aggregate(st, torch.tensor([r for _, r in items]))
        u[num_steps[slot]:], w[num_steps[slot]:] = 0, 0  # an adaptive row's unused slots
        uniform.append(u.to(store_dtype))
        weighted.append(w.to(store_dtype))
        valid_w.append(ok)
        num_valid.append(len(items))
        counts["valid"] += len(items)
        counts["correct_valid"] += sum(r > 0 for _, r in items)
        if not items:
            without.append(problems[slot]["problem_index"])
    counts.update(problems=len(problems), weighted_valid=sum(valid_w), without_valid=len(without),
                  num_steps={str(n): c for n, c in sorted(Counter(num_steps).items())},
                  max_rollouts=max(len(p["rollouts"]) for p in problems))
    tensors = {
        "problem_index": torch.tensor([p["problem_index"] for p in problems], dtype=torch.int64),
        "uniform": torch.stack(uniform), "weighted": torch.stack(weighted),
        "weighted_valid": torch.tensor(valid_w, dtype=torch.bool), "num_valid": torch.tensor(num_valid, dtype=torch.int32),
        "num_steps": torch.tensor(num_steps, dtype=torch.int32),
    }
    return tensors, {**counts, "problems_without_valid": without}


# ---- resumable, multi-process store building ----

REBUILD = "delete it to rebuild"

def finished_shards(out: Path, settings: dict, legacy: dict) -> dict[str, dict]:
    """Shard entries already written whole (progress files, checked against the settings and sha256;
    `legacy`: the paths as progress files written before fingerprints recorded them)."""
    found: dict[str, dict] = {}
    for path in [out / PROGRESS, *sorted(out.glob("progress-rank*.json"))]:
        if path.is_file():
            progress = read_json(path, REBUILD)
            have = progress.get("settings", {})
            require_same_settings(path, have, comparable(have, settings, legacy), "store")
            for entry in progress["shards"]:
                file = out / entry["file"]
                if file.is_file() and sha256_file(file) == entry["sha256"]:
                    found[entry["file"]] = entry
    return found


def build_teachers(base: str, rollouts: str | Path, out: str | Path, K: int = SEED.latent_steps,
                   dtype: str = "bfloat16", batch_size: int = 16, position_scheme: str = SEED.position_scheme,
                   shard_size: int = 256, model_dtype: str = "auto", device: str | None = None,
                   on_shard: Callable[[dict], None] | None = None, trust_remote_code: bool = False, adaptive: bool = False) -> dict:
    """Build (or finish) the teacher store `out` from the rollouts directory `rollouts`; returns the
    manifest. `on_shard(entry)` is called after each shard is on disk.

    Args:
        base: base model directory or Hugging Face repo id (the rollouts' model)
        rollouts: rollouts directory written by `qthink rollouts`
        out: output teacher store directory
        K: teacher positions per rollout = latent steps
        dtype: stored dtype: bfloat16 | float32
        batch_size: rollouts per forward pass (length-bucketed)
        position_scheme: linspace: evenly spaced in the think block; steps: on reasoning-step boundaries
        shard_size: problems per shard file
        model_dtype: compute dtype: float32 | bfloat16 | float16 | auto
        device: cpu | cuda (default: cuda if available)
        trust_remote_code: allow custom model code from the repo
        adaptive: with position_scheme steps: each problem taught its own step count, at most K (for
            model.adaptive: the student decides how long to think)
    """
    return build_stores(base, rollouts, [StoreSpec(Path(out), K, position_scheme, adaptive)], dtype, batch_size,
                        shard_size, model_dtype, device, on_shard, trust_remote_code)[0]


def build_stores(base: str, rollouts: str | Path, specs: list[StoreSpec], dtype: str = "bfloat16",
                 batch_size: int = 16, shard_size: int = 256, model_dtype: str = "auto", device: str | None = None,
                 on_shard: Callable[[dict], None] | None = None, trust_remote_code: bool = False) -> list[dict]:
    """Build (or finish) several teacher stores from the same rollouts in one pass (one forward per rollout
    serves them all); each is resumable on its own. Returns their manifests."""
    for spec in specs:
        require(spec.K >= 1, f"-K must be >= 1 (got {spec.K})")
        require(not spec.adaptive or spec.position_scheme == "steps", "--adaptive teaches each problem its own step "
                "count: it needs --position-scheme steps")
        require(spec.position_scheme in SCHEMES,
                f"--position-scheme {spec.position_scheme!r}: use one of {', '.join(SCHEMES)}")
    require(len({Path(spec.out).absolute() for spec in specs}) == len(specs), "two stores share one --out folder")
    require(dtype in STORE_DTYPES, f"--dtype {dtype!r}: use one of {', '.join(STORE_DTYPES)}")
    require(batch_size >= 1 and shard_size >= 1, "--batch-size and --shard-size must be >= 1")
    check_model_ref(base)
    outs = [writable_dir(spec.out, "--out") for spec in specs]
    ranks, dev = distributed.setup(device)
    rollouts = Path(rollouts)
    rmanifest, entries = read_rollouts(rollouts)
    require(len(entries) > 0, f"{rollouts / ROLLOUTS} holds no problems")
    # the base and rollouts by content (fingerprint, sha256), their paths relative to the store when in
    # the same project: a moved project resumes and trains from its new place
    fp = fingerprint(base)
    common = {"base_fingerprint": fp, "rollouts_sha256": sha256_file(rollouts / ROLLOUTS)}
    legacy = {"base_model": local_ref(base), "rollouts": local_ref(rollouts)}  # what earlier manifests recorded
    settings = [{"base_model": project_ref(base, out), "rollouts": project_ref(rollouts, out), **common, "K": spec.K,
                 "position_scheme": spec.position_scheme, "dtype": dtype, "model_dtype": model_dtype,
                 "shard_size": shard_size, "hidden_state": HIDDEN_STATE, "adaptive": spec.adaptive}
                for spec, out in zip(specs, outs, strict=True)]
    sampled = rmanifest.get("base_fingerprint")
    if (sampled != fp if sampled and fp else rmanifest.get("base_model") not in
            (None, str(base), local_ref(base), project_ref(base, rollouts))) and ranks.is_main:
        print(f"warning: rollouts were sampled from {rmanifest['base_model']}, extracting with {base}")
    if ranks.is_main:
        for out, setting in zip(outs, settings, strict=True):
            out.mkdir(parents=True, exist_ok=True)
            if (out / MANIFEST).is_file():
                have = read_json(out / MANIFEST, REBUILD)
                require_same_settings(out / MANIFEST, have, comparable(have, setting, legacy), "store")
    distributed.barrier()
    done = [finished_shards(out, setting, legacy) for out, setting in zip(outs, settings, strict=True)]
    n_shards = (len(entries) + shard_size - 1) // shard_size
    mine = [s for s in ranks.units(n_shards) if any(shard_name(s) not in d for d in done)]
    own = [list(d.values()) for d in done]  # each store's progress keeps what it rewrites
    # rank 0 marks the stores that lack shards unfinished meanwhile (a finished one stays so)
    marked = [(out, {**setting, "shards_total": n_shards}) for out, setting, d in zip(outs, settings, done, strict=True)
              if ranks.is_main and any(shard_name(s) not in d for s in range(n_shards))]
    with unfinished(marked, write_manifest):
        if mine:
            model, tokenizer = load_base(base, parse_dtype(model_dtype), trust_remote_code)
            decoder = model_parts(model.to(dev)).decoder
            steps = any(spec.position_scheme == "steps" for spec in specs)
            offsets = task_step_offsets(rmanifest.get("task")) if steps else None
            path = rollouts / ROLLOUTS
            for s in mine:
                todo = [i for i, d in enumerate(done) if shard_name(s) not in d]
                chunk = entries[s * shard_size : (s + 1) * shard_size]
                problems = [rollout_at(path, off, n) for _, off, n in chunk]
                built = build_shards(decoder, tokenizer, problems, [specs[i] for i in todo], batch_size, dev,
                                     STORE_DTYPES[dtype], offsets, str(path))
                for i, (tensors, counts) in zip(todo, built, strict=True):
                    entry = {**write_shard(outs[i], s, tensors), "counts": counts}
                    own[i].append(entry)
                    atomic_write_text(outs[i] / f"progress-rank{ranks.rank}.json",
                                      json.dumps({"settings": settings[i], "shards": own[i]}) + "\n")
                    if on_shard is not None:
                        on_shard(entry)
                if ranks.is_main:
                    counts = built[0][1]
                    print(f"shard {s + 1}/{n_shards}: {counts['problems']} problems, {counts['valid']}/{counts['rollouts']} "
                          f"valid rollouts" + (f", {len(todo)} stores" if len(todo) > 1 else ""), flush=True)
            del model, decoder
        distributed.barrier()
    manifests = []
    if ranks.is_main:
        hidden = hidden_size_of(base, trust_remote_code)
        manifests = [finish_store(out, setting, legacy, rmanifest, n_shards, hidden)
                     for out, setting in zip(outs, settings, strict=True)]
    distributed.barrier()
    return manifests if ranks.is_main else [read_json(out / MANIFEST, REBUILD) for out in outs]


def finish_store(out: Path, settings: dict, legacy: dict, rmanifest: dict, n_shards: int, hidden: int) -> dict:
    """Rank 0, after every rank is done: merge the progress files and write the manifest (last)."""
    done = finished_shards(out, settings, legacy)
    names = [shard_name(s) for s in range(n_shards)]
    missing = [n for n in names if n not in done]
    require(not missing, f"{out}: shards {missing[:3]} were not written; rerun `qthink teachers`")
    shards = [done[n] for n in names]
    counts = {key: sum(e["counts"][key] for e in shards) for key in COUNT_KEYS}
    steps: Counter[int] = Counter()
    for e in shards:
        steps.update({int(n): c for n, c in e["counts"]["num_steps"].items()})
    counts["num_steps"] = {str(n): steps[n] for n in sorted(steps)}  # problems per number of latent steps
    without = [i for e in shards for i in e["counts"]["problems_without_valid"]]
    G = rmanifest.get("G") or max(e["counts"]["max_rollouts"] for e in shards)
    manifest = {**settings, "hidden_size": hidden, "G": G, "task": rmanifest.get("task"),
                "split": rmanifest.get("split"), "counts": counts, "problems_without_valid": without,
                "shards": [{k: e[k] for k in ("file", "rows", "sha256")} for e in shards]}
    atomic_write_text(out / PROGRESS, json.dumps({"settings": settings, "shards": shards}) + "\n")
    for path in out.glob("progress-rank*.json"):
        path.unlink()
    remove_stale_temp_files(out)  # a killed run's shards-in-progress; a live run's or a user's .tmp stays
    write_manifest(out, manifest)
    return read_json(out / MANIFEST, REBUILD)


def summary_lines(manifest: dict, seconds: float | None = None) -> list[str]:
    c = manifest["counts"]
    took = f" in {seconds:.1f}s ({c['valid'] / max(seconds, 1e-9):.1f} rollouts/s)" if seconds else ""
    lines = [f"teacher store: {c['problems']} problems, K={manifest['K']}, H={manifest['hidden_size']}, "
             f"{manifest['position_scheme']} positions, {manifest['dtype']}, {len(manifest['shards'])} shards{took}",
             f"rollouts: {c['rollouts']} total, {c['valid']} valid ({c['correct_valid']} correct), excluded "
             f"{c['excluded_unclosed']} without a closed think block and {c['excluded_empty']} with an empty one",
             f"problems: {c['weighted_valid']} with a correct valid rollout (weighted_valid)"]
    if manifest.get("adaptive"):
        lines.append("latent steps per problem (adaptive): " + ", ".join(f"{n}: {c}" for n, c in c["num_steps"].items()))
    if c["without_valid"]:
        shown = ", ".join(map(str, manifest["problems_without_valid"][:20])) + (" ..." if c["without_valid"] > 20 else "")
        lines.append(f"warning: {c['without_valid']} problems have no valid rollout (kept with num_valid 0 and "
                     f"zero targets): {shown}")
    return lines


# ---- the `qthink teachers` subcommand ----

COMMAND = SignatureCommand(build_teachers, skip=frozenset({"on_shard"}), aliases={"-K": "--K"})


def cli_main(settings: dict) -> int:
    start = time.perf_counter()
    try:
        with claim(settings["out"], "teachers", "--out") if distributed.env_ranks().is_main else nullcontext():
            manifest = build_teachers(**settings)
    finally:
        distributed.teardown()
    if distributed.env_ranks().is_main:
        print("\n".join(summary_lines(manifest, time.perf_counter() - start)))
    return 0
