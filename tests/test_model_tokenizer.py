"""Tokenizer: BLIP's caption normalisation and our WordPiece with [DEC]/[ENC]."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from capfilt.model.testing import tiny_tokenizer
from capfilt.model.tokenizer import (
    count_words,
    dec_token_id,
    enc_token_id,
    normalize_caption,
    prompt_length,
    special_ids,
    tokenize,
    train_tokenizer,
    wordpiece_vocab,
)


def test_normalize_caption_follows_pre_caption():
    assert normalize_caption('A Dog! (Running) "fast"; on: the~beach...') == "a dog running fast on the beach"
    assert normalize_caption("  two   #cats*  ") == "two cats"
    # BLIP's pre_caption keeps - and / (that replacement is ALBEF's)
    assert normalize_caption("black-and-white dog/cat") == "black-and-white dog/cat"
    assert normalize_caption(" ".join(str(i) for i in range(40))) == " ".join(str(i) for i in range(30))
    assert normalize_caption("a b c", max_words=2) == "a b"


def test_specials_and_round_trip(tmp_path):
    tok = tiny_tokenizer()
    ids = special_ids(tok)
    assert ids == {"pad": 0, "cls": 2, "sep": 3, "enc": 6, "dec": 5}
    assert tok.unk_token_id == 1 and tok.mask_token_id == 4 and tok.bos_token == "[DEC]"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert special_ids(loaded) == ids
    assert dec_token_id(loaded) == 5 and enc_token_id(loaded) == 6
    assert loaded("a red circle")["input_ids"] == tok("a red circle")["input_ids"]


def test_tokenize_pads_to_longest_and_truncates():
    tok = tiny_tokenizer()
    ids, mask = tokenize(tok, ["a red circle", "a blue square on a plain background"], max_len=24)
    assert ids.shape == mask.shape and ids.shape[1] == int(mask[1].sum())
    assert (
        ids[0, 0] == 2 and ids[0, int(mask[0].sum()) - 1] == 3 and (ids[0, int(mask[0].sum()) :] == 0).all()
    )
    ids, mask = tokenize(tok, ["a blue square on a plain background"], max_len=4)
    assert ids.shape == (1, 4) and ids[0, 0] == 2 and ids[0, -1] == 3


def test_prompt_length():
    tok = tiny_tokenizer()
    assert prompt_length(tok, "a picture of ") == len(tok.tokenize("a picture of"))


def test_vocabulary_is_the_same_in_every_process():
    """HF's WordPieceTrainer broke ties in per-process hash order; ours is a pure function of the captions."""
    code = (
        "import json; from capfilt.model.tokenizer import count_words, wordpiece_vocab; "
        "print(json.dumps(wordpiece_vocab(count_words(['a red circle', 'two blue squares', 'a red square'] * 3), 60)))"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], env=os.environ | {"PYTHONHASHSEED": seed}, capture_output=True
        ).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1] and json.loads(runs[0])["[ENC]"] == 6


def test_vocabulary_ranks_words_and_spells_the_rest():
    captions = ["a red circle", "a red square", "a cat"]
    full = wordpiece_vocab(count_words(captions), 1000)
    assert [t for t in full if len(t) > 1 and not t.startswith(("#", "["))] == [
        "red",
        "cat",
        "circle",
        "square",
    ]
    tok = train_tokenizer(captions, len(full) - 2)  # no room for the two rarest words
    assert tok.tokenize("a red circle") == ["a", "red", "c", "##i", "##r", "##c", "##l", "##e"]
    with pytest.raises(ValueError, match="characters"):
        wordpiece_vocab(count_words(captions), 10)
