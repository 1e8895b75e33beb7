"""BLIP's ViT forward for inference with fused attention, over the weights of a ``BlipVisionModel``
(transformers') or of ``capfilt.model.blip.VisionModel``, which keeps HF's names.

Why: HF writes BLIP's vision attention out (matmul, softmax, matmul) and so materialises every
token-by-token attention map; at BLIP-base size (577 tokens at 384 px) on a GPU that ViT was about
70 % of a CapFilt batch (docs/BENCHMARKS.md, 'GPU path'). ``scaled_dot_product_attention`` computes the
same thing fused (flash attention on CUDA). The result equals HF's to float rounding
(tests/test_model_hf.py); training keeps HF's modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def image_embeds(vision: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``vision(pixel_values=pixels).last_hidden_state``: pre-norm ViT layers, then the final LayerNorm."""
    x = vision.embeddings(pixels)
    for layer in vision.encoder.layers:
        attn = layer.self_attn
        qkv = attn.qkv(layer.layer_norm1(x)).unflatten(-1, (3, attn.num_heads, attn.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, tokens, head_dim]
        x = x + attn.projection(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        x = x + layer.mlp(layer.layer_norm2(x))
    return vision.post_layernorm(x)
