"""Propose whole sentences around an anchor token from the first attention layer's output-projection gradient.

The attention output projection of the first layer is a linear layer whose inputs are the per-token attention
contexts, so its weight gradient ``sum_a dy_a ctx_a^T`` has a row space spanned by the context vectors of every real
token in the batch (padding contributes nothing). Per head h, ``ctx_a,h = sum_b softmax_b(q_a,h . k_b,h / sqrt(d_h))
v_b,h`` over a's own sentence, where q, k and v depend only on each token and its position. A true sentence's context
rows lie in that span to about 1e-6; one wrong token lifts them to 1e-2 or more (MiniLM, SST-2 batches of 4).

For an anchor a (a token known to sit at a position: one that occurs once in the batch), write its sentence as a 0/1
membership vector m over the candidate (token, position) occurrences, one per position. With the per-head softmax
normalisers c_h = 1 / sum_b m_b exp(s_ab) held fixed, ``P_perp ctx_a = sum_h c_h sum_b m_b exp(s_ab) P_perp v_b`` is
linear in m, so alternating between the normalisers and a least-squares solve for m over each position's simplex
(non-negative weights summing to one) finds the sentence as a whole, where a token-by-token descent on this test
stalls (a wrong token disturbs every row a little, not its own row the most, as the second layer's residual
connection makes it). Non-negativity matters: the true membership is the sparse vertex, and an equality-constrained
solve without it has many exact solutions once positions hold more candidates than one anchor gives equations.
The positions the solve is surest of then join the anchor, each adding as many equations, and the solve repeats. The
rounded answer is a start for the second layer's search (span_assembly), which confirms it or repairs a few tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from textleak.attacks.span_assembly import Found, SentenceSearch
from textleak.attacks.span_scoring import EmbeddingParts, encoder_layers, first_attention, first_layer_inputs
from textleak.update import Update

#: Module names of the first attention block's output projection across the BERT family.
OUTPUT = ("attention.output.dense", "attention.out_lin", "attention.o_proj", "attention.out_proj")
#: The context span's spectral gap below which it is too blurred (noise, pruning) to solve against.
MIN_GAP = 10.0
#: Singular values of that gradient below this fraction of the largest are the float32 floor's tail, whose own falls
#: are not the span's edge: in a peeled rest (random BERT-base SST-2 B=8 batch 10, four sentences peeled) the last
#: value fell from 1.3e-11 to 3.8e-14, wider than the true edge's 4.8e-5 to 1.5e-7, and the solver was dropped.
FLOOR_TAIL = 1e-9
#: Alternating steps (normalisers, then membership) of the first solve (anchor alone) and of a solve with more
#: anchors.
FIRST_STEPS, MORE_STEPS = 20, 10
#: Accelerated projected-gradient steps per membership solve (``solve_on_simplices``), its stopping tolerance on the
#: largest weight change, and the power iterations that estimate its step size.
INNER_STEPS, INNER_TOL, POWER_STEPS = 300, 1e-4, 15
#: Rounding to each position's favourite is kept when it fits as well as the weights, up to this (relative) slack.
ROUNDING_SLACK = 1e-9
#: Positions the first solve is surest of that join the anchor (each adds the span's complement as equations).
EXTRA_ANCHORS = 4
#: A position whose favourite weighs less than this after the first solve also tries the tokens allowed anywhere.
SURE = 0.9
#: A first solve has at most this many times as many free unknowns (candidates less positions) as equations (the
#: span's complement): beyond it, each position keeps only its best-ranked candidates, as many as fit, and pricing
#: may add the others back. With non-negative weights a solve up to about 2.7x still lands near the sentence (MiniLM
#: RT B=8 batch 0, first anchors: 0-2 wrong tokens of 10-29 at 0.65-2.0x, 6-16 of 37-52 at 2.4-2.7x, where the plain
#: least squares of earlier versions had 5-37 wrong from 1.6x on). Refusing such solves instead, as earlier versions
#: did, left a masked-LM batch's long sentences unsolved until shorter ones were peeled (MiniLM mlm SST-2 B=8 batch
#: 1: first solves at 26 and 29 tokens refused, the first sentence found after 60 s; capped, after 30 s).
UNDERDETERMINED = 3.0
#: Candidate lengths beyond the sentence ends that each anchor also tries.
SPARE_LENGTHS = 2
#: A refinement whose residual exceeds the first solve's by more than this factor was derailed by a wrong "sure"
#: position. Measured on MiniLM: RT B=4 batch 0 (47 and 52 tokens), 4-16x larger with 3-10 wrong tokens after the
#: first solve against 7-20 after refining; SST-2 B=4 batch 9 (40 tokens), 1.6-1.8x larger yet exact where the first
#: solve had 1-2 wrong tokens (its extra anchors add rows that fit less tightly).
REFINED_WORSE = 3.0
#: First solves per anchor (lowest residual first) that are refined and finished by the second layer's search.
PROPOSALS_TRIED = 2
#: Alternating steps of the quick solves that rank the other candidate lengths when the ends' proposals all fail
#: (MiniLM RT B=8 batch 0, first anchor of each sentence: the pairing's 8 ends held 2 of the 8 true lengths; over all
#: 33-37 candidate lengths, 5-step solves of at most 100 inner steps ranked the true one first for 5 anchors,
#: 20-step solves for 7).
SCREEN_STEPS = 5
#: In the first pass over the anchors, an anchor is finished at once only when one of its first solves at the ends
#: has a residual at most this; the others wait for the second pass. MiniLM RT B=8 batches 7-9: first solves at a
#: true length that the search then finished had 1e-6-0.08 (0-2 tokens off); at true lengths of 35-38 tokens that
#: it could not finish, 0.10-0.17 (7-11 off); at wrong lengths at least 0.13, mostly 0.4-1.4. Each of those costs
#: 1-7 s of refining and up to 22 s of search.
CLEAR_START = 0.1
#: A refined proposal of n tokens whose median second-layer row residual exceeds the larger of these two,
#: ``PROPOSAL_FAR`` and ``PROPOSAL_FAR_TOKENS / n``, mixes sentences and is not searched. MiniLM SST-2 and RT B=8
#: batches 1 and 7 (26-46 tokens): proposals 1-7 tokens off sat at 0.013-0.023, while those 17-34 off or of a wrong
#: length sat at 0.077-0.13, and each of their 8-24 s descents ended 6-32 tokens off. One random wrong token lifts
#: the median of a short sentence more: up to 0.09-0.11 at 11-13 tokens (CoLA, SST-2), 0.018-0.044 at 23-40.
PROPOSAL_FAR, PROPOSAL_FAR_TOKENS = 0.05, 1.5
#: Rounds of pricing (``ContextSolver.price``) and the occurrences each round adds at most. MiniLM RT B=8 batch 9,
#: the rest of six sentences after two peels, first solves at the true length: 17 of the 55 anchors exact after
#: 5 rounds of 15, 8 before; those of the 17-token sentence from 3-7 tokens off (residual 0.25-0.63) to exact
#: (2e-6-0.09). Warm solves beat solving again from equal weights (3 of 55 worse, 25 better).
PRICE_ROUNDS, PRICE_TAKE = 5, 15
#: ``CLEAR_START`` for a priced first solve, whose residual falls further for the same error. The same 55 anchors:
#: exact priced solves at 2e-6-0.15 (8 of 13 at most 0.02), 2-9 tokens off at 0.04-0.085.
CLEAR_PRICED = 0.03
#: A first solve at most this is the sentence, or a token off, and the anchor's other lengths are not solved. Random
#: BERT-base SST-2 B=8 batch 3, the first anchor of each peeled round: exact at 1e-5-1e-4, 1 token off at 0.14-0.19,
#: wrong lengths 0.6-1.6, where the other lengths took 1-2 s of the round; MiniLM wrong lengths at least 0.13 (see
#: ``CLEAR_START``).
CLEAR_EXACT = 1e-3
#: The first pass over the anchors (first solves, the best priced) ends at this share of the phase's budget, and the
#: waiting anchors are finished, most promising first. MiniLM SST-2 B=8 batch 7, the rest of seven sentences: the
#: first pass took 2-3 s an anchor and used the whole 24 s budget on 12 of its anchors, so an exact priced proposal
#: (residual 0.045) among them was never searched.
FIRST_PASS_SHARE = 0.5
#: In a peeled rest, an anchor an earlier round already solved is solved again only at this many of its best lengths
#: then (lowest first-solve residual first), and at any end it was not solved at. Random BERT-base and MiniLM SST-2
#: B=8 batch 1, every anchor of every round: the true length ranked first or second among an anchor's lengths
#: whenever it was among them, while the seven or so others each cost a first solve (0.2-0.6 s) per anchor and round.
CARRIED_LENGTHS = 2


@dataclass(frozen=True)
class FirstSolve:
    """An anchor's first solve at one sentence length: the anchor's position and occurrence index, the occurrences
    allowed at that length and those solved over (``live``), their weights and the solve's residual."""

    position: int
    length: int
    allowed: torch.Tensor
    live: torch.Tensor
    m: torch.Tensor
    residual: float
    anchor: int
    priced: bool = False


class ContextSolver:
    """Membership solves of candidate sentences around anchors against the first layer's context span."""

    def __init__(
        self,
        parts: EmbeddingParts,
        complement: torch.Tensor,
        options: list[list[int]],
        token_type: int,
        anywhere: list[int],
        *,
        query: torch.nn.Linear,
        key: torch.nn.Linear,
        value: torch.nn.Linear,
        heads: int,
    ) -> None:
        self.occurrences, count = _occurrences(options, anywhere)
        self.anywhere = list(anywhere)
        self.index = {occurrence: i for i, occurrence in enumerate(self.occurrences)}
        n = len(self.occurrences)
        self.narrow = torch.arange(n) < count
        self.token = torch.tensor([t for t, _ in self.occurrences], dtype=torch.long)
        self.position = torch.tensor([p for _, p in self.occurrences], dtype=torch.long)
        x = first_layer_inputs(
            parts,
            self.token,
            self.position,
            torch.full((n,), token_type, dtype=torch.long),
        )
        size = query.out_features // heads
        k, v = (x @ m.weight.detach().double().T + _bias(m) for m in (key, value))
        self.keys = k.view(n, heads, size)
        # queries only for the anchors solved around, when first needed (all of them: a third of the set-up)
        self._inputs, self._query, self._queries = x, query, {}
        # (heads, r, n): each occurrence's value, per head, mapped off the span (r = the complement's dimension)
        off = torch.einsum("rhd,nhd->hrn", complement.view(-1, heads, size), v.view(n, heads, size))
        self.off = off.contiguous().numpy()

    def restricted(self, options: list[list[int]]) -> ContextSolver:
        """This solver over narrower lists (each position's tokens among its own, the same ``anywhere``), as a fresh
        one built on them would be, but without computing the occurrences' keys and values and the output
        projection's span again: an mlm pairing's slack is left out where the lists are crowded (see ``crowding``)."""
        occurrences, count = _occurrences(options, self.anywhere)
        if missing := [o for o in occurrences if o not in self.index]:
            raise ValueError(f"restricted lists hold occurrences the solver does not: {missing[:5]}")
        kept = torch.tensor([self.index[o] for o in occurrences], dtype=torch.long)
        out = object.__new__(ContextSolver)
        out.occurrences, out.anywhere = occurrences, self.anywhere
        out.index = {occurrence: i for i, occurrence in enumerate(occurrences)}
        out.narrow = torch.arange(len(occurrences)) < count
        out.token, out.position, out.keys = self.token[kept], self.position[kept], self.keys[kept]
        out._inputs, out._query, out._queries = self._inputs[kept], self._query, {}
        out.off = np.take(self.off, kept.numpy(), axis=2)
        return out

    def propose(
        self, anchor: tuple[int, int], length: int, first: int, last: int
    ) -> tuple[float, list[int]] | None:
        """(residual, sentence) of the sentence of ``length`` tokens around ``anchor`` (token, position) that opens
        with token ``first`` and ends with ``last`` ([CLS], [SEP]), or None when the anchor or a position has no
        candidate. The residual is per anchor, of the answer's solve (see ``refine``): near zero when a consistent
        sentence was found."""
        start = self.first_solve(anchor, length, first, last)
        return None if start is None else self.proposal(start)

    def proposal(self, start: FirstSolve) -> tuple[float, list[int]]:
        """(residual, sentence) from a first solve: within ``CLEAR_EXACT`` it is the sentence already, taken as it
        is; otherwise it is priced and refined."""
        if start.residual <= CLEAR_EXACT:
            return start.residual, self.rounded(start)
        return self.refine(self.price(start))

    def first_solve(
        self, anchor: tuple[int, int], length: int, first: int, last: int, steps: int = FIRST_STEPS
    ) -> FirstSolve | None:
        """The anchor's solve alone over the narrow candidates (None as in ``propose``), with ``steps``
        alternations. Its residual already tells lengths apart, at a fraction of the refinement's cost (random
        BERT-base, SST-2 B=4, with the plain least squares of earlier versions: at most 0.33 at the true lengths, at
        least 0.44 one or two off; MiniLM RT B=8 batch 0 with this solve: true lengths ranked first for 7 of 8
        anchors among 33-37 candidate lengths)."""
        if anchor not in self.index or not 0 < anchor[1] < length - 1:
            return None
        # [CLS] exactly at position 0 and [SEP] exactly at the last
        framed = (self.position == 0) == (self.token == first)
        framed &= (self.position == length - 1) == (self.token == last)
        allowed = (self.position < length) & framed
        # the anchor's position holds the anchor: it is known to sit there
        allowed &= (self.position != anchor[1]) | (torch.arange(len(self.occurrences)) == self.index[anchor])
        live = (allowed & (self.narrow | (self.position == anchor[1]))).nonzero().flatten()
        at = self.position[live]
        if len(torch.unique(at)) < length:  # a position without candidates
            return None
        if len(live) - length > UNDERDETERMINED * self.off.shape[1]:  # far more unknowns than one anchor's equations
            live = _capped(live, at, length, int(UNDERDETERMINED * self.off.shape[1]) + length, self.index[anchor])
            at = self.position[live]
        start = torch.zeros(len(live), dtype=torch.float64)  # projected onto the simplices: equal weights
        m, residual = self._solve([self.index[anchor]], live, at, length, start, steps)
        return FirstSolve(anchor[1], length, allowed, live, m, residual, self.index[anchor])

    def crowding(self, length: int) -> float:
        """Free unknowns per equation of a first solve at ``length`` over the narrow lists (ignoring the anchor's
        and the frame's own positions): above ``UNDERDETERMINED`` the solve keeps each position's best-ranked."""
        unknowns = int((self.narrow & (self.position < length)).sum()) - length
        return unknowns / self.off.shape[1]

    def price(self, start: FirstSolve) -> FirstSolve:
        """The first solve over more occurrences, added by column generation.

        The pairing cannot place a token the batch holds several times ("," "the" "a"): its one word gradient is
        the sum of its occurrences', so the fit spreads it thin or misses its positions, and it is left off the
        narrow lists exactly where it sits (MiniLM RT B=8 batch 9: 1-6 positions of each rest sentence). A solve
        without the true token at a position shifts part of the sentence around the gap instead (3-29 tokens
        off). Each round adds the ``PRICE_TAKE`` allowed occurrences whose reduced cost is most negative (the
        objective's gradient less the least gradient among its position's weighted candidates: adding a little
        of it lowers the residual) and solves again from the current weights, while the residual falls."""
        if start.priced:
            return start
        best = start
        columns = start.allowed.nonzero().flatten()
        terms = self._terms([start.anchor], columns)  # once: the rounds' solves take their columns from it
        column_of = np.zeros(len(self.occurrences), dtype=np.int64)
        column_of[columns.numpy()] = np.arange(len(columns))
        for _ in range(PRICE_ROUNDS):
            held = np.zeros(len(self.occurrences), dtype=bool)
            held[best.live.numpy()] = True
            held = held[columns.numpy()]
            x = torch.zeros(len(self.occurrences), dtype=torch.float64)
            x[best.live] = best.m
            x = x[columns].numpy()
            design = _blocks(terms, x)[0]
            gradient = design.T @ (design @ x)
            at = self.position[columns].numpy()
            least = np.full(best.length, np.inf)  # per position: the least gradient among its weighted candidates
            np.minimum.at(least, at[held & (x > 0)], gradient[held & (x > 0)])
            reduced = np.where(held, np.inf, gradient - least[at])
            order = np.argsort(reduced)[:PRICE_TAKE]
            added = columns[torch.from_numpy(order[reduced[order] < 0])]
            if len(added) == 0:
                break
            grown = torch.cat([best.live, added])
            begin = torch.cat([best.m, torch.zeros(len(added), dtype=torch.float64)])
            picked = column_of[grown.numpy()]
            grown_terms = [(np.take(w, picked, axis=1), np.take(v, picked, axis=2)) for w, v in terms]
            m, residual = self._solve(
                [best.anchor], grown, self.position[grown], best.length, begin, FIRST_STEPS, terms=grown_terms
            )
            if residual >= best.residual:
                break
            best = replace(best, live=grown, m=m, residual=residual)
        return replace(best, priced=True)

    def rounded(self, start: FirstSolve) -> list[int]:
        """The sentence of a solve: each position's favourite occurrence."""
        return _rounded(start.m, self.position[start.live], start.live, start.length, self.occurrences)

    def refine(self, start: FirstSolve) -> tuple[float, list[int]]:
        """(residual, sentence) after solving again with the first solve's surest positions as extra anchors and
        the tokens allowed anywhere at the positions it is unsure of; the first solve's own answer when that
        solve ends with a residual (per anchor) over ``REFINED_WORSE`` times the first's."""
        live, length, m = start.live, start.length, start.m
        at = self.position[live]
        first = start.residual, self.rounded(start)
        sure = _surest(m, at, length, exclude={start.position}, count=EXTRA_ANCHORS)
        if not sure:
            return first
        weight = torch.zeros(length, dtype=torch.float64).scatter_reduce(0, at, m, "amax")
        unsure = weight[self.position.clamp_max(length - 1)] < SURE
        opened = start.allowed & (self.narrow | unsure)
        opened[live] = True  # with what pricing added
        wide = opened.nonzero().flatten()
        begin = torch.zeros(len(self.occurrences), dtype=torch.float64)
        begin[live] = m
        anchors = [start.anchor, *(int(live[j]) for j in sure)]
        at = self.position[wide]
        m, residual = self._solve(anchors, wide, at, length, begin[wide], MORE_STEPS)
        if residual > REFINED_WORSE * start.residual:
            return first
        return residual, _rounded(m, at, wide, length, self.occurrences)

    def _solve(
        self,
        anchors: list[int],
        live: torch.Tensor,
        at: torch.Tensor,
        length: int,
        m: torch.Tensor,
        steps: int,
        terms: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Alternate the per-head normalisers and the membership, from ``m``: least squares over each position's
        weights on its simplex (non-negative, summing to one; see ``solve_on_simplices``). ``terms``: the anchors'
        ``_terms`` over ``live`` when already at hand."""
        terms = self._terms(anchors, live) if terms is None else terms
        simplices = Simplices(at.numpy(), length)
        x = simplices.project(m.numpy())
        residual = math.inf
        for _ in range(steps):
            rows = _blocks(terms, x)
            design = np.concatenate(rows)
            residual = float(np.linalg.norm(design @ x)) / math.sqrt(len(rows))
            x = solve_on_simplices(design.T @ design, x, simplices)
        return torch.from_numpy(x), residual

    def _query_of(self, a: int) -> torch.Tensor:
        """Occurrence ``a``'s (heads, head size) query, scaled by 1 / sqrt(head size)."""
        if a not in self._queries:
            heads, size = self.keys.shape[1:]
            q = self._inputs[a] @ self._query.weight.detach().double().T + _bias(self._query)
            self._queries[a] = q.view(heads, size) / math.sqrt(size)
        return self._queries[a]

    def _terms(self, anchors: list[int], live: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per anchor: the (heads, n) attention weights on the ``live`` occurrences, unnormalised, and their
        (heads, r, n) weighted off-span values."""
        terms = []
        off = np.take(self.off, live.numpy(), axis=2)  # C-contiguous, as the products in ``_blocks`` need
        for a in anchors:
            scores = torch.einsum("hd,nhd->hn", self._query_of(a), self.keys[live])
            weights = torch.exp(scores - scores.max(-1, keepdim=True).values).numpy()
            terms.append((weights, off * weights[:, None, :]))
        return terms


def _blocks(terms: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> list[np.ndarray]:
    """Each anchor's off-span context rows per occurrence, with the softmax normalisers of membership ``x`` held
    fixed, scaled to a unit mean column norm (anchors weigh alike)."""
    rows = []
    for weights, weighted in terms:
        normalisers = 1.0 / np.maximum(weights @ x, 1e-30)
        block = np.tensordot(normalisers, weighted, axes=1)  # (r, n)
        rows.append(block / max(float(np.linalg.norm(block, axis=0).mean()), 1e-300))
    return rows


class Simplices:
    """Each position's occurrences as one row of a padded (positions, most candidates) table, and the Euclidean
    projection onto the product of their probability simplices (sort-based, all positions at once)."""

    def __init__(self, at: np.ndarray, length: int) -> None:
        counts = np.bincount(at, minlength=length)
        order = np.argsort(at, kind="stable")
        slot = np.arange(len(at)) - (np.cumsum(counts) - counts)[at[order]]
        self.index = np.zeros((length, int(counts.max())), dtype=np.int64)
        self.valid = np.zeros(self.index.shape, dtype=bool)
        self.index[at[order], slot], self.valid[at[order], slot] = order, True
        self.rank = np.arange(1, self.index.shape[1] + 1, dtype=np.float64)

    def favourites(self, x: np.ndarray) -> np.ndarray:
        """Per position, the index of its candidate with the largest weight (the first of equal ones)."""
        table = np.where(self.valid, x[self.index], -np.inf)
        return self.index[np.arange(len(table)), table.argmax(axis=1)]

    def project(self, v: np.ndarray) -> np.ndarray:
        """The nearest point to ``v`` with each position's weights non-negative and summing to one."""
        table = np.where(self.valid, v[self.index], -np.inf)
        ordered = -np.sort(-table, axis=1)
        sums = np.cumsum(np.where(np.isfinite(ordered), ordered, 0.0), axis=1) - 1.0
        kept = np.maximum((ordered - sums / self.rank > 0).sum(axis=1), 1)
        shift = sums[np.arange(len(kept)), kept - 1] / kept
        out = np.empty_like(v)
        out[self.index[self.valid]] = np.maximum(table - shift[:, None], 0.0)[self.valid]
        return out


def solve_on_simplices(gram: np.ndarray, x: np.ndarray, simplices: Simplices) -> np.ndarray:
    """Minimise ``x^T gram x`` over the product of simplices by accelerated projected gradient (FISTA), from ``x``.

    Non-negativity is what makes a long sentence's solve determined: with 9-12 candidates per position a plain
    equality-constrained least squares has many exact solutions (MiniLM RT B=4 batch 14, four anchors in sentences
    of 46-50 tokens: 12-24 wrong tokens), while the one true 0/1 membership is the sparse non-negative one (0-2
    wrong at three of those anchors, 17 at the fourth)."""
    vector = np.ones(len(x))
    for _ in range(POWER_STEPS):  # the largest eigenvalue: the step size
        product = gram @ vector
        largest = float(np.linalg.norm(product))
        vector = product / max(largest, 1e-300)
    step = 1.0 / (2.0 * 1.05 * max(largest, 1e-300))
    previous, y, t = x, x, 1.0
    for _ in range(INNER_STEPS):
        current = simplices.project(y - step * 2.0 * (gram @ y))
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = current + ((t - 1.0) / t_next) * (current - previous)
        moved = float(np.abs(current - previous).max())
        previous, t = current, t_next
        if moved < INNER_TOL:
            break
    return _polished(gram, previous, simplices)


def _polished(gram: np.ndarray, x: np.ndarray, simplices: Simplices) -> np.ndarray:
    """Each position's favourite alone (a 0/1 membership) when that fits at least as well as ``x``: projected
    gradient creeps towards a true sentence's zero residual, leaving small weights on other candidates; rounding
    lands on it."""
    rounded = np.zeros_like(x)
    rounded[simplices.favourites(x)] = 1.0
    slack = ROUNDING_SLACK * float(np.trace(gram)) / len(x)  # float noise of a converged mixture's own fit
    return rounded if rounded @ gram @ rounded <= x @ gram @ x + slack else x


def context_solver(
    model: torch.nn.Module,
    update: Update,
    parts: EmbeddingParts,
    options: list[list[int]],
    token_type: int,
    anywhere: list[int],
) -> ContextSolver | None:
    """The solver for the first layer, or None when its modules or output-projection gradient cannot be found, or
    when that gradient's span is full or blurred (no clear spectral gap: noised or pruned updates). ``options``: the
    candidates per position of the first solves; ``anywhere``: tokens offered at every position to pricing and
    refinement only."""
    found = first_attention(model)
    output = next(
        (m for name, m in encoder_layers(model)[0].named_modules() if any(name.endswith(end) for end in OUTPUT)), None
    )
    if found is None or len(found[1]) < 3 or not isinstance(output, torch.nn.Linear) or not any(options):
        return None
    heads, projections = found
    owner = {id(p): name for name, p in model.named_parameters()}
    gradient = update.gradients.get(owner.get(id(output.weight), ""))
    if gradient is None or not bool(torch.isfinite(gradient).all()):
        return None
    _, sigma, vh = torch.linalg.svd(gradient.to(torch.float64), full_matrices=True)
    logs = torch.log10(sigma.clamp_min(1e-300))
    drops = logs[:-1] - logs[1:]
    drops[sigma[:-1] < FLOOR_TAIL * sigma[0]] = 0
    rank = int(drops.argmax()) + 1  # the widest fall above the tail: the float32 floor can fall 10x again
    if rank >= len(sigma) - 1 or float(drops[rank - 1]) < math.log10(MIN_GAP):
        return None
    complement = vh[rank:]
    return ContextSolver(parts, complement, options, token_type, anywhere, heads=heads, **projections)


def _occurrences(options: list[list[int]], anywhere: list[int]) -> tuple[list[tuple[int, int]], int]:
    """The (token, position) occurrences of the narrow lists (``options``), then those of ``anywhere`` at every
    position but the first that the lists do not hold; and how many are narrow."""
    narrow = list(dict.fromkeys((t, p) for p, tokens in enumerate(options) for t in tokens))
    held = set(narrow)
    extra = [(t, p) for p in range(1, len(options)) for t in anywhere if (t, p) not in held]
    return narrow + extra, len(narrow)


def _capped(live: torch.Tensor, at: torch.Tensor, length: int, most: int, anchor: int) -> torch.Tensor:
    """The first k occurrences of ``live`` at each position (the best ranked: the narrow lists keep their order), k
    the largest that keeps at most ``most`` in all, and the anchor."""
    rank = torch.zeros(len(live), dtype=torch.long)
    seen = torch.zeros(length, dtype=torch.long)
    for j, p in enumerate(at.tolist()):
        rank[j] = seen[p]
        seen[p] += 1
    k = max((k for k in range(1, int(seen.max()) + 1) if int(seen.clamp_max(k).sum()) <= most), default=1)
    return live[(rank < k) | (live == anchor)]


def _surest(m: torch.Tensor, at: torch.Tensor, length: int, exclude: set[int], count: int) -> list[int]:
    """Indices (into the live occurrences) of the ``count`` positions' favourites with the largest weight."""
    favourites = Simplices(at.numpy(), length).favourites(m.numpy())
    best = sorted(((float(m[j]), int(j)) for p, j in enumerate(favourites) if p not in exclude), reverse=True)
    return [j for weight, j in best[:count] if weight > 0.5]


def _rounded(
    m: torch.Tensor, at: torch.Tensor, live: torch.Tensor, length: int, occurrences: list[tuple[int, int]]
) -> list[int]:
    """Each position's candidate with the largest weight."""
    return [occurrences[int(live[j])][0] for j in Simplices(at.numpy(), length).favourites(m.numpy())]


def _bias(module: torch.nn.Linear) -> torch.Tensor:
    if module.bias is None:
        return torch.zeros(module.out_features, dtype=torch.float64)
    return module.bias.detach().to(torch.float64)


def assemble_by_context(
    search: SentenceSearch,
    solver: ContextSolver,
    anchors: list[tuple[int, int]],
    ends: list[int],
    options_for: Callable[[int, list[Found]], list[list[int]]],
    batch_size: int,
    *,
    first: int,
    last: int,
    spare: list[int] | None = None,
    budget: float | None = None,
    accepted: list[Found] | None = None,
    confirm: Callable[[Found], bool] | None = None,
    reserve_for: Callable[[int, list[Found]], list[list[int]]] | None = None,
    stop_after: int | None = None,
    defer: bool = True,
    solved: dict[tuple[int, int], dict[int, float]] | None = None,
    linger: float | None = None,
) -> list[Found]:
    """Sentences proposed around anchors by the context solve and finished by the second layer's search, after any
    ``accepted`` ones; ``confirm`` as in ``assemble``.

    For each anchor not yet in a found sentence, a first solve per sentence end no found sentence has, per length
    among the first ``SPARE_LENGTHS`` of ``spare`` (other candidate lengths, most likely first: the ends come from
    the pairing, which can rank a spurious [SEP] above a true one), and per end a found sentence already has (two
    sentences may share a length: CoLA B=4 batch 1 holds two of 14 tokens), in that order up to the first within
    ``CLEAR_EXACT``. Unless one is within ``CLEAR_START``, the best first solve is priced (``ContextSolver.price``).
    An anchor whose best first solve is at most ``CLEAR_START`` (``CLEAR_PRICED`` once priced) is finished at once;
    with ``defer`` the others wait until every anchor has had its first solves or ``FIRST_PASS_SHARE`` of the budget
    is spent, and are then finished lowest residual first, and the anchors not reached after them, each in turn
    (without ``defer``, each anchor is finished at its ends in turn, since a masked-LM update's first solves are too
    loose for their residual to rank anchors, and only then are the anchors' other lengths screened, in turn). To
    finish, the ``PROPOSALS_TRIED`` first solves with the lowest residual are priced and refined (one within
    ``CLEAR_EXACT`` is taken as it is), and the second layer's search descends from each refined proposal, lowest
    residual first, among ``options_for`` the length (each position's narrow favourites plus the proposed token),
    widening near a sentence to the tokens of ``reserve_for`` the length (each position's full candidate list) that
    those options lack; it keeps a sentence the second layer accepts. When none is accepted, quick solves
    (``SCREEN_STEPS``) rank every other length of ``spare``, and the best ``PROPOSALS_TRIED`` are solved, refined
    and searched the same way. ``budget`` (seconds) bounds the phase; ``stop_after`` new
    sentences end it (the span attack peels them off the update and starts over on the rest). ``solved`` records
    each anchor's first-solve residual per length; given an earlier round's record (the parent of a peeled rest),
    an anchor it holds is solved again only at its ``CARRIED_LENGTHS`` best lengths and at the ends it lacks.
    ``linger`` (seconds): once a new sentence is accepted, the phase ends that long after it, found or not, so that a
    sentence hard to find before the rest is peeled does not hold up the peel.
    """
    solved = {} if solved is None else solved
    accepted = list(accepted or [])
    wanted = batch_size if stop_after is None else min(batch_size, len(accepted) + stop_after)
    deadline = math.inf if budget is None else time.perf_counter() + budget

    given, first_new = len(accepted), math.inf  # when the first new sentence was accepted (to within an attempt)

    def over() -> bool:
        nonlocal first_new
        now = time.perf_counter()
        if linger is not None and len(accepted) > given and math.isinf(first_new):
            first_new = now
        return search.expired or now > deadline or linger is not None and now >= first_new + linger

    def finish(starts: list[FirstSolve]) -> Found | None:
        """Refine the best first solves and search from each refined proposal (lowest residual first; one within
        ``CLEAR_START`` at once, before the next refinement); the first sentence accepted."""
        proposals = []
        for start in sorted(starts, key=lambda f: f.residual)[:PROPOSALS_TRIED]:
            residual, sentence = solver.proposal(start)
            proposals.append((residual, start.length, sentence))
            if residual <= CLEAR_START:  # near a sentence: searched before the next (slower, worse) refinement,
                found = search_from(start.length, sentence, clear=True)  # even past the phase's budget
                if found is not None:
                    return found
                proposals.pop()
        for _, length, sentence in sorted(proposals):
            found = search_from(length, sentence)
            if found is not None:
                return found
        return None

    def search_from(length: int, sentence: list[int], clear: bool = False) -> Found | None:
        """The second layer's search from a refined proposal, or None when it is far from a sentence or not
        accepted. A ``clear`` proposal is searched as long as the search has time, past the phase's budget: it
        takes a second or less, and the next phases would look for the sentence far longer."""
        if search.expired if clear else over():
            return None
        far = max(PROPOSAL_FAR, PROPOSAL_FAR_TOKENS / length)
        if float(search.rows(torch.tensor([sentence]))[0].median()) > far:
            return None
        narrow = options_for(length, accepted)
        options = [list(dict.fromkeys([t, *tokens])) for t, tokens in zip(sentence, narrow, strict=True)]
        reserve = None if reserve_for is None else reserve_for(length, accepted)
        found = search.search(sentence, options, avoid={f.ids for f in accepted}, restarts=0, reserve=reserve)
        return found if search.accepts(found, confirm) else None

    def held(anchor: tuple[int, int]) -> bool:
        return any(anchor[1] < len(f.ids) and f.ids[anchor[1]] == anchor[0] for f in accepted)

    def screened(anchor: tuple[int, int], tried: list[int]) -> Found | None:
        """The ends missed this anchor's length (common at B=8): quick solves rank every other candidate length
        and the best are finished."""
        screens: list[FirstSolve] = []
        for n in [n for n in spare or [] if n not in tried]:
            if over():
                break
            screen = solver.first_solve(anchor, n, first, last, steps=SCREEN_STEPS)
            screens += [] if screen is None else [screen]
        best = sorted(screens, key=lambda f: f.residual)[:PROPOSALS_TRIED]
        return finish([f for f in (solver.first_solve(anchor, b.length, first, last) for b in best) if f])

    def attempt(anchor: tuple[int, int], wait: bool) -> tuple[float, list[int], list[FirstSolve], bool] | None:
        """The anchor's first solves at the ends, its best priced; it is finished at once when that is clear or it
        may not ``wait`` (its other lengths are screened by the caller). (best residual, lengths tried, first solves,
        whether finished) when it waits or was finished in vain, None when a sentence was accepted."""
        lengths = {len(f.ids) for f in accepted}
        order = [n for n in ends if n not in lengths]
        order += [n for n in spare or [] if n not in ends and n not in lengths][:SPARE_LENGTHS]
        order += [n for n in ends if n in lengths]
        if anchor in solved:  # an earlier round's best lengths for it, then the ends it was not solved at
            known = sorted(solved[anchor], key=solved[anchor].__getitem__)
            order = known[:CARRIED_LENGTHS] + [n for n in order if n not in solved[anchor]]
        tried, starts = [], []
        for n in order:
            tried.append(n)
            start = solver.first_solve(anchor, n, first, last)
            starts += [] if start is None else [start]
            if start is not None:
                solved.setdefault(anchor, {})[n] = start.residual
            if start is not None and start.residual <= CLEAR_EXACT:  # the sentence: no other length can do better
                break
        if starts and min(f.residual for f in starts) > CLEAR_START:  # the best, with the tokens pricing adds
            starts.sort(key=lambda f: f.residual)
            starts[0] = solver.price(starts[0])
        best = min((f.residual for f in starts), default=math.inf)
        clear = best <= (CLEAR_PRICED if any(f.priced for f in starts) else CLEAR_START) or not wait
        found = finish(starts) if clear else None
        if found is not None:
            accepted.append(found)
            return None
        return best, tried, starts, clear

    # first pass: every anchor's first solves at the ends; with ``defer``, finished at once only when one is clearly
    # near a sentence, since an anchor in a long sentence whose length the ends miss would otherwise spend seconds
    # of refining and screening while other anchors' short sentences wait. It ends at ``FIRST_PASS_SHARE`` of the
    # budget, so that the most promising of the waiting anchors are finished in time.
    first_deadline = math.inf if budget is None or not defer else time.perf_counter() + FIRST_PASS_SHARE * budget
    deferred: list[tuple[float, tuple[int, int], list[int], list[FirstSolve], bool]] = []
    later: list[tuple[int, int]] = []
    for k, anchor in enumerate(anchors):
        if len(accepted) >= wanted or over():
            break
        if time.perf_counter() > first_deadline:
            later = anchors[k:]
            break
        # without ``defer`` each anchor is finished at its ends at once, and screened only in the pass below, so that
        # one anchor's screening of every length does not spend the budget before the next anchors' ends are tried
        if not held(anchor) and (waiting := attempt(anchor, defer)) is not None:
            deferred.append((waiting[0], anchor, *waiting[1:]))
    # then the waiting anchors, most promising first (without ``defer``, in turn): their best first solves finished,
    # then their lengths screened
    for _, anchor, tried, starts, finished in sorted(deferred, key=lambda item: item[0]) if defer else deferred:
        if len(accepted) >= wanted or over():
            break
        if held(anchor):
            continue
        found = (None if finished else finish(starts)) or screened(anchor, tried)
        if found is not None:
            accepted.append(found)
    # and any the first pass did not reach, each in turn
    for anchor in later:
        if len(accepted) >= wanted or over():
            break
        if not held(anchor) and (missed := attempt(anchor, wait=False)) is not None:
            if (found := screened(anchor, missed[1])) is not None:
                accepted.append(found)
    return accepted
