"""Checkpoints: MED round trip, HF exports equal to the MED, and the Salesforce-format load path."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
)

from capfilt.model.hf import (
    export_captioner,
    export_filter,
    load_captioner,
    load_filter,
    load_med,
    save_med,
    unique_state,
)
from capfilt.model.hub import model_hash
from capfilt.model.testing import salesforce_like, tiny_batch, tiny_med, torch_threads
from capfilt.model.vision import image_embeds as fused_image_embeds


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def trained():
    """A tiny MED after two training steps: momentum copies, queues and temp all moved off their init."""
    with torch_threads(1):
        med, tok = tiny_med(seed=5)
        pixels, ids, mask = tiny_batch(tok, med.cfg, 8)
        opt = torch.optim.AdamW([p for p in med.parameters() if p.requires_grad], lr=1e-3)
        med.train()
        for _ in range(2):
            loss = med(pixels, ids, mask, alpha=0.4, idx=torch.arange(8))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        med.eval()
    return med, tok, (pixels, ids, mask)


def test_med_round_trip(trained, tmp_path):
    med, tok, (pixels, ids, mask) = trained
    save_med(med, tok, tmp_path / "med", meta={"step": 2, "stage": "pretrain"})
    with safe_open(str(tmp_path / "med" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys) < len(med.state_dict())  # shared tensors stored once
    assert "text_decoder.cls.predictions.decoder.weight" not in keys
    assert "text_decoder.bert.embeddings.word_embeddings.weight" not in keys

    med2, tok2, meta = load_med(tmp_path / "med")
    assert meta == {"step": 2, "stage": "pretrain"}
    a, b = unique_state(med), unique_state(med2)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(med2.queue_ptr) == 16 and med2.idx_queue[0, :16].tolist() == list(range(8)) * 2
    assert (med2.text_idx_queue == -100).all()  # no same_text_positives
    assert med2.text_decoder.bert.embeddings is med2.text_encoder.embeddings
    assert (
        med2.text_decoder.cls.predictions.decoder.weight
        is med2.text_encoder.embeddings.word_embeddings.weight
    )
    assert med2.text_decoder.bert.encoder.layer[1].output is med2.text_encoder.encoder.layer[1].output
    assert tok2("a red circle")["input_ids"] == tok("a red circle")["input_ids"]
    med2.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        o1 = med(pixels, ids, mask, alpha=0.4)
        torch.manual_seed(0)
        o2 = med2(pixels, ids, mask, alpha=0.4)
    for k in o1:
        assert torch.equal(o1[k], o2[k]), k


def test_a_med_saved_before_the_caption_id_queue_loads(trained, tmp_path):
    """MED checkpoints written before ``text_idx_queue`` existed lack it: they load with it empty."""
    med, tok, _ = trained
    folder = save_med(med, tok, tmp_path / "med")
    state = load_file(str(folder / "model.safetensors"))
    del state["text_idx_queue"]
    save_file(state, str(folder / "model.safetensors"))
    med2, _, _ = load_med(folder)
    assert torch.equal(med2.idx_queue, med.idx_queue) and (med2.text_idx_queue == -100).all()
    state["surplus"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected"):
        load_med(folder)


def test_exports_equal_the_med(trained, tmp_path):
    med, tok, (pixels, ids, mask) = trained
    export_captioner(med, tok, tmp_path / "cap")
    export_filter(med, tok, tmp_path / "filt")
    cap, cap_tok, cap_info = load_captioner(tmp_path / "cap")
    filt, filt_tok, info = load_filter(tmp_path / "filt")
    assert isinstance(cap, BlipForConditionalGeneration) and isinstance(filt, BlipForImageTextRetrieval)
    assert cap_info["source"] == "capfilt" and cap_info["dec_token_id"] == med.special_ids["dec"]
    assert cap_info["sep_token_id"] == med.special_ids["sep"] and cap_info["pad_token_id"] == 0
    assert cap.config.text_config.label_smoothing == 0.1 and cap.config.text_config.hidden_dropout_prob == 0.1
    assert cap.config.vision_config.layer_norm_eps == 1e-6
    assert info["itm_first_token"] == "[ENC]" and info["itm_first_token_id"] == med.special_ids["enc"]
    assert info["itc_temp"] == pytest.approx(float(med.temp.detach()))
    assert cap_tok.get_vocab() == tok.get_vocab() == filt_tok.get_vocab()

    with torch.no_grad():
        image_embeds = med.image_embeds(pixels)
        # captioner: decoder logits with [DEC] first
        dec_ids = ids.clone()
        dec_ids[:, 0] = cap_info["dec_token_id"]
        got = cap(pixel_values=pixels, input_ids=dec_ids, attention_mask=mask).logits
        assert torch.allclose(got, med.decoder_logits(image_embeds, ids, mask), atol=1e-5)
        # filter: ITM logits with the recorded first token
        itm_ids = ids.clone()
        itm_ids[:, 0] = info["itm_first_token_id"]
        got = filt(input_ids=itm_ids, pixel_values=pixels, attention_mask=mask).itm_score
        assert torch.allclose(got, med.itm_logits(image_embeds, ids, mask), atol=1e-5)
        # filter: ITC features (transformers returns their cosine matrix)
        got = filt(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        want = med.image_feat(image_embeds=image_embeds) @ med.text_feat(ids, mask).t()
        assert torch.allclose(got, want, atol=1e-5)
        # inference's fused-attention ViT (model/vision.py) computes what HF's vision model does
        for model in (cap, filt):
            want = model.vision_model(pixel_values=pixels).last_hidden_state
            assert torch.allclose(fused_image_embeds(model.vision_model, pixels), want, atol=1e-5)
        # the exported captioner generates, [DEC] first
        out = cap.generate(pixel_values=pixels[:2], max_length=6, do_sample=False)
        assert out.shape[0] == 2 and (out[:, 0] == cap_info["dec_token_id"]).all()
    hashes = [model_hash(tmp_path / name) for name in ("cap", "filt")]
    assert len(hashes[0]) == 64 and hashes[0] != hashes[1]


def test_salesforce_format_loads_through_the_same_path(tmp_path):
    tok = salesforce_like(tmp_path)
    filt, ftok, info = load_filter(tmp_path / "itm")
    assert info["source"] == "external" and info["itm_first_token"] == "[CLS]"
    assert info["itm_first_token_id"] == tok.cls_token_id and info["itc_temp"] is None
    cap, ctok, cinfo = load_captioner(tmp_path / "cap")
    assert cinfo["source"] == "external" and cinfo["dec_token_id"] == tok.get_vocab()["[DEC]"]
    ids = ftok(["a red circle"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        score = filt(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).itm_score
    assert score.shape == (1, 2)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors only"):
        load_filter(tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        load_captioner(tmp_path)


def test_saved_weights_are_as_readable_as_the_umask_allows(trained, tmp_path):
    """safetensors (0.8.1 on) creates its files 0600 whatever the umask (safetensors#782); capfilt gives
    every weights file it writes (MED, exports, checkpoints) the mode of the config beside it, so a
    team or a worker running as another user can read the models it is handed."""
    from capfilt.train.checkpoint import save_checkpoint

    med, tok, _ = trained
    opt = torch.optim.AdamW(med.parameters(), lr=1e-3)
    old = os.umask(0o027)
    try:
        folders = [save_med(med, tok, tmp_path / "med"), export_captioner(med, tok, tmp_path / "captioner")]
        folders += [export_filter(med, tok, tmp_path / "filter")]
        step = save_checkpoint(tmp_path / "train", 1, med, tok, opt, {})
    finally:
        os.umask(old)
    weights = [f / "model.safetensors" for f in folders] + [step / "med" / "model.safetensors"]
    weights.append(step / "optimizer.safetensors")
    assert {str(w.relative_to(tmp_path)): oct(w.stat().st_mode & 0o777) for w in weights} == {
        str(w.relative_to(tmp_path)): "0o640" for w in weights
    }
