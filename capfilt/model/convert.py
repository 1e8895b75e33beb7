"""``capfilt convert``: Salesforce's original BLIP ``.pth`` checkpoints → a MED folder.

The released pretrain checkpoints (``model_base.pth``, ``model_large.pth``,
``model_base_capfilt_large.pth``) hold ``BLIP_Pretrain``'s state dict, under ``"model"``. They are read
with ``torch.load(weights_only=True)``: tensors and plain containers only, never an arbitrary unpickle.

Names: the text modules (``models/med.py``, ported to transformers as BlipText*) keep their names; the
ViT (``models/vit.py``, timm style) is renamed to transformers' BlipVision names by ``VIT_NAMES``, one
table read both ways. A few reference tensors have no place in our MED and are dropped on purpose
(``DROPPED``); any other key that does not land on a MED tensor is an error that lists it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer

from capfilt.config import ModelConfig
from capfilt.errors import UserError
from capfilt.model.hf import save_med
from capfilt.model.hub import resolve_model
from capfilt.model.med import MED
from capfilt.model.tokenizer import special_ids

# reference top-level module → ours; the others (text_encoder, text_decoder, heads, queues) are the same
MODULES = {"visual_encoder": "vision", "visual_encoder_m": "vision_m"}
# inside a ViT: reference (models/vit.py) → transformers' BlipVisionModel; {i} is a block index
VIT_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{i}.norm1.", "encoder.layers.{i}.layer_norm1."),
    ("blocks.{i}.norm2.", "encoder.layers.{i}.layer_norm2."),
    ("blocks.{i}.attn.qkv.", "encoder.layers.{i}.self_attn.qkv."),
    ("blocks.{i}.attn.proj.", "encoder.layers.{i}.self_attn.projection."),
    ("blocks.{i}.mlp.", "encoder.layers.{i}.mlp."),
    ("norm.", "post_layernorm."),
]
DROPPED = [
    re.compile(r"text_(encoder|encoder_m|decoder\.bert)\.embeddings\.position_ids"),  # arange, rebuilt
    re.compile(r"text_encoder_m\.encoder\.layer\.\d+\.crossattention\."),  # our momentum copy is unimodal
]


class ConvertError(UserError, ValueError):
    """A checkpoint that does not map onto the MED; the message lists what does not fit."""


def _template(t: str) -> re.Pattern:
    return re.compile(re.escape(t).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _rename_vit(rest: str, to_ours: bool) -> str | None:
    for ref, ours in VIT_NAMES:
        src, dst = (ref, ours) if to_ours else (ours, ref)
        m = _template(src).match(rest)
        if m:
            return dst.format(**m.groupdict()) + rest[m.end() :]
    return None


def rename(key: str, to_ours: bool = True) -> str | None:
    """A reference key → our MED's name (``to_ours``), or ours → the reference's; None if no rule fits."""
    modules = MODULES if to_ours else {v: k for k, v in MODULES.items()}
    top, _, rest = key.partition(".")
    if top not in modules:
        return key
    rest = _rename_vit(rest, to_ours)
    return None if rest is None else f"{modules[top]}.{rest}"


def read_checkpoint(src: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a reference ``.pth`` (``"model"`` when wrapped), loaded with weights_only."""
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # a non-checkpoint or a pickle with code in it: the user's file, not our bug
        raise ConvertError(
            f"{src}: not a weights-only torch checkpoint ({type(err).__name__}: {err})"
        ) from err
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{src}: no state dict (expected tensors, or a dict with them under 'model')")
    return state


def load_reference(state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer) -> MED:
    """A MED with every tensor of ``state`` in place; raises listing unmapped, missing or misshapen keys.

    The queue size follows the checkpoint; the id queues (absent from pretrain checkpoints) stay empty,
    as in a fresh MED.
    """
    if "image_queue" in state:
        cfg = dataclasses.replace(cfg, queue_size=state["image_queue"].shape[1])
    try:
        ids = special_ids(tokenizer)
    except KeyError as err:
        raise ConvertError(
            f"{err.args[0]}; pass BLIP's tokenizer (BERT WordPiece plus [DEC] and [ENC])"
        ) from err
    med = MED(cfg, len(tokenizer), ids)
    ours = med.state_dict(keep_vars=True)
    unmapped, misshapen, loaded = [], [], set()
    for key, value in state.items():
        if any(p.match(key) for p in DROPPED):
            continue
        name = rename(key)
        if name not in ours:
            unmapped.append(key)
        elif ours[name].shape != value.shape:
            misshapen.append(f"{key} {tuple(value.shape)} vs {tuple(ours[name].shape)}")
        else:
            loaded.add(name)
            with torch.no_grad():
                ours[name].copy_(value)
    missing = sorted(set(ours) - loaded - {"idx_queue", "text_idx_queue"})
    if unmapped or misshapen or missing:
        raise ConvertError(
            f"the checkpoint does not map onto a {cfg.vision_width}-wide MED: unmapped {unmapped}, "
            f"shape (checkpoint vs MED) {misshapen[:10]}, missing {len(missing)} {missing[:10]}; "
            "convert a pretrain checkpoint (model_base.pth, model_large.pth) with its config "
            "(-c blip-base or blip-large) and BLIP's tokenizer"
        )
    return med


def convert(src: str | Path, out: str | Path, cfg: ModelConfig, tokenizer_ref: str) -> Path:
    """Write a MED folder from a reference ``.pth``; its meta records the source file and its sha256."""
    state = read_checkpoint(src)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(tokenizer_ref).path))
    med = load_reference(state, cfg, tokenizer)
    digest = hashlib.sha256(Path(src).read_bytes()).hexdigest()
    return save_med(med, tokenizer, out, meta={"converted_from": str(src), "sha256": digest})
