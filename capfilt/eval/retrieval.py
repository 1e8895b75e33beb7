"""Image-text retrieval R@1/5/10 on held-out images with several references each, as BLIP evaluates.

ITC cosine similarities rank every image against every text; each query's top k (16 by default) are then
reranked by ITM plus ITC, everything outside the top k keeps a score of −100 (the reference's
``evaluation`` in train_retrieval.py). The reference adds the ITM head's positive logit; we add the
match probability, the number the filter stage computes and selects on, so the eval scores what the
stage scores. Works from a FILTER folder, so ours and Salesforce's are measured by the same code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from capfilt.config import FilterConfig
from capfilt.eval.heldout import HeldOut
from capfilt.model.tokenizer import normalize_caption, tokenize
from capfilt.stages.filter import MAX_TEXT_TOKENS, Filter

OUTSIDE_TOP_K = -100.0


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


def rerank(sims: torch.Tensor, k: int, score_pairs) -> torch.Tensor:
    """Scores [queries, items]: −100 outside each query's top k by ``sims``, else ``score_pairs`` + sim.

    ``score_pairs(query, items)`` returns the ITM score of the query against each of ``items``.
    """
    scores = torch.full_like(sims, OUTSIDE_TOP_K)
    top_sims, top_idx = sims.topk(min(k, sims.shape[1]), dim=1)
    for q in range(sims.shape[0]):
        scores[q, top_idx[q]] = score_pairs(q, top_idx[q]) + top_sims[q]
    return scores


@torch.no_grad()
def evaluate_retrieval(filter_path: str, data: HeldOut, cfg: FilterConfig, k: int = 16) -> dict[str, float]:
    """R@k of a filter folder on held-out images, each with its references as the relevant texts."""
    filt = Filter(str(filter_path), cfg)
    model, dev = filt.model, filt.device
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
        cls = model.text_encoder(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state[:, 0]
        text_feat.append(F.normalize(model.text_proj(cls), dim=-1))
    sims = (image_feat @ torch.cat(text_feat).t()).float().cpu()

    def itm(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        pairs = filt.score_pairs(image_embeds[image_idx], image_feat[image_idx], [texts[t] for t in text_idx])
        return torch.tensor([p[0] for p in pairs])

    i2t = rerank(sims, k, lambda i, top: itm(torch.full_like(top, i), top))
    t2i = rerank(sims.t().contiguous(), k, lambda t, top: itm(top, torch.full_like(top, t)))
    return recall_at_k(i2t.numpy(), t2i.numpy(), txt2img) | {
        "images": len(data.keys),
        "texts": len(texts),
        "k": k,
    }
