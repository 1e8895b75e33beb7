"""BLIP's captioner and filter for inference, built from an HF-format folder without transformers' modeling code.

Why: importing transformers' BLIP classes pulls in its model-loading machinery (``torch.distributed.tensor``,
``torch._dynamo``), about 4 of the 7 s each Ray actor takes to start on the project's 2-core machine
(docs/BENCHMARKS.md, 'What importing transformers costs an actor'): a fixed cost of every round. The round
already runs its own forward passes over the weights (``model/vision.py``, ``stages/sampler.py``). These
modules hold the weights under HF's names, so a folder (ours or Salesforce's) loads key for key, and add the
filter's text-encoder pass. Training, export and beam search keep transformers' classes;
tests/test_model_blip.py checks that both give the same outputs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from capfilt.model.hub import NotAModel, resolve_model, weight_files
from capfilt.model.tokenizer import load_tokenizer

# transformers' BlipTextConfig / BlipVisionConfig / BlipConfig defaults for what these modules read: a folder
# written by an older transformers may leave them out (a test compares them with transformers' own).
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30524,
    "hidden_size": 768,
    "encoder_hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "bos_token_id": 30522,
    "sep_token_id": 102,
    "tie_word_embeddings": True,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 384,
    "patch_size": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
BLIP_DEFAULTS: dict[str, Any] = {"image_text_hidden_size": 256}
DEFAULT_ITM_FIRST_TOKEN = "[CLS]"  # what Salesforce's HF ITM checkpoints (and transformers) feed
ACTIVATIONS = {"gelu": F.gelu}  # what BLIP's configs use (transformers' "gelu" is the exact, erf one)


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported here (one of {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class PostNorm(nn.Module):
    """BERT's output block: LayerNorm(dense(h) + x)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, d_out), nn.LayerNorm(d_out, eps=eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + x)


class TextAttention(nn.Module):
    """``attention`` or ``crossattention`` of a BLIP text layer: ``self.{query,key,value}`` and ``output``."""

    def __init__(self, c: SimpleNamespace, kv_width: int):
        super().__init__()
        self.self = nn.Module()
        self.self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.self.key, self.self.value = (
            nn.Linear(kv_width, c.hidden_size),
            nn.Linear(kv_width, c.hidden_size),
        )
        self.output = PostNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps)
        self.heads = c.num_attention_heads

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.attend(x, *self.keys_values(kv), mask)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``kv`` [B, N, D], split into heads: [B, heads, N, head_dim] each."""
        return self._heads(self.self.key(kv)), self._heads(self.self.value(kv))

    def attend(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        q = self._heads(self.self.query(x))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        return self.output(att, x)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class Dense(nn.Module):
    """A linear layer and its activation, under HF's name for the linear (``intermediate.dense``)."""

    def __init__(self, d_in: int, d_out: int, act: str):
        super().__init__()
        self.dense, self.act = nn.Linear(d_in, d_out), _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class TextLayer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.attention = TextAttention(c, c.hidden_size)
        self.crossattention = TextAttention(c, c.encoder_hidden_size)
        self.intermediate = Dense(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.output = PostNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps)


@dataclass
class ImageKeysValues:
    """Every text layer's cross-attention keys and values of a batch of images, computed once per image.

    Why: an image's candidate captions (its alt-text and its synthetic ones) attend to the same image, and at
    BLIP-base size (577 image tokens against a caption's 10 to 35) projecting the image is most of an ITM
    pass's arithmetic: computed per caption, it is done once per candidate (docs/BENCHMARKS.md, 'Cross-attention keys
    and values once per image'). ``rows`` gives each text's image; the keys and values are gathered for one
    layer at a time, so no copy of all layers for all texts is held.
    """

    # per layer: keys and values, each [images, heads, tokens, head_dim]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    rows: torch.Tensor | None = None  # the image of each text (None: text i is image i's)

    def for_rows(self, rows: torch.Tensor) -> ImageKeysValues:
        return ImageKeysValues(self.layers, rows)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.layers[i]
        return (k, v) if self.rows is None else (k[self.rows], v[self.rows])


def _embedding(n: int, d: int) -> nn.Embedding:
    """An n×d table left uninitialised, for a checkpoint to fill: ``nn.Embedding``'s random init on the
    meta device (``load``) imports ``torch._dynamo``, 2-3 s of an actor's start."""
    return nn.Embedding.from_pretrained(torch.empty(n, d), freeze=False)


class TextModel(nn.Module):
    """BLIP's BERT with cross-attention (``text_encoder``, or ``text_decoder.bert``)."""

    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.config = c
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = _embedding(c.vocab_size, c.hidden_size)
        self.embeddings.position_embeddings = _embedding(c.max_position_embeddings, c.hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(TextLayer(c) for _ in range(c.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        image_kv: ImageKeysValues | None = None,
        first_token_only: bool = False,
    ) -> SimpleNamespace:
        """Bidirectional over the text (padding masked), cross-attending to the image when it is given:
        its embeddings (``encoder_hidden_states``, one row per text), or their projections from
        :meth:`image_keys_values`.

        ``first_token_only``: the last layer computes the first token's output alone (``last_hidden_state``
        [B, 1, D]), which is all that ITM and ITC read; its keys and values still come from every token.
        The rest of that layer is work on tokens whose outputs nobody reads: a quarter of a text pass at the
        demo's 4 layers, a twelfth at BLIP-base's 12."""
        emb = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions))
        mask = attention_mask[:, None, None, :].bool()
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            query = x[:, :1] if first_token_only and i == last else x
            x = layer.attention.attend(query, *layer.attention.keys_values(x), mask)
            if encoder_hidden_states is not None:
                x = layer.crossattention(x, encoder_hidden_states, None)
            elif image_kv is not None:
                x = layer.crossattention.attend(x, *image_kv.layer(i), None)
            x = layer.output(layer.intermediate(x), x)
        return SimpleNamespace(last_hidden_state=x)

    def image_keys_values(self, image_embeds: torch.Tensor) -> ImageKeysValues:
        """Each layer's cross-attention keys and values of ``image_embeds`` [B, N, D], one row per image."""
        return ImageKeysValues(
            [layer.crossattention.keys_values(image_embeds) for layer in self.encoder.layer]
        )


class LMHead(nn.Module):
    """``cls.predictions``: transform (dense, activation, LayerNorm), then the vocabulary projection."""

    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.transform = Dense(c.hidden_size, c.hidden_size, c.hidden_act)
        self.transform.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size)
        self.bias = self.decoder.bias  # HF ties the two; checkpoints store ``cls.predictions.bias``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform.LayerNorm(self.transform(x)))


class TextDecoder(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.config = c
        self.bert = TextModel(c)
        self.cls = nn.Module()
        self.cls.predictions = LMHead(c)
        self.tie()

    def tie(self) -> None:
        """Share HF's tied tensors: the LM head's bias with ``cls.predictions.bias`` (what checkpoints
        store), its weight with the word embeddings when ``tie_word_embeddings``. ``load`` calls it again
        once it has put the checkpoint's tensors in place of the meta ones."""
        head = self.cls.predictions
        head.decoder.bias = head.bias
        if self.config.tie_word_embeddings:
            head.decoder.weight = self.bert.embeddings.word_embeddings.weight


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, hidden), nn.Linear(hidden, d), _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        d, eps = c.hidden_size, c.layer_norm_eps
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.self_attn = nn.Module()
        self.self_attn.qkv, self.self_attn.projection = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.self_attn.num_heads, self.self_attn.head_dim = c.num_attention_heads, d // c.num_attention_heads
        self.mlp = MLP(d, c.intermediate_size, c.hidden_act)


class VisionEmbeddings(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        grid = c.image_size // c.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, grid * grid + 1, c.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """HF's ``BlipVisionEmbeddings`` step for step: patches, the class token first, positions added."""
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixels.to(dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(dtype), x], dim=1)
        return x + self.position_embedding[:, : x.shape[1], :].to(dtype)


class VisionModel(nn.Module):
    """BLIP's ViT; its forward is ``model.vision.image_embeds``."""

    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.config = c
        self.embeddings = VisionEmbeddings(c)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class BlipCaptioner(nn.Module):
    """``BlipForConditionalGeneration``'s weights: ``vision_model`` and ``text_decoder``."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(_section(config, "vision_config", VISION_DEFAULTS))
        self.text_decoder = TextDecoder(_section(config, "text_config", TEXT_DEFAULTS))


class BlipFilter(nn.Module):
    """``BlipForImageTextRetrieval``'s weights: ViT, text encoder, ITC projections and the ITM head."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        text = _section(config, "text_config", TEXT_DEFAULTS)
        vision = _section(config, "vision_config", VISION_DEFAULTS)
        embed = config.get("image_text_hidden_size", BLIP_DEFAULTS["image_text_hidden_size"])
        self.vision_model = VisionModel(vision)
        self.text_encoder = TextModel(text)
        self.vision_proj = nn.Linear(vision.hidden_size, embed)
        self.text_proj = nn.Linear(text.hidden_size, embed)
        self.itm_head = nn.Linear(text.hidden_size, 2)


def _section(config: dict[str, Any], key: str, defaults: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(**(defaults | {k: v for k, v in config.get(key, {}).items() if k in defaults}))


def load(
    cls: type[BlipCaptioner] | type[BlipFilter], path: Path, device: str | torch.device, dtype: torch.dtype
):
    """Build ``cls`` from ``path/config.json`` and load every tensor of its safetensors file(s) by name.

    A tensor the modules do not have, or one they need that the folder lacks, is an error that names it;
    tied copies HF may have stored (the LM head's weight and bias) are ignored. The modules are built on
    the meta device and take the checkpoint's tensors, copied to ``device`` and ``dtype``: a random
    initialisation would be overwritten anyway, and at BLIP-base size it took longer than reading the
    weights (docs/BENCHMARKS.md, 'Loading the models').
    """
    config = json.loads((path / "config.json").read_text())
    with torch.device("meta"):
        model = cls(config)
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        state |= load_file(str(f))
    tied = {"text_decoder.cls.predictions.decoder.bias"}
    if isinstance(model, BlipCaptioner) and model.text_decoder.config.tie_word_embeddings:
        tied.add("text_decoder.cls.predictions.decoder.weight")
    wanted = {k for k in model.state_dict() if k not in tied}
    missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted - tied)
    if missing or extra:
        raise NotAModel(
            f"{path}: not a {cls.__name__} of BLIP: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    # copies, not views of the file's memory map, which a rewrite of the file would change under us
    owned = {
        k: state[k].to(device, dtype if state[k].is_floating_point() else None, copy=True) for k in wanted
    }
    model.load_state_dict(owned, strict=False, assign=True)
    if isinstance(model, BlipCaptioner):
        model.text_decoder.tie()  # the tied tensors were not in the checkpoint's share
    return model.eval()


def _capfilt_meta(config: dict[str, Any]) -> dict[str, Any]:
    meta = config.get("capfilt")
    return dict(meta) if isinstance(meta, dict) else {}


def captioner_info(config: dict[str, Any]) -> dict[str, Any]:
    """source ("capfilt"/"external"), dec_token_id (the decoder's first token, from the config),
    sep_token_id (eos), pad_token_id."""
    text = _section(config, "text_config", TEXT_DEFAULTS)
    return {
        "source": "capfilt" if _capfilt_meta(config) else "external",
        "dec_token_id": int(text.bos_token_id),
        "sep_token_id": int(text.sep_token_id),
        "pad_token_id": int(text.pad_token_id),
    }


def filter_info(config: dict[str, Any], vocab: dict[str, int], path: Path) -> dict[str, Any]:
    """source, itm_first_token (ours: "[ENC]"; Salesforce's: "[CLS]"), itm_first_token_id (replace
    ids[:, 0] with it for ITM), itc_temp (None for Salesforce's)."""
    meta = _capfilt_meta(config)
    first = meta.get("itm_first_token", DEFAULT_ITM_FIRST_TOKEN)
    if first not in vocab:
        raise ValueError(f"{path}: the ITM first token {first} is not in the tokenizer")
    return {
        "source": "capfilt" if meta else "external",
        "itm_first_token": first,
        "itm_first_token_id": int(vocab[first]),
        "itc_temp": meta.get("itc_temp"),
    }


def _load_ref(cls: type[BlipCaptioner] | type[BlipFilter], ref: str | Path, device, dtype):
    """Resolve ``ref`` (a folder or a cached hub id), load the model and its tokenizer, log one line."""
    path = resolve_model(ref).path
    model, tokenizer = load(cls, path, device, dtype), load_tokenizer(path)
    print(f"[model] loaded {cls.__name__} from {ref} on {device}", file=sys.stderr, flush=True)
    return model, tokenizer, path


def load_captioner(ref: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A captioner folder or hub id (ours or Salesforce's) → (BlipCaptioner in eval mode, tokenizer, info)."""
    model, tokenizer, path = _load_ref(BlipCaptioner, ref, device, dtype)
    return model, tokenizer, captioner_info(model.config)


def load_filter(ref: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A filter folder or hub id (ours or Salesforce's) → (BlipFilter in eval mode, tokenizer, info)."""
    model, tokenizer, path = _load_ref(BlipFilter, ref, device, dtype)
    return model, tokenizer, filter_info(model.config, tokenizer.get_vocab(), path)
