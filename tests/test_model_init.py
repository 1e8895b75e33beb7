"""Pretraining's start from a pretrained ViT and BERT (model/init.py), as BLIP's reference starts.

Each checkpoint is a real one of its library, tiny: an HF ViTModel (and the same weights in timm's
layout) and an HF BertForMaskedLM with its tokenizer, saved as safetensors. The test is of function:
the MED's ViT and unimodal text encoder must compute what the source models compute.
"""

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, ViTConfig, ViTModel

from capfilt.config import load_config
from capfilt.model.hf import export_captioner, load_med
from capfilt.model.init import InitMismatch, load_vision
from capfilt.model.testing import tiny_med, torch_threads
from capfilt.model.tokenizer import special_ids
from capfilt.train.pretrain import fresh_med

WORDS = ["a", "red", "green", "circle", "square", "on", "the", "left", "of", "picture", "##s"]


def hf_vit(tmp_path, image_size=32, width=32):
    torch.manual_seed(1)
    config = ViTConfig(
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    vit = ViTModel(config, add_pooling_layer=False).eval()
    for p in vit.parameters():  # away from the 0/1 initialisation of biases and LayerNorms
        p.data.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path / f"vit-{image_size}-{width}"
    vit.save_pretrained(folder)
    return vit, folder


def timm_layout(vit: ViTModel) -> dict[str, torch.Tensor]:
    """The same weights under timm's VisionTransformer names (what DeiT's checkpoints use)."""
    e = vit.embeddings
    state = {
        "cls_token": e.cls_token,
        "pos_embed": e.position_embeddings,
        "patch_embed.proj.weight": e.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": e.patch_embeddings.projection.bias,
        "norm.weight": vit.layernorm.weight,
        "norm.bias": vit.layernorm.bias,
        "head.weight": torch.zeros(10, e.cls_token.shape[-1]),  # a classifier head, unused
        "head.bias": torch.zeros(10),
    }
    for i, layer in enumerate(vit.layers):
        a = layer.attention
        for part in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [getattr(m, part) for m in (a.q_proj, a.k_proj, a.v_proj)]
            )
            state[f"blocks.{i}.attn.proj.{part}"] = getattr(a.o_proj, part)
            state[f"blocks.{i}.norm1.{part}"] = getattr(layer.layernorm_before, part)
            state[f"blocks.{i}.norm2.{part}"] = getattr(layer.layernorm_after, part)
            state[f"blocks.{i}.mlp.fc1.{part}"] = getattr(layer.mlp.fc1, part)
            state[f"blocks.{i}.mlp.fc2.{part}"] = getattr(layer.mlp.fc2, part)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def blip_vit_output(med, pixels):
    med.vision.eval()
    with torch.no_grad():
        return med.vision(pixel_values=pixels).last_hidden_state


@pytest.mark.parametrize("layout", ["hf", "timm"])
def test_the_med_vit_computes_the_pretrained_vit(tmp_path, layout):
    with torch_threads():
        vit, folder = hf_vit(tmp_path)
        if layout == "timm":
            folder = tmp_path / "timm"
            folder.mkdir()
            save_file(timm_layout(vit), str(folder / "model.safetensors"))
        med, _ = tiny_med()
        pixels = torch.randn(3, 3, 32, 32)
        assert not torch.allclose(blip_vit_output(med, pixels), vit(pixel_values=pixels).last_hidden_state)
        load_vision(med.vision, str(folder))
        with torch.no_grad():
            expected = vit(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(blip_vit_output(med, pixels), expected, atol=1e-5, rtol=1e-5)


def test_a_blip_checkpoints_vit_is_taken_as_it_is(tmp_path):
    """A BLIP captioner (HF BlipForConditionalGeneration, as Salesforce's and ours): its vision_model."""
    with torch_threads():
        source, tok = tiny_med(seed=3)
        folder = export_captioner(source, tok, tmp_path / "captioner")
        med, _ = tiny_med()
        pixels = torch.randn(2, 3, 32, 32)
        load_vision(med.vision, str(folder))
        torch.testing.assert_close(blip_vit_output(med, pixels), blip_vit_output(source, pixels))


def test_a_vit_of_another_grid_is_interpolated_like_hf(tmp_path):
    """A 16 px checkpoint (2x2 patches) in a 32 px MED (4x4): HF's own interpolate_pos_encoding agrees."""
    with torch_threads():
        vit, folder = hf_vit(tmp_path, image_size=16)
        med, _ = tiny_med()
        load_vision(med.vision, str(folder))
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = vit(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(blip_vit_output(med, pixels), expected, atol=1e-5, rtol=1e-5)


def test_a_vit_of_another_width_or_variant_is_a_clear_error(tmp_path):
    vit, folder = hf_vit(tmp_path, width=48)
    med, _ = tiny_med()
    with pytest.raises(InitMismatch, match=r"model.vision_\*.*shape"):
        load_vision(med.vision, str(folder))

    def saved(name: str, state: dict) -> str:
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
        return str(tmp_path / name)

    timm = timm_layout(vit)
    distilled = saved("distilled", timm | {"dist_token": timm["cls_token"].clone()})
    with pytest.raises(InitMismatch, match="distilled"):
        load_vision(med.vision, distilled)
    pooled = saved("pooled", {k: v for k, v in timm.items() if k != "norm.weight"})
    with pytest.raises(InitMismatch, match="without 'norm.weight'"):
        load_vision(med.vision, pooled)


def bert(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(2)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = BertForMaskedLM(config).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path / "bert"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def test_pretraining_starts_from_bert_and_the_vit_as_the_reference_does(tmp_path):
    """fresh_med (pretrain's start, saved and loaded back) with both inits: BERT's tokenizer plus [DEC]
    and [ENC]; the unimodal encoder computes BERT (token type 0 folded into positions); the decoder's
    own self-attention and LM head are BERT's; the ViT is the checkpoint's; momentum copies equal."""
    with torch_threads():
        model, tok, bert_folder = bert(tmp_path)
        vit, vit_folder = hf_vit(tmp_path)
        cfg = load_config("tiny", [f"model.text_init={bert_folder}", f"model.vision_init={vit_folder}"])
        med, med_tok, _ = load_med(fresh_med(cfg, None, tmp_path / "init"))

        assert len(med_tok) == len(tok) + 2
        ids = special_ids(med_tok)
        assert (ids["dec"], ids["enc"]) == (len(tok), len(tok) + 1)
        text = med_tok(
            ["a red circle on the left of a green square"], return_tensors="pt", return_token_type_ids=False
        )
        assert text["input_ids"].tolist() == tok(["a red circle on the left of a green square"])["input_ids"]
        med.eval()
        with torch.no_grad():
            ours = med.text_encoder(**text).last_hidden_state
            theirs = model.bert(**text).last_hidden_state
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

        layer = med.text_decoder.bert.encoder.layer[0].attention.self
        torch.testing.assert_close(
            layer.query.weight, model.bert.encoder.layer[0].attention.self.query.weight
        )
        assert (
            layer.query.weight.data_ptr()
            != med.text_encoder.encoder.layer[0].attention.self.query.weight.data_ptr()
        )
        head = med.text_decoder.cls.predictions
        torch.testing.assert_close(head.transform.dense.weight, model.cls.predictions.transform.dense.weight)
        torch.testing.assert_close(head.bias[: len(tok)], model.cls.predictions.bias)

        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = vit(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(blip_vit_output(med, pixels), expected, atol=1e-5, rtol=1e-5)
        for online, momentum in med.momentum_pairs():
            torch.testing.assert_close(online, momentum)


def test_a_bert_of_another_depth_is_a_clear_error(tmp_path):
    _, _, folder = bert(tmp_path)
    cfg = load_config("tiny", [f"model.text_init={folder}", "model.text_layers=3"])
    with pytest.raises(InitMismatch, match=r"model.text_\*.*missing: encoder.layer.2"):
        fresh_med(cfg, None, tmp_path / "init")
