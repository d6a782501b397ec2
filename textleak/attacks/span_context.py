"""Propose whole sentences around an anchor token from the first attention layer's output-projection gradient.

The attention output projection of the first layer is a linear layer whose inputs are the per-token attention
contexts, so its weight gradient ``sum_a dy_a ctx_a^T`` has a row space spanned by the context vectors of every real
token in the batch (padding contributes nothing). Per head h, ``ctx_a,h = sum_b softmax_b(q_a,h . k_b,h / sqrt(d_h))
v_b,h`` over a's own sentence, where q, k and v depend only on each token and its position. A true sentence's context
rows lie in that span to about 1e-6; one wrong token lifts them to 1e-2 or more (MiniLM, SST-2 batches of 4).

For an anchor a (a token known to sit at a position: one that occurs once in the batch), write its sentence as a 0/1
membership vector m over the candidate (token, position) occurrences, one per position. With the per-head softmax
normalisers c_h = 1 / sum_b m_b exp(s_ab) held fixed, ``P_perp ctx_a = sum_h c_h sum_b m_b exp(s_ab) P_perp v_b`` is
linear in m, so alternating between the normalisers and an equality-constrained least-squares solve for m (one unit
of weight per position) finds the sentence as a whole, where a token-by-token descent on this test stalls (a wrong
token disturbs every row a little, not its own row the most, as the second layer's residual connection makes it).
The positions the solve is surest of then join the anchor, each adding as many equations, and the solve repeats. The
rounded answer is a start for the second layer's search (span_assembly), which confirms it or repairs a few tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from textleak.attacks.span_assembly import Found, SentenceSearch
from textleak.attacks.span_scoring import EmbeddingParts, encoder_layers, first_attention, first_layer_inputs
from textleak.update import Update

#: Module names of the first attention block's output projection across the BERT family.
OUTPUT = ("attention.output.dense", "attention.out_lin", "attention.o_proj", "attention.out_proj")
#: The context span's spectral gap below which it is too blurred (noise, pruning) to solve against.
MIN_GAP = 10.0
#: Alternating least-squares steps of the first solve (anchor alone) and of each solve with more anchors.
FIRST_STEPS, MORE_STEPS = 20, 10
#: Positions the first solve is surest of that join the anchor (each adds the span's complement as equations).
EXTRA_ANCHORS = 4
#: A position whose favourite weighs less than this after the first solve also tries the tokens allowed anywhere.
SURE = 0.9
#: A first solve with more than this many times as many free unknowns (candidates less positions) as equations
#: (the span's complement) is not tried: it has many exact solutions. SST-2 B=4 batch 2's 40-token sentences (about
#: 7 candidates per position, 256 equations) sit near 1x and are solved; allowing up to 2x cost SST-2/RT B=8 13-18
#: ROUGE-1 points of search time on MiniLM, whose batches of 8 long sentences leave far fewer equations (384 less
#: the batch's tokens, about 250 by estimate).
UNDERDETERMINED = 1.25
#: Candidate lengths beyond the sentence ends that each anchor also tries.
SPARE_LENGTHS = 2
#: A refinement whose residual exceeds the first solve's by more than this factor was derailed by a wrong "sure"
#: position. Measured on MiniLM: RT B=4 batch 0 (47 and 52 tokens), 4-16x larger with 3-10 wrong tokens after the
#: first solve against 7-20 after refining; SST-2 B=4 batch 9 (40 tokens), 1.6-1.8x larger yet exact where the first
#: solve had 1-2 wrong tokens (its extra anchors add rows that fit less tightly).
REFINED_WORSE = 3.0
#: First solves per anchor (lowest residual first) that are refined and finished by the second layer's search.
PROPOSALS_TRIED = 2


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
        narrow = list(dict.fromkeys((t, p) for p, tokens in enumerate(options) for t in tokens))
        held = set(narrow)
        extra = [(t, p) for p in range(1, len(options)) for t in anywhere if (t, p) not in held]
        self.occurrences = narrow + extra
        self.index = {occurrence: i for i, occurrence in enumerate(self.occurrences)}
        n = len(self.occurrences)
        self.narrow = torch.arange(n) < len(narrow)
        self.token = torch.tensor([t for t, _ in self.occurrences], dtype=torch.long)
        self.position = torch.tensor([p for _, p in self.occurrences], dtype=torch.long)
        x = first_layer_inputs(
            parts,
            self.token,
            self.position,
            torch.full((n,), token_type, dtype=torch.long),
        )
        size = query.out_features // heads
        q, k, v = (x @ m.weight.detach().double().T + _bias(m) for m in (query, key, value))
        self.queries = q.view(n, heads, size) / math.sqrt(size)
        self.keys = k.view(n, heads, size)
        # (heads, n, r): each occurrence's value, per head, mapped off the span (r = the complement's dimension)
        self.off = torch.einsum("rhd,nhd->hnr", complement.view(-1, heads, size), v.view(n, heads, size))

    def propose(
        self, anchor: tuple[int, int], length: int, first: int, last: int
    ) -> tuple[float, list[int]] | None:
        """(residual, sentence) of the sentence of ``length`` tokens around ``anchor`` (token, position) that opens
        with token ``first`` and ends with ``last`` ([CLS], [SEP]), or None when the anchor or a position has no
        candidate or the first solve would be far underdetermined (``UNDERDETERMINED``). The residual is per anchor,
        of the answer's solve (see ``refine``): near zero when a consistent sentence was found."""
        start = self.first_solve(anchor, length, first, last)
        return None if start is None else self.refine(start)

    def first_solve(self, anchor: tuple[int, int], length: int, first: int, last: int) -> FirstSolve | None:
        """The anchor's solve alone over the narrow candidates (None as in ``propose``). Its residual already
        tells lengths apart (random BERT-base, SST-2 B=4: at most 0.33 at the true lengths, at least 0.44 at
        lengths one or two off), at a fraction of the refinement's cost."""
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
        if len(live) - length > UNDERDETERMINED * self.off.shape[2]:  # far more unknowns than one anchor's equations
            return None
        m, residual = self._solve([self.index[anchor]], live, at, length, _uniform(at, length), FIRST_STEPS)
        return FirstSolve(anchor[1], length, allowed, live, m, residual, self.index[anchor])

    def refine(self, start: FirstSolve) -> tuple[float, list[int]]:
        """(residual, sentence) after solving again with the first solve's surest positions as extra anchors and
        the tokens allowed anywhere at the positions it is unsure of; the first solve's own answer when that
        solve ends with a residual (per anchor) over ``REFINED_WORSE`` times the first's."""
        live, length, m = start.live, start.length, start.m
        at = self.position[live]
        first = start.residual, _rounded(m, at, live, length, self.occurrences)
        sure = _surest(m, at, length, exclude={start.position}, count=EXTRA_ANCHORS)
        if not sure:
            return first
        weight = torch.zeros(length, dtype=torch.float64).scatter_reduce(0, at, m, "amax")
        unsure = weight[self.position.clamp_max(length - 1)] < SURE
        wide = (start.allowed & (self.narrow | unsure)).nonzero().flatten()
        begin = torch.zeros(len(self.occurrences), dtype=torch.float64)
        begin[live] = m
        anchors = [start.anchor, *(int(live[j]) for j in sure)]
        at = self.position[wide]
        m, residual = self._solve(anchors, wide, at, length, begin[wide], MORE_STEPS)
        if residual > REFINED_WORSE * start.residual:
            return first
        return residual, _rounded(m, at, wide, length, self.occurrences)

    def _solve(
        self, anchors: list[int], live: torch.Tensor, at: torch.Tensor, length: int, m: torch.Tensor, steps: int
    ) -> tuple[torch.Tensor, float]:
        """Alternate the per-head normalisers and the constrained least-squares membership, from ``m``."""
        n = len(live)
        terms = []  # per anchor: (heads, n) attention weights and (heads, r * n) weighted off-span values
        for a in anchors:
            scores = torch.einsum("hd,nhd->hn", self.queries[a], self.keys[live])
            weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
            weighted = self.off[:, live] * weights[..., None]  # (heads, n, r)
            terms.append((weights, weighted.transpose(1, 2).reshape(len(weights), -1)))  # (heads, r * n)
        one_per_position = torch.zeros(length, n, dtype=torch.float64)
        one_per_position[at, torch.arange(n)] = 1
        system = torch.zeros(n + length, n + length, dtype=torch.float64)
        system[:n, n:], system[n:, :n] = one_per_position.T, one_per_position
        rhs = torch.cat([torch.zeros(n, dtype=torch.float64), torch.ones(length, dtype=torch.float64)])[:, None]
        residual = math.inf
        for _ in range(steps):
            rows = []
            for weights, weighted in terms:
                normalisers = 1.0 / (weights @ m).clamp_min(1e-30)
                block = (normalisers @ weighted).view(-1, n)
                rows.append(block / block.norm(dim=0).mean().clamp_min(1e-300))
            design = torch.cat(rows)
            residual = float((design @ m).norm()) / math.sqrt(len(rows))
            system[:n, :n] = design.T @ design
            m = torch.linalg.lstsq(system, rhs).solution[:n, 0]
        return m, residual


def context_solver(
    model: torch.nn.Module,
    update: Update,
    parts: EmbeddingParts,
    options: list[list[int]],
    token_type: int,
    anywhere: list[int],
) -> ContextSolver | None:
    """The solver for the first layer, or None when its modules or output-projection gradient cannot be found, or
    when that gradient's span is full or blurred (no clear spectral gap: noised or pruned updates)."""
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
    rank = int(drops.argmax()) + 1  # the widest fall: the float32 floor's own tail can fall 10x again
    if rank >= len(sigma) - 1 or float(drops[rank - 1]) < math.log10(MIN_GAP):
        return None
    complement = vh[rank:]
    return ContextSolver(parts, complement, options, token_type, anywhere, heads=heads, **projections)


def _uniform(at: torch.Tensor, length: int) -> torch.Tensor:
    """Equal weight over each position's candidates."""
    counts = torch.bincount(at, minlength=length).to(torch.float64)
    return 1.0 / counts[at]


def _surest(m: torch.Tensor, at: torch.Tensor, length: int, exclude: set[int], count: int) -> list[int]:
    """Indices (into the live occurrences) of the ``count`` positions' favourites with the largest weight."""
    best: list[tuple[float, int]] = []
    for p in range(length):
        if p in exclude:
            continue
        where = (at == p).nonzero().flatten()
        j = int(where[m[where].argmax()])
        best.append((float(m[j]), j))
    return [j for weight, j in sorted(best, reverse=True)[:count] if weight > 0.5]


def _rounded(
    m: torch.Tensor, at: torch.Tensor, live: torch.Tensor, length: int, occurrences: list[tuple[int, int]]
) -> list[int]:
    """Each position's candidate with the largest weight."""
    sentence = []
    for p in range(length):
        where = (at == p).nonzero().flatten()
        sentence.append(occurrences[int(live[where[m[where].argmax()]])][0])
    return sentence


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
) -> list[Found]:
    """Sentences proposed around anchors by the context solve and finished by the second layer's search, after any
    ``accepted`` ones; ``confirm`` as in ``assemble``.

    For each anchor not yet in a found sentence, a first solve per sentence end no found sentence has, per length
    among the first ``SPARE_LENGTHS`` of ``spare`` (other candidate lengths, most likely first: the ends come from
    the pairing, which can rank a spurious [SEP] above a true one), and per end a found sentence already has (two
    sentences may share a length: CoLA B=4 batch 1 holds two of 14 tokens). The ``PROPOSALS_TRIED`` first solves
    with the lowest residual are refined, and the second layer's search descends from each refined proposal, lowest
    residual first, among ``options_for`` the length (each position's narrow favourites plus the proposed token),
    widening near a sentence to the tokens of ``reserve_for`` the length (each position's full candidate list) that
    those options lack; it keeps a sentence the second layer accepts. ``budget`` (seconds) bounds the phase.
    """
    accepted = list(accepted or [])
    deadline = math.inf if budget is None else time.perf_counter() + budget
    for token, position in anchors:
        if len(accepted) >= batch_size or search.expired or time.perf_counter() > deadline:
            break
        if any(position < len(f.ids) and f.ids[position] == token for f in accepted):
            continue
        held = {len(f.ids) for f in accepted}
        proposals = []
        tried = [n for n in ends if n not in held]
        tried += [n for n in spare or [] if n not in ends and n not in held][:SPARE_LENGTHS]
        tried += [n for n in ends if n in held]
        starts = [f for f in (solver.first_solve((token, position), n, first, last) for n in tried) if f is not None]
        for start in sorted(starts, key=lambda f: f.residual)[:PROPOSALS_TRIED]:
            residual, sentence = solver.refine(start)
            proposals.append((residual, start.length, sentence))
        for _, length, sentence in sorted(proposals):
            if search.expired or time.perf_counter() > deadline:
                break
            narrow = options_for(length, accepted)
            options = [list(dict.fromkeys([t, *tokens])) for t, tokens in zip(sentence, narrow, strict=True)]
            reserve = None if reserve_for is None else reserve_for(length, accepted)
            found = search.search(sentence, options, avoid={f.ids for f in accepted}, restarts=0, reserve=reserve)
            if found.score <= search.accept and (confirm is None or confirm(found)):
                accepted.append(found)
                break
    return accepted
