"""Decoding: BLIP preprocessing, every hard image kind, Pillow and DALI agreeing, failure containment."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import DECODE_MAX_PIXELS, decode_cases, encode, smooth_image
from PIL import Image

from capfilt.config import RunConfig
from capfilt.data.decode import (
    MEAN,
    STD,
    PillowDecoder,
    Planes,
    make_decoder,
    normalize,
    pillow_rgb,
    to_planes,
)
from capfilt.data.reader import iter_shard
from capfilt.data.sample import Reject, Sample
from capfilt.data.specs import expand_shards

# Pillow and DALI resize with different bicubic kernels. Measured mean |difference| per image, in
# normalised units (1 unit ≈ 69 grey levels): 32 px world → 24 or 48 px: 0.003 (worst image 0.004);
# 64 px world → 96 or 384 px: 0.002 (worst 0.003); an exact 2× downscale (64 → 32 px), where the
# kernels differ most: 0.021 (worst 0.044). The bound covers every case: 0.05 ≈ 3.4 grey levels.
AGREEMENT_TOL = 0.05


def _samples() -> list[Sample]:
    return [Sample(k, "mem", data, ext, k) for k, (data, ext, _) in decode_cases().items()]


def _verdicts(results) -> dict[str, str | None]:
    return {s.key: (r.reason if isinstance(r, Reject) else None) for s, r in zip(_samples(), results)}


def _expected() -> dict[str, str | None]:
    return {k: reason for k, (_, _, reason) in decode_cases().items()}


def test_normalisation_matches_blip():
    colour = (200, 100, 50)
    sample = Sample("c", "mem", encode(Image.new("RGB", (10, 7), colour), "PNG"), "png", "c")
    (t,) = PillowDecoder(16).decode([sample])
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    want = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, MEAN, STD)])
    torch.testing.assert_close(t[:, 5, 5], want, atol=1e-5, rtol=0)


def test_normalize_is_bit_for_bit_the_broadcast_formula():
    """The channel-plane normalisation gives the float32 values of (x - 255·mean) / (255·std) broadcast over
    the last axis, as outputs written before it did, so captions and scores stay the same bytes."""
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mean, std = (np.array(v, dtype=np.float32) * 255 for v in (MEAN, STD))
    want = ((rgb.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    got = normalize(rgb)
    assert got.shape == (3, 37, 53) and got.dtype == torch.float32 and got.is_contiguous()
    assert np.array_equal(got.numpy(), want)


def test_planes_hold_uint8_and_give_the_decoder_s_values_bit_for_bit():
    """A split held whole (eval, calibration) keeps a quarter of the bytes and the same normalised values
    as the round's decoder, whatever the slice."""
    samples = [s for s in _samples() if _expected()[s.key] is None]
    want = torch.stack(PillowDecoder(24, max_pixels=DECODE_MAX_PIXELS).decode(samples))
    planes = Planes(
        torch.stack([torch.from_numpy(to_planes(pillow_rgb(s, 24, DECODE_MAX_PIXELS))) for s in samples])
    )
    assert planes.planes.dtype == torch.uint8 and len(planes) == len(samples) > 5
    assert torch.equal(planes[2:5], want[2:5]) and torch.equal(planes[3], want[3])
    assert torch.equal(planes[:], want)  # and the slices taken left the planes as they were
    with pytest.raises(TypeError, match="uint8"):
        Planes(want)


def test_pillow_handles_every_hard_case():
    with PillowDecoder(32, threads=2, max_pixels=DECODE_MAX_PIXELS) as dec:
        results = dec.decode(_samples())
    assert _verdicts(results) == _expected()
    out = dict(zip(decode_cases(), results))
    # alpha composited on white, 16-bit scaled (not clipped to white), EXIF applied
    white = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)])
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    (clear,) = PillowDecoder(32).decode([Sample("a", "m", encode(rgba, "PNG"), "png", "a")])
    torch.testing.assert_close(clear[:, 4, 4], white, atol=1e-5, rtol=0)
    gray8 = PillowDecoder(32).decode([Sample("g", "m", decode_cases()["gray"][0], "png", "g")])[0]
    assert (out["gray-16bit"] - gray8).abs().max() < 0.02
    upright = smooth_image().transpose(Image.Transpose.ROTATE_270)
    (want,) = PillowDecoder(32).decode([Sample("u", "m", encode(upright), "jpg", "u")])
    assert (out["exif-rotated"] - want).abs().mean() < 0.05


def test_decode_batch_stacks_and_splits():
    dec = PillowDecoder(16, max_pixels=DECODE_MAX_PIXELS)
    batch, kept, rejects = dec.decode_batch(_samples())
    ok = [i for i, reason in enumerate(_expected().values()) if reason is None]
    assert kept == ok and batch.shape == (len(ok), 3, 16, 16)
    assert sorted(r.reason for r in rejects) == sorted(r for r in _expected().values() if r)
    empty, kept, rejects = dec.decode_batch([])
    assert empty.shape == (0, 3, 16, 16) and kept == [] and rejects == []


def test_make_decoder_from_run_config():
    dec = make_decoder(RunConfig(image_size=24, decode_threads=1, max_pixels=100))
    assert isinstance(dec, PillowDecoder) and dec.image_size == 24 and dec.max_pixels == 100


# --- DALI (CPU mode runs anywhere DALI is installed; mixed needs CUDA) ---------------------------------


def _dali(**kw):
    pytest.importorskip("nvidia.dali")
    from capfilt.data.dali import DaliDecoder

    return DaliDecoder(**kw)


def test_dali_agrees_with_pillow_on_the_demo_world(tiny_world):
    samples = [s for url in expand_shards([f"{tiny_world}/web-*.tar"]) for s in iter_shard(url)]
    for size in (24, 48):  # a downscale and an upscale of the 32 px world
        pillow = PillowDecoder(size).decode(samples)
        dali = _dali(image_size=size, batch_size=32).decode(samples)
        diffs = torch.stack([(p - d).abs().mean() for p, d in zip(pillow, dali)])
        assert diffs.max() < AGREEMENT_TOL, (size, diffs.max())


ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI mixed decodes on a GPU; no CUDA here")


@pytest.mark.parametrize("device", ["cpu", pytest.param("mixed", marks=ON_GPU)])
def test_dali_same_verdicts_and_pixels_on_hard_cases(device):
    pillow = PillowDecoder(32, max_pixels=DECODE_MAX_PIXELS).decode(_samples())
    dali = _dali(image_size=32, batch_size=8, max_pixels=DECODE_MAX_PIXELS, device=device).decode(_samples())
    assert _verdicts(dali) == _expected()
    for key, p, d in zip(decode_cases(), pillow, dali):
        if not isinstance(p, Reject):
            assert d.is_cuda == (device == "mixed") and (p - d.cpu()).abs().mean() < AGREEMENT_TOL, key


def test_dali_batch_with_one_corrupt_image_rejects_only_it():
    good = encode(smooth_image())
    bad = bytearray(good)
    dht = good.find(b"\xff\xc4")  # a broken Huffman table: header and end marker intact, fails in DALI
    bad[dht + 5 : dht + 25] = b"\xff" * 20
    samples = [Sample(f"k{i}", "m", good, "jpg", "c") for i in range(6)]
    samples[3] = Sample("bad", "m", bytes(bad), "jpg", "c")
    dec = _dali(image_size=32, batch_size=6)
    results = dec.decode(samples)
    assert [isinstance(r, Reject) for r in results] == [False, False, False, True, False, False]
    assert results[3].reason == "undecodable_image"
    assert all(isinstance(r, torch.Tensor) for r in dec.decode(samples[:3]))  # the pipeline recovered


def test_dali_that_fails_every_image_is_said_once_and_pillow_decodes(monkeypatch, capsys):
    """DALI broken at run time (here its pipeline cannot be built, as after a driver or memory error):
    every image still decodes, by Pillow, to Pillow's pixels, and stderr says so once, not per batch.
    Before, nothing was said and a DALI round ran at Pillow's speed with a DALI attempt per image."""
    dec = _dali(image_size=32, batch_size=4)
    monkeypatch.setattr(dec, "_build", lambda: (_ for _ in ()).throw(RuntimeError("nvJPEG: out of memory")))
    samples = [Sample(f"k{i}", "m", encode(smooth_image()), "jpg", "c") for i in range(8)]
    with PillowDecoder(32) as pillow:
        want = pillow.decode(samples)
    got = dec.decode(samples)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    said = capsys.readouterr().err
    assert said.count("[capfilt] DALI (cpu) failed a batch of 4") == 1 and "nvJPEG: out of memory" in said


@ON_GPU
def test_dali_mixed_agrees_with_cpu_and_stays_on_the_gpu():
    samples = [Sample(f"k{i}", "m", encode(smooth_image(seed=i)), "jpg", "c") for i in range(4)]
    samples += [s for s in _samples() if s.key == "rgba"]  # decoded by Pillow, joins the batch on the GPU
    cpu = _dali(image_size=32, device="cpu").decode(samples)
    batch, kept, _ = _dali(image_size=32, device="mixed").decode_batch(samples)
    assert batch.is_cuda and kept == list(range(len(samples)))
    assert all((c - g.cpu()).abs().mean() < AGREEMENT_TOL for c, g in zip(cpu, batch))


def test_dali_mixed_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        _dali(image_size=32, device="mixed")


def test_dali_missing_is_a_clear_error_not_a_silent_pillow_fallback(monkeypatch):
    """Without DALI, ``decoder: dali`` fails when the decoder is made. Before, the import failed inside
    each batch's run, which the per-sample fallback took for a bad batch: every image went through Pillow,
    one DALI build attempt each, and benchmarks labelled Pillow's rate as DALI's."""
    if "nvidia" in sys.modules:
        monkeypatch.delattr(sys.modules["nvidia"], "dali", raising=False)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    from capfilt.data.dali import DaliDecoder

    with pytest.raises(ImportError, match="run.decoder=pillow"):
        DaliDecoder(32, device="cpu")
    with pytest.raises(ImportError, match="needs NVIDIA DALI"):
        make_decoder(RunConfig(decoder="dali", image_size=32))


def test_pillow_decode_batch_equals_decoding_one_at_a_time():
    """Rows written in place, with and without rejects among them, equal the per-sample tensors stacked,
    bit for bit (so a round's captions and scores are the same bytes), for a thread pool too."""
    samples = _samples()
    for threads in (1, 2):
        with PillowDecoder(32, threads=threads, max_pixels=DECODE_MAX_PIXELS) as dec:
            singles = dec.decode(samples)
            for batch in (samples, [s for s, r in zip(samples, singles) if not isinstance(r, Reject)]):
                pixels, kept, rejects = dec.decode_batch(batch)
                want = [r for r in dec.decode(batch) if not isinstance(r, Reject)]
                assert len(kept) == len(want) == pixels.shape[0] and len(kept) + len(rejects) == len(batch)
                assert torch.equal(pixels, torch.stack(want))
    assert any(isinstance(r, Reject) for r in singles) and not all(isinstance(r, Reject) for r in singles)
