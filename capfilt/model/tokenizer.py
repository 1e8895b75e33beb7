"""Caption text → token ids: BLIP's caption normalisation and a BERT-style WordPiece with [DEC]/[ENC].

BLIP_REFERENCE.md, 'MED' and 'Preprocessing'. Our tokenizer uses BERT's special-token layout ([PAD]=0,
[UNK], [CLS], [SEP], [MASK]) plus [DEC] (bos, first token of the decoder) and [ENC] (first token of
the image-grounded encoder, ITM). It is a ``transformers.BertTokenizer`` (the tokenizers-backed one), so
it saves with ``save_pretrained`` and loads with ``AutoTokenizer.from_pretrained``, like Salesforce's.
"""

from __future__ import annotations

import re
from collections import Counter
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


def wordpiece_vocab(captions: Iterable[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary that is a pure function of the captions: the special tokens, every character
    seen (alone and as a ``##`` continuation, so any word of those characters can be spelled), then whole
    words by frequency, ties in alphabetical order, up to ``vocab_size``.

    Why not HF's ``WordPieceTrainer``: it breaks ties in hash-map order, which changes from process to
    process, so two runs over the same captions got different vocabularies and different initial models.
    """
    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for caption in captions:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(normalize_caption(caption))))
    pieces = sorted({c for w in words for c in w}) + sorted({"##" + c for w in words for c in w[1:]})
    if len(SPECIAL_TOKENS) + len(pieces) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the captions' characters need")
    ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    return {t: i for i, t in enumerate([*SPECIAL_TOKENS, *pieces, *ranked][:vocab_size])}


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> BertTokenizer:
    """A BERT-style WordPiece tokenizer on :func:`wordpiece_vocab`; [PAD]=0 ... [DEC]=5 (bos), [ENC]=6."""
    # BertTokenizer builds BERT's normalizer, pre-tokenizer and `[CLS] $A [SEP]` post-processor itself.
    return BertTokenizer(
        vocab=wordpiece_vocab(captions, vocab_size), bos_token=DEC_TOKEN, extra_special_tokens=[ENC_TOKEN]
    )


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
