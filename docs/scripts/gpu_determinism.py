"""Which kernel makes a GPU round's captions and ITM scores differ run to run? BLIP-base (random weights,
bf16, 384 px), one batch captioned and scored twice with each attention backend forced (a new captioner
and filter each, as the sampler's CUDA graphs keep the kernels they were captured with), and once with the
sampler run eagerly (no graphs); then, with forward hooks on every module, the first module whose
output differs between two identical passes (the filter's ITM, the eager sampler's decoding), by an exact
integer checksum of its output's bits. With ``strict``, all of it under
``torch.use_deterministic_algorithms(True)`` (``CUBLAS_WORKSPACE_CONFIG=:4096:8``). On the H100 the default gave other captions for 119 of 512 images and
ITM scores up to 2e-4 apart, run to run, where the ViT embeddings and ITC scores agreed bit for bit.

    python docs/scripts/gpu_determinism.py [BATCH] [DEVICE] [strict]   # default 512 cuda; cpu: tiny config
"""

import contextlib
import dataclasses
import json
import os
import sys
import tempfile

STRICT = "strict" in sys.argv[3:]
if STRICT:  # before CUDA starts: cuBLAS reads it once
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from capfilt.config import load_config  # noqa: E402
from capfilt.run import bench  # noqa: E402
from capfilt.stages.captioner import Captioner  # noqa: E402
from capfilt.stages.filter import Filter  # noqa: E402
from capfilt.stages.sampler import written_out_attention  # noqa: E402

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(STRICT)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 512
device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
cfg = load_config("blip-base" if device == "cuda" else "tiny")
size = cfg.run.image_size
words = "a red green blue small large circle square near the left right of on with".split()
web = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(B)]
cap_path, flt_path = bench.random_models(
    dataclasses.replace(cfg.model, image_size=size), tempfile.mkdtemp(), web
)
pixels = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
keys = [f"k{i:04d}" for i in range(B)]


def twice(backends: list | None, eager: bool = False, dtype: str = "bfloat16") -> dict:
    """Captions and scores of the batch, twice, with only ``backends`` allowed (None: PyTorch's choice)."""
    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
        cap = Captioner(cap_path, cfg.caption, device, cfg.run.seed, dtype)
        flt = Filter(flt_path, cfg.filter, device, dtype)
        if eager:
            cap.sampler.graphed, cap.sampler.attention = False, written_out_attention
        runs = []
        for _ in range(2):
            caps = cap.caption(pixels, keys)
            runs.append((caps, flt.score(pixels, [[w, *c] for w, c in zip(web, caps)])))
        cands = [[w, *c] for w, c in zip(web, runs[0][0])]  # the same candidates, scored twice
        s1, s2 = flt.score(pixels, cands), flt.score(pixels, cands)
    pairs = [(x, y) for a, b in zip(s1, s2) for x, y in zip(a, b)]
    return {
        "images_other_captions": sum(a != b for a, b in zip(runs[0][0], runs[1][0])),
        "max_itm_diff": max(abs(x[0] - y[0]) for x, y in pairs),
        "max_itc_diff": max(abs(x[1] - y[1]) for x, y in pairs),
    }


def checksum(t: torch.Tensor) -> int:
    """An exact fingerprint of a tensor's bits (integer sums, so no rounding and no order)."""
    bits = t.detach().contiguous().view(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()]).long()
    weights = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
    return int((bits * weights).sum()) ^ int(bits.sum()) << 1


def first_apart(model: torch.nn.Module, run) -> dict:
    """``run()`` twice with every module of ``model`` recording its output's checksum, in call order: the
    first module whose output differs, and how many calls differ."""
    calls: list[tuple[str, int]] = []

    def hook(name):
        def record(module, args, out):
            t = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                calls.append((name, checksum(t)))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        run()
        first = calls[:]
        calls.clear()
        run()
    finally:
        for h in handles:
            h.remove()
    apart = [a[0] for a, b in zip(first, calls) if a != b]
    return {"calls": len(first), "calls_apart": len(apart), "first_apart": apart[:3]}


report = {"batch": B, "strict": STRICT}
ways = {
    "default": (None, False, "bfloat16"),
    "default, float32": (None, False, "float32"),
    "sampler eager, written-out attention": (None, True, "bfloat16"),
    "flash (math where masked)": ([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], False, "bfloat16"),
    "efficient": ([SDPBackend.EFFICIENT_ATTENTION], False, "bfloat16"),
    "cudnn (math where it cannot)": ([SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH], False, "bfloat16"),
    "math": ([SDPBackend.MATH], False, "bfloat16"),
}
for name, way in ways.items():
    try:
        report[name] = twice(*way)
    except Exception as err:  # a backend that cannot run these shapes says so, and the others go on
        report[name] = f"{type(err).__name__}: {str(err)[:300]}"
    print(name, report[name], file=sys.stderr, flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
cap = Captioner(cap_path, cfg.caption, device, cfg.run.seed, "bfloat16")
cap.sampler.graphed, cap.sampler.attention = False, torch.nn.functional.scaled_dot_product_attention
flt = Filter(flt_path, cfg.filter, device, "bfloat16")
caps = cap.caption(pixels, keys)
cands = [[w, *c] for w, c in zip(web, caps)]
for name, (model, run) in {
    "filter, ITM and ITC": (flt.model, lambda: flt.score(pixels, cands)),
    "captioner, eager steps with SDPA": (cap.model, lambda: cap.caption(pixels, keys)),
}.items():
    report[f"modules: {name}"] = first_apart(model, run)
    print(name, report[f"modules: {name}"], file=sys.stderr, flush=True)
print(json.dumps(report, indent=1))
