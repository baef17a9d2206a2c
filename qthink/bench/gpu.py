"""`qthink bench gpu`: training-step throughput/MFU and latent-inference throughput of a Qwen3-1.7B-shaped
model with random weights (the GPU machines have no network, so no real weights), bf16 on CUDA.

    qthink bench gpu [--batch-size 8] [--json OUT]      (default JSON: $OUT/bench_gpu.json)
    qthink bench gpu --small                            (tiny shape on CPU: a smoke test for the suite)

Training goes through the real code path (`QThinkModule.configure_model` + `compute_losses` + backward,
LoRA r=32 + head) at prompt 1024 / K=6 / answer 256; inference through `qthink.core.latent.generate` at batch 64, once
per `--decode-modes` mode (default `dynamic,compiled`: the growing cache, and the static cache under
torch.compile with CUDA graphs), each row saying how many of its tokens equal the first mode's.
"""

import tempfile
from pathlib import Path

import torch

from qthink.arguments import PositiveFinite, parse_decode_modes
from qthink.core.device import default_device
from qthink.core.latent import ProjectionHead
from qthink.errors import require
from qthink.files import read_json
from qthink.measure import sync, timed, timed_call, train_flops, write_json
from qthink.parallel import choose_threads
from qthink.recipe import SEED
from qthink.shipped import config_file
from qthink.tables import records_table

QWEN3_1P7B = config_file("qwen3-1.7b", "model.json")
# Dense bf16 tensor-core peaks (no sparsity); more specific names first. Other cards: --peak-tflops.
# Not Lightning's `get_available_flops` (which the fit's ThroughputMonitor uses): in Lightning 2.6 it finds
# no entry for a plain "NVIDIA H200" (None, so no MFU on the machine this bench is run on), and its H200
# and H100 NVL entries are the sparse peaks (2x dense). `train_flops` stays analytic for the same reason
# MFU is defined on model FLOPs: `FlopCounterMode` counts what runs (full-square SDPA, LoRA, recomputation).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
SMALL = {"batch_size": 2, "prompt_tokens": 32, "answer_tokens": 8, "latent_steps": SEED.latent_steps, "lora_r": 4, "steps": 1,
         "infer_batch": 4, "infer_prompt_tokens": 16, "infer_new_tokens": 8}


def peak_of(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if all(part in name for part in k.split())), None)


def write_random_base(config, out: Path, dtype: torch.dtype, device: torch.device) -> Path:
    """A loadable model directory with random weights of `config`'s shape (tokenizer: the tiny one's)."""
    from transformers import AutoModelForCausalLM

    from qthink.core.tiny import build_tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: 1.7B normal_ draws on a CPU take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    build_tokenizer(0).save_pretrained(out)
    return out


def latent_inference(model, device: torch.device, batch: int, prompt: int, new_tokens: int, latent_steps: int,
                     decode_mode: str = "dynamic") -> tuple[dict, torch.Tensor]:
    """Throughput of `qthink.core.latent.generate` (prompt -> K latents -> answer) on random prompts, and its tokens;
    EOS is never matched, so every row decodes `new_tokens`. The first, untimed call compiles (`compiled`)."""
    from qthink.core.latent import generate, think

    torch.manual_seed(0)
    head = ProjectionHead(model.config.hidden_size).to(device, model.dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    ids, mask = ids.to(device), torch.ones(batch, prompt, dtype=torch.long, device=device)

    def run() -> torch.Tensor:
        tokens = generate(model, head, ids, mask, latent_steps, new_tokens, -1, 0, decode_mode=decode_mode).tokens
        sync(device)
        return tokens

    def prefill() -> None:
        with torch.inference_mode():
            think(model, head, ids, mask, latent_steps, new_tokens, decode_mode)
        sync(device)

    _, warmup = timed_call(run)  # warm-up (and compilation)
    think_s, _ = timed(prefill, 2)
    seconds, tokens = timed(run, 2)
    row = {"system": "latent-inference", "decode_mode": decode_mode, "batch_size": batch, "prompt_tokens": prompt,
           "latent_steps": latent_steps, "new_tokens": new_tokens, "seconds": seconds, "warmup_seconds": warmup,
           "prefill_latent_seconds": think_s, "problems_per_s": batch / seconds,
           "tokens_per_s": batch * new_tokens / seconds,
           "decode_tokens_per_s": batch * new_tokens / max(seconds - think_s, 1e-9)}
    return row, tokens


def inference_rows(base: Path, device: torch.device, dtype: torch.dtype, sizes: dict,
                   modes: tuple[str, ...]) -> list[dict]:
    """One `latent_inference` row per decode mode; a mode that fails (a compiler error on this card) gives a
    row with its `error` instead of ending the bench, and `speedup_vs_first`/`tokens_equal_first` compare each
    row with the first mode's."""
    from qthink.core.kv_cache import release_static_cache
    from qthink.core.model import load_base

    model, _ = load_base(str(base), dtype)
    model.to(device)
    rows, first = [], None
    for mode in modes:
        try:
            row, tokens = latent_inference(model, device, sizes["infer_batch"], sizes["infer_prompt_tokens"],
                                           sizes["infer_new_tokens"], sizes["latent_steps"], mode)
        except Exception as e:  # noqa: BLE001 - reported in the row; the other measurements still run
            rows.append({"system": "latent-inference", "decode_mode": mode, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        if first is None:
            first = (row["seconds"], tokens)
        row["speedup_vs_first"] = first[0] / row["seconds"]
        row["tokens_equal_first"] = float((tokens == first[1]).float().mean())
        rows.append(row)
    # give the training measurement its memory back: the static KV cache, and the compiled graphs with
    # their CUDA-graph pools, which hold the weights as static inputs
    release_static_cache(model)
    del model, first
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def training_step_speed(base: Path, device: torch.device, batch: int, prompt: int, answer: int, latent_steps: int,
                        lora_r: int, steps: int, peak: float | None) -> dict:
    """Tokens/s and MFU of the training step `QThinkModule.compute_losses` + backward + AdamW on random
    data, under bf16 autocast on CUDA (the Trainer's bf16-mixed: float32 weights, bf16 matmuls)."""
    import contextlib

    from qthink.training.module import LoraArgs, QThinkModule

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
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=SEED.lr)
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


def bench_gpu(model_config: str = str(QWEN3_1P7B), batch_size: int = 8, prompt_tokens: int = SEED.max_prompt_tokens,
              answer_tokens: int = SEED.max_answer_tokens, latent_steps: int = SEED.latent_steps, lora_r: int = SEED.lora_r,
              steps: int = 5, infer_batch: int = 64, infer_prompt_tokens: int = 256, infer_new_tokens: int = 256,
              decode_modes: str = "dynamic,compiled", peak_tflops: PositiveFinite | None = None, small: bool = False,
              json: str | None = None) -> list[dict]:
    """Training-step and latent-inference speed of a random model of `model_config`'s shape; prints the rows.

    Args:
        model_config: config.json giving the model shape (also --config)
        batch_size: training batch size
        prompt_tokens: training prompt length
        answer_tokens: training answer length
        latent_steps: K
        lora_r: LoRA rank
        steps: timed training steps (after 2 warm-up steps)
        infer_batch: inference batch size
        infer_prompt_tokens: inference prompt length
        infer_new_tokens: inference answer tokens
        decode_modes: inference decode modes, comma-separated (dynamic, static, compiled: see qthink.core.latent);
            the first is the reference
        peak_tflops: card's dense bf16 peak (default: known cards)
        small: tiny shape and sizes; runs on CPU (smoke test)
        json: output JSON (default: $OUT/bench_gpu.json when $OUT is set)
    """
    import os

    from transformers import AutoConfig

    from qthink.core.tiny import tiny_config

    require(small or torch.cuda.is_available(), "qthink bench gpu needs a CUDA GPU and torch sees none "
            "(torch.cuda.is_available() is False); run `qthink bench gpu --small` for a CPU smoke test")
    given = {"batch_size": batch_size, "prompt_tokens": prompt_tokens, "answer_tokens": answer_tokens,
             "latent_steps": latent_steps, "lora_r": lora_r, "steps": steps, "infer_batch": infer_batch,
             "infer_prompt_tokens": infer_prompt_tokens, "infer_new_tokens": infer_new_tokens}
    sizes = SMALL if small else given
    require(all(v > 0 for v in sizes.values()), f"bench gpu sizes must be > 0 (got {sizes})")
    modes = parse_decode_modes(decode_modes)
    if small:
        config = tiny_config(512)
    else:
        require(Path(model_config).is_file(), f"{model_config}: no such config file; pass --config model.json")
        config = AutoConfig.for_model(**read_json(Path(model_config), "pass --config model.json"))
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    choose_threads(device, config)  # --small on CPU: the tiny shape, on one thread
    peak = peak_tflops or peak_of(device)
    with tempfile.TemporaryDirectory(prefix="qthink-bench-gpu-") as tmp:
        base = write_random_base(config, Path(tmp), dtype, device)
        rows = inference_rows(base, device, dtype, sizes, modes)
        rows.append(training_step_speed(base, device, sizes["batch_size"], sizes["prompt_tokens"],
                                        sizes["answer_tokens"], sizes["latent_steps"], sizes["lora_r"],
                                        sizes["steps"], peak))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for row in rows:
        row.update(bench="gpu", device=name, dtype=str(dtype).removeprefix("torch."), peak_tflops=peak,
                   hidden_size=config.hidden_size, layers=config.num_hidden_layers)
    print(records_table(rows))
    out = json or (str(Path(os.environ["OUT"]) / "bench_gpu.json") if os.environ.get("OUT") else None)
    write_json(rows, out)
    return rows
