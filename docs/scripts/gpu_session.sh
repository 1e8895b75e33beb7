#!/bin/bash
# The open GPU checks in one device call (about 6 minutes on an H100; no Ray and no DALI needed):
#   1. which kernel makes bf16 captions and ITM scores differ run to run (gpu_determinism.py, then strict);
#   2. the round on two worker processes sharing the GPU, now that the bench frees its sweep's memory;
#   3. one ViT pass against two, end to end in the models (gpu_shared_vit.py).
# Each part writes to $OUT (the device tool's folder; ./gpu-out elsewhere) as it finishes, under a time
# limit of its own, so a call cut short keeps what it measured.
#   bash docs/scripts/gpu_session.sh
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
L=$OUT/log.txt
capfilt() { python3 -c "from capfilt.cli import app; app()" "$@"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } > "$OUT/machine.txt" 2>&1
( capfilt synth /tmp/w384 --set synth.image_size=384 --set synth.n_web=2000 --set synth.n_human=100 \
    --set synth.n_test=100 && for i in 2 3 4 5 6 7; do cp /tmp/w384/web-00000$((i % 2)).tar /tmp/w384/web-00000$i.tar; done ) >> "$L" 2>&1 &
echo "== determinism $(date +%T)" >> "$L"
timeout 120 python3 docs/scripts/gpu_determinism.py 512 > "$OUT/determinism.json" 2>> "$L"
echo "== determinism, strict $(date +%T)" >> "$L"
timeout 90 python3 docs/scripts/gpu_determinism.py 512 cuda strict > "$OUT/determinism_strict.json" 2>> "$L"
wait
echo "== bench $(date +%T)" >> "$L"
timeout 200 capfilt bench -c blip-base --device cuda --processes --world /tmp/w384 --images 1024 \
  --batch-sizes 512 --actors 1,2 --table "$OUT/bench-gpu.md" > "$OUT/bench.json" 2>> "$L"
echo "== shared vit $(date +%T)" >> "$L"
timeout 60 python3 docs/scripts/gpu_shared_vit.py 512 > "$OUT/shared_vit.json" 2>> "$L"
echo "== end $(date +%T)" >> "$L"
