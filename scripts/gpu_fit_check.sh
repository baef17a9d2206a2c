#!/usr/bin/env bash
# The tiny pipeline through the real CLI on a GPU: reference rollouts -> teachers -> `qthink fit` under
# LightningCLI in bf16-mixed (ThroughputMonitor, LearningRateMonitor, atomic checkpoints) -> the logged
# metric tags and their last values -> export -> eval on CUDA. About a minute on an H200.
# On CPU: DEV=cpu ACC=cpu PREC=32-true scripts/gpu_fit_check.sh. An offline machine without jsonargparse
# can be given a copy of it (and docstring_parser, typeshed_client, omegaconf, antlr4, with their
# .dist-info folders) in extra/pylib, which is put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/extra/pylib${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEV=${DEV:-cuda}; ACC=${ACC:-gpu}; PREC=${PREC:-bf16-mixed}
T=$(mktemp -d)  # a fresh folder each run (a second fit into a run folder is refused)
python -c "import lightning, jsonargparse; print('lightning', lightning.__version__, 'jsonargparse', jsonargparse.__version__)"
python -m qthink tiny-base $T/base
python -c "from qthink.teachers.rollouts import write_reference_rollouts as w; w('$T/base', '$T/r', n=64, G=2)"  # the tiny base is untrained: its own rollouts never close a think block
python -m qthink teachers --base $T/base --rollouts $T/r --out $T/t -K 6 --device $DEV
python -m qthink fit -c configs/tiny/qthink.yaml --model.base_model $T/base --data.teachers $T/t \
  --trainer.default_root_dir $T/run --trainer.accelerator $ACC --trainer.precision $PREC --trainer.max_steps 40 \
  --trainer.val_check_interval 20 --data.val_limit 32 --data.batch_size 8 2>&1 | tail -5
python - "$T/run/tensorboard" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]).Reload()
for tag in sorted(acc.Tags()["scalars"]):
    if tag.startswith(("train/device", "lr/", "train/grad_norm", "train/loss", "val/")):
        events = acc.Scalars(tag)
        print(f"{tag}: n={len(events)} last={events[-1].value:.6g} (step {events[-1].step})")
PY
ls -la $T/run/checkpoints
python -m qthink export $T/run/checkpoints/last.ckpt $T/export
python -m qthink eval $T/export --task synthetic --limit 64 --device $DEV --out $T/eval | tail -4
