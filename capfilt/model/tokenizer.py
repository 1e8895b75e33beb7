"""Caption text → token ids: BLIP's caption normalisation and a BERT-style WordPiece with [DEC]/[ENC].

BLIP_REFERENCE.md, 'MED' and 'Preprocessing'. Our tokenizer uses BERT's special-token layout ([PAD]=0,
[UNK], [CLS], [SEP], [MASK]) plus [DEC] (bos, first token of the decoder) and [ENC] (first token of
the image-grounded encoder, ITM). It is a ``transformers.BertTokenizer`` (the tokenizers-backed one), so
it saves with ``save_pretrained`` and loads with ``AutoTokenizer.from_pretrained``, like Salesforce's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from transformers import BertTokenizer, PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"

_PUNCT = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def normalize_caption(text: str, max_words: int = 30) -> str:
    """BLIP's ``pre_caption``: lower case, ``.!"()*#:;~`` → space, collapse spaces, strip, ≤ max_words words.

    BLIP's own pre_caption keeps ``-`` and ``/`` (the ``-``/``/`` replacement is ALBEF's and BLIP's VQA
    ``pre_question``); BLIP_REFERENCE.md lists only the characters above, so we keep them too.
    """
    text = _PUNCT.sub(" ", text.lower())
    text = _SPACES.sub(" ", text).strip()
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> BertTokenizer:
    """Train a BERT-style WordPiece on normalised captions; [PAD]=0 ... [DEC]=5 (bos), [ENC]=6."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    backend.train_from_iterator((normalize_caption(c) for c in captions), trainer)
    vocab = backend.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS))), vocab
    # BertTokenizer rebuilds the same normalizer/pre-tokenizer and the `[CLS] $A [SEP]` post-processor.
    return BertTokenizer(vocab=vocab, bos_token=DEC_TOKEN, extra_special_tokens=[ENC_TOKEN])


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise KeyError(f"tokenizer has no {token} token (special tokens: {tokenizer.all_special_tokens})")
    return vocab[token]


def dec_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """[DEC]: the decoder's first token. Ours and Salesforce's both make it the bos token."""
    if tokenizer.bos_token == DEC_TOKEN and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    return _token_id(tokenizer, DEC_TOKEN)


def enc_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """[ENC]: the image-grounded encoder's first token (an extra special token, ours and Salesforce's)."""
    return _token_id(tokenizer, ENC_TOKEN)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The ids the MED needs: pad, cls, sep, enc, dec."""
    return {
        "pad": int(tokenizer.pad_token_id),
        "cls": int(tokenizer.cls_token_id),
        "sep": int(tokenizer.sep_token_id),
        "enc": enc_token_id(tokenizer),
        "dec": dec_token_id(tokenizer),
    }


def tokenize(
    tokenizer: PreTrainedTokenizerBase, captions: list[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] caption [SEP]`` ids and attention mask, padded to the longest, truncated to max_len.

    Captions go in as given: normalise them first with :func:`normalize_caption`.
    """
    out = tokenizer(
        list(captions),
        padding="longest",
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return out["input_ids"], out["attention_mask"]


def prompt_length(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """Number of tokens of ``prompt`` without specials: the ``prompt_len`` that MED.forward masks.

    ``"a picture of "`` → 3 (a, picture, of); with [DEC] in front that is the reference's
    ``prompt_length = len(tokenizer(prompt).input_ids) - 1 = 4`` positions masked.
    """
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
