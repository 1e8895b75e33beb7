"""BLIP's three losses as pure functions of tensors (BLIP_REFERENCE.md, 'Losses').

No module state here: the MED (med.py) runs the encoders and calls these; the tests check each one on
inputs small enough to work out by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_j targets[i, j] * log_softmax(logits)[i, j]``."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def same_id(ids: torch.Tensor, ids_all: torch.Tensor) -> torch.Tensor:
    """[rows, columns]: True where a row and a column share an id of any kind.

    ``ids`` [K, rows] and ``ids_all`` [K, columns] hold one line per kind of id (the image's, the
    caption's); a 1-D tensor is one kind. Two captions of one picture are a pair of positives, and so are
    two pictures with one caption ("click to enlarge"): either alone leaves the other pair a negative.
    """
    ids, ids_all = torch.atleast_2d(ids), torch.atleast_2d(ids_all)
    return torch.eq(ids[:, :, None], ids_all[:, None, :]).any(dim=0)


def positive_targets(
    batch_size: int, total: int, idx: torch.Tensor | None = None, idx_all: torch.Tensor | None = None
) -> torch.Tensor:
    """Hard ITC targets over ``total`` columns ([batch | queue]), each row summing to 1.

    Without ids: one-hot on the diagonal of the first ``batch_size`` columns. With ids (``same_id``'s
    [K, B] and [K, total]): every column that shares an id with the row is a positive, weighted equally.
    """
    if idx is None:
        targets = torch.zeros(batch_size, total)
        targets[:, :batch_size] = torch.eye(batch_size)
        return targets
    assert idx_all is not None and idx_all.shape[-1] == total
    pos = same_id(idx, idx_all).float()
    return pos / pos.sum(dim=1, keepdim=True)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor | float,
    alpha: float,
    idx: torch.Tensor | None = None,
    idx_queue: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-text contrastive loss with momentum distillation.

    ``*_feat`` (B, D) are the online features, ``*_feat_m`` (B, D) the momentum features, all
    L2-normalised; the queues are (D, Q). Similarities run against ``[batch momentum | queue]`` / temp;
    targets = alpha·softmax(momentum sims) + (1 − alpha)·hard targets (same-id with ``idx``, [K, B] or
    (B,), and ``idx_queue`` [K, Q]); loss = (soft CE i2t + soft CE t2i) / 2.
    """
    b = image_feat.size(0)
    image_all = torch.cat([image_feat_m.t(), image_queue], dim=1)
    text_all = torch.cat([text_feat_m.t(), text_queue], dim=1)
    idx_all = None
    if idx is not None:
        assert idx_queue is not None, "ITC with ids needs the id queue"
        idx_all = torch.cat([torch.atleast_2d(idx), torch.atleast_2d(idx_queue)], dim=1)
    hard = positive_targets(b, image_all.size(1), idx, idx_all).to(image_feat.device)
    with torch.no_grad():
        sim_i2t_m = image_feat_m @ text_all / temp
        sim_t2i_m = text_feat_m @ image_all / temp
        i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * hard
        t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * hard
    sim_i2t = image_feat @ text_all / temp
    sim_t2i = text_feat @ image_all / temp
    return (soft_cross_entropy(sim_i2t, i2t_targets) + soft_cross_entropy(sim_t2i, t2i_targets)) / 2


# A fixed pseudo-random int64 weight per token position, drawn once (BERT's 512 positions).
_TEXT_ID_WEIGHTS = torch.randint(1, 2**62, (512,), generator=torch.Generator().manual_seed(0x5EED))


def text_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """An int64 id per caption, equal for identical token rows (padding ignored), stable across batches.

    The row's tokens weighted by :data:`_TEXT_ID_WEIGHTS` and summed (int64 arithmetic wraps); two
    different captions collide with probability about 2^-64.
    """
    ids = input_ids.long() * attention_mask.long()
    return (ids * _TEXT_ID_WEIGHTS[: ids.size(1)].to(ids.device)).sum(dim=1)


def negative_mask(batch_size: int, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Pairs that must not be drawn as ITM negatives: the diagonal, or with ids (``same_id``'s [K, B] or
    (B,)) every pair that shares an id."""
    if idx is None:
        return torch.eye(batch_size, dtype=torch.bool)
    return same_id(idx, idx)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` whose backward adds the gradients of repeated rows in order (``index_select``).

    Why: advanced indexing's backward adds them with parallel atomic adds on the CPU, in an order that
    changes from run to run, and hard negatives repeat images (several texts pick the same similar one),
    so the same pretraining step gave other weights each run and two runs drifted apart
    (docs/BENCHMARKS.md, 'Pretraining the same twice').
    """
    return x.index_select(0, rows)


@torch.no_grad()
def sample_negatives(
    sim: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each row, one column index drawn with ``multinomial(softmax(sim) + 1e-4)``, masked pairs at 0.

    ``sim`` (B, B) are in-batch similarities (row = the anchor). A row whose every column is masked (all
    items of the batch share one image id) falls back to masking only the diagonal, where the reference
    would raise.
    """
    weights = F.softmax(sim.float(), dim=1) + 1e-4
    weights = weights.masked_fill(mask.to(weights.device), 0.0)
    empty = weights.sum(dim=1) == 0
    if empty.any():
        eye = torch.eye(sim.size(0), dtype=torch.bool, device=weights.device)
        fallback = (F.softmax(sim.float(), dim=1) + 1e-4).masked_fill(eye, 0.0)
        weights[empty] = fallback[empty]
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@torch.no_grad()
def swap_one_token(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each caption with one inner token (not the first, not [SEP]) replaced by a token of the same kind:
    (ids, ok).

    "Same kind" is read off the batch, not a word list: a token that some caption of the batch has
    between the same left and right neighbours ("a small [red] circle" → "a small [blue] circle"), so
    the negative differs from a true caption in one word that fits its slot, the fine-grained mismatch
    (a wrong colour, size or count) that random negatives rarely show. A caption with no such slot gets
    any different token of the batch. ``ok`` is False for a row left unchanged (no inner token, or a
    batch with one distinct token). Uses torch's global RNG, seeded per step by the loop.
    """
    b, n = input_ids.shape
    pos = torch.arange(n, device=input_ids.device)
    lengths = attention_mask.sum(dim=1, keepdim=True)
    inner = (pos > 0) & (pos < lengths - 1)  # between the first token and [SEP]
    row, col = inner.nonzero(as_tuple=True)
    swapped = input_ids.clone()
    if row.numel() == 0:
        return swapped, torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    token, left, right = input_ids[row, col], input_ids[row, col - 1], input_ids[row, col + 1]
    other = token[:, None] != token[None, :]  # [slots, slots]
    same_slot = other & (left[:, None] == left[None, :]) & (right[:, None] == right[None, :])
    in_context = same_slot.any(dim=1)
    candidates = torch.where(in_context[:, None], same_slot, other)
    # per caption, its slots with a same-kind candidate if it has one, else its slots with any candidate
    row_in_context = torch.zeros(b, device=input_ids.device).index_add_(0, row, in_context.float()) > 0
    eligible = in_context | (~row_in_context[row] & candidates.any(dim=1))
    weight = torch.zeros(b, n, device=input_ids.device)
    weight[row, col] = eligible.float()
    ok = weight.sum(dim=1) > 0
    slot_of = torch.full((b, n), -1, dtype=torch.long, device=input_ids.device)
    slot_of[row, col] = torch.arange(row.numel(), device=input_ids.device)
    where = torch.multinomial(weight[ok], 1).squeeze(1)
    slots = slot_of[ok.nonzero().squeeze(1), where]
    draw = torch.multinomial(candidates[slots].float(), 1).squeeze(1)
    swapped[row[slots], col[slots]] = token[draw]
    return swapped, ok


def itm_labels(
    batch_size: int, device: torch.device | str | None = None, negatives: int | None = None
) -> torch.Tensor:
    """[1]·B (positives) + [0]·negatives (2B by default: a negative image per text, a negative text per
    image)."""
    negatives = 2 * batch_size if negatives is None else negatives
    return torch.cat([torch.ones(batch_size, dtype=torch.long), torch.zeros(negatives, dtype=torch.long)]).to(
        device
    )


def itm_loss(logits: torch.Tensor, positives: int | None = None) -> torch.Tensor:
    """Plain cross-entropy of the ITM head's logits: the first ``positives`` rows are matches, the rest
    negatives (by default the reference's (3B, 2): B positives + 2B negatives)."""
    if positives is None:
        assert logits.size(0) % 3 == 0, "ITM logits come as B positives + 2B negatives"
        positives = logits.size(0) // 3
    labels = itm_labels(positives, logits.device, logits.size(0) - positives)
    return F.cross_entropy(logits, labels)


def lm_targets(decoder_ids: torch.Tensor, pad_id: int, prompt_len: int = 0) -> torch.Tensor:
    """LM labels: the decoder ids ([DEC] first) with pad → −100 and [DEC] + ``prompt_len`` tokens → −100.

    The final [SEP] stays a target (the model must learn to stop).
    """
    labels = decoder_ids.masked_fill(decoder_ids == pad_id, IGNORE)
    labels[:, : 1 + prompt_len] = IGNORE
    return labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy with label smoothing: logits[:, t] predict labels[:, t + 1].

    Mean over the non-ignored targets of ``(1 − ε)·(−log p_y) + ε·mean_k(−log p_k)``, as the
    reference's ``CrossEntropyLoss(label_smoothing=0.1)``.
    """
    shifted = logits[:, :-1, :].contiguous()
    targets = labels[:, 1:].contiguous()
    return F.cross_entropy(
        shifted.view(-1, shifted.size(-1)).float(),
        targets.view(-1),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )
