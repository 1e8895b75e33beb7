"""Pretraining step time (forward, backward, AdamW) of the demo's round-0 MED on real web batches, by
``text_chunk`` (MED.by_length), the settings alternating so that the machine's drift hits each alike.

    python docs/scripts/cpu_text_chunk.py THREADS CHUNKS     # e.g. 2 0,64,48,0,64,48,0,64,48

Needs ``runs/demo/round-0/pretrain/med`` (``make demo``) and the demo world in ``shards/``.
"""

import statistics
import sys
import time

import torch

from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader
from capfilt.model.hf import load_med
from capfilt.model.tokenizer import normalize_caption, tokenize

BATCH, BATCHES = 64, 6

torch.set_num_threads(int(sys.argv[1]))
chunks = [int(c) for c in sys.argv[2].split(",")]
med, tok, _ = load_med("runs/demo/round-0/pretrain/med")
med.train()
opt = torch.optim.AdamW(med.parameters(), lr=1e-6)
records = list(ShardReader("shards/web-000001.tar"))[: BATCH * BATCHES]
pixels, _, _ = PillowDecoder(64).decode_batch(records)
captions = [normalize_caption(r.caption or "") for r in records]
batches = [
    (pixels[s : s + BATCH], *tokenize(tok, captions[s : s + BATCH], med.cfg.max_text_len))
    for s in range(0, BATCH * BATCHES, BATCH)
]
times: dict[int, list[float]] = {c: [] for c in chunks}
for chunk in chunks:
    med.text_chunk = chunk
    torch.manual_seed(0)
    start = time.perf_counter()
    for px, ids, mask in batches:
        med(px, ids, mask, alpha=0.4)["loss"].backward()
        opt.step()
        opt.zero_grad()
    times[chunk].append((time.perf_counter() - start) / BATCHES)
for chunk, t in times.items():
    print(f"text_chunk {chunk}: s/step {[round(x, 3) for x in t]}, median {statistics.median(t):.3f}")
