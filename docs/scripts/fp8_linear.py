"""FP8 (e4m3) matrix products for the ViT's linear layers, for inference on GPUs with FP8 tensor cores: the
layer that docs/scripts/gpu_fp8.py and gpu_fp8_gemm.py measure. Not part of capfilt: on an H100 it made
the ViT and the round slower (docs/BENCHMARKS.md, "FP8 in the ViTs").

Why it was tried: at BLIP-base size the two ViT-B/16 passes at 384 px are about half of a CapFilt batch on
an H100 (docs/BENCHMARKS.md, 'GPU path'), and Hopper and Ada multiply e4m3 at twice bf16's rate. Weights are
quantized once, one scale per output channel; activations at each call, one scale per token, so a token
with large values does not cost the others their precision. Products accumulate in float32 and come out
in the activations' dtype. Attention itself (``scaled_dot_product_attention``), the LayerNorms and the
patch embedding stay in bf16, and so do the text layers, whose products are small.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale per row [rows, 1]) with ``values * scale ≈ x``: each row's largest
    magnitude maps to e4m3's largest value, 448.

    Three passes over ``x`` (its extremes, the scaling in ``x``'s dtype, the cast) and no float32 copy of
    it. The bf16 rounding of the factor and the product can take a value to about 451.5, which the cast
    rounds to 448 (it gives NaN only from 480), so no clamp is needed.
    """
    low, high = x.aminmax(dim=-1, keepdim=True)
    amax = torch.maximum(-low, high).float().clamp(min=1e-12)
    return (x * (E4M3_MAX / amax).to(x.dtype)).to(E4M3), amax / E4M3_MAX


class Fp8Linear(nn.Module):
    """``nn.Linear`` for inference with e4m3 weights and per-token e4m3 activations."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        for name, size in (("in_features", linear.in_features), ("out_features", linear.out_features)):
            if size % 16:  # the FP8 kernels' layout needs both sizes in multiples of 16
                raise ValueError(f"a linear layer's {name} is {size}, not a multiple of 16")
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_t", weight.t())  # [in, out], column-major as the kernel wants
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        out = torch._scaled_mm(
            values, self.weight_t, scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=x.dtype
        )
        return out.view(*x.shape[:-1], out.shape[-1])


def quantize_vision(vision: nn.Module) -> None:
    """Replace the linear layers of ``vision``'s transformer layers (attention qkv and projection, MLP fc1
    and fc2; HF's names) by :class:`Fp8Linear`, in place. For inference only: the weights are not kept."""
    for layer in vision.encoder.layers:
        for parent, name in (
            (layer.self_attn, "qkv"),
            (layer.self_attn, "projection"),
            (layer.mlp, "fc1"),
            (layer.mlp, "fc2"),
        ):
            setattr(parent, name, Fp8Linear(getattr(parent, name)))
