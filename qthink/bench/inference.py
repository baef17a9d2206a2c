"""`qthink bench`: how fast the latent loop is against the seed's recipe and the alternatives.

    qthink bench inference [--model tiny|DIR] [--batch-sizes 1,8,32,64] [--problems N] [--json OUT]
    qthink bench train | teachers | all          (training step / teacher extraction / all three)
    qthink bench gpu [--small]                   (Qwen3-1.7B shape, random weights, CUDA; `bench_gpu`)

`inference` runs on the same synthetic test questions, in one process, all greedy with the same budgets:
- `seed`:    the seed's published recipe, one question at a time (`qthink.bench.seed_recipe`), the baseline;
- `nocache`: Coconut-style recompute (batch 1, no KV cache: every step re-runs the whole prefix);
- `qthink`:  the batched latent loop (`QThink.generate`) at each batch size, in each `--decode-modes` mode
             (`dynamic`, `static`, `compiled`: see `qthink.core.latent`; rows carry `decode_mode`);
- `think`:   the base model with its visible chain of thought (K = 0, `enable_thinking=True`), batched
             at the largest batch size.
Timings are `time.perf_counter` medians over repeats after one warm-up call per system; every system
returns host-side token lists, so GPU work is finished when the clock stops. qthink rows say whether
their tokens equal the seed's, question by question, and what one latent pass and one decoding pass cost
at that batch (`latent_pass_ms`, `decode_pass_ms`, `pass_ratio`: see `pass_times`).
"""

import inspect
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qthink.arguments import CommandGroup, SignatureCommand, comma_ints, parse_decode_modes
from qthink.bench.seed_recipe import seed_generate
from qthink.core.device import parse_dtype
from qthink.core.latent import ProjectionHead, decode, model_parts, think
from qthink.core.model import HEAD_PT, HEAD_ST, QThink, init_checkpoint
from qthink.core.sequences import encode_prompts, left_pad
from qthink.errors import require
from qthink.measure import sync, timed, write_json
from qthink.recipe import SEED
from qthink.tables import records_table

SYSTEMS = ("seed", "nocache", "qthink", "think")


# ---- models ----


def spread_weights(module: nn.Module, seed: int) -> nn.Module:
    """Redraw every matrix (linear weights, embeddings) at std 2/sqrt(fan_in), in place.

    A default-initialised tiny Qwen3 (std 0.02) has nearly flat logits whose argmax is the same token
    whatever the prompt: greedy decoding repeats it, never stops at EOS, and a prompt, mask or position
    error leaves the output unchanged. At 2/sqrt(fan_in) every layer amplifies its inputs, so the next
    token depends on every attended position: benchmarks decode varied text with some EOS stops, and
    token-equality checks see any difference in what the model attends to.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * (2.0 / math.sqrt(p.shape[1])))
    return module


def tiny_qthink(workdir: str | Path, seed: int = 0, latent_steps: int = SEED.latent_steps) -> QThink:
    """The tiny base (`qthink.core.tiny`) wrapped by `init_checkpoint`, weights spread (see `spread_weights`)."""
    from qthink.core.tiny import build_tiny_base

    workdir = Path(workdir)
    base = build_tiny_base(workdir / "base", seed, force=True)  # the benchmark's own folder
    ckpt = init_checkpoint(str(base), workdir / "ckpt", seed, latent_steps)
    qt = QThink.from_pretrained(ckpt, torch.float32)
    spread_weights(qt.model, seed)
    spread_weights(qt.head, seed + 1)
    return qt


def load_bench_model(spec: str, workdir: Path, dtype: torch.dtype | None, device: torch.device) -> QThink:
    """`tiny`, a seed-format checkpoint, or a base model (given a fresh head, seed 0, for K > 0)."""
    if spec == "tiny":
        return tiny_qthink(workdir).to(device)
    path = Path(spec)
    if (path / HEAD_ST).is_file() or (path / HEAD_PT).is_file():
        return QThink.from_pretrained(spec, dtype, device)
    qt = QThink.for_base(spec, dtype, device)
    torch.manual_seed(0)
    qt.head = ProjectionHead(qt.model.config.hidden_size).to(device, qt.model.dtype).eval()
    qt.latent_steps = SEED.latent_steps
    return qt


# ---- (b) the no-cache recipe: only what differs from the shared loop ----


@torch.inference_mode()
def nocache_generate(model: nn.Module, tokenizer, head: nn.Module, question: str, latent_steps: int,
                     max_new_tokens: int) -> list[int]:
    """Coconut's inference, batch 1 without a KV cache: each latent step and each answer token re-runs the
    decoder over the whole prefix (prompt embeddings + latents + tokens so far), so a step costs O(length).

    This is a separate loop on purpose: it is the baseline the cached loop (`qthink.core.latent`) replaces, and
    the one thing it must not share with it is the cache.
    """
    decoder, lm_head, embed = model_parts(model)
    ids = torch.tensor([encode_prompts(tokenizer, [question])[0]], device=lm_head.weight.device)
    embeds = embed(ids)
    hidden = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
    for _ in range(latent_steps):
        embeds = torch.cat([embeds, head(hidden).to(embeds.dtype)[:, None]], 1)
        hidden = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = lm_head(hidden).argmax(-1)
        tokens.append(int(token))
        if tokens[-1] == tokenizer.eos_token_id or len(tokens) == max_new_tokens:
            break
        embeds = torch.cat([embeds, embed(token)[:, None]], 1)
        hidden = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
    return tokens


# ---- measuring ----

PASSES = 32  # steps per pass measurement: enough that they, not the shared prefill, dominate each timed run


@torch.inference_mode()
def pass_times(qt: QThink, questions: list[str], decode_mode: str = "dynamic", passes: int = PASSES,
               repeats: int = 3) -> tuple[float, float]:
    """(ms of one latent pass, ms of one decoding pass) of `qt` on `questions` as one batch, at the same cache
    lengths: three runs of the real loop from the same prefill, timed in turn `repeats` times, `think` with
    K = 0 then `decode` of 1 token (P), `think` with K = `passes` then 1 token (L), and K = 0 then `passes` + 1
    tokens with no EOS, so every row decodes them all (D). Each of P, L, D is its fastest run; a latent
    pass is (L - P) / passes (head + one decoder step), a decoding pass (D - P) / passes (LM head, argmax,
    bookkeeping, embedding + one decoder step); the capacity (prompt + passes + 1) is the same in all three."""
    tok = qt.tokenizer
    qt.check_request([len(p) for p in encode_prompts(tok, questions)], passes, 1)
    batch = left_pad(encode_prompts(tok, questions), tok.pad_token_id, qt.device)

    def run(latent_steps: int, tokens: int) -> float:
        began = time.perf_counter()
        state = think(qt.model, qt.head, batch.input_ids, batch.attention_mask, latent_steps,
                      passes + 1 - latent_steps, decode_mode)
        decode(qt.model, state, tokens, -1, tok.pad_token_id)  # -1: no token stops a row
        sync(qt.device)
        return time.perf_counter() - began

    shapes = ((0, 1), (passes, 1), (0, passes + 1))
    for shape in shapes:  # warm-up (and, for `compiled`, compilation)
        run(*shape)
    times: list[list[float]] = [[], [], []]
    for _ in range(max(1, repeats)):  # interleaved, so a slow spell of the machine touches all three
        for i, shape in enumerate(shapes):
            times[i].append(run(*shape))
    # each run's fastest time, as timeit advises (interference only adds time); single measurements still spread
    # 0.9-1.5x on this project's virtual machine, so compare several runs (docs/findings.md, F26)
    prefill, latents, tokens = (min(t) for t in times)
    return 1000 * (latents - prefill) / passes, 1000 * (tokens - prefill) / passes



def bench_row(system: str, batch_size: int, seconds: float, tokens: list[list[int]]) -> dict:
    n, total = len(tokens), sum(map(len, tokens))
    return {"system": system, "batch_size": batch_size, "problems": n, "seconds": seconds,
            "problems_per_s": n / seconds, "tokens_per_s": total / seconds, "seconds_per_problem": seconds / n,
            "mean_tokens": total / n}


def inference_runs(qt: QThink, batch_sizes: list[int], latent_steps: int, max_new_tokens: int,
                   decode_modes: tuple[str, ...] = ("dynamic",)) -> dict:
    """(system, batch size, decode mode or None) -> a function of the questions returning their token-id lists."""
    k, n = latent_steps, max_new_tokens

    def batched(b: int, steps: int, mode: str = "dynamic", thinking: bool = False) -> Callable[[list[str]], list]:
        return lambda qs: [r["token_ids"] for r in qt.generate(qs, steps, n, b, enable_thinking=thinking,
                                                               decode_mode=mode)]

    return {
        ("seed", 1, None): lambda qs: [seed_generate(qt.model, qt.tokenizer, qt.head, q, k, n) for q in qs],
        ("nocache", 1, None): lambda qs: [nocache_generate(qt.model, qt.tokenizer, qt.head, q, k, n) for q in qs],
        **{("qthink", b, mode): batched(b, k, mode) for mode in decode_modes for b in batch_sizes},
        ("think", max(batch_sizes), decode_modes[0]): batched(max(batch_sizes), 0, decode_modes[0], thinking=True),
    }


def bench_inference(qt: QThink, questions: list[str], batch_sizes: list[int], latent_steps: int = SEED.latent_steps,
                    max_new_tokens: int = 64, repeats: int = 3, systems: tuple[str, ...] = SYSTEMS,
                    decode_modes: tuple[str, ...] = ("dynamic",)) -> list[dict]:
    """One row per (system, batch size[, decode mode]); `speedup_vs_seed` is the seed's seconds over the row's."""
    require(len(questions) > 0, "no questions to benchmark")
    require(all(b > 0 for b in batch_sizes), f"batch sizes must be > 0 (got {batch_sizes})")
    rows, reference = [], None
    for (system, b, mode), run in inference_runs(qt, batch_sizes, latent_steps, max_new_tokens, decode_modes).items():
        if system not in systems:
            continue
        # warm-up on every batch shape the timed runs will see (the last batch may be smaller): first-call
        # allocations, lazy imports, kernel choice and, for `compiled`, compilation
        run(questions[:b])
        if len(questions) % b:
            run(questions[-(len(questions) % b):])
        seconds, tokens = timed(lambda run=run: run(questions), repeats)
        row = bench_row(system, b, seconds, tokens)
        if mode is not None:
            row["decode_mode"] = mode
        if system == "seed":
            reference = tokens
        elif system in ("qthink", "nocache") and reference is not None:
            row["identical_to_seed"] = tokens == reference
        if system == "qthink" and qt.head is not None:
            latent_ms, decode_ms = pass_times(qt, questions[:b], mode, repeats=max(5, repeats))
            row.update(latent_pass_ms=latent_ms, decode_pass_ms=decode_ms, pass_ratio=latent_ms / decode_ms)
        rows.append(row)
    seed_seconds = next((r["seconds"] for r in rows if r["system"] == "seed"), None)
    for row in rows:
        row.update(latent_steps=0 if row["system"] == "think" else latent_steps, max_new_tokens=max_new_tokens,
                   device=str(qt.device), threads=torch.get_num_threads())
        if seed_seconds is not None:
            row["speedup_vs_seed"] = seed_seconds / row["seconds"]
    return rows


# ---- the other benches (their owners' modules, imported when asked for) ----


def flatten_result(bench: str, result: dict | list) -> list[dict]:
    """Rows from another bench's result: a list of rows as is; a dict's nested dicts as one row each
    (named `bench:key`) carrying the dict's scalar fields; a flat dict as one row."""
    if isinstance(result, list):
        return [{"bench": bench, **r} for r in result]
    scalars = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
    nested = {k: v for k, v in result.items() if isinstance(v, dict)}
    if not nested:
        return [{"bench": bench, "system": bench, **scalars}]
    return [{"bench": bench, "system": f"{bench}:{k}", **scalars, **v} for k, v in nested.items()]


def teacher_store(base_dir: Path, work: Path, device: str | None) -> Path:
    """A small teacher store for `bench train`: the synthetic task's reference rollouts, extracted."""
    from qthink.teachers.extract import build_teachers
    from qthink.teachers.rollouts import write_reference_rollouts

    rollouts = write_reference_rollouts(str(base_dir), work / "rollouts", n=16, G=2)
    build_teachers(str(base_dir), rollouts, work / "teachers", K=SEED.latent_steps, dtype="float32", device=device)
    return work / "teachers"


def run_other(bench: str, base_dir: Path, work: Path, device: str | None, store: str | None = None) -> list[dict]:
    """`bench_teachers` (qthink.bench.teachers) or `bench_train` (qthink.bench.train) on `base_dir`."""
    if bench == "teachers":
        from qthink.bench.teachers import bench_teachers

        return flatten_result(bench, bench_teachers(str(base_dir), device=device))
    from qthink.bench.train import bench_train

    store = store or str(teacher_store(base_dir, work, device))
    return flatten_result(bench, bench_train(str(base_dir), store, device=device))


# ---- output ----


INFERENCE_COLUMNS = ["system", "batch_size", "decode_mode", "problems_per_s", "tokens_per_s", "seconds_per_problem",
                     "mean_tokens", "speedup_vs_seed", "identical_to_seed", "latent_pass_ms", "decode_pass_ms",
                     "pass_ratio"]


# ---- CLI ----


def parse_ints(text: str, flag: str) -> list[int]:
    values = comma_ints(text, flag)
    require(values and all(v > 0 for v in values), f"{flag} needs positive integers (got {text!r})")
    return values


def inference_main(qt: QThink, batch_sizes: str, problems: int, max_new_tokens: int, latent_steps: int, repeats: int,
                   systems: str, decode_modes: str) -> list[dict]:
    from qthink.tasks import get_task

    chosen = tuple(s.strip() for s in systems.split(","))
    require(set(chosen) <= set(SYSTEMS), f"--systems: unknown {sorted(set(chosen) - set(SYSTEMS))}; use {SYSTEMS}")
    modes = parse_decode_modes(decode_modes)
    require(problems > 0, f"--problems must be > 0 (got {problems})")
    require(repeats > 0, f"--repeats must be > 0 (got {repeats})")
    qt.check_request([1], latent_steps, max_new_tokens)
    questions = [r["question"] for r in get_task("synthetic").load("test", n=problems)]
    rows = bench_inference(qt, questions, parse_ints(batch_sizes, "--batch-sizes"), latent_steps, max_new_tokens,
                           repeats, chosen, modes)
    return [{"bench": "inference", **r} for r in rows]


def run_bench(what: str = "inference", model: str = "tiny", json: str | None = None, dtype: str = "auto",
              device: str | None = None, store: str | None = None, threads: int | None = None,
              batch_sizes: str = "1,8,32,64", problems: int = 64, max_new_tokens: int = 64,
              latent_steps: int = SEED.latent_steps, repeats: int = 3, systems: str = ",".join(SYSTEMS),
              decode_modes: str = "dynamic") -> list[dict]:
    """`qthink bench inference|train|teachers|all`: the rows of those benches, printed as one table.

    Args:
        what: inference | train | teachers | all
        model: tiny (built here, weights spread) | checkpoint or base DIR
        json: write the rows to this JSON file
        dtype: float32 | bfloat16 | float16 | auto
        device: cpu | cuda (default: cuda if available)
        store: bench train: teacher store (default: built from the model)
        threads: torch CPU threads (default: 1 for a small model on CPU)
        batch_sizes: comma-separated qthink batch sizes
        problems: synthetic test questions
        max_new_tokens: answer token budget, every system
        latent_steps: K for seed, nocache and qthink
        repeats: timed runs per system (median reported)
        systems: subset of seed,nocache,qthink,think
        decode_modes: qthink decode modes to time, comma-separated: dynamic,static,compiled
    """
    from qthink.core.device import pick_device
    from qthink.parallel import choose_threads

    pick = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="qthink-bench-") as tmp:
        qt = load_bench_model(model, Path(tmp), parse_dtype(dtype), pick)
        choose_threads(qt.device, qt.model.config, threads)
        base_dir = Path(tmp) / "base" if model == "tiny" else Path(model)
        rows = (inference_main(qt, batch_sizes, problems, max_new_tokens, latent_steps, repeats, systems, decode_modes)
                if what in ("inference", "all") else [])
        for bench in ("train", "teachers"):
            if what in (bench, "all"):
                rows += run_other(bench, base_dir, Path(tmp), device, store)
    print(records_table(rows, INFERENCE_COLUMNS if what == "inference" else None))
    write_json(rows, json)
    return rows


def _commands() -> dict:
    from qthink.bench.gpu import bench_gpu

    inference_only = frozenset(list(inspect.signature(run_bench).parameters)[7:])  # batch_sizes ... decode_modes
    everything = SignatureCommand(run_bench, skip=frozenset({"what"}))
    common = SignatureCommand(run_bench, skip=frozenset({"what"}) | inference_only)
    return {"inference": (everything, "seed vs nocache vs qthink vs think"),
            "train": (common, "training step, batched vs 1 x B (qthink.bench.train)"),
            "teachers": (common, "teacher extraction (qthink.bench.teachers)"),
            "all": (everything, "inference, train and teachers: one table"),
            "gpu": (SignatureCommand(bench_gpu, aliases={"--config": "--model_config"}),
                    "Qwen3-1.7B shape on a CUDA GPU (--small: CPU smoke test)")}


COMMAND = CommandGroup(_commands())


def cli_main(settings: dict) -> None:
    if settings["what"] == "gpu":
        from qthink.bench.gpu import bench_gpu

        settings.pop("what")
        bench_gpu(**settings)
    else:
        run_bench(**settings)
