"""`qthink bench`: how fast the latent loop is against the seed's recipe and the alternatives.

    qthink bench inference [--model tiny|DIR] [--batch-sizes 1,8,32,64] [--problems N] [--json OUT]
    qthink bench train | teachers | all          (training step / teacher extraction / all three)
    qthink bench gpu [--small]                   (Qwen3-1.7B shape, random weights, CUDA; `gpu_main`)

`inference` runs on the same synthetic test questions, in one process, all greedy with the same budgets:
- `seed`:    the seed's published recipe, one question at a time (`qthink.seed_recipe`), the baseline;
- `nocache`: Coconut-style recompute (batch 1, no KV cache: every step re-runs the whole prefix);
- `qthink`:  the batched latent loop (`QThink.generate`) at each batch size;
- `think`:   the base model with its visible chain of thought (K = 0, `enable_thinking=True`), batched
             at the largest batch size.
Timings are `time.perf_counter` medians over repeats after one warm-up call per system; every system
returns host-side token lists, so GPU work is finished when the clock stops. qthink rows say whether
their tokens equal the seed's, question by question.
"""

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qthink.errors import UserError, require
from qthink.latent import ProjectionHead, model_parts
from qthink.model import HEAD_PT, HEAD_ST, QThink, encode_prompts, init_checkpoint, parse_dtype
from qthink.seed_recipe import seed_generate

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


def tiny_qthink(workdir: str | Path, seed: int = 0, latent_steps: int = 6) -> QThink:
    """The tiny base (`qthink.tiny`) wrapped by `init_checkpoint`, weights spread (see `spread_weights`)."""
    from qthink.tiny import build_tiny_base

    workdir = Path(workdir)
    base = build_tiny_base(workdir / "base", seed)
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
    qt.latent_steps = 6
    return qt


# ---- (b) the no-cache recipe: only what differs from the shared loop ----


@torch.inference_mode()
def nocache_generate(model: nn.Module, tokenizer, head: nn.Module, question: str, latent_steps: int,
                     max_new_tokens: int) -> list[int]:
    """Coconut's inference, batch 1 without a KV cache: each latent step and each answer token re-runs the
    decoder over the whole prefix (prompt embeddings + latents + tokens so far), so a step costs O(length).

    This is a separate loop on purpose: it is the baseline the cached loop (`qthink.latent`) replaces, and
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


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall seconds of `repeats` calls of `fn` and the last call's result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_row(system: str, batch_size: int, seconds: float, tokens: list[list[int]]) -> dict:
    n, total = len(tokens), sum(map(len, tokens))
    return {"system": system, "batch_size": batch_size, "problems": n, "seconds": seconds,
            "problems_per_s": n / seconds, "tokens_per_s": total / seconds, "seconds_per_problem": seconds / n,
            "mean_tokens": total / n}


def inference_runs(qt: QThink, batch_sizes: list[int], latent_steps: int, max_new_tokens: int) -> dict:
    """(system, batch size) -> a function of the questions returning their token-id lists."""
    k, n = latent_steps, max_new_tokens

    def batched(b: int, steps: int, thinking: bool = False) -> Callable[[list[str]], list[list[int]]]:
        return lambda qs: [r["token_ids"] for r in qt.generate(qs, steps, n, b, enable_thinking=thinking)]

    return {
        ("seed", 1): lambda qs: [seed_generate(qt.model, qt.tokenizer, qt.head, q, k, n) for q in qs],
        ("nocache", 1): lambda qs: [nocache_generate(qt.model, qt.tokenizer, qt.head, q, k, n) for q in qs],
        **{("qthink", b): batched(b, k) for b in batch_sizes},
        ("think", max(batch_sizes)): batched(max(batch_sizes), 0, thinking=True),
    }


def bench_inference(qt: QThink, questions: list[str], batch_sizes: list[int], latent_steps: int = 6,
                    max_new_tokens: int = 64, repeats: int = 3, systems: tuple[str, ...] = SYSTEMS) -> list[dict]:
    """One row per (system, batch size); `speedup_vs_seed` is the seed's seconds over the row's."""
    require(len(questions) > 0, "no questions to benchmark")
    require(all(b > 0 for b in batch_sizes), f"batch sizes must be > 0 (got {batch_sizes})")
    rows, reference = [], None
    for (system, b), run in inference_runs(qt, batch_sizes, latent_steps, max_new_tokens).items():
        if system not in systems:
            continue
        run(questions[:b])  # warm-up: first-call allocations, lazy imports, kernel choice
        seconds, tokens = timed(lambda run=run: run(questions), repeats)
        row = bench_row(system, b, seconds, tokens)
        if system == "seed":
            reference = tokens
        elif system in ("qthink", "nocache") and reference is not None:
            row["identical_to_seed"] = tokens == reference
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
    build_teachers(str(base_dir), rollouts, work / "teachers", K=6, dtype="float32", device=device)
    return work / "teachers"


def run_other(bench: str, base_dir: Path, work: Path, device: str | None, store: str | None = None) -> list[dict]:
    """`bench_teachers` (qthink.teachers.extract) or `bench_train` (qthink.train_bench) on `base_dir`."""
    if bench == "teachers":
        from qthink.teachers.extract import bench_teachers

        return flatten_result(bench, bench_teachers(str(base_dir), device=device))
    from qthink.train_bench import bench_train

    store = store or str(teacher_store(base_dir, work, device))
    return flatten_result(bench, bench_train(str(base_dir), store, device=device))


# ---- bench gpu: a Qwen3-1.7B-shaped model with random weights (the GPU machine has no network) ----

QWEN3_1P7B = Path(__file__).resolve().parents[1] / "configs" / "qwen3-1.7b" / "model.json"
# Dense bf16 tensor-core peaks (no sparsity); more specific names first. Other cards: --peak-tflops.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
SMALL = {"batch_size": 2, "prompt_tokens": 32, "answer_tokens": 8, "latent_steps": 6, "lora_r": 4, "steps": 1,
         "infer_batch": 4, "infer_prompt_tokens": 16, "infer_new_tokens": 8}


def train_flops(config, batch: int, prompt: int, latents: int, answer: int) -> tuple[float, float]:
    """(model FLOPs of one LoRA training step, the same counted PaLM-style as 3 x forward).

    Forward: 2 FLOPs per weight per token for the block projections, causal attention (QK^T and AV over
    the keys each query sees) and the LM head over answer tokens only (`answer_loss`). Backward of frozen
    weights needs input gradients only (1 x forward); attention needs dQ, dK and dV (2 x forward). LoRA's
    rank-r matmuls (a few % at r=32) and the head's are left out, and so is recomputation.
    """
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_token = 2 * layers * (2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * config.intermediate_size)
    seq = prompt + latents + answer
    attention = 4 * layers * heads * head_dim * seq * (seq + 1) / 2
    lm_head = 2 * h * vocab * answer
    linear = seq * per_token + lm_head
    return batch * (2 * linear + 3 * attention), batch * 3 * (linear + attention)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if all(part in name for part in k.split())), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_random_base(config, out: Path, dtype: torch.dtype, device: torch.device) -> Path:
    """A loadable model directory with random weights of `config`'s shape (tokenizer: the tiny one's)."""
    from transformers import AutoModelForCausalLM

    from qthink.tiny import build_tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: 1.7B normal_ draws on a CPU take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    build_tokenizer(0).save_pretrained(out)
    return out


def latent_inference(base: Path, device: torch.device, dtype: torch.dtype, batch: int, prompt: int,
                     new_tokens: int, latent_steps: int) -> dict:
    """Throughput of `qthink.latent.generate` (prompt -> K latents -> answer) on random prompts; EOS is
    never matched, so every row decodes `new_tokens`."""
    from qthink.latent import generate, think
    from qthink.model import load_base

    model, _ = load_base(str(base), dtype)
    model.to(device)
    head = ProjectionHead(model.config.hidden_size).to(device, dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    ids, mask = ids.to(device), torch.ones(batch, prompt, dtype=torch.long, device=device)

    def run(n: int) -> None:
        generate(model, head, ids, mask, latent_steps, n, eos_token_id=-1, pad_token_id=0)
        sync(device)

    def prefill() -> None:
        with torch.inference_mode():
            think(model, head, ids, mask, latent_steps, reserve=new_tokens)
        sync(device)

    run(2)  # warm-up
    think_s, _ = timed(prefill, 2)
    seconds, _ = timed(lambda: run(new_tokens), 2)
    return {"system": "latent-inference", "batch_size": batch, "prompt_tokens": prompt, "latent_steps": latent_steps,
            "new_tokens": new_tokens, "seconds": seconds, "prefill_latent_seconds": think_s,
            "problems_per_s": batch / seconds, "tokens_per_s": batch * new_tokens / seconds,
            "decode_tokens_per_s": batch * new_tokens / max(seconds - think_s, 1e-9)}


def training_step_speed(base: Path, device: torch.device, batch: int, prompt: int, answer: int, latent_steps: int,
                        lora_r: int, steps: int, peak: float | None) -> dict:
    """Tokens/s and MFU of the training step `QThinkModule.compute_losses` + backward + AdamW on random
    data, under bf16 autocast on CUDA (the Trainer's bf16-mixed: float32 weights, bf16 matmuls)."""
    import contextlib

    from qthink.module import LoraArgs, QThinkModule

    module = QThinkModule(str(base), lora=LoraArgs(r=lora_r, alpha=max(1, lora_r // 2)), latent_steps=latent_steps)
    module.configure_model()
    module.to(device).train()
    config = module.model.config
    g = torch.Generator().manual_seed(0)
    answer_ids = torch.randint(0, config.vocab_size, (batch, answer), generator=g)
    data = {"prompt_ids": torch.randint(0, config.vocab_size, (batch, prompt), generator=g),
            "prompt_mask": torch.ones(batch, prompt, dtype=torch.long), "answer_ids": answer_ids,
            "answer_mask": torch.ones(batch, answer, dtype=torch.long), "labels": answer_ids.clone(),
            "teacher_uniform": torch.randn(batch, latent_steps, config.hidden_size, generator=g),
            "num_valid": torch.full((batch,), 4), "weighted_valid": torch.ones(batch, dtype=torch.bool)}
    data = {k: v.to(device) for k, v in data.items()}
    data["teacher_weighted"] = data["teacher_uniform"]
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=2e-4)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = module.compute_losses(data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)

    step(), step()  # warm-up: allocator, kernel choice, AdamW state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, _ = timed(step, steps)
    flops, palm_flops = train_flops(config, batch, prompt, latent_steps, answer)
    tokens = batch * (prompt + latent_steps + answer)
    row = {"system": "train-step", "batch_size": batch, "prompt_tokens": prompt, "latent_steps": latent_steps,
           "answer_tokens": answer, "lora_r": lora_r, "seconds": seconds, "tokens_per_s": tokens / seconds,
           "tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / (peak * 1e12) if peak else None,
           "mfu_palm": palm_flops / seconds / (peak * 1e12) if peak else None}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def add_gpu_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(QWEN3_1P7B), help="config.json giving the model shape")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--answer-tokens", type=int, default=256)
    p.add_argument("--latent-steps", type=int, default=6)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--infer-batch", type=int, default=64)
    p.add_argument("--infer-prompt-tokens", type=int, default=256)
    p.add_argument("--infer-new-tokens", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=None, help="card's dense bf16 peak (default: known cards)")
    p.add_argument("--small", action="store_true", help="tiny shape and sizes; runs on CPU (smoke test)")
    p.add_argument("--json", default=None, help="output JSON (default: $OUT/bench_gpu.json when $OUT is set)")


def gpu_main(args) -> None:
    import os

    from transformers import AutoConfig

    from qthink.tiny import tiny_config

    require(args.small or torch.cuda.is_available(), "qthink bench gpu needs a CUDA GPU and torch sees none "
            "(torch.cuda.is_available() is False); run `qthink bench gpu --small` for a CPU smoke test")
    sizes = SMALL if args.small else {k: getattr(args, k) for k in SMALL}
    require(all(v > 0 for v in sizes.values()), f"bench gpu sizes must be > 0 (got {sizes})")
    if args.small:
        config = tiny_config(512)
    else:
        require(Path(args.config).is_file(), f"{args.config}: no such config file; pass --config model.json")
        config = AutoConfig.for_model(**json.loads(Path(args.config).read_text()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # the tiny shape: see qthink.evaluate.choose_threads
    peak = args.peak_tflops or peak_tflops(device)
    with tempfile.TemporaryDirectory(prefix="qthink-bench-gpu-") as tmp:
        base = write_random_base(config, Path(tmp), dtype, device)
        rows = [latent_inference(base, device, dtype, sizes["infer_batch"], sizes["infer_prompt_tokens"],
                                 sizes["infer_new_tokens"], sizes["latent_steps"])]
        rows.append(training_step_speed(base, device, sizes["batch_size"], sizes["prompt_tokens"],
                                        sizes["answer_tokens"], sizes["latent_steps"], sizes["lora_r"],
                                        sizes["steps"], peak))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for row in rows:
        row.update(bench="gpu", device=name, dtype=str(dtype).removeprefix("torch."), peak_tflops=peak,
                   hidden_size=config.hidden_size, layers=config.num_hidden_layers)
    print(markdown_table(rows))
    out = args.json or (str(Path(os.environ["OUT"]) / "bench_gpu.json") if os.environ.get("OUT") else None)
    write_json(rows, out)


# ---- output ----


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of `rows` over `columns` (default: every scalar key, in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, dict | list)))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


INFERENCE_COLUMNS = ["system", "batch_size", "problems_per_s", "tokens_per_s", "seconds_per_problem",
                     "mean_tokens", "speedup_vs_seed", "identical_to_seed"]


def write_json(rows: list[dict] | dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {path}")


# ---- CLI ----


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="{inference,train,teachers,all,gpu}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="tiny", help="tiny (built here, weights spread) | checkpoint or base DIR")
    common.add_argument("--json", help="write the rows to this JSON file")
    common.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto")
    common.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    common.add_argument("--store", default=None, help="bench train: teacher store (default: built from the model)")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for a small model on CPU)")
    infer = argparse.ArgumentParser(add_help=False)
    infer.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated qthink batch sizes")
    infer.add_argument("--problems", type=int, default=64, help="synthetic test questions")
    infer.add_argument("--max-new-tokens", type=int, default=64, help="answer token budget, every system")
    infer.add_argument("--latent-steps", type=int, default=6, help="K for seed, nocache and qthink")
    infer.add_argument("--repeats", type=int, default=3, help="timed runs per system (median reported)")
    infer.add_argument("--systems", default=",".join(SYSTEMS), help="subset of " + ",".join(SYSTEMS))
    sub.add_parser("inference", parents=[common, infer], help="seed vs nocache vs qthink vs think")
    sub.add_parser("train", parents=[common], help="training step, batched vs 1 x B (qthink.train_bench)")
    sub.add_parser("teachers", parents=[common], help="teacher extraction (qthink.teachers.extract)")
    sub.add_parser("all", parents=[common, infer], help="inference, train and teachers: one table")
    add_gpu_arguments(sub.add_parser("gpu", help="Qwen3-1.7B shape on a CUDA GPU (--small: CPU smoke test)"))


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise UserError(f"{flag} takes comma-separated integers (got {text!r})") from e
    require(values and all(v > 0 for v in values), f"{flag} needs positive integers (got {text!r})")
    return values


def inference_main(args, qt: QThink) -> list[dict]:
    from qthink.tasks import get_task

    systems = tuple(s.strip() for s in args.systems.split(","))
    require(set(systems) <= set(SYSTEMS), f"--systems: unknown {sorted(set(systems) - set(SYSTEMS))}; use {SYSTEMS}")
    require(args.problems > 0, f"--problems must be > 0 (got {args.problems})")
    require(args.repeats > 0, f"--repeats must be > 0 (got {args.repeats})")
    qt.check_request([1], args.latent_steps, args.max_new_tokens)
    questions = [r["question"] for r in get_task("synthetic").load("test", n=args.problems)]
    rows = bench_inference(qt, questions, parse_ints(args.batch_sizes, "--batch-sizes"), args.latent_steps,
                           args.max_new_tokens, args.repeats, systems)
    return [{"bench": "inference", **r} for r in rows]


def cli_main(args) -> None:
    from qthink.compat import default_device

    if args.what == "gpu":
        return gpu_main(args)
    from qthink.evaluate import choose_threads

    device = torch.device(args.device) if args.device else default_device()
    with tempfile.TemporaryDirectory(prefix="qthink-bench-") as tmp:
        qt = load_bench_model(args.model, Path(tmp), parse_dtype(args.dtype), device)
        choose_threads(qt, args.threads)
        base_dir = Path(tmp) / "base" if args.model == "tiny" else Path(args.model)
        rows = inference_main(args, qt) if args.what in ("inference", "all") else []
        for bench in ("train", "teachers"):
            if args.what in (bench, "all"):
                rows += run_other(bench, base_dir, Path(tmp), args.device, args.store)
    columns = INFERENCE_COLUMNS if args.what == "inference" else None
    print(markdown_table(rows, columns))
    write_json(rows, args.json)
