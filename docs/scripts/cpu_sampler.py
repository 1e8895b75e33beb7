"""The sampler of this checkout against another checkout's ``capfilt/stages/sampler.py`` on the CPU, in one
process: first, on one thread, SDPA against the written-out attention at the decoder's shapes (one query
per row, or the prompt's four); then captioning with each sampler in turn, batch by batch in a shuffled
order, on the first 768 images of a demo web shard in batches of 256 (thread CPU time, ms per image),
and whether the captions are the same; last, with torch's default threads, the model-only rate of
``capfilt bench`` (caption + score, and the batched HF script, taking turns batch by batch) on the whole
shard with each sampler, three times.

    python docs/scripts/cpu_sampler.py /tmp/old/capfilt/stages/sampler.py runs/demo/round-0/finetune \
        shards/web-000004.tar
"""

import copy
import importlib.util
import random
import sys
import time

import torch
import torch.nn.functional as F

from capfilt.config import load_config
from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader
from capfilt.run.bench import model_images_per_s
from capfilt.run.hf_script import HFScript
from capfilt.run.pipeline import decoded_batches
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter
from capfilt.stages.sampler import Sampler, written_out_attention

threads = torch.get_num_threads()
torch.set_num_threads(1)
torch.set_grad_enabled(False)
old_file, models, shard = sys.argv[1:4]


def ms(fn, *args, n: int = 50) -> float:
    for _ in range(5):
        fn(*args)
    start = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return (time.perf_counter() - start) / n * 1e3


print("rows heads queries keys head_dim | SDPA ms | written out ms")
for rows, heads, queries, keys, dim in [
    (256, 4, 1, 20, 32),  # demo: a step's self-attention
    (256, 4, 1, 17, 32),  # demo: a step's cross-attention (64 px, 17 image tokens)
    (256, 4, 4, 20, 32),  # demo: the prompt
    (256, 12, 1, 20, 64),  # BLIP-base: a step's self-attention
    (256, 12, 1, 577, 64),  # BLIP-base: a step's cross-attention (384 px)
]:
    q, k, v = (torch.randn(rows, heads, n, dim) for n in (queries, keys, keys))
    mask = torch.arange(keys) <= torch.arange(queries)[:, None] + keys // 2
    a = ms(F.scaled_dot_product_attention, q, k, v, mask)
    b = ms(written_out_attention, q, k, v, mask)
    print(f"{rows} {heads} {queries} {keys} {dim} | {a:.3f} | {b:.3f}")

spec = importlib.util.spec_from_file_location("old_sampler", old_file)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
cfg = load_config("demo")
captioner = Captioner(f"{models}/captioner", cfg.caption, "cpu", cfg.run.seed)
decoder = captioner.model.text_decoder
samplers = {
    "before": old.Sampler(decoder, cfg.caption, captioner.prompt_ids, captioner.eos),
    "after": Sampler(decoder, cfg.caption, captioner.prompt_ids, captioner.eos),
}
batches = list(decoded_batches(ShardReader(shard), PillowDecoder(cfg.run.image_size), 256))
seconds, captions = dict.fromkeys(samplers, 0.0), {name: [] for name in samplers}
for rep in range(8):
    for batch in batches[:3]:
        keys = [s.key for s in batch.samples]
        for name in random.Random(rep * 31 + len(keys)).sample(list(samplers), len(samplers)):
            captioner.sampler = samplers[name]
            start = time.thread_time()
            caps = captioner.caption(batch.pixels, keys)
            if rep:
                seconds[name] += time.thread_time() - start
            else:
                captions[name] += caps
images = 7 * sum(len(b.samples) for b in batches[:3])
print(", ".join(f"{name} {s * 1e3 / images:.3f} ms per image" for name, s in seconds.items()))
same = sum(a == b for a, b in zip(*captions.values()))
print(f"captions the same: {same} of {len(captions['before'])}")

torch.set_num_threads(threads)
after = copy.copy(captioner)
captioner.sampler, after.sampler = samplers["before"], samplers["after"]
flt = Filter(f"{models}/filter", cfg.filter)
script = HFScript(cfg, f"{models}/captioner", f"{models}/filter")
decoded = [(b.pixels, [s.key for s in b.samples], [s.caption for s in b.samples]) for b in batches]
for _ in range(3):
    rates = model_images_per_s(
        {"before": (captioner, flt), "after": (after, flt), "HF script": (script, script)}, decoded
    )
    print(f"{threads} threads, images/s: " + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()))
