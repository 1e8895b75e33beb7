import math

import pytest
import torch

from capfilt.config import FilterConfig
from capfilt.model.hf import load_filter
from capfilt.model.tokenizer import normalize_caption
from capfilt.stages.filter import Filter

pytest_plugins = ["run_helpers"]  # tiny_models, tiny_shards

CAPTIONS = [["A red square!", "two circles"], ["a blue triangle"], ["one", "big small", "the picture"]]


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_scores_shape_ranges_and_chunking(tiny_models, pixels):
    big = Filter(tiny_models[1], FilterConfig(batch_size=64)).score(pixels, CAPTIONS)
    small = Filter(tiny_models[1], FilterConfig(batch_size=2)).score(pixels, CAPTIONS)
    assert [len(x) for x in big] == [2, 1, 3]
    for row_big, row_small in zip(big, small):
        for (itm, itc), (itm2, itc2) in zip(row_big, row_small):
            assert 0.0 <= itm <= 1.0 and -1.0 <= itc <= 1.0
            assert itm == pytest.approx(itm2, abs=1e-5) and itc == pytest.approx(itc2, abs=1e-5)
    f = Filter(tiny_models[1], FilterConfig())  # chunks go shortest first; scores come back in place
    alone = [[f.score(pixels[b : b + 1], [[t]])[0][0] for t in ts] for b, ts in enumerate(CAPTIONS)]
    for row, row_alone in zip(small, alone):
        assert sum(row, ()) == pytest.approx(sum(row_alone, ()), abs=1e-5)


def test_itm_from_each_images_keys_and_values_equals_itm_from_its_embeddings(tiny_models, pixels):
    """score projects each image once for the cross-attention and gathers it per caption; match (retrieval
    evaluation) cross-attends to the embeddings repeated per caption: the same ITM."""
    f = Filter(tiny_models[1], FilterConfig(batch_size=2))  # chunks mix the images
    scores = f.score(pixels, CAPTIONS)
    with torch.no_grad():
        embeds, _ = f.encode_images(pixels)
    rows = [b for b, ts in enumerate(CAPTIONS) for _ in ts]
    match = f.match(embeds[rows], [t for ts in CAPTIONS for t in ts])
    assert [itm for row in scores for itm, _ in row] == pytest.approx(match.tolist(), abs=1e-6)


def test_itm_uses_the_checkpoints_first_token_and_itc_is_unimodal(tiny_models, pixels):
    f = Filter(tiny_models[1], FilterConfig())
    assert f.info["itm_first_token"] == "[ENC]"
    [[(itm, itc)]] = f.score(pixels[:1], [["A red square!"]])
    m, tok, _ = load_filter(tiny_models[1])  # transformers' BlipForImageTextRetrieval, the same folder
    ids = tok([normalize_caption("A red square!")], return_tensors="pt").input_ids
    with torch.no_grad():
        itc_ref = m(input_ids=ids, pixel_values=pixels[:1], use_itm_head=False).itm_score[0, 0]
        ids[:, 0] = tok.convert_tokens_to_ids("[ENC]")
        itm_ref = m(input_ids=ids, pixel_values=pixels[:1], use_itm_head=True).itm_score.softmax(-1)[0, 1]
    assert itm == pytest.approx(float(itm_ref), abs=1e-5)
    assert itc == pytest.approx(float(itc_ref), abs=1e-5)


def test_without_itc_the_itm_scores_stay_and_itc_is_nan(tiny_models, pixels):
    both = Filter(tiny_models[1], FilterConfig()).score(pixels, CAPTIONS)
    itm_only = Filter(tiny_models[1], FilterConfig(itc=False)).score(pixels, CAPTIONS)
    for row, row_itm in zip(both, itm_only):
        assert [itm for itm, _ in row] == pytest.approx([itm for itm, _ in row_itm], abs=1e-6)
        assert all(math.isnan(itc) for _, itc in row_itm)


def test_bfloat16_scores_track_float32(tiny_models, pixels):
    """run.dtype=bfloat16 (for GPUs) casts weights and pixels; scores stay near float32's."""
    full = Filter(tiny_models[1], FilterConfig()).score(pixels, CAPTIONS)
    half = Filter(tiny_models[1], FilterConfig(), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    for row, row_half in zip(full, half.score(pixels, CAPTIONS)):
        assert sum(row_half, ()) == pytest.approx(sum(row, ()), abs=0.05)
