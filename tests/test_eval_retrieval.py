"""R@k and the top-k rerank on hand-made score matrices."""

import numpy as np
import pytest
import torch

from capfilt.eval.retrieval import OUTSIDE_TOP_K, recall_at_k, rerank


def test_recall_at_k_by_hand():
    # 3 images, 2 texts each: texts 0,1 → image 0; 2,3 → image 1; 4,5 → image 2
    txt2img = np.array([0, 0, 1, 1, 2, 2])
    i2t = np.array(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # image 0: its text 1 first → hit @1
            [0.9, 0.0, 0.1, 0.0, 0.8, 0.7],  # image 1: texts 0, 4, 5 outrank text 2 → rank 3 (0-based) → @5
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # image 2: all tied, stable order puts text 4 at rank 4 → @5
        ]
    )
    t2i = np.array(
        [
            [0.9, 0.1, 0.0],  # text 0 → image 0 first: hit @1
            [0.1, 0.9, 0.0],  # text 1 → image 0 second: @5
            [0.0, 0.9, 0.1],  # hit @1
            [0.9, 0.0, 0.1],  # image 1 third: @5
            [0.0, 0.0, 0.9],  # hit @1
            [0.0, 0.0, 0.9],  # hit @1
        ]
    )
    r = recall_at_k(i2t, t2i, txt2img)
    assert r["tr@1"] == pytest.approx(100 / 3) and r["tr@5"] == 100.0 and r["tr@10"] == 100.0
    assert r["ir@1"] == pytest.approx(400 / 6) and r["ir@5"] == 100.0
    assert r["r_mean"] == pytest.approx((100 / 3 + 200 + 400 / 6 + 200) / 6)


def test_rerank_scores_only_the_top_k():
    sims = torch.tensor([[0.5, 0.4, 0.3, 0.1]])
    # ITM prefers text 2, which ITC put third: with k=3 it is reranked to the top; text 3 is outside.
    itm = torch.tensor([0.1, 0.1, 0.9, 1.0])
    i2t, _ = rerank(sims, 3, lambda pairs: itm[pairs[:, 1]])
    assert i2t[0, 3] == OUTSIDE_TOP_K
    assert i2t[0].argmax() == 2
    assert torch.allclose(i2t[0, :3], torch.tensor([0.6, 0.5, 1.2]))


def test_rerank_scores_each_pair_once_for_both_directions():
    sims = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.7]])  # 2 images, 3 texts
    itm = torch.tensor([[0.5, 0.0, 0.2], [0.1, 0.4, 0.6]])
    scored = []

    def score(pairs):
        scored.extend(map(tuple, pairs.tolist()))
        return itm[pairs[:, 0], pairs[:, 1]]

    i2t, t2i = rerank(sims, 1, score)
    # image tops: (0, 0), (1, 1); text tops: (0, 0), (1, 1), (1, 2); each pair scored once
    assert sorted(scored) == [(0, 0), (1, 1), (1, 2)]
    assert torch.allclose(i2t, torch.tensor([[1.4, -100, -100], [-100, 1.2, -100]]))
    assert torch.allclose(t2i, torch.tensor([[1.4, -100], [-100, 1.2], [-100, 1.3]]))
