"""The exact span-check attack (DAGER-style) on the first two encoder layers.

1. The first layer's query/key/value weight gradients span the batch's first-layer inputs; every
   (token, position, type) candidate is scored by its relative residual against that span (span_scoring).
2. [SEP] candidates give the sentence lengths; padding contributes nothing to the gradient.
3. For B > 1 the per-position candidates are assembled into sentences with the second layer's span
   (span_assembly); for B = 1 the same check confirms the single answer. Before that, sentences are grown around
   tokens that occur once in the batch, first as whole sentences solved from the first attention layer's context
   span (span_context), then guided by the first attention layer's per-token gradients (span_attention).
4. For mlm updates the masked-out labels are placed at the masked positions (mlm_labels).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch

from textleak.attacks.base import Progress, Reconstruction, check_requirements
from textleak.attacks.mlm_labels import recover_originals
from textleak.attacks.span_assembly import (
    FirstLayer,
    Found,
    SentenceSearch,
    assemble,
    assemble_by_anchors,
)
from textleak.attacks.span_attention import AttentionTest, attention_test
from textleak.attacks.span_context import assemble_by_context, context_solver
from textleak.attacks.span_pairing import Pairing, pair_tokens
from textleak.attacks.span_peeling import lowers_rank, peel, peel_refusal
from textleak.attacks.span_scoring import (
    EmbeddingParts,
    SpanBasis,
    candidate_residuals,
    embedding_parts,
    encoder_layers,
    first_layer_inputs,
    qkv_gradient_names,
    span_basis,
    stacked_gradient,
)
from textleak.models import LoadedModel
from textleak.update import Update

#: A position whose best candidate has a relative residual above this holds no token that reached the gradient.
DEAD = 1e-2
#: A pairing share above this marks a token that occurs once in the batch, at that position.
UNIQUE_SHARE = 0.9
#: Sentence lengths tried around anchors: of the [SEP] positions holding at least this pairing share of [SEP]'s
#: gradient, the batch size largest ([SEP] passes the layer-1 check at every position, so those positions alone
#: would try every length).
ANCHOR_SEP_SHARE = 0.01
#: Share of ``time_limit`` the anchor growth may spend, times the share of those lengths a head can read: seeds in
#: sentences too long for a head try every shorter length in vain, and on long-sentence data (RT) that time is the
#: second-layer search's.
ANCHOR_SHARE = 0.5
#: Share of ``time_limit`` for the quick second-layer pass before the anchors (one descent per sentence, no restarts)
QUICK_SHARE = 0.2
#: Share of ``time_limit`` for the context proposals, before the quick pass (span_context)
CONTEXT_SHARE = 0.4
#: Under additive noise a true sentence's worst second-layer row lies within this multiple of the span's noise level
#: (its typical row's residual: worst rows 2.1-2.8x that on MiniLM CoLA B=4 batch 0 under noise 1e-6, 2.7-3.9x under
#: 3e-6), while one wrong token lifts the worst row to about 0.17 whatever the noise.
NOISE_ACCEPT = 4.0
#: The timing of a whole reconstruction (the others are its phases, summed over peeled rounds)
TOTAL = "total_s"
#: Seconds the rest of a peeled batch needs at least. With less left of the time limit, a last sentence still gets
#: them (it is read alone in about a second: span_peeling), while a rest of several sentences is not attacked.
PEEL_MIN_S = 2.0
#: New sentences after which the context phase of a peelable batch ends (and the rest is peeled) when the first
#: layer's span fills less than half the hidden size; one otherwise, and always for an mlm pairing, whose first
#: solves are loose. With the larger complement a first solve is well determined before peeling, and each peeled
#: round costs set-up (random BERT-base: about 5.6 s of peel, spans, pairing and solver against 1-5 s of solving;
#: RT B=8 batches 5, 7, 8, 13, 17: 42 of 64 sentences at the time limit when peeling after each sentence, 38 of 40
#: in 36.9-66.9 s after every two). On MiniLM SST-2 and RT B=8 (spans of 230-300 of 384) peeling after each
#: sentence is faster: every two took batches 1 and 15 from 56 and 46 s to 67 and 68 s.
ROUND_SENTENCES = 2
#: ... and only where the span's complement gives each anchor at least this many equations. MiniLM (384) never has
#: them: its first solves at 150-200 equations need the peel (RT B=8 batch 15, first span 188 of 384: exact in 50 s
#: at 9836e82 peeling after each sentence, 0.5 in 63 s at 10a8ef4 taking two a round).
ROUND_EQUATIONS = 384
#: With more than one sentence a round, the context phase ends this many seconds after its first new sentence
#: (about a peeled round's set-up on random BERT-base): a second sentence that takes longer is found faster after
#: the peel. MiniLM SST-2 B=8 batch 1, whose later rounds' spans fill under half of 384: 8 of 8 in 67.5 s without
#: it, 54.1 s with it.
ROUND_LINGER = 5.0

#: The loosest second-layer acceptance: beyond it a true sentence cannot be told from a near miss.
ACCEPT_MAX = 0.1

#: An mlm pairing's slack (``Pairing.slack``) is left out of the context phase's lists when they would give a first
#: solve at the longest end at least this many free unknowns per equation. MiniLM mlm, single batches: SST-2 B=4
#: batch 2 (1.1 per equation) and RT B=4 batch 19 (1.7) are exact in 39 s and 34 s with the slack kept, 2 of 4 at the
#: 60 s limit without it (a twice-seen token loses the lesser of its places); RT B=8 batch 3 (2.7) was exact only
#: without it.
CROWDED = 1.8


@dataclass(frozen=True, kw_only=True)
class SpanConfig:
    """Options of the span attack; None means an automatic choice from the update itself.

    threshold: layer-1 relative residual below which a candidate passes (auto: the widest gap in the pooled
    residuals above the worst position's best candidate). rank_tol: singular values kept, relative to the
    largest (auto: the last 10x drop). accept: layer-2 residual below which a sentence is accepted (auto: 100x
    a true token's typical layer-1 residual, within [1e-5, 1e-2]). max_candidates: candidates per position the
    second-layer search's wide pass tries, after a narrow pass over as many as sentences reach the position (near
    misses and the anchor growth use every passing one; at least the first layer's rank + 1 are kept, the most
    distinct tokens a batch can hold);
    restarts: random restarts of the per-sentence search (seeded). pairing: for B > 1, order and narrow each
    position's candidates by the embedding gradients' token-position pairing (span_pairing), keeping tokens whose
    share there is at least ``pair_floor``. attention: for B > 1, first grow a sentence around each token that
    occurs once (needs pairing) with the first attention layer's per-token gradients (span_attention). quick: before
    that growth, one quick pass of the second-layer search (one descent per length, no restarts), which takes the
    easy sentences in seconds; every sentence either finds must also agree with the anchors it holds. time_limit:
    seconds for the sentence search, after which the best answer so far is returned with a warning (None: no limit).
    context: before the quick pass, propose whole sentences around tokens that occur once from the first attention
    layer's output-projection gradient (span_context; needs pairing and attention), finished by the second-layer
    search. peel: once some sentences of a classification or mlm batch are accepted, subtract their gradients and
    attack the rest of the batch as a smaller one (span_peeling), within what is left of ``time_limit``.
    """

    threshold: float | None = None
    rank_tol: float | None = None
    accept: float | None = None
    max_candidates: int = 16
    max_sweeps: int = 6
    restarts: int = 8
    seed: int = 0
    chunk: int = 4096
    pairing: bool = True
    pair_floor: float = 0.01
    attention: bool = True
    quick: bool = True
    time_limit: float | None = None
    context: bool = True
    peel: bool = True

    def __post_init__(self) -> None:
        for name in ("threshold", "rank_tol", "accept"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1) or None, got {value!r}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError(f"time_limit must be positive seconds or None, got {self.time_limit!r}")
        if not 0 <= self.pair_floor < 1:
            raise ValueError(f"pair_floor must be in [0, 1), got {self.pair_floor!r}")
        if self.restarts < 0:
            raise ValueError(f"restarts must be >= 0, got {self.restarts!r}")
        for name in ("max_candidates", "max_sweeps", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


def sentences_per_round(rank: int, hidden: int) -> int:
    """New sentences after which a peelable batch's context phase ends: ``ROUND_SENTENCES`` when the first layer's
    span (``rank``) fills less than half of the ``hidden`` size and leaves at least ``ROUND_EQUATIONS``, else one."""
    return ROUND_SENTENCES if 2 * rank < hidden and hidden - rank >= ROUND_EQUATIONS else 1


def auto_threshold(best: torch.Tensor, noise: float = 0.0) -> float:
    """Cut at the widest gap (log scale) of the pooled residuals that lie above every live position's best one.

    ``best`` is (positions, keep), ascending per row. A position is live when its best candidate is below
    ``DEAD``: it holds a token that reached the gradient (mlm sentences with nothing masked leave no trace).
    The cut never goes below the worst live position's best candidate, nor, under additive noise, below
    ``NOISE_ACCEPT`` times the first layer's ``SpanBasis.noise`` (where true tokens' residuals spread).
    """
    return max(_widest_gap(best), NOISE_ACCEPT * noise)


def _widest_gap(best: torch.Tensor) -> float:
    """``auto_threshold`` without noise."""
    live = best[best[:, 0] < DEAD]
    if len(live) == 0:
        return float(best[:, 0].min()) / 2
    floor = float(live[:, 0].max())
    pooled = torch.log10(live.flatten().clamp_min(1e-300)).sort().values
    pooled = pooled[pooled >= math.log10(max(floor, 1e-300))]
    if len(pooled) < 2:
        return min(DEAD, floor * 10)
    gaps = pooled[1:] - pooled[:-1]
    k = int(gaps.argmax())
    return float(10 ** ((pooled[k] + pooled[k + 1]) / 2))


def auto_accept(best: torch.Tensor, noise: float = 0.0) -> float:
    """Second-layer acceptance: 100x the typical first-layer residual of a true token, within [1e-5, 1e-2]; under
    additive noise at least ``NOISE_ACCEPT`` times the second layer's ``SpanBasis.noise``, up to ``ACCEPT_MAX``."""
    live = best[best[:, 0] < DEAD, 0]
    typical = float(live.median()) if len(live) else DEAD
    clean = min(1e-2, max(1e-5, 100 * typical))
    return min(ACCEPT_MAX, max(clean, NOISE_ACCEPT * noise))


class SpanAttack:
    """Exact recovery from the first layers' weight gradients (span check, lengths, layer-2 assembly)."""

    name: ClassVar[str] = "span"
    requires: ClassVar[tuple[str, ...]] = ("first_layer_grads",)

    def __init__(self, **options: Any) -> None:
        self.config = SpanConfig(**options)

    def reconstruct(self, update: Update, target: LoadedModel, *, progress: Progress | None = None) -> Reconstruction:
        check_requirements(self.name, update, self.requires)
        start = time.perf_counter()
        result = self._reconstruct(update, target, progress)
        result.timings[TOTAL] = time.perf_counter() - start
        return result

    def _reconstruct(
        self,
        update: Update,
        target: LoadedModel,
        progress: Progress | None,
        deadline: float | None = None,
        vocabulary: torch.Tensor | None = None,
        solved: dict[tuple[int, int], dict[int, float]] | None = None,
    ) -> Reconstruction:
        """The attack; ``deadline`` (``time.perf_counter()`` seconds): when the sentence search must end, for the rest
        of a peeled batch (by default ``time_limit`` after the search starts); ``vocabulary``: the only tokens its
        first layer scores (for the rest of a peeled batch: the candidates kept for the whole batch); ``solved``: the
        context phase's first-solve residuals per anchor and length from the earlier rounds
        (``assemble_by_context``)."""
        cfg, tok, model = self.config, target.tokenizer, target.model
        meta = update.metadata
        warnings: list[str] = []
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        solved = {} if solved is None else solved

        span1 = span_basis(stacked_gradient(update, qkv_gradient_names(model, 0)), cfg.rank_tol)
        warnings += _rank_warnings(span1, "first")
        types = _token_types(update)
        parts = embedding_parts(model)
        exclude = _reserved(tok, parts.word.shape[0], random_inputs=meta.task == "mlm")
        res, ids = candidate_residuals(
            parts, span1, meta.seq_len, types, keep=_keep(cfg, span1), chunk=cfg.chunk, exclude=exclude,
            vocabulary=vocabulary,
        )
        kept = torch.unique(ids)
        res, ids = res[:, 0], ids[:, 0]  # single-segment inputs: the first present token type
        threshold = cfg.threshold if cfg.threshold is not None else auto_threshold(res, span1.noise)
        timings["layer1"] = time.perf_counter() - clock
        if progress:
            progress(1, 3)

        passing = [[int(t) for t, r in zip(ids[p], res[p], strict=True) if r <= threshold] for p in range(len(ids))]
        if not any(passing[1:]):
            warnings.append(f"no candidate passes the layer-1 threshold {threshold:.2e}; best candidates used")
        pairing, test = None, None
        paired_count = [0] * len(passing)
        tight_count = paired_count
        if meta.batch_size > 1 and (cfg.pairing or cfg.attention):
            clock = time.perf_counter()
            bag = sorted({t for tokens in passing for t in tokens})
            test = attention_test(model, update, parts, bag, meta.seq_len, types)
            if cfg.pairing:
                pairing = pair_tokens(
                    update, bag, meta.seq_len, offset=parts.position_offset, mask=tok.mask_token_id, parts=parts,
                    token_type=types[0], decoder_bias=_decoder_bias(model),
                )
            timings["pairing"] = time.perf_counter() - clock
            if pairing is not None:
                passing, paired_count, tight_count = _paired(
                    passing, pairing, parts, span1, types[0], cfg.pair_floor, threshold
                )
        sep, cls, pad = tok.sep_token_id, tok.cls_token_id, tok.pad_token_id
        lengths = _lengths(passing, res, ids, sep)
        if not any(sep in passing[p] for p in range(len(passing))):
            warnings.append("no [SEP] candidate passes; assumed every sequence spans the padded length")

        single = set() if pairing is None else pairing.single_occurrences(UNIQUE_SHARE)

        def options_for(length: int, accepted: list[Found]) -> list[list[int]]:
            """Allowed tokens per position; a token that occurs once in the batch and is already used there by
            an accepted sentence goes last (it cannot be in another sentence, unless the share misled)."""
            middle = []
            for p in range(1, length - 1):
                allowed = [t for t in passing[p] if t not in (sep, cls, pad)]
                taken = {f.ids[p] for f in accepted if p < len(f.ids) and (f.ids[p], p) in single}
                allowed = [t for t in allowed if t not in taken] + [t for t in allowed if t in taken]
                middle.append(allowed or [int(t) for t in ids[p] if int(t) not in (sep, cls, pad)][:1])
            return [[cls], *middle, [sep]]

        if span1.full:
            return self._partial(update, target, ids, warnings, timings)
        clock = time.perf_counter()
        span2 = span_basis(stacked_gradient(update, qkv_gradient_names(model, 1)), cfg.rank_tol)
        if span1.edge and not span2.edge and not span2.noise and vocabulary is None:
            # a clean update's second-layer rank is its number of tokens (one contextual row each): without an edge
            # there, the rows fill the hidden size (MiniLM SST-2 B=16: 386-409 tokens of 384, a 120 s search for
            # nothing), and no sentence can be confirmed. Not where that layer shows additive noise's bulk (a noised
            # update's edge may drown there), and on the whole batch only: a peeled rest holds fewer tokens.
            warnings.append(
                f"the second layer's gradient shows no rank edge while the first layer's does: the batch holds at "
                f"least as many tokens as the hidden size ({span2.basis.shape[0]}), so no sentence can be confirmed "
                f"and the result is not exact"
            )
            return self._partial(update, target, ids, warnings, timings)
        warnings += _rank_warnings(span2, "second")
        if span2.rank < max(lengths):
            warnings.append(
                f"the second layer's span (rank {span2.rank}) is smaller than a sentence ({max(lengths)} tokens): "
                f"it is probably the model's last layer, whose gradient follows only the [CLS] path; "
                f"sentences cannot be confirmed"
            )
        accept = cfg.accept if cfg.accept is not None else auto_accept(res, span2.noise)
        if NOISE_ACCEPT * span2.noise > ACCEPT_MAX:
            warnings.append(
                f"the update's noise leaves a true sentence's second-layer rows about {span2.noise:.2f} off their span "
                f"(a wrong token's about 0.17): acceptance is capped at {ACCEPT_MAX}, so true sentences may go "
                f"unconfirmed and the answer is partly a best guess"
            )
        search = SentenceSearch(
            FirstLayer(model),
            span2,
            accept=accept,
            max_sweeps=cfg.max_sweeps,
            restarts=cfg.restarts,
            seed=cfg.seed,
            time_limit=cfg.time_limit if deadline is None else deadline - time.perf_counter(),
        )

        ends = lengths
        if pairing is not None and pairing.pooled is None:  # the B [SEP] ends with the largest pairing shares
            shares = {p + 1: w for p in range(len(passing)) for t, w in pairing.ranked(p, ANCHOR_SEP_SHARE) if t == sep}
            top = sorted(shares, key=shares.__getitem__, reverse=True)[: meta.batch_size]
            ends = [n for n in lengths if n in top] or lengths
        elif pairing is not None:  # an mlm pairing cannot place [SEP] where a [MASK] sits: layer 1's B best ends
            ends = lengths[: meta.batch_size]

        def widths(length: int, accepted: list[Found]) -> list[int]:
            """How many of each position's candidates the search tries first: the sentences that hold a word there
            (ends beyond it, plus any sentences no end accounts for), less accepted ones whose once-seen token
            there ``options_for`` has moved last."""
            unaccounted = max(0, meta.batch_size - len(ends))
            out = []
            for p in range(length):
                reach = sum(n > p + 1 for n in ends) + unaccounted
                held = sum(p < len(f.ids) and (f.ids[p], p) in single for f in accepted)
                out.append(max(1, min(meta.batch_size, reach - held)))
            return out

        peelable = cfg.peel and peel_refusal(update) is None
        contextual: list[Found] = []
        quick: list[Found] = []
        anchored: list[Found] = []

        def phases() -> dict[tuple[int, ...], str]:
            """The phase that found each sentence so far (the final search's are not counted by phase)."""
            named = [("anchored", anchored), ("quick", quick), ("context", contextual)]
            return {f.ids: phase for phase, found in named for f in found}

        def peeled(found: list[Found]) -> Reconstruction | None:
            return self._peeled(update, target, found, search, warnings, timings, phases, kept, solved)
        confirm: Callable[[Found], bool] | None = None
        if cfg.attention and test is not None and pairing is not None:
            anchor_set = {(t, p) for t, p in single if t not in (sep, cls, pad)}
            anchors = sorted(anchor_set, key=lambda pair: (pair[1], pair[0]))
            rank_test = partial(lowers_rank, update, target) if peelable else None
            confirm = partial(_agrees, test, anchor_set, search.attention_accept, rank_test)
            if cfg.context:
                clock_phase = time.perf_counter()
                # tokens seen more than once may sit anywhere: the pairing spreads their share over the positions;
                # an mlm pairing already offers each [MASK] position every token it did not place whole
                once = {t for t, _ in single} | {sep, cls, pad}
                anywhere = [] if pairing.pooled is not None else sorted({t for ts in passing for t in ts} - once)
                def narrow(counts: list[int]) -> list[list[int]]:
                    return [[cls]] + [
                        [t for t in tokens[: counts[p]] if t not in (cls, pad)] + [sep]
                        for p, tokens in enumerate(passing) if p > 0
                    ]

                solver = context_solver(model, update, parts, narrow(paired_count), types[0], anywhere)
                if solver is not None and tight_count != paired_count and solver.crowding(max(ends)) >= CROWDED:
                    # the pairing's slack is left out, of the first solves and of the search's lists alike
                    paired_count = tight_count
                    solver = solver.restricted(narrow(paired_count))
                if solver is not None:
                    # an mlm pairing's first solves are loose (``defer`` below): peeled after each sentence
                    hidden = parts.word.shape[1]
                    per_round = 1 if pairing.pooled is not None else sentences_per_round(span1.rank, hidden)
                    budget = None if cfg.time_limit is None else cfg.time_limit * CONTEXT_SHARE
                    contextual = assemble_by_context(
                        search, solver, anchors, ends, partial(_narrowed, options_for, paired_count),
                        meta.batch_size, first=cls, last=sep, spare=lengths, budget=budget, confirm=confirm,
                        reserve_for=options_for,
                        stop_after=per_round if peelable else None,
                        # an mlm pairing's first solves are 2-22 tokens off even at residuals of 0.01 (MiniLM
                        # SST-2 B=4 batches 9, 12): no ranking of anchors; each is finished in turn
                        defer=pairing.pooled is None,
                        solved=solved,
                        linger=ROUND_LINGER if per_round > 1 else None,
                    )
                timings["context"] = time.perf_counter() - clock_phase
                if (rest := peeled(contextual)) is not None:
                    return rest
            clock_phase = time.perf_counter()
            budget = None if cfg.time_limit is None else cfg.time_limit * QUICK_SHARE
            quick = contextual
            if cfg.quick:
                quick, _ = assemble(
                    search, ends, options_for, meta.batch_size, accepted=contextual, quick=True, budget=budget,
                    confirm=confirm, widths=widths, wide=cfg.max_candidates,
                )
            timings["quick"] = time.perf_counter() - clock_phase
            if (rest := peeled(quick)) is not None:
                return rest
            clock_phase = time.perf_counter()
            readable = sum(test.usable(n) for n in ends) / len(ends)
            budget = None if cfg.time_limit is None else cfg.time_limit * ANCHOR_SHARE * readable
            anchored = assemble_by_anchors(
                search, test, anchors, ends, options_for, meta.batch_size, budget,
                accepted=quick, confirm=confirm,
            )
            timings["anchors"] = time.perf_counter() - clock_phase
            if (rest := peeled(anchored)) is not None:
                return rest
        final = partial(assemble, search, lengths, options_for, meta.batch_size, confirm=confirm, widths=widths,
                        wide=cfg.max_candidates)
        accepted, rejected = final(accepted=anchored, stop_after=1 if peelable else None)
        if peelable and len(accepted) < meta.batch_size and not search.expired:
            if rest := peeled(accepted):
                return rest
            accepted, more = final(accepted=accepted)  # not peeled after all: the rest of the batch here
            rejected += more
        if not accepted and not rejected:  # the time limit struck before any search: layer-1 favourites
            rejected = [Found(tuple(options[0] for options in options_for(lengths[0], [])), math.inf)]
        if search.out_of_time and len(accepted) < meta.batch_size:
            warnings.append(f"the sentence search ran out of its {cfg.time_limit} s time limit")
        sentences = _complete(accepted, rejected, meta.batch_size, warnings)
        timings["assembly"] = time.perf_counter() - clock
        if progress:
            progress(2, 3)

        token_ids = [list(f.ids) for f in sentences]
        details: dict[str, Any] = {
            "rank_layer1": span1.rank,
            "rank_gap_layer1": span1.gap,
            "rank_layer2": span2.rank,
            "threshold": threshold,
            "accept": accept,
            "lengths": [len(f.ids) for f in sentences],
            "candidate_lengths": lengths,
            "estimated_sequences": len(accepted),
            "context_sentences": len(contextual),
            "quick_sentences": len(quick) - len(contextual),
            "anchored_sentences": len(anchored) - len(quick),
            "sentence_scores": [f.score for f in sentences],
            "candidates": _candidate_table(ids, res, threshold),
        }
        if meta.task == "mlm":
            clock = time.perf_counter()
            distinct = [list(ids) for ids in dict.fromkeys(tuple(ids) for ids in token_ids)]  # repeats once
            originals, label_details, label_warnings = recover_originals(update, target, distinct)
            warnings += label_warnings
            details.update(label_details, input_ids=token_ids, input_texts=_decode(tok, token_ids))
            original_of = {tuple(i): o for i, o in zip(distinct, originals, strict=True)}
            token_ids = [list(original_of[tuple(ids)]) for ids in token_ids]
            timings["mlm_labels"] = time.perf_counter() - clock
        if progress:
            progress(3, 3)
        return Reconstruction(
            attack=self.name,
            token_ids=token_ids,
            texts=_decode(tok, token_ids),
            timings=timings,
            config=dataclasses.asdict(cfg),
            warnings=warnings,
            details=details,
        )

    def _peeled(
        self,
        update: Update,
        target: LoadedModel,
        found: list[Found],
        search: SentenceSearch,
        warnings: list[str],
        timings: dict[str, float],
        phases: Callable[[], dict[tuple[int, ...], str]],
        vocabulary: torch.Tensor,
        solved: dict[tuple[int, int], dict[int, float]],
    ) -> Reconstruction | None:
        """``found`` plus the span attack on the update less their gradients (span_peeling), in what is left of the
        search's time (``PEEL_MIN_S`` for a last sentence); None when peeling is off, nothing or everything is found,
        the update cannot be peeled, or too little time is left. ``phases`` names the phase that found each sentence
        so far: a peeled sentence counts in its phase's total in the details. ``vocabulary``: the candidates kept for
        the whole batch, the only tokens the rest can hold, so its first layer scores them alone (random BERT-base:
        0.8 s of a peeled round's 6 s of set-up, where one round finds one sentence in 1-5 s). ``solved``: the context
        phase's record of first solves, carried into the rest."""
        cfg = self.config
        if not cfg.peel or not 0 < len(found) < update.metadata.batch_size:
            return None
        clock = time.perf_counter()
        peeled = peel(update, target, [f.ids for f in found], keep=_read(target.model))
        timings["peel"] = timings.get("peel", 0.0) + time.perf_counter() - clock
        if peeled is None:
            return None
        deadline = None
        if cfg.time_limit is not None:
            deadline = max(search.deadline, time.perf_counter() + PEEL_MIN_S)
            if deadline > search.deadline and peeled.update.metadata.batch_size > 1:
                return None
        rest = self._reconstruct(peeled.update, target, None, deadline, vocabulary, solved)
        scores = {f.ids: f.score for f in found}
        token_ids = [list(ids) for ids in peeled.originals] + rest.token_ids
        details = {
            **rest.details,
            **({"input_ids": [list(ids) for ids in peeled.ids] + rest.details.get("input_ids", rest.token_ids)}
               if update.metadata.task == "mlm" else {}),
            "peeled_sentences": len(peeled.ids) + rest.details.get("peeled_sentences", 0),
            "peeled_labels": [*peeled.labels, *rest.details.get("peeled_labels", [])],
            "lengths": [len(ids) for ids in token_ids],
            "estimated_sequences": len(peeled.ids) + (rest.details.get("estimated_sequences") or 0),
            "sentence_scores": [scores[ids] for ids in peeled.ids] + rest.details.get("sentence_scores", []),
        }
        found_in = phases()
        for ids in peeled.ids:
            if ids in found_in:
                key = f"{found_in[ids]}_sentences"
                details[key] = details.get(key, 0) + 1
        return Reconstruction(
            attack=self.name,
            token_ids=token_ids,
            texts=_decode(target.tokenizer, token_ids),
            timings={k: timings.get(k, 0.0) + rest.timings.get(k, 0.0) for k in {*timings, *rest.timings} - {TOTAL}},
            config=dataclasses.asdict(cfg),
            warnings=warnings + rest.warnings,
            details=details,
        )

    def _partial(
        self, update: Update, target: LoadedModel, ids: torch.Tensor, warnings: list[str], timings: dict[str, float]
    ) -> Reconstruction:
        """No usable span: one padded-length guess per sequence from the best candidate at each position."""
        tok = target.tokenizer
        plain = [[int(t) for t in row if int(t) not in tok.all_special_ids] for row in ids[1:-1]]
        middle = [row[0] if row else tok.unk_token_id for row in plain]
        guess = [tok.cls_token_id, *middle, tok.sep_token_id]
        token_ids = [list(guess) for _ in range(update.metadata.batch_size)]
        warnings.append("returned the best candidate per position as a partial answer; it is not a reconstruction")
        return Reconstruction(
            attack=self.name,
            token_ids=token_ids,
            texts=_decode(tok, token_ids),
            timings=timings,
            config=dataclasses.asdict(self.config),
            warnings=warnings,
            details={"partial": True, "lengths": [len(guess)] * len(token_ids), "estimated_sequences": None},
        )


def _paired(
    passing: list[list[int]],
    pairing: Pairing,
    parts: EmbeddingParts,
    span: SpanBasis,
    token_type: int,
    floor: float,
    threshold: float,
) -> tuple[list[list[int]], list[int], list[int]]:
    """Per position, the bag's tokens whose pairing share there is at least ``floor`` and which pass the layer-1
    check there, largest share first, then those of its slack shares (``Pairing.slack``), then the position's other
    layer-1 candidates (a poor fit, as on randomly initialised models whose word gradients are nearly collinear, then
    costs search time, never a lost token); per position how many lead the list from the pairing, and how many of
    those from its shares alone."""
    out, counts, tight = [], [], []
    for p, fallback in enumerate(passing):
        ranked = [t for t, _ in pairing.ranked(p, floor)]
        spare = [t for t, _ in pairing.ranked(p, floor, slack=True)]
        if ranked or spare:
            both = ranked + spare
            n = len(both)
            rows = first_layer_inputs(
                parts, torch.tensor(both), torch.full((n,), p), torch.full((n,), token_type, dtype=torch.long)
            )
            passed = {t for t, r in zip(both, span.residual(rows).tolist(), strict=True) if r <= threshold}
            ranked = [t for t in ranked if t in passed]
            spare = [t for t in spare if t in passed]
        out.append(ranked + spare + [t for t in fallback if t not in ranked and t not in spare])
        counts.append(len(ranked) + len(spare))
        tight.append(len(ranked))
    return out, counts, tight


def _decoder_bias(model: torch.nn.Module) -> torch.Tensor | None:
    """The output layer's bias (a masked-LM decoder's), or None when the model has none."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return None if output is None or getattr(output, "bias", None) is None else output.bias.detach()


def _narrowed(
    options_for: Callable[[int, list[Found]], list[list[int]]], counts: list[int], length: int, accepted: list[Found]
) -> list[list[int]]:
    """``options_for`` cut to each position's paired candidates (at least one): the context proposals are near a
    sentence already, and every extra candidate costs the second layer's descent a forward pass per sweep."""
    return [tokens[: max(1, counts[p])] for p, tokens in enumerate(options_for(length, accepted))]


def _keep(cfg: SpanConfig, span: SpanBasis) -> int:
    """Candidates kept per position: at least the span's rank, which bounds the number of distinct batch tokens.

    Every token of the batch passes at every position (word + position mixtures span each other), so a position
    can hold as many passing candidates as the batch has distinct tokens; keeping fewer drops true ones at random.
    """
    return max(cfg.max_candidates, span.rank + 1) if not span.full else cfg.max_candidates


def _reserved(tokenizer: Any, vocab_size: int, *, random_inputs: bool = False) -> torch.Tensor:
    """Mask over the model's ``vocab_size`` word rows of entries the tokenizer never emits (BERT's ``[unused17]``
    and the like, and rows past the tokenizer's vocabulary, which some models pad to a round size).

    ``random_inputs``: the client puts random tokens into its inputs (mlm's 10% random replacements draw uniformly
    from the tokenizer's whole vocabulary, ``[unused]`` entries included), so only the rows past it are reserved.
    """
    if vocab_size < len(tokenizer):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} word embeddings: "
            f"they do not belong together"
        )
    mask = torch.ones(vocab_size, dtype=torch.bool)
    if random_inputs:
        mask[: len(tokenizer)] = False
        return mask
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    mask[: len(tokens)] = torch.tensor([t is not None and t.startswith("[unused") for t in tokens])
    return mask


def _candidate_table(ids: torch.Tensor, res: torch.Tensor, threshold: float) -> list[list[list[float]]]:
    """Per position, [token id, layer-1 residual] of the passing candidates (the best one if none passes)."""
    table = []
    for row_ids, row_res in zip(ids.tolist(), res.tolist(), strict=True):
        limit = max(threshold, row_res[0])
        table.append([[t, r] for t, r in zip(row_ids, row_res, strict=True) if r <= limit])
    return table


def _decode(tokenizer: Any, token_ids: list[list[int]]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]


def _rank_warnings(span: SpanBasis, which: str) -> list[str]:
    d = span.basis.shape[0]
    if span.full:
        return [
            f"the {which} layer's gradient has full rank ({d}): the batch holds at least as many distinct tokens as "
            f"the hidden size, so every candidate lies in the span and the result is not exact"
        ]
    if span.gap < 10:
        return [f"the {which} layer's rank estimate ({span.rank}) is ambiguous: its spectral gap is {span.gap:.1f}x"]
    return []


def _agrees(
    test: AttentionTest,
    anchors: set[tuple[int, int]],
    accept: float,
    rank_test: Callable[[tuple[int, ...]], bool] | None,
    found: Found,
) -> bool:
    """Whether a sentence agrees with the once-seen tokens it holds (``AttentionTest.confirms`` at ``accept``), or,
    failing that, whether taking it out of the update lowers the first layer's rank (``rank_test``, for updates that
    can be peeled). A token seen twice at one position looks once-seen, and its gradient mixes both sentences; when
    every anchor a true sentence holds is such a token, the attention test fails it (MiniLM CoLA B=8 batch 11: two
    minimal pairs share "mike" and "qui" at positions 4 and 5, and the true 13-token sentence found at 4 s was
    rejected until the 60 s limit)."""
    if test.confirms(found.ids, anchors, accept):
        return True
    return rank_test is not None and rank_test(found.ids)


def _read(model: torch.nn.Module) -> set[str]:
    """The parameters whose gradients the attack reads: all but those of the encoder layers past the second (the
    embeddings, the first two layers, the heads)."""
    later = {id(p) for layer in encoder_layers(model)[2:] for p in layer.parameters()}
    return {name for name, p in model.named_parameters() if id(p) not in later}


def _token_types(update: Update) -> list[int]:
    """Token types present in the batch (rows of the type-embedding gradient that are non-zero); [0] if unknown."""
    for name, grad in update.gradients.items():
        if name.endswith("token_type_embeddings.weight"):
            present = grad.abs().sum(-1).nonzero().flatten().tolist()
            return present or [0]
    return [0]


def _lengths(passing: list[list[int]], res: torch.Tensor, ids: torch.Tensor, sep: int) -> list[int]:
    """Candidate sentence lengths: positions where [SEP] passes, most confident first; the padded length if none."""
    found = []
    for p, tokens in enumerate(passing):
        if sep in tokens and p >= 1:
            score = res[p][ids[p] == sep]
            found.append((float(score[0]) if len(score) else float(res[p][-1]), p + 1))
    return [length for _, length in sorted(found)] or [len(passing)]


def _complete(accepted: list[Found], rejected: list[Found], batch_size: int, warnings: list[str]) -> list[Found]:
    """Accepted sentences topped up to the batch size.

    First with the best rejected attempt of each sentence length no accepted sentence has (a search that failed
    there still places most tokens), then with repeats of accepted sentences (the span cannot tell duplicates
    apart). With nothing accepted, the best distinct rejected attempts (repeated only when too few).
    """
    if len(accepted) >= batch_size:
        return accepted[:batch_size]
    if not accepted:
        warnings.append("no sentence passed the second-layer check; returning the best partial answers")
        pool: dict[tuple[int, ...], Found] = {}
        for attempt in sorted(rejected, key=lambda f: f.score):  # distinct attempts first, best first
            pool.setdefault(attempt.ids, attempt)
        distinct = list(pool.values())
        return [distinct[i % len(distinct)] for i in range(batch_size)]
    covered = {len(f.ids) for f in accepted}
    best_per_length: dict[int, Found] = {}
    for attempt in sorted(rejected, key=lambda f: f.score):
        if len(attempt.ids) not in covered:
            best_per_length.setdefault(len(attempt.ids), attempt)
    partial = sorted(best_per_length.values(), key=lambda f: f.score)[: batch_size - len(accepted)]
    if partial:
        warnings.append(
            f"{len(partial)} sentence(s) did not pass the second-layer check: their best partial answers are returned"
        )
    sentences = accepted + partial
    if len(sentences) < batch_size:
        warnings.append(
            f"found {len(accepted)} distinct sentences for a batch of {batch_size}: the rest are taken to be repeats "
            f"(the span cannot tell duplicates apart), or left no trace in the gradient (mlm: nothing masked in them)"
        )
        sentences += [accepted[i % len(accepted)] for i in range(batch_size - len(sentences))]
    return sentences
