"""Finetuning: a captioner and a filter from one MED that share no tensor, exported as HF folders."""

import json

import pytest
import torch
from test_train_data import make_shard

from capfilt.config import load_config
from capfilt.model.hf import load_captioner, load_filter, load_med
from capfilt.model.tokenizer import count_words
from capfilt.run.worker import ShardWorker
from capfilt.train.finetune import finetune, shared_tensors
from capfilt.train.pretrain import fresh_med


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    human = [make_shard(d / "human.tar", 16, refs=3)]
    cfg = load_config("tiny", ["finetune.steps=4", "finetune.image_size=48"])
    fresh_med(cfg, count_words(["a red square", "the bar is blue", "green yellow picture of"]), d / "med")
    report = finetune(cfg, d / "med", human, d / "out")
    return d, report


def test_finetune_exports_and_reports(finetuned):
    d, report = finetuned
    assert report["captioner"]["steps"] == 4 and report["filter"]["steps"] == 4
    assert set(report["captioner"]["losses"][0]) >= {"lm", "loss"}
    assert set(report["filter"]["losses"][0]) >= {"itc", "itm", "loss"}
    assert json.loads((d / "out" / "finetune.json").read_text())["n_pairs"] == 48
    captioner, _, _ = load_captioner(d / "out" / "captioner")
    assert captioner.config.vision_config.image_size == 48  # finetuned at its own resolution


def test_captioner_and_filter_are_independent(finetuned):
    d, _ = finetuned
    captioner, _, _ = load_captioner(d / "out" / "captioner")
    filt, _, _ = load_filter(d / "out" / "filter")
    assert shared_tensors(captioner, filt) == []
    # Trained apart from the same start, their common ViT has diverged, and neither is the start.
    init = load_med(d / "med")[0].vision.embeddings.patch_embedding.weight
    cap_w = captioner.vision_model.embeddings.patch_embedding.weight
    filt_w = filt.vision_model.embeddings.patch_embedding.weight
    assert not torch.equal(cap_w, filt_w) and not torch.equal(cap_w, init) and not torch.equal(filt_w, init)
    # Training one leaves the other untouched.
    before = {k: v.clone() for k, v in filt.state_dict().items()}
    cap_before = cap_w.detach().clone()
    opt = torch.optim.SGD(captioner.parameters(), lr=1.0)
    ids = torch.tensor([[5, 10, 11, 3]])
    captioner(pixel_values=torch.randn(1, 3, 48, 48), input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(cap_w, cap_before)
    assert all(torch.equal(before[k], v) for k, v in filt.state_dict().items())


def test_shared_tensors_sees_sharing():
    a = torch.nn.Linear(2, 2)
    b = torch.nn.Sequential(a)
    assert shared_tensors(a, b) == ["weight", "bias"]
    assert shared_tensors(a, torch.nn.Linear(2, 2)) == []


def test_a_frozen_vit_leaves_both_models_the_pretrained_one(finetuned):
    """finetune.freeze_vision: the captioner and the filter keep the MED's ViT (at the finetuning size), so
    a round's worker sees one ViT and encodes each image once for both (test_run_local)."""
    d, _ = finetuned
    frozen = [
        "finetune.steps=4",
        "finetune.image_size=48",
        "finetune.freeze_vision=true",
        "run.image_size=48",
    ]
    cfg = load_config("tiny", frozen)
    finetune(cfg, d / "med", [str(d / "human.tar")], d / "frozen")
    captioner, _, _ = load_captioner(d / "frozen" / "captioner")
    filt, _, _ = load_filter(d / "frozen" / "filter")
    med = load_med(d / "med")[0]
    med.resize_image(48)
    want = med.vision.state_dict()
    for model in (captioner, filt):
        got = model.vision_model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(
        captioner.text_decoder.cls.predictions.decoder.weight, med.text_decoder.cls.predictions.decoder.weight
    )
    worker = ShardWorker(cfg, str(d / "frozen" / "captioner"), str(d / "frozen" / "filter"), device="cpu")
    assert worker.shared_vision
