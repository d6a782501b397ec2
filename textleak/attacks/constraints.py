"""Candidate constraints: side channels that narrow which token may sit at each free position.

- ``embedding-rows``: rows of the word-embedding gradient that are non-zero belong to tokens of the batch (exact
  when the embeddings are untied; with a tied MLM decoder, or under noise, the rows well above the median norm).
- ``labels``: the output-bias leak (``leakage.label_bag``): the exact bag of input tokens for ``all-tokens``; for
  ``mlm`` the masked-out tokens, which must be in the batch but do not narrow the rest (added to other sets).
- ``positions``: at B = 1, per position, the ``top_k`` batch tokens (embedding rows) whose word-embedding
  gradient row points the way of that position's position-embedding gradient row: both are sums of the gradient at
  the embedding layer's input, so a token that occurs once has exactly its position's row. The best-aligned token
  of each position is also the attack's first guess (``start``): on MiniLM it was the true token at every position
  of 7 CoLA and SST-2 sentences, also under noise 1e-4. At B > 1 a position row sums the whole batch, so the
  tokens are paired with positions by ``span_pairing`` (each position row a sum of token rows) and a position
  allows the tokens with at least ``PAIR_FLOOR`` of their gradient there (MiniLM, SST-2, B = 4, noise 1e-5: 97%
  of the true tokens in sets of 3.5 on average; the misses are repeated tokens whose share the fit gave to another
  of their positions).
- ``span``: per position, the ``top_k`` tokens of lowest first-layer span residual (``span_scoring``); the rank is
  capped at the number of tokens, so the sets stay usable when noise hides the true rank.
- ``all``: every available source: the span sets intersected with the vocabulary sets where that leaves something.
  At B > 1 on a noisy update the span sets are left out: their top tokens miss half the batch's, and cutting the
  pairing's sets with them dropped those (MiniLM CoLA B=4, noise 1e-4: ROUGE-1 42.9 with them, 52.9 without).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from textleak.attacks.layout import Layout
from textleak.attacks.leakage import label_bag
from textleak.attacks.span_pairing import pair_tokens
from textleak.attacks.span_scoring import (
    SpanBasis,
    candidate_residuals,
    embedding_parts,
    qkv_gradient_names,
    span_basis,
    stacked_gradient,
)
from textleak.update import Update

CONSTRAINTS = ("none", "embedding-rows", "labels", "positions", "span", "all")
#: at B > 1, the share of a token's gradient a position must hold for the token to be allowed there
PAIR_FLOOR = 0.05
#: Under i.i.d. noise a word-embedding row above this multiple of the median row norm surely belongs to the batch
#: (noise alone: the largest of MiniLM's 30522 rows lies 1.16x above the median).
SURE_RATIO = 2.0
#: Word-embedding rows kept as the batch's vocabulary: above this multiple of the median row norm. Still clear of
#: noise alone (1.16x at most on MiniLM), and it keeps the weaker rows of long batches: MiniLM B=4 under noise 1e-4,
#: the pairing's sets then held 92-95% of the true tokens of SST-2 batches 0-1 where they sit (56-64% at 2x), RT 73-89%
#: (36-58%), CoLA 83-100% (71-83%); lamp's ROUGE-1 rose on all three (4 batches each; results/README.md).
ROW_RATIO = 1.3
POSITION_EMBEDDINGS = "position_embeddings.weight"
WORD_EMBEDDINGS = "word_embeddings.weight"


@dataclass(frozen=True)
class TokenSet:
    """Token ids from one side channel: ``exact`` (the batch's tokens), or ``subset`` (some of them), or neither
    (an approximate superset); ``sure``: those of ``ids`` that certainly occur in the batch."""

    ids: list[int]
    exact: bool
    subset: bool = False
    sure: list[int] = field(default_factory=list)


@dataclass
class Candidates:
    """Allowed tokens per (sequence, position) (``allowed``: (B, L, V) bool, None = unconstrained) and a record."""

    allowed: torch.Tensor | None
    details: dict[str, Any] = field(default_factory=dict)
    required: list[int] = field(default_factory=list)  # tokens known to occur in the batch
    warnings: list[str] = field(default_factory=list)
    start: torch.Tensor | None = None  # (B, L) a first guess per position (the positions channel's best), or None

    def padded(self, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate ids (B, L, C) padded to the widest free position, and which entries are real."""
        assert self.allowed is not None
        width = int(self.allowed[layout.free].sum(-1).max())
        ids = torch.zeros(*layout.free.shape, width, dtype=torch.long)
        valid = torch.zeros(*layout.free.shape, width, dtype=torch.bool)
        for b, p in layout.free.nonzero().tolist():
            tokens = self.allowed[b, p].nonzero().flatten()
            ids[b, p, : len(tokens)] = tokens
            valid[b, p, : len(tokens)] = True
        return ids, valid


def embedding_row_tokens(update: Update, ratio: float) -> TokenSet | None:
    """Tokens whose word-embedding gradient row is non-zero (above ``ratio`` x the median row norm if that is not 0).

    Under i.i.d. noise every row outside the batch is noise alone, whose norms cluster tightly around the median,
    so each row above ``SURE_RATIO`` x the median surely belongs to a token of the batch (``sure``), though tokens
    with weaker rows may be missing.
    """
    grads = [g for n, g in update.gradients.items() if n.endswith(WORD_EMBEDDINGS)]
    if not grads:
        return None
    norms = grads[0].to(torch.float64).norm(dim=-1)
    median = float(norms.median())
    present = (norms > ratio * median).nonzero().flatten().tolist()
    sure = (norms > max(ratio, SURE_RATIO) * median).nonzero().flatten().tolist() if median > 0 else []
    return TokenSet(present, exact=median == 0.0, sure=sure) if present else None


def label_tokens(update: Update) -> TokenSet | None:
    """The output-bias label bag where labels are tokens: exact for ``all-tokens``, a subset for ``mlm``."""
    task = update.metadata.task
    if task == "classification":
        return None
    bag = label_bag(update)
    return TokenSet(bag, exact=task == "all-tokens", subset=task == "mlm") if bag else None


def position_row_tokens(update: Update, layout: Layout, rows: TokenSet | None, top_k: int) -> torch.Tensor | None:
    """(L, k) batch tokens whose word-embedding gradient row is most aligned (cosine) with each position's row."""
    word = [g for n, g in update.gradients.items() if n.endswith(WORD_EMBEDDINGS)]
    position = [g for n, g in update.gradients.items() if n.endswith(POSITION_EMBEDDINGS)]
    if rows is None or not word or not position:
        return None
    tokens = torch.tensor(rows.ids, dtype=torch.long)
    word_rows = torch.nn.functional.normalize(word[0][tokens].to(torch.float64), dim=-1)
    position_rows = torch.nn.functional.normalize(position[0][: layout.fixed_ids.shape[1]].to(torch.float64), dim=-1)
    best = (position_rows @ word_rows.T).topk(min(top_k, len(tokens)), dim=1).indices
    return tokens[best]


def paired_position_tokens(
    update: Update, model: torch.nn.Module, layout: Layout, rows: TokenSet | None, vocab: int
) -> torch.Tensor | None:
    """(L, V) mask: the batch tokens holding at least ``PAIR_FLOOR`` of their gradient at each position (B > 1)."""
    if rows is None:
        return None
    length = layout.fixed_ids.shape[1]
    offset = embedding_parts(model).position_offset
    pairing = pair_tokens(update, rows.ids, length, offset=offset, exact=False)
    if pairing is None:
        return None
    mask = torch.zeros(length, vocab, dtype=torch.bool)
    for p in range(length):
        mask[p, [t for t, _ in pairing.ranked(p, PAIR_FLOOR)]] = True
    return mask


def first_layer_span(update: Update, model: torch.nn.Module) -> SpanBasis | None:
    """The first layer's input span from its query/key/value gradients; None without them."""
    try:
        return span_basis(stacked_gradient(update, qkv_gradient_names(model, 0)))
    except ValueError:
        return None


def noisy_span(span: SpanBasis, layout: Layout) -> bool:
    """Whether the span's spectrum shows additive noise, or it fills more directions than there are tokens."""
    return span.noise > 0 or span.rank > int(layout.attention_mask.sum())


def span_position_tokens(span: SpanBasis, model: torch.nn.Module, layout: Layout, top_k: int) -> torch.Tensor:
    """(L, top_k) token ids of lowest residual per position against the first layer's ``span``."""
    tokens = int(layout.attention_mask.sum())
    if span.rank > tokens:  # noise fills the spectrum: keep the strongest directions, at most one per token
        span = SpanBasis(span.basis[:, :tokens].contiguous(), span.spectrum, tokens, span.gap)
    _, ids = candidate_residuals(embedding_parts(model), span, layout.fixed_ids.shape[1], [0], keep=top_k)
    return ids[:, 0]


def build_candidates(
    update: Update,
    model: torch.nn.Module,
    layout: Layout,
    base: torch.Tensor,
    mode: str,
    *,
    row_ratio: float = ROW_RATIO,
    top_k: int = 8,
    position_top_k: int = 3,
) -> Candidates:
    """Combine the side channels ``mode`` selects into allowed tokens per free position (within ``base``, (V,))."""
    if mode not in CONSTRAINTS:
        raise ValueError(f"constraints must be one of {CONSTRAINTS}, got {mode!r}")
    details: dict[str, Any] = {"constraints": mode, "sources": []}
    warnings: list[str] = []
    if mode == "none":
        return Candidates(None, details)
    vocab = base.shape[0]
    sets: list[TokenSet] = []
    rows = embedding_row_tokens(update, row_ratio)
    if mode in ("embedding-rows", "all"):
        details["embedding_rows"] = None if rows is None else {"size": len(rows.ids), "exact": rows.exact}
        if rows is None:
            warnings.append("constraint embedding-rows: the update has no usable word-embedding gradient")
        else:
            sets.append(rows)
    if mode in ("labels", "all"):
        labels = label_tokens(update)
        details["labels"] = None if labels is None else {"size": len(labels.ids), "exact": labels.exact}
        if labels is not None:
            sets.append(labels)
        elif update.metadata.task != "classification":
            warnings.append("constraint labels: the labels are not tokens, or the output-bias gradient is missing")
    vocabulary = _combine(sets, vocab)
    required = sorted({t for s in sets for t in (s.ids if s.exact or s.subset else s.sure) if bool(base[t])})
    if vocabulary is not None and any(s.exact for s in sets):
        required = [t for t in required if bool(vocabulary[t])]
    per_position, start = None, None
    if mode in ("positions", "all") and layout.fixed_ids.shape[0] > 1:
        paired = paired_position_tokens(update, model, layout, rows, vocab)
        details["position_top_k"] = None if paired is None else f"pairing share >= {PAIR_FLOOR}"
        if paired is None:
            warnings.append(
                "constraint positions: no token-position pairing (embedding gradients missing, or a tied masked-LM "
                "decoder adds to the word gradient)"
            )
        else:
            per_position = paired
    elif mode in ("positions", "all"):
        position_ids = position_row_tokens(update, layout, rows, position_top_k)
        details["position_top_k"] = None if position_ids is None else position_top_k
        if position_ids is None:
            warnings.append("constraint positions: the update lacks word- or position-embedding gradients")
        else:
            per_position = _mask(position_ids, vocab)
            start = position_ids[None, :, 0]
    if mode in ("span", "all"):
        span = first_layer_span(update, model)
        details["span_top_k"] = None if span is None else top_k
        if span is None:
            warnings.append("constraint span: the update has no first-layer query/key/value gradients")
        elif layout.fixed_ids.shape[0] > 1 and per_position is not None and noisy_span(span, layout):
            # at B > 1 a noisy span's top tokens miss half the batch's (MiniLM CoLA B=4, noise 1e-4: 16-18 of 41-51
            # true tokens in their position's top 8, against 32-40 in the pairing's sets), and intersecting them
            # with the pairing's sets drops the rest: the pairing's sets stand alone
            details["span_top_k"], details["span_unused"] = None, "noisy span at B > 1: the pairing's sets kept"
        else:
            span_mask = _mask(span_position_tokens(span, model, layout, top_k), vocab)
            both = None if per_position is None else per_position & span_mask
            # where the span sets (noisy) and the position sets disagree entirely, keep the position sets
            per_position = span_mask if both is None else torch.where(both.any(-1, keepdim=True), both, per_position)
            if start is not None:  # the positions channel's best guess stays: noise blurs the span sets first
                per_position[torch.arange(per_position.shape[0]), start[0]] = True
    if vocabulary is None and per_position is None:
        return Candidates(None, details, required=required, warnings=warnings)
    sources = ("embedding_rows", "labels", "position_top_k", "span_top_k")
    details["sources"] = [s for s in sources if details.get(s) is not None]
    allowed = base.expand(*layout.free.shape, vocab).clone()
    if vocabulary is not None:
        allowed &= vocabulary
    if per_position is not None:
        narrowed = allowed & per_position[None]
        keep = narrowed.any(-1, keepdim=True)  # a noisy span set may miss the vocabulary: keep the wider one
        allowed = torch.where(keep, narrowed, allowed if vocabulary is not None else base.expand_as(allowed))
    empty = ~allowed.any(-1, keepdim=True)
    allowed = torch.where(empty, base.expand_as(allowed), allowed)
    sizes = allowed[layout.free].sum(-1).to(torch.float64)
    details.update(
        vocabulary_size=None if vocabulary is None else int((vocabulary & base).sum()),
        per_position_mean=float(sizes.mean()),
        per_position_max=int(sizes.max()),
        required_tokens=len(required),
    )
    if start is not None:  # a guess the other sets exclude gives way to their first allowed token
        guess = allowed.gather(-1, start[..., None])[..., 0]
        start = torch.where(guess, start, allowed.to(torch.uint8).argmax(-1))
    return Candidates(allowed, details, required=required, warnings=warnings, start=start)


def _mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(L, V) boolean mask from (L, k) token ids."""
    return torch.zeros(ids.shape[0], vocab, dtype=torch.bool).scatter_(1, ids, True)


def _combine(sets: list[TokenSet], vocab: int) -> torch.Tensor | None:
    """One vocabulary mask: exact sets intersected; else approximate supersets united with the known subsets.

    Subsets alone (mlm labels without another source) narrow nothing: None.
    """
    if not any(not s.subset for s in sets):
        return None
    exact = [s for s in sets if s.exact]
    mask = torch.zeros(vocab, dtype=torch.bool)
    if exact:
        mask[:] = True
        for s in exact:
            part = torch.zeros(vocab, dtype=torch.bool)
            part[torch.tensor(s.ids, dtype=torch.long)] = True
            mask &= part
        return mask
    for s in sets:
        mask[torch.tensor(s.ids, dtype=torch.long)] = True
    return mask
