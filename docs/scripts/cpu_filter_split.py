"""Where `Filter.score` spends its time at the demo's size on one CPU thread: the ViT, the unimodal text pass
(ITC only) and the ITM pass, against the batched HF script's ITM call (64 images × 2 captions).

    python docs/scripts/cpu_filter_split.py runs/demo/round-0/finetune shards/web-000004.tar
"""

import sys
import time

import torch

from capfilt.config import load_config
from capfilt.data import reader
from capfilt.data.decode import PillowDecoder
from capfilt.run.hf_script import HFScript
from capfilt.stages.filter import Filter

torch.set_num_threads(1)
torch.set_grad_enabled(False)
models, shard = sys.argv[1], sys.argv[2]
cfg = load_config("demo")
records = list(reader.ShardReader(shard))[:64]
pixels, _, _ = PillowDecoder(64).decode_batch(records)
synthetic = "a small red circle to the left of a large blue square on a white background"
captions = [[r.caption or "image", synthetic] for r in records]
flt = Filter(f"{models}/filter", cfg.filter)
script = HFScript(cfg, f"{models}/captioner", f"{models}/filter")
texts = [c for cs in captions for c in cs]
rows = torch.tensor([b for b, cs in enumerate(captions) for _ in cs])
embeds, _ = flt.encode_images(pixels)
ids, mask = flt._tokenize(texts)


def ms(fn, n: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1000


print(f"Filter.score: {ms(lambda: flt.score(pixels, captions)):.1f} ms")
print(f"  ViT: {ms(lambda: flt.encode_images(pixels)):.1f} ms")
print(
    f"  unimodal text pass (ITC): {ms(lambda: flt.model.text_encoder(input_ids=ids, attention_mask=mask)):.1f} ms"
)
print(
    f"  ITM pass: {ms(lambda: flt._itm(ids, mask, image_kv=flt.model.text_encoder.image_keys_values(embeds).for_rows(rows))):.1f} ms"
)
print(f"HF script, ITM: {ms(lambda: script.score(pixels, captions)):.1f} ms")
