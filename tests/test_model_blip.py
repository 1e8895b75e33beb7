"""capfilt.model.blip and FolderTokenizer against transformers: the same outputs from the same folders, and
a round's worker that never imports transformers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import make_models
from safetensors.torch import load_file
from transformers import AutoTokenizer, BlipConfig, BlipTextConfig, BlipVisionConfig

from capfilt.config import load_config
from capfilt.model import blip, hf
from capfilt.model.testing import salesforce_like, torch_threads
from capfilt.model.tokenizer import FolderTokenizer, tokenize
from capfilt.model.vision import image_embeds
from capfilt.stages.sampler import Sampler


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _strip_defaults(folder: Path) -> None:
    """Rewrite config.json as an older transformers wrote it: only what differs from the defaults."""
    config = json.loads((folder / "config.json").read_text())
    for key, defaults in (("text_config", blip.TEXT_DEFAULTS), ("vision_config", blip.VISION_DEFAULTS)):
        config[key] = {k: v for k, v in config[key].items() if defaults.get(k, object()) != v}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=["ours", "salesforce", "salesforce, defaults left out"])
def folders(request, tmp_path_factory) -> tuple[Path, Path]:
    """(captioner, filter) folders: our export convention, or Salesforce's."""
    tmp = tmp_path_factory.mktemp("blip")
    if request.param == "ours":
        cap, flt = make_models(tmp)
        return Path(cap), Path(flt)
    salesforce_like(tmp)
    if "defaults" in request.param:
        for name in ("cap", "itm"):
            _strip_defaults(tmp / name)
    return tmp / "cap", tmp / "itm"


def test_defaults_are_transformers_defaults():
    for defaults, config in (
        (blip.TEXT_DEFAULTS, BlipTextConfig()),
        (blip.VISION_DEFAULTS, BlipVisionConfig()),
        (blip.BLIP_DEFAULTS, BlipConfig()),
    ):
        assert {k: getattr(config, k) for k in defaults} == defaults


def test_the_captioner_samples_what_transformers_modules_sample(folders):
    ours, tok, info = blip.load_captioner(folders[0])
    theirs, _, their_info = hf.load_captioner(folders[0])
    assert info == their_info
    pixels = torch.randn(
        6, 3, *[ours.vision_model.config.image_size] * 2, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        embeds = image_embeds(ours.vision_model, pixels)
        assert torch.equal(embeds, image_embeds(theirs.vision_model, pixels))  # same weights, same function
    cfg = load_config("tiny").caption
    prompt = [info["dec_token_id"], *tok(cfg.prompt, add_special_tokens=False)["input_ids"]]
    uniforms = torch.rand(6, cfg.max_length - len(prompt), generator=torch.Generator().manual_seed(2))
    drawn = [
        Sampler(m.text_decoder, cfg, prompt, info["sep_token_id"]).sample(embeds, uniforms)
        for m in (ours, theirs)
    ]
    assert torch.equal(*drawn)


def test_the_filter_scores_what_transformers_modules_score(folders):
    ours, tok, info = blip.load_filter(folders[1])
    theirs, their_tok, their_info = hf.load_filter(folders[1])
    assert info == their_info
    ids, mask = tokenize(tok, ["a red circle", "the dog on the grass", "a"], 35)
    their_ids, their_mask = tokenize(their_tok, ["a red circle", "the dog on the grass", "a"], 35)
    assert torch.equal(ids, their_ids) and torch.equal(mask, their_mask)
    pixels = torch.randn(
        3, 3, *[ours.vision_model.config.image_size] * 2, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        embeds = image_embeds(ours.vision_model, pixels)
        assert torch.equal(embeds, image_embeds(theirs.vision_model, pixels))
        assert torch.equal(ours.vision_proj(embeds[:, 0]), theirs.vision_proj(embeds[:, 0]))
        itm_ids = ids.clone()
        itm_ids[:, 0] = info["itm_first_token_id"]
        for kwargs in ({}, {"encoder_hidden_states": embeds}):  # ITC's text pass, ITM's
            a = ours.text_encoder(input_ids=itm_ids, attention_mask=mask, **kwargs).last_hidden_state
            b = theirs.text_encoder(input_ids=itm_ids, attention_mask=mask, **kwargs).last_hidden_state
            assert torch.allclose(a, b, atol=1e-5)
            first = ours.text_encoder(itm_ids, mask, first_token_only=True, **kwargs).last_hidden_state
            assert first.shape == (3, 1, a.shape[-1]) and torch.allclose(first, a[:, :1], atol=1e-6)
            assert torch.allclose(ours.itm_head(a[:, 0]), theirs.itm_head(b[:, 0]), atol=1e-5)
            assert torch.allclose(ours.text_proj(a[:, 0]), theirs.text_proj(b[:, 0]), atol=1e-5)


def test_folder_tokenizer_matches_transformers(folders):
    ours, theirs = FolderTokenizer(folders[1]), AutoTokenizer.from_pretrained(str(folders[1]))
    texts = ["a red circle", "A Dog on THE grass!", "café déjà vu", "", "  spaces  ", "xyzzy qwerty", "日本語",
             "a picture of ", " ".join(["red circle"] * 40)]  # fmt: skip
    for got, want in zip(tokenize(ours, texts, 35), tokenize(theirs, texts, 35)):
        assert torch.equal(got, want)
    for text in texts:
        assert (
            ours(text, add_special_tokens=False)["input_ids"]
            == theirs(text, add_special_tokens=False)["input_ids"]
        )
    assert ours.get_vocab() == theirs.get_vocab()
    everything = list(range(len(ours.get_vocab())))
    assert [ours.convert_ids_to_tokens(i) for i in everything] == theirs.convert_ids_to_tokens(everything)
    g = torch.Generator().manual_seed(4)
    for _ in range(50):
        ids = torch.randint(0, len(everything), (12,), generator=g).tolist()
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_a_folder_that_is_not_that_model_is_a_clear_error(tmp_path):
    cap, flt = make_models(tmp_path)
    with pytest.raises(ValueError, match="missing.*text_encoder"):
        blip.load_filter(cap)
    with pytest.raises(ValueError, match="unexpected.*text_encoder"):
        blip.load_captioner(flt)


def test_a_worker_loads_its_models_without_importing_transformers(tmp_path):
    """Nor what torch imports for ops on the meta device that have no C++ kernel (torch._dynamo, sympy):
    each of the three costs an actor seconds of its start."""
    cap, flt = make_models(tmp_path)
    code = (
        "import sys; from capfilt.config import load_config; from capfilt.run.worker import ShardWorker; "
        f"ShardWorker(load_config('tiny'), {cap!r}, {flt!r}); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'sympy'}), "
        "'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_models_hold_the_checkpoints_tensors_in_memory_of_their_own(folders, dtype, tmp_path):
    """Built on the meta device, every tensor is the checkpoint's (cast to ``dtype``), the LM head's tied
    tensors are shared again, and a later rewrite of the file in place changes nothing that was loaded."""
    for role, load in ((0, blip.load_captioner), (1, blip.load_filter)):
        folder = Path(shutil.copytree(folders[role], tmp_path / str(role)))
        model = load(folder, "cpu", dtype)[0]
        on_disk = load_file(str(folder / "model.safetensors"))
        loaded = {k: v.clone() for k, v in model.state_dict().items()}
        for key, tensor in loaded.items():
            want = on_disk.get(key, on_disk.get(key.replace("decoder.bias", "bias")))
            if want is None and key.endswith("predictions.decoder.weight"):
                want = on_disk[key.replace("cls.predictions.decoder", "bert.embeddings.word_embeddings")]
            assert tensor.dtype == dtype and torch.equal(tensor, want.to(dtype)), key
        if role == 0:
            head, text = model.text_decoder.cls.predictions, model.text_decoder.bert
            assert head.decoder.bias is head.bias
            assert head.decoder.weight is text.embeddings.word_embeddings.weight
        with open(folder / "model.safetensors", "r+b") as f:  # every tensor's bytes zeroed, same inode
            header = 8 + int.from_bytes(f.read(8), "little")
            f.seek(header)
            f.write(bytes((folder / "model.safetensors").stat().st_size - header))
        assert not any(t.any() for t in load_file(str(folder / "model.safetensors")).values())
        assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())


def test_folder_tokenizer_cleans_up_spaces_when_the_folder_says_so(tmp_path):
    """Older BERT tokenizer folders set clean_up_tokenization_spaces: " ." becomes "." on decode."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", ".", ",", "'", "s", "it", "n", "t"]
    BertTokenizer(
        vocab={w: i for i, w in enumerate(words)}, clean_up_tokenization_spaces=True
    ).save_pretrained(tmp_path)
    ours, theirs = FolderTokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.clean_up and theirs.clean_up_tokenization_spaces
    ids = theirs("a dog , it ' s a dog .", add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids) == "a dog, it's a dog."
