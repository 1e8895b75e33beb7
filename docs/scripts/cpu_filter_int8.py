"""int8 dynamic quantisation of the filter's linear layers (``torch.ao.quantization.quantize_dynamic``) at the
demo's size, one thread: ``Filter.score`` time, float against int8 in turns, and how far the ITM moves
(512 demo web images, each with its alt-text and one fixed synthetic caption).

    python docs/scripts/cpu_filter_int8.py runs/demo/round-0/finetune shards/web-000004.tar [THRESHOLD]
"""

import sys
import time
import warnings

import torch
from torch import nn
from torch.ao.quantization import quantize_dynamic

from capfilt.config import load_config
from capfilt.stages.filter import Filter

warnings.filterwarnings("ignore")  # torch: quantized tensors are deprecated (see the note in BENCHMARKS)
from filter_batches import filter_batches  # noqa: E402  (beside this script)

torch.set_num_threads(1)
models, shard = sys.argv[1], sys.argv[2]
threshold = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
cfg = load_config("demo")
batches = filter_batches(shard, cfg.run.max_pixels)
float_filter, int8_filter = Filter(f"{models}/filter", cfg.filter), Filter(f"{models}/filter", cfg.filter)
int8_filter.model = quantize_dynamic(int8_filter.model, {nn.Linear}, dtype=torch.qint8)


def timed(flt: Filter) -> tuple[float, list[float]]:
    start = time.perf_counter()
    itm = [itm for px, cands in batches for row in flt.score(px, cands) for itm, _ in row]
    return (time.perf_counter() - start) * 1000 / 512, itm


timed(float_filter), timed(int8_filter)
for _ in range(3):
    (f_ms, f_itm), (q_ms, q_itm) = timed(float_filter), timed(int8_filter)
    print(f"Filter.score ms per image: float {f_ms:.3f}, int8 {q_ms:.3f}")
diffs = [abs(a - b) for a, b in zip(f_itm, q_itm)]
flips = sum((a >= threshold) != (b >= threshold) for a, b in zip(f_itm, q_itm))
print(f"ITM |float - int8|: max {max(diffs):.3f}, mean {sum(diffs) / len(diffs):.4f}")
print(f"decisions flipped at {threshold}: {flips} of {len(diffs)}")
