"""The MED: weight sharing, momentum encoders, queues, the forward API, and a real learning check."""

import pytest
import torch

from capfilt.model import losses as L
from capfilt.model.info import count, unique_params
from capfilt.model.losses import lm_targets
from capfilt.model.med import by_length as by_length
from capfilt.model.testing import tiny_batch, tiny_captions, tiny_med, torch_threads
from capfilt.model.tokenizer import normalize_caption, tokenize


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def med_tok():
    return tiny_med(seed=0)


def test_decoder_shares_all_but_self_attention(med_tok):
    med, _ = med_tok
    enc, dec = med.text_encoder, med.text_decoder
    assert dec.bert.embeddings is enc.embeddings
    for el, dl in zip(enc.encoder.layer, dec.bert.encoder.layer, strict=True):
        assert dl.crossattention is el.crossattention
        assert dl.intermediate is el.intermediate and dl.output is el.output
        assert dl.attention is not el.attention
        for (n, p), (_, q) in zip(
            dl.attention.named_parameters(), el.attention.named_parameters(), strict=True
        ):
            assert p is not q and p.data_ptr() != q.data_ptr(), n
    lm_w = dec.cls.predictions.decoder.weight
    assert lm_w is enc.embeddings.word_embeddings.weight
    assert lm_w.data_ptr() == enc.embeddings.word_embeddings.weight.data_ptr()
    # named_parameters dedupes: the decoder contributes only its self-attention and its LM head transform
    own = {n.split(".", 1)[1] for n, _ in med.named_parameters() if n.startswith("text_decoder.")}
    assert all(".attention." in n or n.startswith("cls.predictions.") for n in own), own
    assert "cls.predictions.decoder.weight" not in own
    # counts: every parameter once; the same arithmetic as model-info
    n_named = sum(p.numel() for _, p in med.named_parameters())
    assert n_named == unique_params(med)
    c = count(med.cfg, med.vocab_size)
    assert n_named == c.med + c.momentum
    assert c.captioner == unique_params(med.vision, med.text_decoder)


def test_shared_params_get_gradient_from_both_heads(med_tok):
    med, tok = med_tok
    pixels, ids, mask = tiny_batch(tok, med.cfg, 8)
    med.zero_grad()
    med.train()
    torch.manual_seed(0)
    med(pixels, ids, mask, alpha=0.4, losses=("lm",))["loss"].backward()
    assert med.text_encoder.encoder.layer[0].intermediate.dense.weight.grad is not None
    assert med.text_decoder.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    assert med.text_encoder.encoder.layer[0].attention.self.query.weight.grad is None  # encoder-only
    med.zero_grad()


def test_momentum_copies_and_update():
    med, _ = tiny_med(seed=1)
    assert not hasattr(med.text_encoder_m.encoder.layer[0], "crossattention")
    pairs = med.momentum_pairs()
    assert (
        len(pairs)
        == sum(1 for _ in med.vision_m.parameters()) + sum(1 for _ in med.text_encoder_m.parameters()) + 4
    )
    assert all(not pm.requires_grad and torch.equal(p, pm) for p, pm in pairs)
    with torch.no_grad():
        for p, _ in pairs:
            p.add_(1.0)
    before = [pm.clone() for _, pm in pairs]
    med.momentum_update(0.9)
    for (p, pm), b in zip(pairs, before, strict=True):
        assert torch.allclose(pm, 0.9 * b + 0.1 * p)


def test_enqueue_and_pointer():
    med, _ = tiny_med(seed=2)  # queue_size 32
    d = med.cfg.embed_dim
    assert torch.allclose(med.image_queue.norm(dim=0), torch.ones(32))
    assert (med.idx_queue == -100).all() and int(med.queue_ptr) == 0
    img, txt = torch.randn(8, d), torch.randn(8, d)
    med.enqueue(img, txt, torch.arange(8))
    assert int(med.queue_ptr) == 8
    assert torch.equal(med.image_queue[:, :8], img.t()) and torch.equal(med.text_queue[:, :8], txt.t())
    assert med.idx_queue[0, :8].tolist() == list(range(8)) and (med.idx_queue[0, 8:] == -100).all()
    for _ in range(3):
        med.enqueue(img, txt)
    assert int(med.queue_ptr) == 0  # wrapped
    with pytest.raises(ValueError, match="multiple"):
        med.enqueue(torch.randn(5, d), torch.randn(5, d))


def test_forward_updates_momentum_and_queue_in_training_only():
    med, tok = tiny_med(seed=3)
    pixels, ids, mask = tiny_batch(tok, med.cfg, 8)
    with torch.no_grad():
        med.vision.embeddings.position_embedding.add_(1.0)  # as if an optimiser step happened
    pm = med.vision_m.embeddings.position_embedding
    before = pm.clone()
    med.eval()
    with torch.no_grad():
        out = med(pixels, ids, mask, alpha=0.4)
    assert set(out) == {"itc", "itm", "lm", "loss"} and int(med.queue_ptr) == 0 and torch.equal(pm, before)
    med.train()
    out = med(pixels, ids, mask, alpha=0.4, losses=("itc",), idx=torch.arange(8))
    assert set(out) == {"itc", "loss"} and int(med.queue_ptr) == 8
    assert torch.allclose(pm, 0.995 * before + 0.005 * med.vision.embeddings.position_embedding)
    assert med.idx_queue[0, :8].tolist() == list(range(8))
    with torch.no_grad():
        med.temp.fill_(5.0)
    med(pixels, ids, mask, alpha=0.4, losses=("itm",))
    assert float(med.temp.detach()) == 0.5  # clamped to [0.001, 0.5]
    with pytest.raises(ValueError):
        med(pixels, ids, mask, alpha=0.4, losses=("mlm",))


def test_lm_loss_matches_transformers_and_masks_prompt(med_tok):
    med, tok = med_tok
    med.eval()
    pixels, ids, mask = tiny_batch(tok, med.cfg, 4)
    with torch.no_grad():
        ours = med(pixels, ids, mask, alpha=0.0, losses=("lm",))["lm"]
        dec_ids = ids.clone()
        dec_ids[:, 0] = med.special_ids["dec"]
        image_embeds = med.image_embeds(pixels)
        hf = med.text_decoder(
            input_ids=dec_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
            labels=lm_targets(dec_ids, 0), use_cache=False,
        ).loss  # fmt: skip
        assert torch.allclose(ours, hf, atol=1e-6)  # shift, pad → -100, smoothing 0.1 agree
        masked = med(pixels, ids, mask, alpha=0.0, losses=("lm",), prompt_len=2)["lm"]
        assert not torch.allclose(ours, masked)


def test_a_few_steps_reduce_the_loss():
    med, tok = tiny_med(seed=0)
    pixels, ids, mask = tiny_batch(tok, med.cfg, 8)
    opt = torch.optim.AdamW([p for p in med.parameters() if p.requires_grad], lr=2e-3)
    med.train()
    torch.manual_seed(0)
    hist = []
    for _ in range(40):
        out = med(pixels, ids, mask, alpha=0.4)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        hist.append({k: float(v.detach()) for k, v in out.items()})
    first = sum(h["loss"] for h in hist[:3]) / 3
    last = sum(h["loss"] for h in hist[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert hist[-1]["lm"] < 0.5 * hist[0]["lm"]
    # ITM learns more slowly (and ITC's queue fills over these steps, so its loss is not comparable
    # step to step): the mean of the last five steps, not a single step, against the first five.
    assert sum(h["itm"] for h in hist[-5:]) < sum(h["itm"] for h in hist[:5])


def test_resize_image_interpolates_position_embeddings():
    med, tok = tiny_med(seed=4)
    pos = med.vision.embeddings.position_embedding.detach().clone()
    med.resize_image(48)  # 4x4 patches → 6x6
    assert med.vision.embeddings.position_embedding.shape == (1, 37, med.cfg.vision_width)
    assert med.vision_m.embeddings.position_embedding.shape == (1, 37, med.cfg.vision_width)
    assert not med.vision_m.embeddings.position_embedding.requires_grad
    assert torch.equal(med.vision.embeddings.position_embedding[:, 0], pos[:, 0])  # CLS untouched
    assert med.cfg.image_size == 48 and med.vision.config.image_size == 48
    pixels = torch.randn(2, 3, 48, 48)
    assert med.image_embeds(pixels).shape == (2, 37, med.cfg.vision_width)


def test_same_text_positives_use_caption_ids_in_pretraining():
    med, tok = tiny_med(seed=4, same_text_positives=True)
    pixels, ids, mask = tiny_batch(tok, med.cfg, 8)
    ids[1], mask[1] = ids[0], mask[0]  # two images with one caption, as web corpora have
    med.train()
    med(pixels, ids, mask, alpha=0.4, losses=("itc", "itm"))
    queued = med.text_idx_queue[0, :8].tolist()
    assert queued == L.text_ids(ids, mask).tolist() and queued[0] == queued[1] and len(set(queued)) == 7
    assert (med.idx_queue == -100).all()  # no image ids given


def test_same_text_positives_hold_beside_image_ids_in_finetuning(monkeypatch):
    """The filter's finetuning gives image ids; two pictures with one caption (802 of the demo's 2,000
    human pairs share their text) must still be positives, not ITM negatives, as in pretraining."""
    med, tok = tiny_med(seed=4, same_text_positives=True)
    pixels, ids, mask = tiny_batch(tok, med.cfg, 8)
    ids[1], mask[1] = ids[0], mask[0]
    masks = []
    sample = L.sample_negatives
    monkeypatch.setattr(L, "sample_negatives", lambda sim, m, *a: masks.append(m) or sample(sim, m, *a))
    med.train()
    med(pixels, ids, mask, alpha=0.4, losses=("itc", "itm"), idx=torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]))
    expected = torch.eye(8, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = expected[6, 7] = expected[7, 6] = True  # same caption; same image
    assert len(masks) == 2 and all(torch.equal(m, expected) for m in masks)
    assert med.idx_queue[0, :8].tolist() == [0, 1, 2, 3, 4, 5, 6, 6]
    assert med.text_idx_queue[0, :8].tolist() == L.text_ids(ids, mask).tolist()


def test_itm_swap_negatives_add_one_scored_negative_per_pair():
    """model.itm_swap_negatives: the ITM head also sees each caption with one token swapped, as a
    negative; the loss then differs from the reference's B positives + 2B negatives."""
    losses = {}
    for swap in (False, True):
        med, tok = tiny_med(seed=4, itm_swap_negatives=swap)
        pixels, ids, mask = tiny_batch(tok, med.cfg, 8)
        calls: list[int] = []
        med.itm_head.register_forward_hook(lambda mod, inp, out, calls=calls: calls.append(out.shape[0]))
        torch.manual_seed(0)
        losses[swap] = med(pixels, ids, mask, alpha=0.4, losses=("itm",))["itm"]
        assert calls == [8 * (4 if swap else 3)]  # every tiny caption has a token to swap
    assert not torch.isclose(losses[False], losses[True])


def test_text_chunk_gives_the_losses_and_gradients_of_one_pass(med_tok):
    """Chunks of similar-length rows, each cut to its longest text, then put back in row order: the same
    losses and gradients as one padded pass (a misordered or mistrimmed row would change them)."""
    med, tok = med_tok
    pixels, _, _ = tiny_batch(tok, med.cfg, 8)
    words = [normalize_caption(c).split() for c in tiny_captions()[:8]]
    ids, mask = tokenize(tok, [" ".join(w[: 2 + i % 5]) for i, w in enumerate(words)], med.cfg.max_text_len)
    assert len(set(mask.sum(1).tolist())) > 2, "the captions must differ in length for chunks to trim"
    med.eval()  # no dropout, no momentum or queue update: two forwards see the same model
    results = []
    for chunk in (0, 3):
        med.text_chunk = chunk
        med.zero_grad()
        torch.manual_seed(0)  # the same ITM negatives
        out = med(pixels, ids, mask, alpha=0.4)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in med.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in out.items()}, grads))
    med.text_chunk = 0
    med.zero_grad()
    (one, one_grads), (chunked, chunked_grads) = results
    assert chunked == pytest.approx(one, rel=1e-5, abs=1e-6)
    assert one_grads.keys() == chunked_grads.keys()
    for name, grad in one_grads.items():
        assert torch.allclose(grad, chunked_grads[name], rtol=1e-4, atol=1e-6), name
    left_padded = torch.stack([m.roll(int((m == 0).sum())) for m in mask])
    with pytest.raises(ValueError, match="right-padded"):
        by_length(lambda ids, m: ids, ids, left_padded, chunk=3)
