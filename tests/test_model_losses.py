"""Each loss on inputs small enough to check by hand."""

import math

import torch
import torch.nn.functional as F

from capfilt.model import losses as L

E = math.e
EYE2 = torch.eye(2)


def _itc(alpha, queue=None, idx=None, idx_queue=None):
    q = torch.zeros(2, 0) if queue is None else queue
    return float(L.itc_loss(EYE2, EYE2, EYE2, EYE2, q, q, 1.0, alpha, idx=idx, idx_queue=idx_queue))


def test_itc_one_hot_2x2():
    # sims = I / 1: each row softmax is [e, 1] / (e + 1); target one-hot on the diagonal
    assert math.isclose(_itc(0.0), -math.log(E / (E + 1)), rel_tol=1e-6)


def test_itc_momentum_distillation_2x2():
    p = E / (E + 1)  # softmax of the momentum sims (= online sims here) on the diagonal
    t = 0.5 * p + 0.5  # alpha·softmax + (1 − alpha)·one-hot
    expected = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    assert math.isclose(_itc(0.5), expected, rel_tol=1e-6)


def test_itc_queue_column_is_a_negative():
    queue = torch.tensor([[0.0], [1.0]])  # one queued feature, equal to item 1
    # row 0: sims [1, 0, 0] → target col 0; row 1: sims [0, 1, 1] → target col 1
    l0 = -math.log(E / (E + 2))
    l1 = -math.log(E / (2 * E + 1))
    assert math.isclose(_itc(0.0, queue), (l0 + l1) / 2, rel_tol=1e-6)


def test_itc_same_id_targets():
    # both items of image 7: each row's target is [0.5, 0.5]
    expected = -(0.5 * math.log(E / (E + 1)) + 0.5 * math.log(1 / (E + 1)))
    got = _itc(0.0, idx=torch.tensor([7, 7]), idx_queue=torch.zeros(1, 0, dtype=torch.long))
    assert math.isclose(got, expected, rel_tol=1e-6)
    # an id in the queue matching a batch item counts as a positive too
    t = L.positive_targets(2, 3, torch.tensor([1, 2]), torch.tensor([1, 2, 1]))
    assert torch.allclose(t, torch.tensor([[0.5, 0, 0.5], [0, 1, 0]]))


def test_ids_of_two_kinds_make_a_pair_positive_if_either_is_shared():
    """Image ids [4, 4, 9, 6] and caption ids [1, 2, 3, 3]: items 0-1 show one picture, items 2-3 carry
    one caption; with only one kind, the other pair would be a negative."""
    ids = torch.tensor([[4, 4, 9, 6], [1, 2, 3, 3]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(L.same_id(ids, ids), expected)
    assert torch.equal(L.negative_mask(4, ids), expected)
    queue = torch.tensor([[9, -100], [-100, 1]])  # a queued pair of image 9, one of caption 1
    t = L.positive_targets(4, 6, ids, torch.cat([ids, queue], dim=1))
    assert torch.allclose(t[0], torch.tensor([1, 1, 0, 0, 0, 1]) / 3)
    assert torch.allclose(t[2], torch.tensor([0, 0, 1, 1, 1, 0]) / 3)
    assert torch.equal(L.same_id(ids[0], ids[0]), L.negative_mask(4, ids[0]))  # a 1-D tensor: one kind


def test_hard_negative_picks_the_only_option():
    sim = torch.tensor([[5.0, -5.0], [3.0, 9.0]])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert L.sample_negatives(sim, L.negative_mask(2), g).tolist() == [1, 0]
    # with ids: items 0 and 1 show the same image, so both must pick 2; item 2 picks 0 or 1
    idx = torch.tensor([4, 4, 9])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        neg = L.sample_negatives(torch.zeros(3, 3), L.negative_mask(3, idx), g).tolist()
        assert neg[:2] == [2, 2] and neg[2] in (0, 1)


def test_hard_negative_follows_the_similarity():
    sim = torch.tensor([[0.0, 10.0, -10.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = [int(L.sample_negatives(sim, L.negative_mask(3), g)[0]) for _ in range(200)]
    assert picks.count(1) > 190  # the hardest negative dominates, the other stays possible (1e-4)


def test_hard_negative_all_same_id_falls_back_to_off_diagonal():
    mask = L.negative_mask(2, torch.tensor([3, 3]))
    assert L.sample_negatives(torch.zeros(2, 2), mask).tolist() == [1, 0]


def test_itm_loss():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])  # B = 1: labels [1, 0, 0]
    expected = (-math.log(E**2 / (1 + E**2)) - math.log(E / (E + 1)) - math.log(0.5)) / 3
    assert math.isclose(float(L.itm_loss(logits)), expected, rel_tol=1e-6)
    assert L.itm_labels(2).tolist() == [1, 1, 0, 0, 0, 0]


def test_lm_targets_pad_prompt_and_final_sep():
    ids = torch.tensor([[5, 10, 11, 12, 3, 0, 0]])  # [DEC] a picture x [SEP] pad pad
    assert L.lm_targets(ids, 0).tolist() == [[-100, 10, 11, 12, 3, -100, -100]]
    assert L.lm_targets(ids, 0, prompt_len=2).tolist() == [[-100, -100, -100, 12, 3, -100, -100]]


def test_lm_loss_matches_manual_label_smoothing():
    torch.manual_seed(0)
    v, eps = 6, 0.1
    logits = torch.randn(2, 4, v)
    labels = torch.tensor([[-100, 2, 3, -100], [-100, 1, 5, 4]])
    logp = F.log_softmax(logits, dim=-1)
    terms = []
    for b in range(2):
        for t in range(3):  # logits[:, t] predict labels[:, t + 1]
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            terms.append((1 - eps) * -logp[b, t, y] + eps * -logp[b, t].mean())
    expected = torch.stack(terms).mean()
    assert torch.allclose(L.lm_loss(logits, labels, eps), expected, atol=1e-6)
    assert len(terms) == 5  # 2 + 3 non-ignored targets


def test_text_ids_equal_for_equal_captions_whatever_the_padding():
    ids = torch.tensor([[1, 7, 8, 2, 0], [1, 7, 8, 2, 0], [1, 7, 9, 2, 0], [1, 8, 7, 2, 0]])
    mask = (ids != 0).long()
    t = L.text_ids(ids, mask).tolist()
    assert t[0] == t[1] and len({t[0], t[2], t[3]}) == 3  # order of tokens matters
    assert L.text_ids(ids[:1, :4], mask[:1, :4]).tolist() == t[:1]  # less padding, same id
    # as ids: identical captions are never ITM negatives of each other
    neg = L.sample_negatives(torch.zeros(4, 4), L.negative_mask(4, L.text_ids(ids, mask)))
    assert int(neg[0]) != 1 and int(neg[1]) != 0


def test_swap_one_token_changes_exactly_one_inner_token():
    torch.manual_seed(0)
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 20, 21, 3, 0, 0], [2, 3, 0, 0, 0, 0]])  # [CLS] .. [SEP]
    mask = (ids != 0).long()
    swapped, ok = L.swap_one_token(ids, mask)
    assert ok.tolist() == [True, True, False]  # the last caption has no token to swap
    changed = swapped != ids
    assert changed.sum(dim=1).tolist() == [1, 1, 0]
    assert not changed[:, 0].any() and (swapped[mask == 0] == 0).all()  # first token and padding kept
    assert set(swapped[changed].tolist()) <= {10, 11, 12, 20, 21}  # drawn from the batch's captions
    assert (swapped.gather(1, (mask.sum(1, keepdim=True) - 1)) == 3).all()  # [SEP] kept


def test_swap_one_token_prefers_a_word_of_the_same_slot():
    # "a small red circle", "a small blue circle", "a large red square", "hello world": a swap takes a
    # token that another caption has between the same neighbours ([SEP] included); "hello world" has
    # none, so it gets any other token.
    a, small, large, red, blue, circle, square, hello, world = range(10, 19)
    ids = torch.tensor(
        [
            [2, a, small, red, circle, 3],
            [2, a, small, blue, circle, 3],
            [2, a, large, red, square, 3],
            [2, hello, world, 3, 0, 0],
        ]
    )
    mask = (ids != 0).long()
    same_slot = [  # per caption, every swap whose neighbours another caption shares
        {(a, large, red, circle), (a, small, blue, circle), (a, small, red, square)},
        {(a, small, red, circle)},  # blue sits between small and circle, as red does in the first
        {(a, small, red, square), (a, large, red, circle)},
    ]
    seen = [set() for _ in same_slot]
    for seed in range(40):
        torch.manual_seed(seed)
        swapped, ok = L.swap_one_token(ids, mask)
        assert ok.all()
        for i, options in enumerate(same_slot):
            assert tuple(swapped[i, 1:5].tolist()) in options
            seen[i].add(tuple(swapped[i, 1:5].tolist()))
        assert (swapped[3] != ids[3]).sum() == 1
    assert seen == same_slot  # every same-slot swap occurs


def test_itm_loss_with_extra_negatives():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0], [3.0, 0.0]])  # 1 positive, 3 negatives
    labels = torch.tensor([1, 0, 0, 0])
    assert torch.isclose(L.itm_loss(logits, positives=1), F.cross_entropy(logits, labels))


def test_taking_repeated_rows_gives_the_same_gradient_every_run_on_two_threads():
    """Hard negatives repeat images; their gradients must add in the same order every time. (Advanced
    indexing, ``x[rows]``, gave 30 different gradients in 30 runs of this test on 2 threads.)"""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 17, 128, generator=g, requires_grad=True)  # a demo batch's ViT output
        rows = torch.randint(0, 4, (192,), generator=g)  # each of 4 images taken 48 times
        w = torch.randn(192, 17, 128, generator=g)
        grads = set()
        for _ in range(30):
            x.grad = None
            (L.take_rows(x, rows) * w).sum().backward()
            grads.add(x.grad.numpy().tobytes())
    finally:
        torch.set_num_threads(old)
    assert len(grads) == 1
    assert torch.equal(L.take_rows(x, rows), x[rows])
