"""The arithmetic of capfilt's models against the batched HF script's on the same demo images: floating-point
operations counted by `torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions,
attention, SDPA's CPU kernel included) in captioning, and in scoring each image's alt-text and capfilt's synthetic caption.

    python docs/scripts/cpu_flops.py runs/demo/round-0/finetune shards/web-000004.tar [IMAGES]
"""

import sys

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from capfilt.config import load_config
from capfilt.data import reader
from capfilt.data.decode import PillowDecoder
from capfilt.run.hf_script import HFScript
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

torch.set_grad_enabled(False)
models, shard = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 256
cfg = load_config("demo")
records = list(reader.ShardReader(shard))[:n]
pixels, kept, _ = PillowDecoder(cfg.run.image_size).decode_batch(records)
records = [records[k] for k in kept]
keys = [r.key for r in records]
captioner = Captioner(f"{models}/captioner", cfg.caption)
flt = Filter(f"{models}/filter", cfg.filter)
script = HFScript(cfg, f"{models}/captioner", f"{models}/filter")


def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # torch counts only the GPU kernels' attention


def mflop_per_image(fn) -> float:
    cpu = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with FlopCounterMode(display=False, custom_mapping=cpu) as counter:
        fn()
    return counter.get_total_flops() / len(records) / 1e6


synthetic = captioner.caption(pixels, keys)
candidates = [[r.caption or "image", *s] for r, s in zip(records, synthetic)]
rows = {
    "caption": (lambda: captioner.caption(pixels, keys), lambda: script.caption(pixels, keys)),
    "score": (lambda: flt.score(pixels, candidates), lambda: script.score(pixels, candidates)),
    "score, ITM only": (lambda: flt.itm_only().score(pixels, candidates), None),
}
print("MFLOP per image | capfilt | HF script")
for name, (ours, theirs) in rows.items():
    print(f"{name} | {mflop_per_image(ours):.1f} | {mflop_per_image(theirs) if theirs else float('nan'):.1f}")
