"""Where a BLIP-base bf16 batch's time goes on the GPU: captioner parts and filter parts, batch 512.

python docs/scripts/gpu_profile.py
"""

import dataclasses
import json
import tempfile
import time

import torch
import torch.nn.functional as F

from capfilt.config import load_config
from capfilt.model.tokenizer import normalize_caption, tokenize
from capfilt.run import bench
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

torch.set_grad_enabled(False)
cfg = load_config("blip-base")
size, B = cfg.run.image_size, 512
words = "a red green blue small large circle square triangle near the left right of on with".split()
caps_text = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(300)]
cap_path, flt_path = bench.random_models(
    dataclasses.replace(cfg.model, image_size=size), tempfile.mkdtemp(), caps_text
)
pixels = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(0)).cuda().bfloat16()
keys = [f"k{i}" for i in range(B)]


def t(fn, n=3):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        r = fn()
    torch.cuda.synchronize()
    return r, (time.perf_counter() - t0) / n * 1000


cap = Captioner(cap_path, cfg.caption, "cuda", 0, "bfloat16")
r = {}
emb, r["cap_vit"] = t(lambda: cap.model.vision_model(pixel_values=pixels).last_hidden_state)
gens, r["cap_generators"] = t(lambda: [cap._generator(k, 0) for k in keys])
uni, r["cap_uniforms"] = t(lambda: torch.stack([torch.rand(cap.sampler.steps, generator=g) for g in gens]))
toks, r["cap_sample"] = t(lambda: cap.sampler.sample(emb, uni))
rows = [cap.prompt_ids + [x for x in row if x >= 0] for row in toks.tolist()]
_, r["cap_text"] = t(lambda: [cap._text(row) for row in rows])
_, r["cap_total"] = t(lambda: cap.caption(pixels, keys))
print(json.dumps({k: round(v, 1) for k, v in r.items()}), "ms per 512", flush=True)
cap = emb = None
torch.cuda.empty_cache()
flt = Filter(flt_path, cfg.filter, "cuda", "bfloat16")
m = flt.model
r = {}
emb, r["flt_vit"] = t(lambda: m.vision_model(pixel_values=pixels).last_hidden_state)
feat = F.normalize(m.vision_proj(emb[:, 0]), dim=-1)
texts = [caps_text[i % 300] for i in range(B)]
ids, mask = tokenize(flt.tokenizer, [normalize_caption(x) for x in texts], 35)
ids, mask = ids.cuda(), mask.cuda()
_, r["flt_tokenize"] = t(lambda: tokenize(flt.tokenizer, [normalize_caption(x) for x in texts], 35))
with torch.no_grad():
    _, r["flt_text_unimodal_512"] = t(
        lambda: m.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    )
    _, r["flt_text_fused_512"] = t(
        lambda: (
            m.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=emb).last_hidden_state
        )
    )
    two = [[x, "a small red circle near a big square"] for x in texts]
    _, r["flt_score_total_2caps"] = t(lambda: flt.score(pixels, two))
for bsz in (64, 512):
    flt.cfg.batch_size = bsz
    _, r[f"flt_score_total_2caps_chunk{bsz}"] = t(lambda: flt.score(pixels, two))
print(json.dumps({k: round(v, 1) for k, v in r.items()}), "ms per 512 images", flush=True)
print("ids shape", tuple(ids.shape))
