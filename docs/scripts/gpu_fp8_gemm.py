"""The ViT-B/16 linear layers' matrix products at batch 512 (577 tokens at 384 px) on the GPU: bf16 against
FP8 e4m3 with per-row scales and with one scale per tensor (each with and without fast accumulation), the
operands already quantized; then the per-token quantization of the input alone, eager and compiled.
Where FP8 does not pay in the ViT (gpu_fp8.py), this says whether the product or the quantizing is why.

    python docs/scripts/gpu_fp8_gemm.py OUT.json
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from fp8_linear import quantize_rows
from gpu_timing import ms

M = 512 * 577
SHAPES = {"qkv": (768, 2304), "projection": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}


compiled_quantize = torch.compile(quantize_rows, dynamic=False)


def measure(k: int, n: int) -> dict[str, float]:
    """Milliseconds of each way to compute one layer's product for M tokens."""
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    (xq, xs), (wq, ws) = quantize_rows(x), quantize_rows(w)
    one = torch.ones((), device="cuda")
    row = {"bf16": ms(lambda: F.linear(x, w, bias), 10)}
    for fast in (False, True):
        for scales, (sa, sb) in (("rowwise", (xs, ws.t())), ("tensor", (one, one))):
            row[f"fp8_{scales}{'_fast' if fast else ''}"] = ms(
                lambda f=fast, sa=sa, sb=sb: torch._scaled_mm(
                    xq, wq.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=f
                ),
                10,
            )
    row["quantize_eager"] = ms(lambda: quantize_rows(x), 10)
    row["quantize_compiled"] = ms(lambda: compiled_quantize(x), 10)
    return row


out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": M}
for name, (k, n) in SHAPES.items():
    flops = 2 * M * k * n
    out[name] = {
        key: {"ms": round(v, 2), "tflops": round(flops / v / 1e9)} for key, v in measure(k, n).items()
    }
    print(json.dumps({name: out[name]}), flush=True)
    torch.cuda.empty_cache()
json.dump(out, open(sys.argv[1], "w"), indent=1)
