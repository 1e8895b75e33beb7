"""``capfilt model-info``: parameter counts of the MED a config builds, and of its two exports.

The MED is built on the meta device: shapes only, no memory, so blip-large counts in a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from capfilt.config import Config, ModelConfig


def unique_params(*modules: nn.Module) -> int:
    """Parameters of the modules together, each shared tensor counted once."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


@dataclass
class Counts:
    med: int  # trainable MED: ViT + text encoder + decoder's own self-attention + heads, shared once
    momentum: int  # momentum ViT, unimodal text encoder and projections (no gradient)
    captioner: int  # BlipForConditionalGeneration as exported: ViT + decoder (with the shared modules)
    filter: int  # BlipForImageTextRetrieval as exported: ViT + text encoder + projections + ITM head
    queues: int  # floats in the two feature queues


def count(cfg: ModelConfig, vocab_size: int | None = None) -> Counts:
    """Counts for ``cfg`` (vocab ``cfg.vocab_size`` unless a tokenizer's size is given)."""
    from capfilt.model.med import MED

    v = vocab_size or cfg.vocab_size
    ids = {"pad": 0, "cls": min(101, v - 3), "sep": min(102, v - 3), "dec": v - 2, "enc": v - 1}
    with torch.device("meta"):
        med = MED(cfg, v, ids)
    momentum = [m for _, m in med.momentum_modules()]
    return Counts(
        med=unique_params(med) - unique_params(*momentum),
        momentum=unique_params(*momentum),
        captioner=unique_params(med.vision, med.text_decoder),
        filter=unique_params(med.vision, med.text_encoder, med.vision_proj, med.text_proj, med.itm_head),
        queues=med.image_queue.numel() + med.text_queue.numel(),
    )


def describe(cfg: Config | ModelConfig) -> str:
    model = cfg.model if isinstance(cfg, Config) else cfg
    c = count(model)

    def row(name: str, n: int, note: str = "") -> str:
        return f"  {name:<22}{n / 1e6:>9.1f}M  {n:>13,}  {note}".rstrip()

    lines = [
        f"MED ({model.vision_layers}-layer ViT width {model.vision_width} at {model.image_size}px, "
        f"{model.text_layers}-layer text width {model.text_width}, vocab {model.vocab_size})",
        row("MED (trainable)", c.med, "shared encoder/decoder tensors counted once"),
        row("momentum copies", c.momentum, "ViT, unimodal text encoder, projections"),
        row("captioner (export)", c.captioner, "BlipForConditionalGeneration"),
        row("filter (export)", c.filter, "BlipForImageTextRetrieval"),
        row("ITC queues (floats)", c.queues, f"2 x {model.embed_dim} x {model.queue_size}"),
    ]
    if isinstance(cfg, Config) and cfg.finetune.image_size != model.image_size:
        p = model.patch_size
        extra = ((cfg.finetune.image_size // p) ** 2 - (model.image_size // p) ** 2) * model.vision_width
        lines.append(
            f"  at finetune.image_size {cfg.finetune.image_size}px the ViT position embeddings add "
            f"{extra:,} (captioner {(c.captioner + extra) / 1e6:.1f}M, filter {(c.filter + extra) / 1e6:.1f}M)"
        )
    return "\n".join(lines)
