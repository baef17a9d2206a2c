#!/usr/bin/env bash
# `qthink bench gpu` on a CUDA machine without network access: a Qwen3-1.7B-shaped model with random
# weights (configs/qwen3-1.7b/model.json), bf16: training-step tokens/s + MFU at prompt 1024 / K=6 /
# answer 256 (LoRA r=32 + head), and latent-inference throughput at batch 64 in the `dynamic` and
# `compiled` (static cache + torch.compile + CUDA graphs) decode modes, with their token agreement.
# Usage: scripts/gpu_bench.sh [more `qthink bench gpu` flags, e.g. --batch-size 16]
# Writes $OUT/bench_gpu.json (./bench_gpu.json without $OUT); stops after 8 minutes whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 480 python -m qthink bench gpu --json "${OUT:-.}/bench_gpu.json" "$@"
