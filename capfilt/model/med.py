"""The MED: BLIP's multimodal mixture of encoder-decoder, built from transformers' BLIP modules.

One ViT (``BlipVisionModel``), one image-grounded text encoder (``BlipTextModel``: self-attention,
cross-attention, FFN) and one text decoder (``BlipTextLMHeadModel``) that shares every module with the
encoder except each layer's self-attention, like the reference's
``tie_encoder_decoder_weights(encoder, decoder.bert, '', '/attention')``. Heads: ``vision_proj``,
``text_proj`` (ITC), ``itm_head``, the temperature ``temp``; momentum copies of the unimodal encoders
and projections, and the ITC feature queues.

``forward`` computes the three losses (losses.py) for one batch; the training loop owns the optimiser,
schedule and alpha ramp. BLIP_REFERENCE.md, 'MED' and 'Losses'.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel
from transformers.utils import ModelOutput

from capfilt.config import ModelConfig
from capfilt.model import losses as L
from capfilt.model.init import interpolate_positions

LOSSES = ("itc", "itm", "lm")
TEXT_MAX_POSITIONS = 512  # BERT's; must be >= max_text_len


def by_length(
    text_pass: Callable[..., torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *rows: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """``text_pass(ids, mask, *rows)`` on chunks of ``chunk`` rows of similar text length, each cut to
    its longest text, put back in row order; a sequence output ([B, L, ...]) is padded back to L with
    zeros. Padding never changes a real token's output (the mask hides it), so this equals one pass up to
    float rounding. Why: a batch pads every text to its longest, and the demo's captions (10 tokens on
    average, padded to 16) spend over a third of a text pass on padding (docs/BENCHMARKS.md). ``chunk``
    0 is one pass, as the reference does it.
    """
    if chunk <= 0 or input_ids.shape[0] <= chunk:
        return text_pass(input_ids, attention_mask, *rows)
    lengths = attention_mask.sum(1)
    positions = torch.arange(attention_mask.shape[1], device=lengths.device)
    if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
        raise ValueError("text_chunk needs right-padded texts: a chunk is cut to its longest text")
    order = torch.argsort(lengths, stable=True)
    parts = []
    for part in order.split(chunk):
        n = int(lengths[part].max())
        out = text_pass(input_ids[part, :n], attention_mask[part, :n], *(r[part] for r in rows))
        if out.dim() > 2:
            out = F.pad(out, (0, 0, 0, input_ids.shape[1] - n))
        parts.append(out)
    return torch.cat(parts)[torch.argsort(order)]


def vision_config(cfg: ModelConfig) -> BlipVisionConfig:
    return BlipVisionConfig(
        hidden_size=cfg.vision_width,
        intermediate_size=cfg.vision_mlp,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.vision_ln_eps,
        initializer_range=0.02,  # transformers' 1e-10 would start a from-scratch ViT at ~zero weights
    )


def text_config(cfg: ModelConfig, vocab_size: int, ids: dict[str, int]) -> BlipTextConfig:
    return BlipTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_width,
        encoder_hidden_size=cfg.vision_width,
        intermediate_size=cfg.text_ffn,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=max(TEXT_MAX_POSITIONS, cfg.max_text_len),
        hidden_dropout_prob=cfg.text_dropout,
        attention_probs_dropout_prob=cfg.text_dropout,
        label_smoothing=cfg.label_smoothing,
        bos_token_id=ids["dec"],
        eos_token_id=ids["sep"],
        sep_token_id=ids["sep"],
        pad_token_id=ids["pad"],
        is_decoder=True,  # layers get cross-attention; the causal mask is chosen per call
    )


def is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``t`` concatenated along dim 0 (no gradient); ``t`` itself outside DDP."""
    if not is_dist() or torch.distributed.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def tie_decoder_to_encoder(encoder: BlipTextModel, decoder: BlipTextLMHeadModel) -> None:
    """Share everything but each layer's self-attention (``layer[i].attention``) by module identity."""
    bert = decoder.bert
    bert.embeddings = encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.encoder.layer, bert.encoder.layer, strict=True):
        dec_layer.crossattention = enc_layer.crossattention
        dec_layer.intermediate = enc_layer.intermediate
        dec_layer.output = enc_layer.output
    # LM head output weight = word embeddings (its bias stays the decoder's own, tied to cls.predictions.bias)
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight


def _unimodal_copy(encoder: BlipTextModel) -> BlipTextModel:
    """A text encoder without cross-attention: the momentum text encoder only runs unimodal."""
    cfg = copy.deepcopy(encoder.config)
    cfg.is_decoder = False
    m = BlipTextModel(cfg, add_pooling_layer=False)
    return m


class MED(nn.Module):
    """BLIP's MED with ITC/ITM/LM losses, momentum encoders and feature queues."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int]):
        super().__init__()
        self.cfg = copy.deepcopy(cfg)
        self.vocab_size = vocab_size
        self.special_ids = {k: int(special_ids[k]) for k in ("pad", "cls", "sep", "enc", "dec")}
        tcfg = text_config(cfg, vocab_size, self.special_ids)

        self.vision = BlipVisionModel(vision_config(cfg))
        self.text_encoder = BlipTextModel(tcfg, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(tcfg)
        tie_decoder_to_encoder(self.text_encoder, self.text_decoder)

        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))

        # Momentum copies (ITC only): ViT, unimodal text encoder (no cross-attention: never used
        # unimodally, so we skip ~20% of the copy and its EMA), both projections.
        self.vision_m = copy.deepcopy(self.vision)
        self.text_encoder_m = _unimodal_copy(self.text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for _, mom in self.momentum_modules():
            mom.requires_grad_(False)
        self.copy_to_momentum()

        q = cfg.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        # The ids of the queued pairs: their images' (finetuning) and their captions' (same_text_positives);
        # −100 where a pair came without that kind of id.
        self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))
        self.register_buffer("text_idx_queue", torch.full((1, q), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # Rows per text pass (``by_length``); 0: one pass. A compute setting, not part of the model: the
        # training loop sets it from the stage's ``text_chunk``.
        self.text_chunk = 0

    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer) -> MED:
        from capfilt.model.tokenizer import special_ids

        return cls(cfg, len(tokenizer), special_ids(tokenizer))

    # ---- momentum encoders and queues ---------------------------------------------------------

    def momentum_modules(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.vision, self.vision_m),
            (self.text_encoder, self.text_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_proj, self.text_proj_m),
        ]

    def momentum_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(online, momentum) parameter pairs, matched by name (the momentum text encoder lacks cross-attention)."""
        pairs = []
        for online, mom in self.momentum_modules():
            params = dict(online.named_parameters())
            pairs += [(params[name], p_m) for name, p_m in mom.named_parameters()]
        return pairs

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        """Momentum params := online params (at init, as the reference's ``copy_params``)."""
        for p, p_m in self.momentum_pairs():
            p_m.copy_(p)

    @torch.no_grad()
    def momentum_update(self, momentum: float | None = None) -> None:
        """``p_m = m·p_m + (1 − m)·p`` for every momentum parameter (m = cfg.momentum, 0.995)."""
        m = self.cfg.momentum if momentum is None else momentum
        pairs = self.momentum_pairs()
        online = [p.detach() for p, _ in pairs]
        mom = [p_m for _, p_m in pairs]
        torch._foreach_mul_(mom, m)
        torch._foreach_add_(mom, online, alpha=1 - m)

    @torch.no_grad()
    def enqueue(
        self,
        image_feat_m: torch.Tensor,
        text_feat_m: torch.Tensor,
        idx: torch.Tensor | None = None,
        text_idx: torch.Tensor | None = None,
    ):
        """Write the (all-rank) momentum features and the pairs' image and caption ids (−100 for a kind not
        given) at the pointer and advance it by the global batch."""
        image_feats = concat_all_gather(image_feat_m)
        text_feats = concat_all_gather(text_feat_m)
        n = image_feats.size(0)
        q = self.image_queue.size(1)
        if q % n != 0:
            raise ValueError(
                f"queue_size {q} is not a multiple of the global batch {n}: drop the last partial batch"
            )
        ptr = int(self.queue_ptr[0])
        self.image_queue[:, ptr : ptr + n] = image_feats.t()
        self.text_queue[:, ptr : ptr + n] = text_feats.t()
        for queue, ids in ((self.idx_queue, idx), (self.text_idx_queue, text_idx)):
            queue[:, ptr : ptr + n] = -100 if ids is None else concat_all_gather(ids.view(-1)).view(1, -1)
        self.queue_ptr[0] = (ptr + n) % q

    @torch.no_grad()
    def clamp_temp(self) -> None:
        """The reference clamps the ITC temperature to [0.001, 0.5] every step."""
        self.temp.clamp_(0.001, 0.5)

    # ---- encoders and features (also the eval API) ----------------------------------------------

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """ViT output (B, 1 + patches, vision_width), post-LayerNorm; [:, 0] is the CLS."""
        return self.vision(pixel_values=pixels).last_hidden_state

    def text_cls(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder: nn.Module | None = None
    ) -> torch.Tensor:
        """The unimodal text encoder's (or its momentum copy's) [CLS] output, no image: (B, text_width)."""
        encoder = self.text_encoder if encoder is None else encoder

        def text_pass(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return _cls(encoder(input_ids=ids, attention_mask=mask))

        return by_length(text_pass, input_ids, attention_mask, chunk=self.text_chunk)

    def image_feat(self, pixels: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None):
        """L2-normalised ITC image features (B, embed_dim)."""
        if image_embeds is None:
            image_embeds = self.image_embeds(pixels)
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC text features (B, embed_dim)."""
        return F.normalize(self.text_proj(self.text_cls(input_ids, attention_mask)), dim=-1)

    def itm_logits(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        first_token_id: int | None = None,
    ) -> torch.Tensor:
        """ITM head logits (B, 2), column 1 = match; the first token is replaced by [ENC] (or the given id)."""
        ids = input_ids.clone()
        ids[:, 0] = self.special_ids["enc"] if first_token_id is None else first_token_id
        return self.itm_head(self._grounded(self.text_encoder, ids, attention_mask, image_embeds, _cls))

    def decoder_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Decoder logits (B, L, vocab) with [DEC] as first token, causal self-attention, image cross-attention."""
        ids = input_ids.clone()
        ids[:, 0] = self.special_ids["dec"]
        return self._grounded(self.text_decoder, ids, attention_mask, image_embeds, lambda out: out.logits)

    def _grounded(
        self,
        module: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        output: Callable[[ModelOutput], torch.Tensor],
    ) -> torch.Tensor:
        """``output`` of ``module`` (the text encoder or the decoder) on the texts, cross-attending to every
        token of the image on their row; in chunks by length (``by_length``)."""

        def text_pass(ids: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
            ones = torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)
            out = module(
                input_ids=ids,
                attention_mask=mask,
                encoder_hidden_states=embeds,
                encoder_attention_mask=ones,
                use_cache=False,
            )
            return output(out)

        return by_length(text_pass, input_ids, attention_mask, image_embeds, chunk=self.text_chunk)

    @torch.no_grad()
    def momentum_feats(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_embeds_m = self.vision_m(pixel_values=pixels).last_hidden_state
        image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
        text_m = self.text_cls(input_ids, attention_mask, self.text_encoder_m)
        text_feat_m = F.normalize(self.text_proj_m(text_m), dim=-1)
        return image_feat_m, text_feat_m

    # ---- training forward ------------------------------------------------------------------------

    def forward(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float,
        losses: Sequence[str] = LOSSES,
        idx: torch.Tensor | None = None,
        prompt_len: int = 0,
    ) -> dict[str, torch.Tensor]:
        """The requested losses ("itc", "itm", "lm") for one batch, and "loss" = their sum.

        ``input_ids`` are ``[CLS] caption [SEP]`` (tokenizer.tokenize). ``idx`` (image ids, (B,)) selects
        the finetuning variant: same-id positives in ITC, same-id pairs never ITM negatives;
        ``same_text_positives`` adds caption ids (:func:`losses.text_ids`): pairs that share either id are
        positives of each other.
        ``prompt_len`` masks that many tokens after [DEC] out of the LM loss (tokenizer.prompt_length).
        In training mode this also updates the momentum encoders (before their forward) and the queues.
        """
        losses = tuple(losses)
        unknown = set(losses) - set(LOSSES)
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {losses}")
        out: dict[str, torch.Tensor] = {}
        b = pixels.size(0)
        text_idx = L.text_ids(input_ids, attention_mask) if self.cfg.same_text_positives else None
        kinds = [(i, q) for i, q in ((idx, self.idx_queue), (text_idx, self.text_idx_queue)) if i is not None]
        ids = torch.stack([i for i, _ in kinds]) if kinds else None  # [K, B]: the kinds of id given
        image_embeds = self.image_embeds(pixels)

        if "itc" in losses or "itm" in losses:
            self.clamp_temp()
            image_feat = self.image_feat(image_embeds=image_embeds)
            text_feat = self.text_feat(input_ids, attention_mask)

        if "itc" in losses:
            with torch.no_grad():
                if self.training:
                    self.momentum_update()
                image_feat_m, text_feat_m = self.momentum_feats(pixels, input_ids, attention_mask)
            out["itc"] = L.itc_loss(
                image_feat, text_feat, image_feat_m, text_feat_m,
                self.image_queue.clone().detach(), self.text_queue.clone().detach(),
                self.temp, alpha, idx=ids, idx_queue=torch.cat([q for _, q in kinds]) if kinds else None,
            )  # fmt: skip
            if self.training:
                self.enqueue(image_feat_m, text_feat_m, idx, text_idx)

        if "itm" in losses:
            # Hard negatives from this rank's batch (the reference's pretraining; its retrieval
            # finetuning draws from all ranks, see the module notes in the report).
            with torch.no_grad():
                sim_i2t = image_feat @ text_feat.t() / self.temp
                mask = L.negative_mask(b, ids).to(pixels.device)
                neg_image = L.sample_negatives(sim_i2t.t(), mask)  # per text, a negative image
                neg_text = L.sample_negatives(sim_i2t, mask)  # per image, a negative text
            ids_all = [input_ids, input_ids, input_ids[neg_text]]
            atts_all = [attention_mask, attention_mask, attention_mask[neg_text]]
            embeds_all = [image_embeds, L.take_rows(image_embeds, neg_image), image_embeds]
            if self.cfg.itm_swap_negatives:  # the image with its caption, one token swapped
                swapped, ok = L.swap_one_token(input_ids, attention_mask)
                ids_all.append(swapped[ok])
                atts_all.append(attention_mask[ok])
                embeds_all.append(image_embeds[ok])
            logits = self.itm_logits(torch.cat(embeds_all), torch.cat(ids_all), torch.cat(atts_all))
            out["itm"] = L.itm_loss(logits, positives=b)

        if "lm" in losses:
            labels = L.lm_targets(input_ids, self.special_ids["pad"], prompt_len)
            logits = self.decoder_logits(image_embeds, input_ids, attention_mask)
            out["lm"] = L.lm_loss(logits, labels, self.cfg.label_smoothing)

        out["loss"] = sum(out[k] for k in losses)
        return out

    # ---- resolution -------------------------------------------------------------------------------

    @torch.no_grad()
    def resize_image(self, new_size: int) -> None:
        """Interpolate the ViT position embeddings (bicubic, as the reference's ``interpolate_pos_embed``)
        for a new input resolution, in the ViT and its momentum copy. Call before building the optimiser."""
        if new_size == self.cfg.image_size:
            return
        for vit in (self.vision, self.vision_m):
            emb = vit.embeddings
            pos = emb.position_embedding
            new = new_size // self.cfg.patch_size
            emb.position_embedding = nn.Parameter(
                interpolate_positions(pos, new), requires_grad=pos.requires_grad
            )
            emb.image_size = new_size
            emb.num_patches = new * new
            emb.num_positions = new * new + 1
            vit.config.image_size = new_size
        self.vision_m.embeddings.position_embedding.requires_grad_(False)
        self.cfg.image_size = new_size


def _cls(out: ModelOutput) -> torch.Tensor:
    """The [CLS] position of a text encoder's last layer."""
    return out.last_hidden_state[:, 0, :]
