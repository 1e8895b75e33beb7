"""Caption text → token ids: BLIP's caption normalisation and a BERT-style WordPiece with [DEC]/[ENC].

BLIP_REFERENCE.md, 'MED' and 'Preprocessing'. Our tokenizer uses BERT's special-token layout ([PAD]=0,
[UNK], [CLS], [SEP], [MASK]) plus [DEC] (bos, first token of the decoder) and [ENC] (first token of
the image-grounded encoder, ITM). It is a ``transformers.BertTokenizer`` (the tokenizers-backed one), so
it saves with ``save_pretrained`` and loads with ``AutoTokenizer.from_pretrained``, like Salesforce's.
A round's workers read the saved ``tokenizer.json`` with :class:`FolderTokenizer` instead, without
importing transformers.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is imported where a tokenizer is trained: a round's workers never need it
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


@functools.cache
def _word_splitter():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()


def count_words(captions: Iterable[str], words: Counter | None = None) -> Counter:
    """``words`` (a new Counter if None) plus the captions' words, split as the vocabulary splits them.

    All a tokenizer needs of a corpus: a pass over it keeps one entry per distinct word here instead of
    every caption, so its memory does not grow with the number of pairs.
    """
    norm, pre = _word_splitter()
    words = Counter() if words is None else words
    for caption in captions:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(normalize_caption(caption))))
    return words


def wordpiece_vocab(words: Counter, vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary that is a pure function of the word counts (:func:`count_words`): the special
    tokens, every character seen (alone and as a ``##`` continuation, so any word of those characters can
    be spelled), then whole words by frequency, ties in alphabetical order, up to ``vocab_size``.

    Why not HF's ``WordPieceTrainer``: it breaks ties in hash-map order, which changes from process to
    process, so two runs over the same captions got different vocabularies and different initial models.
    """
    pieces = sorted({c for w in words for c in w}) + sorted({"##" + c for w in words for c in w[1:]})
    if len(SPECIAL_TOKENS) + len(pieces) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the captions' characters need")
    ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    return {t: i for i, t in enumerate([*SPECIAL_TOKENS, *pieces, *ranked][:vocab_size])}


def train_tokenizer(words: Counter | Iterable[str], vocab_size: int) -> BertTokenizer:
    """A BERT-style WordPiece tokenizer on :func:`wordpiece_vocab` of word counts, or of captions to count;
    [PAD]=0 ... [DEC]=5 (bos), [ENC]=6."""
    from transformers import BertTokenizer

    words = words if isinstance(words, Counter) else count_words(words)
    # BertTokenizer builds BERT's normalizer, pre-tokenizer and `[CLS] $A [SEP]` post-processor itself.
    return BertTokenizer(
        vocab=wordpiece_vocab(words, vocab_size), bos_token=DEC_TOKEN, extra_special_tokens=[ENC_TOKEN]
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


# transformers' ``clean_up_tokenization``, for folders whose tokenizer_config.json turns it on
_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]  # fmt: skip


class FolderTokenizer:
    """A model folder's ``tokenizer.json`` through the ``tokenizers`` library, answering the calls the round
    makes of a transformers tokenizer (encode with or without padding and truncation, decode, vocabulary).

    Why: importing transformers costs each worker seconds at start (``capfilt.model.blip``). The ids and the
    text equal transformers' for the same folder (tests/test_model_blip.py).
    """

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        named = [config.get(f"{k}_token") for k in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")]
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        specials = [t if isinstance(t, str) else (t or {}).get("content") for t in [*named, *extra]]
        self.special = {self.backend.token_to_id(t) for t in specials if t} - {None}
        self.pad_token = config.get("pad_token") or "[PAD]"
        self.pad_id = self.backend.token_to_id(self.pad_token)
        self.lock = threading.Lock()  # the backend's padding and truncation are settings, set per call

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        for before, after in _CLEAN_UP if self.clean_up else []:
            text = text.replace(before, after)
        return text

    def __call__(
        self,
        text: str | list[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
    ) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        with self.lock:
            if truncation and max_length:
                self.backend.enable_truncation(max_length)
            else:
                self.backend.no_truncation()
            if padding:
                self.backend.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token)
            else:
                self.backend.no_padding()
            encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        out = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
        }
        if return_tensors == "pt":
            return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        return {k: v[0] for k, v in out.items()} if isinstance(text, str) else out


def load_tokenizer(path: Path) -> FolderTokenizer | PreTrainedTokenizerBase:
    """A model folder's tokenizer: its tokenizer.json without transformers, else transformers' loader."""
    if (path / "tokenizer.json").exists():
        return FolderTokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
