"""Image-text retrieval R@1/5/10 on held-out images with several references each, as BLIP evaluates.

ITC cosine similarities rank every image against every text; each query's top k (16 by default, enough
for the demo's 500 images; BLIP's COCO config has ``k_test: 256``) are then reranked by ITM plus ITC,
everything outside the top k keeps a score of −100 (the reference's ``evaluation`` in
train_retrieval.py). The reference scores each query's k pairs in its own ITM call;
here the pairs of both directions are scored once each, in chunks of ``filter.batch_size`` (an image's
top texts and those texts' top images overlap): the same scores in a fraction of the time. The
reference adds the ITM head's positive logit; we add the match probability, the number the filter
stage computes and selects on, so the eval scores what the stage scores. Works from a FILTER folder, so
ours and Salesforce's are measured by the same code.
"""

from __future__ import annotations

import numpy as np
import torch

from capfilt.config import FilterConfig
from capfilt.eval.heldout import HeldOut
from capfilt.model.tokenizer import normalize_caption, tokenize
from capfilt.stages.filter import MAX_TEXT_TOKENS, Filter, length_chunks

OUTSIDE_TOP_K = -100.0
RERANK_K = 16


def recall_at_k(i2t: np.ndarray, t2i: np.ndarray, txt2img: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """TR@k and IR@k in percent from score matrices i2t [images, texts] and t2i [texts, images].

    Text retrieval: an image hits at k if any of its texts (``txt2img == image``) is in its top k.
    Image retrieval: a text hits at k if its image is in its top k.
    """
    txt2img = np.asarray(txt2img)
    tr_rank = np.empty(i2t.shape[0])
    for i, row in enumerate(i2t):
        order = np.argsort(-row, kind="stable")
        tr_rank[i] = np.flatnonzero(txt2img[order] == i).min()
    ir_rank = np.array(
        [np.flatnonzero(np.argsort(-row, kind="stable") == txt2img[t])[0] for t, row in enumerate(t2i)]
    )
    out = {f"tr@{k}": 100.0 * float((tr_rank < k).mean()) for k in ks}
    out |= {f"ir@{k}": 100.0 * float((ir_rank < k).mean()) for k in ks}
    out["r_mean"] = float(np.mean(list(out.values())))
    return out


def top_k_mask(sims: torch.Tensor, k: int) -> torch.Tensor:
    """True at each row's top k columns of ``sims`` (ties as ``torch.topk`` breaks them)."""
    mask = torch.zeros_like(sims, dtype=torch.bool)
    mask.scatter_(1, sims.topk(min(k, sims.shape[1]), dim=1).indices, True)
    return mask


def rerank(sims: torch.Tensor, k: int, score_pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t [images, texts], t2i [texts, images]): ITM + sim inside each query's top k by ``sims``, −100 outside.

    ``sims`` is [images, texts]. The pairs that either direction reranks are scored once, all together:
    ``score_pairs(pairs)`` gets an [n, 2] tensor of (image, text) indices and returns their n ITM scores.
    """
    i2t_top = top_k_mask(sims, k)
    t2i_top = top_k_mask(sims.t(), k).t()
    pairs = (i2t_top | t2i_top).nonzero()
    itm = torch.zeros_like(sims)
    itm[pairs[:, 0], pairs[:, 1]] = score_pairs(pairs).to(sims.dtype)
    i2t = torch.where(i2t_top, itm + sims, OUTSIDE_TOP_K)
    t2i = torch.where(t2i_top, itm + sims, OUTSIDE_TOP_K).t()
    return i2t, t2i


@torch.no_grad()
def evaluate_retrieval(
    filter_path: str, data: HeldOut, cfg: FilterConfig, k: int = RERANK_K
) -> dict[str, float]:
    """R@k of a filter folder on held-out images, each with its references as the relevant texts."""
    filt = Filter(str(filter_path), cfg)
    dev = filt.device
    texts = [normalize_caption(t) for refs in data.references for t in refs]
    txt2img = np.array([i for i, refs in enumerate(data.references) for _ in refs])

    image_embeds, image_feat = [], []
    for start in range(0, len(data.keys), cfg.batch_size):
        embeds, feat = filt.encode_images(data.pixels[start : start + cfg.batch_size])
        image_embeds.append(embeds)
        image_feat.append(feat)
    image_embeds, image_feat = torch.cat(image_embeds), torch.cat(image_feat)
    text_feat = []
    for start in range(0, len(texts), cfg.batch_size):
        ids, mask = tokenize(filt.tokenizer, texts[start : start + cfg.batch_size], MAX_TEXT_TOKENS)
        text_feat.append(filt.text_features(ids.to(dev), mask.to(dev)))
    sims = (image_feat @ torch.cat(text_feat).t()).float().cpu()

    def itm(pairs: torch.Tensor) -> torch.Tensor:
        scores = torch.empty(len(pairs))
        for chunk in length_chunks([len(texts[t]) for t in pairs[:, 1].tolist()], cfg.batch_size):
            image, text = pairs[chunk].unbind(1)
            scores[chunk] = filt.match(image_embeds[image], [texts[t] for t in text])
        return scores

    i2t, t2i = rerank(sims, k, itm)
    return recall_at_k(i2t.numpy(), t2i.numpy(), txt2img) | {
        "images": len(data.keys),
        "texts": len(texts),
        "k": k,
    }
