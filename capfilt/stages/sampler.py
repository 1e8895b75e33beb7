"""Nucleus sampling over BLIP's text decoder with fixed-shape state, and on CUDA one graph per step.

Why not the HF modules step by step: their cache grows by concatenation and every step runs the
decoder module by module, hundreds of small operations whatever the batch. On a GPU that launch and
Python overhead, not arithmetic, bounds the captioner (docs/BENCHMARKS.md, 'GPU path'). Here a step
touches only tensors of fixed shape: self-attention keys and values for all ``max_length`` positions,
the cross-attention keys and values of the image computed once per batch, the step's position and each
row's seen tokens (for the repetition penalty) as tensors. So a whole step (decoder, nucleus, draw) is
one function of fixed-shape tensors, which on CUDA is captured once per batch size as a CUDA graph and
replayed. The weights are the HF ``BlipTextLMHeadModel``'s own, so ours and Salesforce's load alike.

Rows that finish leave the batch when half of them have written [SEP]: on CUDA into a graph of the next
power of two (the spare rows ride along, ignored), so a run captures at most log2(batch) graphs per
batch size; on the CPU into exactly the rows still going. Leaving is a copy of every remaining row's
state (its keys and values), so on the CPU too it pays only once many rows have finished
(docs/BENCHMARKS.md, 'The sampler on the CPU').
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from capfilt.config import CaptionConfig

REFERENCE_TOP_K = 50  # HF generate's default, in force in the reference's nucleus sampling


def nucleus(
    logits: torch.Tensor,
    seen: torch.Tensor,
    length: int | torch.Tensor,
    cfg: CaptionConfig,
    eos: int,
    top_k: int = REFERENCE_TOP_K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits [R, V] → the nucleus of each row: (probabilities [R, k], token ids [R, k]),
    most likely first, zero outside the nucleus. ``seen`` [R, V] marks the tokens of each row so far
    and ``length`` is their count (the same for every row).

    HF's chain (repetition penalty, min length, top-k, top-p) on the k best tokens instead of a sort of
    the whole vocabulary: HF keeps a token when the probability mass *below* it exceeds 1 - top_p, that
    is when the mass *above* it (most likely first) is under top_p; the most likely token always stays.
    """
    penalized = torch.where(logits < 0, logits * cfg.repetition_penalty, logits / cfg.repetition_penalty)
    logits = torch.where(seen, penalized, logits)
    too_short = torch.as_tensor(length, device=logits.device) < cfg.min_length
    logits[:, eos] = logits[:, eos].masked_fill(too_short, -float("inf"))
    top, ids = torch.topk(logits, min(top_k, logits.shape[-1]))
    probs = top.softmax(-1)
    above = probs.cumsum(-1) - probs
    return probs.masked_fill(above >= cfg.top_p, 0.0), ids


def written_out_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as matmul, softmax, matmul. The sampler's attention on the CPU:
    with one query per row (a step) or a few (the prompt) and at most ``max_length`` keys, SDPA's CPU
    kernel, built for long queries, took 1.3-2x as long at the demo's step shapes (two runs) and was
    never faster (docs/BENCHMARKS.md, 'The sampler on the CPU')."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -float("inf"))
    return scores.softmax(-1) @ v


def draw(probs: torch.Tensor, ids: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse CDF: the first candidate whose cumulative mass exceeds u·total."""
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)
    return ids.gather(1, pick.clamp_(max=ids.shape[1] - 1)).squeeze(1)


@dataclass
class Rows:
    """The decoding state of R rows; every tensor but ``pos`` has the row first (keys and values after
    the layer)."""

    ids: torch.Tensor  # [R, 1] the next input token
    keys: torch.Tensor  # [layers, R, heads, max_length, head_dim] self-attention
    values: torch.Tensor
    cross_keys: torch.Tensor  # [layers, R, heads, image tokens, head_dim], computed once per batch
    cross_values: torch.Tensor
    seen: torch.Tensor  # [R, V] bool: tokens of the row so far (repetition penalty)
    uniforms: torch.Tensor  # [R, steps] the row's own random stream, one uniform per drawn token
    live: torch.Tensor  # [R] bool: a real row that has not written [SEP]
    tokens: torch.Tensor  # [R, steps] drawn tokens, -1 after [SEP]
    origin: torch.Tensor  # [R] the row's index in the batch; the spare rows' is the batch size
    pos: torch.Tensor  # [1] position of the last input token (shared by all rows)

    def select(self, index: torch.Tensor, real: int, spare: int) -> Rows:
        """Rows ``index``: the first ``real`` as they are, the others spares (not live, origin ``spare``)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = t if f.name == "pos" else t.index_select(1 if t.dim() == 5 else 0, index)
        out["live"][real:] = False
        out["origin"][real:] = spare
        return Rows(**out)

    def copy_(self, other: Rows) -> None:
        for f in fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name))


class Sampler:
    """Draws captions with the captioner's ``text_decoder``: ``capfilt.model.blip.TextDecoder`` in a round,
    transformers' ``BlipTextLMHeadModel`` (same names, same weights) where a test compares the two."""

    def __init__(self, text_decoder: torch.nn.Module, cfg: CaptionConfig, prompt_ids: list[int], eos: int):
        conf = text_decoder.config
        self.cfg, self.eos, self.prompt_ids = cfg, eos, prompt_ids
        self.steps = cfg.max_length - len(prompt_ids)
        self.heads, self.head_dim = conf.num_attention_heads, conf.hidden_size // conf.num_attention_heads
        self.emb = text_decoder.bert.embeddings
        self.layers = text_decoder.bert.encoder.layer
        self.head = text_decoder.cls.predictions
        self.vocab = conf.vocab_size
        with torch.no_grad():  # self-attention's q, k, v as one matrix: one matmul instead of three
            self.qkv = [
                (
                    torch.cat([a.query.weight, a.key.weight, a.value.weight]),
                    torch.cat([a.query.bias, a.key.bias, a.value.bias]),
                )
                for a in (layer.attention.self for layer in self.layers)
            ]
        param = next(text_decoder.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.graphed = self.device.type == "cuda"
        self.attention = F.scaled_dot_product_attention if self.graphed else written_out_attention
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Rows]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.graphed else None

    @torch.no_grad()
    def sample(self, image_embeds: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, N, D] (one row per caption) and each row's uniforms [B, steps] → the
        drawn tokens [B, steps], -1 after [SEP]."""
        batch = image_embeds.shape[0]
        result = torch.full((batch + 1, self.steps), -1, device=self.device)  # the last row: spares'
        rows = self._start(image_embeds, uniforms.to(self.device))
        for _ in range(1, self.steps):
            live = int(rows.live.sum())  # the step's one host sync
            if live == 0:
                break
            rows = self._step_on(self._shrink(rows, live, result))
        result.index_copy_(0, rows.origin, rows.tokens)
        return result[:batch]

    def _start(self, image_embeds: torch.Tensor, uniforms: torch.Tensor) -> Rows:
        """Prefill the prompt for every row and draw its first token (outside any graph)."""
        batch, prompt = image_embeds.shape[0], len(self.prompt_ids)
        capacity = _pow2(batch) if self.graphed else batch
        rows = torch.arange(capacity, device=self.device)
        if capacity > batch:  # spare rows repeat the last one, before anything is computed for them
            last = rows.clamp(max=batch - 1)
            image_embeds, uniforms = image_embeds[last], uniforms[last]
        cross_shape = (len(self.layers), capacity, self.heads, image_embeds.shape[1], self.head_dim)
        cross_keys, cross_values = (image_embeds.new_empty(cross_shape) for _ in range(2))
        for i, layer in enumerate(self.layers):  # written in place: at BLIP-base size they are gigabytes
            cross_keys[i] = self._split(layer.crossattention.self.key(image_embeds))
            cross_values[i] = self._split(layer.crossattention.self.value(image_embeds))
        shape = (len(self.layers), capacity, self.heads, self.cfg.max_length, self.head_dim)
        ids = torch.tensor([self.prompt_ids], device=self.device).expand(capacity, -1)
        state = Rows(
            ids=ids[:, -1:].clone(),
            keys=torch.zeros(shape, device=self.device, dtype=self.dtype),
            values=torch.zeros(shape, device=self.device, dtype=self.dtype),
            cross_keys=cross_keys,
            cross_values=cross_values,
            seen=torch.zeros(capacity, self.vocab, dtype=torch.bool, device=self.device).scatter_(
                1, ids, True
            ),
            uniforms=uniforms,
            live=rows < batch,
            tokens=torch.full((capacity, self.steps), -1, device=self.device),
            origin=rows.clamp(max=batch),  # the spares' is the batch size
            pos=torch.tensor([prompt - 1], device=self.device),
        )
        self._draw(state, self._forward(state, ids, torch.arange(prompt, device=self.device)))
        return state

    def _shrink(self, rows: Rows, live: int, result: torch.Tensor) -> Rows:
        """Drop finished rows once half have finished: on CUDA into the next power of two (so into one of a
        few captured graphs), on the CPU into the live rows. Their tokens go to ``result`` first."""
        capacity = rows.live.shape[0]
        if live > capacity // 2:
            return rows
        target = _pow2(live) if self.graphed else live
        result.index_copy_(0, rows.origin, rows.tokens)
        keep = torch.argsort((~rows.live).byte(), stable=True)[:live]  # live rows, in their order
        return rows.select(torch.cat([keep, keep[:1].expand(target - live)]), live, len(result) - 1)

    def _step_on(self, rows: Rows) -> Rows:
        """One step, and the state after it: eagerly on the CPU; on CUDA by replaying the graph of this
        row count, whose own buffers are then the state (``rows`` is copied into them when new)."""
        if not self.graphed:
            self._step(rows)
            return rows
        capacity = rows.live.shape[0]
        if capacity not in self.graphs:
            self.graphs[capacity] = self._capture(rows)
        graph, static = self.graphs[capacity]
        if static is not rows:
            static.copy_(rows)
        graph.replay()
        return static

    def _capture(self, rows: Rows) -> tuple[torch.cuda.CUDAGraph, Rows]:
        """A CUDA graph of one step over buffers shaped like ``rows`` (warmed up on a side stream)."""
        static = Rows(**{f.name: getattr(rows, f.name).clone() for f in fields(rows)})
        start = static.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(static)
                static.pos.copy_(start)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(static)
        return graph, static

    def _step(self, rows: Rows) -> None:
        self._draw(rows, self._forward(rows, rows.ids, rows.pos))

    def _draw(self, rows: Rows, logits: torch.Tensor) -> None:
        """Draw each row's next token from the last position's logits and advance the state in place."""
        step = rows.pos + 1 - len(self.prompt_ids)  # [1]: the index of the token drawn
        probs, ids = nucleus(logits[:, -1].float(), rows.seen, rows.pos + 1, self.cfg, self.eos)
        nxt = draw(probs, ids, rows.uniforms.index_select(1, step)[:, 0])
        rows.tokens.index_copy_(1, step, torch.where(rows.live, nxt, -1)[:, None])
        rows.live &= nxt != self.eos
        rows.seen.scatter_(1, nxt[:, None], True)
        rows.ids.copy_(nxt[:, None])
        rows.pos.add_(1)

    def _forward(self, rows: Rows, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """BLIP's decoder (BERT layers: causal self-attention, cross-attention, feed-forward, each
        post-norm) on input ``ids`` [R, T] at ``positions`` [T]; writes their keys and values into the
        cache and returns the last position's logits [R, 1, V]."""
        x = self.emb.LayerNorm(self.emb.word_embeddings(ids) + self.emb.position_embeddings(positions))
        causal = torch.arange(self.cfg.max_length, device=self.device) <= positions[:, None]  # [T, L]
        for i, layer in enumerate(self.layers):
            q, k, v = (self._split(t) for t in F.linear(x, *self.qkv[i]).chunk(3, dim=-1))
            rows.keys[i].index_copy_(2, positions, k)
            rows.values[i].index_copy_(2, positions, v)
            att = self.attention(q, rows.keys[i], rows.values[i], attn_mask=causal)
            x = _residual(layer.attention.output, self._merge(att), x)
            cross = layer.crossattention
            q = self._split(cross.self.query(x))
            att = self.attention(q, rows.cross_keys[i], rows.cross_values[i])
            x = _residual(cross.output, self._merge(att), x)
            x = _residual(layer.output, layer.intermediate(x), x)
        return self.head(x[:, -1:])

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """[R, T, D] → [R, heads, T, head_dim]."""
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).flatten(2)


def _residual(block: torch.nn.Module, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """BERT's post-norm output: LayerNorm(dense(h) + x) (dropout is off in eval)."""
    return block.LayerNorm(block.dense(h) + x)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
