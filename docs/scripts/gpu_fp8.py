"""FP8 in the ViTs on the GPU (issue 10's next lever; the layer is ``fp8_linear.py`` beside this script), at
BLIP-base size, 384 px.

1. The ViT alone, batch 512: bf16 against FP8 linears, eager; each one's error against float32 on the
   same weights (random: BLIP-base's config, capfilt's init).
2. Caption + filter (random weights, bf16, batch 512) with bf16 and with FP8 ViTs, taking turns batch by
   batch (``bench.model_images_per_s``).
3. With trained models (a folder holding ``captioner/`` and ``filter/``, and web shards): the filter's ITM
   scores and keep/drop decisions at thresholds 0.3-0.7 on the web captions, and the captioner's captions
   of 512 images, bf16 against FP8.
4. Both ViTs under ``torch.compile`` (compile time, then a first call at another batch size).

    python docs/scripts/gpu_fp8.py OUT.json [MODELS_DIR CONFIG 'WEB_SHARDS']
Each part is printed and written to OUT.json as it is measured, so a run cut short keeps what it reached.
"""

import copy
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from fp8_linear import quantize_vision
from gpu_timing import ms

from capfilt.config import load_config
from capfilt.model.vision import image_embeds
from capfilt.run import bench
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

torch.set_grad_enabled(False)
out_path, out = sys.argv[1], {"device": torch.cuda.get_device_name(), "torch": torch.__version__}


def report(key, value):
    out[key] = value
    print(json.dumps({key: value}), flush=True)
    json.dump(out, open(out_path, "w"), indent=1)


def with_fp8(stage, on):
    """The captioner or filter, with its ViT's linear layers in FP8 if ``on``."""
    if on:
        quantize_vision(stage.model.vision_model)
    return stage


def rel_error(x, ref):
    x, ref = x.float(), ref.float()
    cos = torch.nn.functional.cosine_similarity(x.flatten(0, 1), ref.flatten(0, 1), dim=-1)
    return {
        "rel_l2": round(((x - ref).norm() / ref.norm()).item(), 5),
        "min_token_cos": round(cos.min().item(), 5),
    }


# 1. the ViT alone
cfg = load_config("blip-base")
B, size = 512, cfg.run.image_size
words = "a red green blue small large circle square triangle near the left right of on with".split()
texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(300)]
cap_path, flt_path = bench.random_models(
    dataclasses.replace(cfg.model, image_size=size), tempfile.mkdtemp(), texts
)
fp32 = Captioner(cap_path, cfg.caption, "cuda", 0, "float32").model.vision_model
bf16 = copy.deepcopy(fp32).bfloat16()
fp8 = copy.deepcopy(bf16)
quantize_vision(fp8)
px = torch.randn(B, 3, size, size, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
ref = image_embeds(fp32, px[:32])
report(
    "vit_error_vs_fp32",
    {n: rel_error(image_embeds(m, px[:32].bfloat16()), ref) for n, m in [("bf16", bf16), ("fp8", fp8)]},
)
del fp32, ref
px = px.bfloat16()
flops = (2 * 86e6 * 577 + 12 * 4 * 577 * 577 * 768) * B
vit = {}
for name, model in (("bf16", bf16), ("fp8", fp8)):
    t = ms(lambda m=model: image_embeds(m, px))
    vit[name] = {"ms": round(t, 1), "images_s": round(B / t * 1000), "tflops": round(flops / t / 1e9)}
report("vit_batch512", vit)

# 2. caption + filter, bf16 against FP8 ViTs, taking turns
g = torch.Generator().manual_seed(1)
pixels = torch.randn(4 * B, 3, size, size, generator=g).cuda().bfloat16()
batches = [
    (pixels[i : i + B], [f"k{j}" for j in range(i, i + B)], [texts[j % 300] for j in range(i, i + B)])
    for i in range(0, 4 * B, B)
]
pairs = {
    f"{name}": (
        with_fp8(Captioner(cap_path, cfg.caption, "cuda", 0, "bfloat16"), on),
        with_fp8(Filter(flt_path, cfg.filter, "cuda", "bfloat16"), on),
    )
    for name, on in (("bf16", False), ("fp8_vision", True))
}
report(
    "caption_filter_images_s_batch512",
    {k: round(v, 1) for k, v in bench.model_images_per_s(pairs, batches).items()},
)
del pairs, batches, pixels
torch.cuda.empty_cache()

# 3. trained models: the filter's decisions, bf16 against fp8
if len(sys.argv) > 4:
    from capfilt.data.decode import PillowDecoder
    from capfilt.data.reader import ShardReader
    from capfilt.data.sample import Sample
    from capfilt.data.specs import expand_shards

    models, tcfg = sys.argv[2], load_config(sys.argv[3])
    urls = expand_shards(sys.argv[4])
    samples = [s for url in urls for s in ShardReader(url) if isinstance(s, Sample) and s.caption]
    pix, kept, _ = PillowDecoder(tcfg.run.image_size).decode_batch(samples)
    pix, caps = pix.cuda(), [[samples[i].caption] for i in kept]
    scores = {}
    for name, on in (("bf16", False), ("fp8", True)):
        flt = with_fp8(Filter(f"{models}/filter", tcfg.filter, "cuda", "bfloat16"), on)
        scores[name] = torch.tensor(
            [
                s[0][0]
                for i in range(0, len(caps), 256)
                for s in flt.score(pix[i : i + 256], caps[i : i + 256])
            ]
        )
    diff = (scores["fp8"] - scores["bf16"]).abs()
    keys = [samples[i].key for i in kept[:512]]
    texts = {
        name: with_fp8(Captioner(f"{models}/captioner", tcfg.caption, "cuda", 0, "bfloat16"), on).caption(
            pix[:512], keys
        )
        for name, on in (("bf16", False), ("fp8", True))
    }
    report(
        "trained_filter",
        {
            "pairs": len(caps),
            "itm_max_abs_diff": round(diff.max().item(), 4),
            "itm_mean_abs_diff": round(diff.mean().item(), 5),
            "captions_identical_of_512": sum(a == b for a, b in zip(texts["bf16"], texts["fp8"])),
            "decisions_changed_at_threshold": {
                th: int(((scores["bf16"] >= th) != (scores["fp8"] >= th)).sum())
                for th in (0.3, 0.4, 0.5, 0.6, 0.7)
            },
        },
    )

# 4. under torch.compile (last: compiling takes a minute or more), then one batch of another size
compiled = {}
for name, model in (("bf16", bf16), ("fp8", fp8)):
    torch._dynamo.reset()  # each model's compile timed from scratch
    start = time.perf_counter()
    fn = torch.compile(image_embeds, dynamic=False)
    fn(model, px)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    t = ms(lambda f=fn, m=model: f(m, px))
    start = time.perf_counter()
    fn(model, px[:300])
    torch.cuda.synchronize()
    compiled[name] = {
        "compile_s": round(compile_s, 1),
        "ms": round(t, 1),
        "images_s": round(B / t * 1000),
        "tflops": round(flops / t / 1e9),
        "first_call_at_300_s": round(time.perf_counter() - start, 1),
    }
    report("vit_batch512_compiled", compiled)
