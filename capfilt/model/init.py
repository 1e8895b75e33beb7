"""The reference's starting point for pretraining: a pretrained ViT and a pretrained BERT in a fresh MED.

BLIP never pretrains from scratch: ``blip_pretrain.py`` loads DeiT-base (ImageNet) into its ViT and
``bert-base-uncased`` into its text encoder and its decoder (which it then ties to the encoder), with
BERT's tokenizer plus [DEC] and [ENC]. ``model.vision_init`` and ``model.text_init`` do the same from a
local folder or a cached hub id (``model/hub.py``: never a download). Vision weights may come in timm's
layout (``timm/deit_base_patch16_224.fb_in1k``: the reference's DeiT), as an HF ``ViTModel``
(``google/vit-base-patch16-224``) or as a BLIP ViT (a checkpoint's ``vision_model``); text weights are
an HF BERT. Shapes must match the config: a ViT of another width or depth is a clear error, another
input grid is interpolated like ``MED.resize_image``.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForMaskedLM, PreTrainedTokenizerBase, ViTModel

from capfilt.errors import UserError
from capfilt.model.hub import NotAModel, resolve_model, weight_files
from capfilt.model.tokenizer import DEC_TOKEN, ENC_TOKEN

# (ours under encoder.layers.N., timm's under blocks.N.): the same pre-norm block, other names
_TIMM_BLOCK = (
    ("layer_norm1", "norm1"),
    ("self_attn.qkv", "attn.qkv"),
    ("self_attn.projection", "attn.proj"),
    ("layer_norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)


class InitMismatch(UserError, ValueError):
    """Pretrained weights that do not fit the configured MED (another width, depth or patch size)."""


def interpolate_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """ViT position embeddings [1, 1 + g*g, D] for a ``grid`` × ``grid`` patch grid (bicubic, the
    reference's ``interpolate_pos_embed``); the [CLS] position is kept as it is."""
    old = int(round((pos.size(1) - 1) ** 0.5))
    if old == grid:
        return pos
    dim = pos.size(-1)
    patches = pos[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches.float(), size=(grid, grid), mode="bicubic")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)
    return torch.cat([pos[:, :1], patches], dim=1)


def _from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "embeddings.class_embedding": state["cls_token"],
        "embeddings.position_embedding": state["pos_embed"],
        "post_layernorm.weight": state["norm.weight"],
        "post_layernorm.bias": state["norm.bias"],
    }
    for part in ("weight", "bias"):
        out[f"embeddings.patch_embedding.{part}"] = state[f"patch_embed.proj.{part}"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        for ours, theirs in _TIMM_BLOCK:
            for part in ("weight", "bias"):
                out[f"encoder.layers.{i}.{ours}.{part}"] = state[f"blocks.{i}.{theirs}.{part}"]
    return out


def _from_hf_vit(vit: ViTModel) -> dict[str, torch.Tensor]:
    emb = vit.embeddings
    out = {
        "embeddings.class_embedding": emb.cls_token,
        "embeddings.position_embedding": emb.position_embeddings,
        "embeddings.patch_embedding.weight": emb.patch_embeddings.projection.weight,
        "embeddings.patch_embedding.bias": emb.patch_embeddings.projection.bias,
        "post_layernorm.weight": vit.layernorm.weight,
        "post_layernorm.bias": vit.layernorm.bias,
    }
    for i, layer in enumerate(vit.layers):
        attn, prefix = layer.attention, f"encoder.layers.{i}."
        for part in ("weight", "bias"):
            qkv = [getattr(getattr(attn, f"{p}_proj"), part) for p in "qkv"]
            out[prefix + f"self_attn.qkv.{part}"] = torch.cat(qkv)
            out[prefix + f"self_attn.projection.{part}"] = getattr(attn.o_proj, part)
            out[prefix + f"layer_norm1.{part}"] = getattr(layer.layernorm_before, part)
            out[prefix + f"layer_norm2.{part}"] = getattr(layer.layernorm_after, part)
            out[prefix + f"mlp.fc1.{part}"] = getattr(layer.mlp.fc1, part)
            out[prefix + f"mlp.fc2.{part}"] = getattr(layer.mlp.fc2, part)
    return {k: v.detach() for k, v in out.items()}


def vision_state(ref: str) -> dict[str, torch.Tensor]:
    """A pretrained ViT's weights under ``BlipVisionModel``'s names: timm's layout, an HF ViT, or BLIP's own
    (a ``BlipVisionModel``, or the ``vision_model`` of a BLIP checkpoint such as Salesforce's)."""
    path = resolve_model(ref).path
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        state.update(load_file(f))
    blip = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    if "embeddings.class_embedding" in (blip or state):  # a BLIP checkpoint's ViT, or a BlipVisionModel
        return blip or state
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        if "dist_token" in state:
            raise InitMismatch(f"{ref}: a distilled DeiT (two class tokens); BLIP starts from the plain one")
        try:
            return _from_timm(state)
        except KeyError as err:
            raise InitMismatch(f"{ref}: timm ViT weights without {err} (another ViT variant)") from None
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "vit":
        return _from_hf_vit(ViTModel.from_pretrained(str(path), add_pooling_layer=False))
    raise NotAModel(f"{ref}: not a ViT in timm's, HF's (model_type vit) or BLIP's layout")


def load_vision(vision: torch.nn.Module, ref: str) -> None:
    """Copy a pretrained ViT into the MED's ``BlipVisionModel``, position grid interpolated to its own."""
    state = vision_state(ref)
    pos = vision.embeddings.position_embedding
    state["embeddings.position_embedding"] = interpolate_positions(
        state["embeddings.position_embedding"], int(round((pos.size(1) - 1) ** 0.5))
    )
    ours = vision.state_dict()
    _check(ref, "model.vision_*", ours, state)
    vision.load_state_dict(state)


def text_state(ref: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An HF BERT's encoder weights under ``BlipTextModel``'s names, and its MLM head (empty when the
    checkpoint has none). BLIP's text embeddings have no token types: BERT adds token type 0 to every
    position, so that vector is folded into the position embeddings and the function stays BERT's (the
    reference drops it)."""
    path = resolve_model(ref).path
    weight_files(path)
    model, info = BertForMaskedLM.from_pretrained(str(path), output_loading_info=True)
    state = {k.removeprefix("bert."): v.detach() for k, v in model.state_dict().items()}
    token_type = state.pop("embeddings.token_type_embeddings.weight")[0]
    state["embeddings.position_embeddings.weight"] = (
        state["embeddings.position_embeddings.weight"] + token_type
    )
    head = {k: state.pop(k) for k in [k for k in state if k.startswith("cls.")]}
    if any(k.startswith("cls.") for k in info["missing_keys"]):
        head = {}
    return state, head


def load_text(med: torch.nn.Module, ref: str) -> None:
    """BERT into the text encoder (all but cross-attention) and into the decoder's own self-attention,
    and BERT's MLM head into the LM head: the reference's ``from_pretrained('bert-base-uncased')`` twice.
    The rows of [DEC] and [ENC] (appended to BERT's vocabulary) keep their fresh initialisation."""
    state, head = text_state(ref)
    words = state["embeddings.word_embeddings.weight"]
    ours = med.text_encoder.embeddings.word_embeddings.weight
    if words.shape[0] > ours.shape[0] or words.shape[1] != ours.shape[1]:
        raise InitMismatch(
            f"{ref}: word embeddings {tuple(words.shape)} do not fit the MED's {tuple(ours.shape)}"
        )
    state["embeddings.word_embeddings.weight"] = torch.cat([words, ours.detach()[words.shape[0] :]])
    encoder = {k: v for k, v in med.text_encoder.state_dict().items() if ".crossattention." not in k}
    _check(ref, "model.text_*", encoder, state)
    med.text_encoder.load_state_dict(state, strict=False)
    med.text_decoder.bert.load_state_dict(state, strict=False)  # its self-attention; the rest is shared
    if head:
        bias = head.pop("cls.predictions.bias")
        lm = med.text_decoder.cls.predictions
        lm.bias.data[: bias.shape[0]] = bias
        lm.transform.load_state_dict(
            {
                k.removeprefix("cls.predictions.transform."): v
                for k, v in head.items()
                if k.startswith("cls.predictions.transform.")
            }
        )


def _check(ref: str, keys: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Names and shapes must match exactly: a clear error instead of a half-initialised model."""
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    wrong = [
        f"{k} {tuple(theirs[k].shape)} (ours {tuple(v.shape)})"
        for k, v in ours.items()
        if k in theirs and theirs[k].shape != v.shape
    ]
    if missing or extra or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for what, items in (("missing", missing), ("unexpected", extra), ("shape", wrong))
            if items
        )
        raise InitMismatch(f"{ref} does not fit the configured MED (check {keys}): {detail}")


def bert_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """The text checkpoint's own tokenizer plus [DEC] (bos) and [ENC], as the reference's ``init_tokenizer``."""
    tok = AutoTokenizer.from_pretrained(str(resolve_model(ref).path))
    tok.add_special_tokens({"bos_token": DEC_TOKEN, "extra_special_tokens": [ENC_TOKEN]})
    return tok
