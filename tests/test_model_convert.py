"""`capfilt convert` on a checkpoint laid out like Salesforce's ``model_base.pth``, built from a tiny MED."""

from __future__ import annotations

import random

import torch
from run_helpers import WORDS
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.config import load_config
from capfilt.model.convert import rename
from capfilt.model.hf import load_med
from capfilt.model.med import MED
from capfilt.model.tokenizer import special_ids, train_tokenizer


def _reference_checkpoint(tmp_path):
    """A tiny MED and its weights under the reference's names, saved the way BLIP's training saves."""
    rng = random.Random(0)
    tokenizer = train_tokenizer([" ".join(rng.choices(WORDS, k=8)) for _ in range(200)], vocab_size=120)
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    med = MED(cfg, len(tokenizer), special_ids(tokenizer)).eval()
    for p in med.parameters():  # momentum weights differ from the online ones, as in a real checkpoint
        p.data.add_(0.01 * torch.randn_like(p))
    state = {rename(k, to_ours=False): v.clone() for k, v in med.state_dict().items()}
    state.pop("idx_queue")  # BLIP_Pretrain has no id queue
    for m in ("text_encoder", "text_decoder.bert", "text_encoder_m"):  # buffers ours does not keep
        state[f"{m}.embeddings.position_ids"] = torch.arange(512)[None]
    state["text_encoder_m.encoder.layer.0.crossattention.self.query.weight"] = torch.zeros(32, 32)
    assert "visual_encoder.blocks.1.attn.qkv.weight" in state and "visual_encoder_m.cls_token" in state
    return med, state


def _outputs(med: MED, pixels: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        image = med.vision(pixel_values=pixels).last_hidden_state
        fused = med.text_encoder(input_ids=ids, encoder_hidden_states=image).last_hidden_state
        logits = med.text_decoder(input_ids=ids, encoder_hidden_states=image).logits
        image_m = med.vision_m(pixel_values=pixels).last_hidden_state
        return [image, fused, logits, med.itm_head(fused[:, 0]), med.vision_proj(image[:, 0]), image_m]


def test_convert_a_released_blip_checkpoint_round_trip(tmp_path):
    med, state = _reference_checkpoint(tmp_path)
    torch.save({"model": state, "optimizer": {}, "epoch": 19}, tmp_path / "model_base.pth")
    args = ["convert", str(tmp_path / "model_base.pth"), str(tmp_path / "med"), "-c", "tiny"]
    result = CliRunner().invoke(app, [*args, "--tokenizer", str(tmp_path / "tokenizer")])
    assert result.exit_code == 0, result.output
    converted, _, meta = load_med(tmp_path / "med")
    converted.eval()
    assert meta["converted_from"].endswith("model_base.pth") and len(meta["sha256"]) == 64
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(7, med.vocab_size, (2, 9))
    for ours, theirs in zip(_outputs(med, pixels, ids), _outputs(converted, pixels, ids), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(converted.image_queue, med.image_queue, rtol=0, atol=0)

    state["visual_encoder.head.weight"] = torch.zeros(10, 32)  # a classifier head the MED has no place for
    torch.save(state, tmp_path / "with_head.pth")  # a bare state dict, no "model" wrapper
    args = ["convert", str(tmp_path / "with_head.pth"), str(tmp_path / "med2"), "-c", "tiny"]
    result = CliRunner().invoke(app, [*args, "--tokenizer", str(tmp_path / "tokenizer")])
    assert result.exit_code == 2 and "unmapped ['visual_encoder.head.weight']" in result.stderr, result.output
