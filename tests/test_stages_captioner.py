import pytest
import torch

from capfilt.config import CaptionConfig
from capfilt.errors import UserError
from capfilt.model.hf import load_captioner
from capfilt.model.vision import image_embeds
from capfilt.stages.captioner import Captioner, caption_tokens, row_seed
from capfilt.stages.sampler import draw, nucleus

pytest_plugins = ["run_helpers"]  # tiny_models, tiny_shards

KEYS = [f"img-{i}" for i in range(8)]


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def captioner(tiny_models):
    return Captioner(tiny_models[0], CaptionConfig(num_captions=2), seed=7)


def test_captions_do_not_depend_on_batch_size_order_or_worker(captioner, pixels, tiny_models):
    many = pixels.repeat(8, 1, 1, 1) + 0.01 * torch.arange(64.0)[:, None, None, None]  # 64 distinct images
    keys = [f"img-{i}" for i in range(64)]
    whole = captioner.caption(many, keys)
    assert len(whole) == 64 and all(len(caps) == 2 for caps in whole)
    for size in (1, 7):
        parts = []
        for i in range(0, 64, size):
            parts += captioner.caption(many[i : i + size], keys[i : i + size])
        assert parts == whole
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = captioner.caption(many[perm], [keys[i] for i in perm])
    assert [shuffled[perm.index(i)] for i in range(64)] == whole
    restarted = Captioner(tiny_models[0], CaptionConfig(num_captions=2), seed=7)  # a fresh worker
    assert restarted.caption(many[:9], keys[:9]) == whole[:9]


def test_the_cuda_row_policy_gives_the_same_captions(captioner, pixels, tiny_models):
    """On CUDA a batch is padded to a power of two with spare rows, which ride along when rows leave
    (into captured graphs, which replay this same step). Run eagerly here, that policy must give the
    captions of the CPU's, where the batch keeps exactly its live rows."""
    many = pixels.repeat(4, 1, 1, 1) + 0.01 * torch.arange(32.0)[:, None, None, None]
    keys = [f"img-{i}" for i in range(32)]
    cuda_like = Captioner(tiny_models[0], CaptionConfig(num_captions=2), seed=7)
    sampler = cuda_like.sampler
    sampler.graphed = True  # its row policy and its attention kernel, stepped eagerly:
    sampler.attention = torch.nn.functional.scaled_dot_product_attention
    sampler._step_on = lambda rows: (sampler._step(rows), rows)[1]
    for size in (5, 32):  # 5 rows become 8, 3 of them spares; 32 rows shrink to 16, 8, ...
        want = captioner.caption(many[:size], keys[:size])
        assert cuda_like.caption(many[:size], keys[:size]) == want
        assert len({len(c.split()) for caps in want for c in caps}) > 1  # rows finish at different steps


def test_randomness_comes_from_seed_key_and_index(captioner, pixels, tiny_models):
    a = captioner.caption(pixels[:4], KEYS[:4])
    assert any(x[0] != x[1] for x in a)  # the two captions of an image are drawn independently
    other = Captioner(tiny_models[0], CaptionConfig(num_captions=2), seed=8).caption(pixels[:4], KEYS[:4])
    assert other != a
    assert row_seed(7, "k", 0) == row_seed(7, "k", 0) != row_seed(7, "k", 1)


def test_nucleus_is_hf_generates_distribution():
    """The same processors as HF generate (what the reference calls), on the k best tokens only."""
    from transformers import (
        LogitsProcessorList,
        MinLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    cfg, eos = CaptionConfig(), 3
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 400, generator=g) * 4
    for length in (4, 9):  # eos suppressed, then allowed
        seqs = torch.randint(0, 400, (16, length), generator=g)
        hf = LogitsProcessorList(
            [
                RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty),
                MinLengthLogitsProcessor(cfg.min_length, eos),
                TopKLogitsWarper(50),
                TopPLogitsWarper(cfg.top_p),
            ]
        )(seqs, logits.clone()).softmax(-1)
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seqs, True)
        probs, ids = nucleus(logits, seen, length, cfg, eos)
        ours = torch.zeros_like(hf).scatter(1, ids, probs / probs.sum(-1, keepdim=True))
        torch.testing.assert_close(ours, hf)
        assert (length < cfg.min_length) == bool((ours[:, eos] == 0).all())


def test_draw_is_inverse_cdf():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.6, 0.4, 0.0, 0.0]])
    ids = torch.tensor([[7, 8, 9, 10], [1, 2, 3, 4]])
    u = torch.tensor([0.0, 0.95])
    assert draw(probs, ids, u).tolist() == [7, 2]
    assert draw(probs, ids, torch.tensor([0.79, 0.59])).tolist() == [8, 1]
    assert draw(probs, ids, torch.tensor([0.999999, 0.0])).tolist() == [9, 1]  # never a zero-mass token


def test_lengths_count_the_prompt(captioner, pixels):
    embeds = image_embeds(captioner.model.vision_model, pixels)
    rows = captioner._sample(embeds, [captioner._generator(k, 0) for k in KEYS])
    for row in rows:
        assert row[: len(captioner.prompt_ids)] == captioner.prompt_ids
        assert len(row) <= captioner.cfg.max_length
        assert captioner.eos not in row[: captioner.cfg.min_length]


def test_a_max_length_the_prompt_fills_is_an_error(tiny_models):
    with pytest.raises(UserError, match=r"caption.max_length \(4\) counts the prompt's 4 tokens"):
        Captioner(tiny_models[0], CaptionConfig(min_length=0, max_length=4))


def test_beam_is_deterministic(tiny_models, pixels):
    beam = Captioner(tiny_models[0], CaptionConfig(method="beam", num_captions=2))
    a = beam.caption(pixels[:2], KEYS[:2])
    assert a == beam.caption(pixels[:2], KEYS[:2]) and all(len(x) == 2 for x in a)


def test_caption_tokens_keep_whole_words_only():
    cont = {10, 11}.__contains__  # ids 10 and 11 are "##" pieces
    prompt, eos = [5, 20, 21], 3
    assert caption_tokens([*prompt, 30, 10, 31, eos, 0], 3, eos, cont) == [30, 10, 31]
    assert caption_tokens([*prompt, 10, 30, 31, eos], 3, eos, cont) == [30, 31]  # leading piece
    # cut by max_length: the last word may be unfinished (its next piece could be "##..."): it goes
    assert caption_tokens([*prompt, 30, 31, 32, 11], 3, eos, cont) == [30, 31]
    assert caption_tokens([*prompt, 30, 31, 32], 3, eos, cont) == [30, 31]


def test_prompt_is_cut_by_tokens_even_when_the_tokenizer_cannot_spell_it(tiny_models):
    """The fragment captions' cause: "zebra" is [UNK] to this tokenizer, decoding drops it, and the
    reference's character cut (len(prompt)) then removed the first letters of the caption."""
    cap = Captioner(tiny_models[0], CaptionConfig(prompt="a zebra picture of "))
    assert cap.tokenizer.get_vocab()["[UNK]"] in cap.prompt_ids
    words = cap.tokenizer("red circle near the big square", add_special_tokens=False)["input_ids"]
    assert cap._text([*cap.prompt_ids, *words, cap.eos]) == "red circle near the big square"


def test_sampled_captions_start_and_end_on_word_boundaries(captioner, pixels):
    vocab = {t for t in captioner.tokenizer.get_vocab() if not t.startswith("##")}
    words = {
        w for caps in captioner.caption(pixels, KEYS) for c in caps for w in c.split()[:1] + c.split()[-1:]
    }
    pieces = {t[2:] for t in captioner.tokenizer.get_vocab() if t.startswith("##")} - vocab
    assert not words & pieces, words & pieces


def test_bfloat16_captioner_writes_whole_captions(tiny_models, pixels):
    """run.dtype=bfloat16 (for GPUs): weights and pixels cast; sampling stays float32 and deterministic."""
    half = Captioner(tiny_models[0], CaptionConfig(num_captions=2), seed=7, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    first = half.caption(pixels, KEYS)
    assert first == half.caption(pixels, KEYS) and all(len(caps) == 2 for caps in first)


def test_sampler_decoder_computes_what_hf_text_decoder_does(captioner, pixels, tiny_models):
    """The fixed-shape decoder (prompt prefill, then one cached position per step) over capfilt's modules
    gives the logits of transformers' BLIP decoder loaded from the same folder."""
    sampler, prompt = captioner.sampler, len(captioner.prompt_ids)
    embeds = image_embeds(captioner.model.vision_model, pixels)
    tokens = [10, 11, 12]
    ids = torch.tensor([captioner.prompt_ids + tokens] * len(pixels))
    hf_decoder = load_captioner(tiny_models[0])[0].text_decoder
    want = hf_decoder(input_ids=ids, encoder_hidden_states=embeds).logits
    with torch.no_grad():
        rows = sampler._start(embeds, torch.rand(len(pixels), sampler.steps))  # prefills the prompt
        for j, token in enumerate(tokens):
            got = sampler._forward(rows, torch.full((len(pixels), 1), token), torch.tensor([prompt + j]))
            torch.testing.assert_close(got[:, 0], want[:, prompt + j], atol=1e-5, rtol=1e-4)
