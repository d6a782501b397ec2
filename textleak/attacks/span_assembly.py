"""Assemble per-position candidates into sentences with the second layer's span.

Each sentence's first-layer outputs depend only on that sentence, and they are the inputs of the second layer, so a
candidate sentence is right when all of its first-layer output rows lie in the second layer's input span. The
search works one sentence (one length) at a time: coordinate descent over positions, each step scoring every
candidate token of one position in a single batched forward pass, never the product of all candidate sets.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from textleak.attacks.span_attention import AttentionTest
from textleak.attacks.span_scoring import SpanBasis, encoder_layers


class FirstLayer:
    """A float32 copy of the embeddings and first encoder layer: sentences -> second-layer input rows.

    Float32 is the client's own precision: a true sentence's rows then lie in the second layer's span to about 3e-7,
    as close as in float64, and the forward passes that dominate the search run 2.5x faster (the span residual
    itself is taken in float64).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        base = getattr(model, "base_model", model)
        self.embeddings = copy.deepcopy(base.embeddings).to(torch.float32).eval()
        self.layer = copy.deepcopy(encoder_layers(model)[0]).to(torch.float32).eval()
        self.typed = getattr(self.embeddings, "token_type_embeddings", None) is not None  # DistilBERT has none

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, token_type: int = 0) -> torch.Tensor:
        """Hidden states (n, L, d) after the first layer for n unpadded sentences of equal length L."""
        types = {"token_type_ids": torch.full_like(ids, token_type)} if self.typed else {}
        hidden = self.embeddings(input_ids=ids, **types)
        out = self.layer(hidden)
        return out[0] if isinstance(out, tuple) else out


#: An anchor's attention residual below this marks its sentence found (right: about 1e-7; one wrong token: 1e-2),
#: on a clean update; ``attention_accept`` loosens it for rounded or noised ones.
ATTENTION_ACCEPT = 1e-4
#: The loosest attention acceptance (a true sentence under bf16 rounding: about 1.5e-3).
ATTENTION_ACCEPT_MAX = 3e-3
#: A sentence whose median second-layer row residual is below this is near a true one (one or two wrong tokens lift
#: every row to about 3e-2; a mix of several sentences sits near 2e-1), so its worst rows are worth widening.
NEAR = 0.08
#: Worst rows whose positions the widening step retries with every candidate.
WIDEN_POSITIONS = 4
#: Worst rows whose positions ``swap`` exchanges pairwise.
SWAP_POSITIONS = 8
#: Singular values of the passed sentences' first-layer outputs below this fraction of the largest are float32
#: rounding, not a direction of the second layer's span.
SETTLED_RTOL = 1e-5


def attention_accept(accept: float) -> float:
    """The attention residual that marks a sentence found, given the second layer's acceptance ``accept``.

    Rounding the update (fp16, bf16) or slight noise lifts a true sentence's attention residuals with its second-layer
    ones (fp16: both about 5e-4, where ``accept`` is then 1e-2); a quarter of ``accept``, within
    [``ATTENTION_ACCEPT``, ``ATTENTION_ACCEPT_MAX``], keeps them below while a wrong token stays above (1e-2 or more).
    """
    return min(ATTENTION_ACCEPT_MAX, max(ATTENTION_ACCEPT, accept / 4))


@dataclass(frozen=True)
class Found:
    """A sentence the search settled on and its second-layer score (worst row's relative residual)."""

    ids: tuple[int, ...]
    score: float


class SentenceSearch:
    """Coordinate search of sentences of a given length against the second layer's span."""

    def __init__(
        self,
        first: FirstLayer,
        span: SpanBasis,
        *,
        accept: float,
        max_sweeps: int = 6,
        restarts: int = 8,
        seed: int = 0,
        block: int = 256,
        batch: int = 256,
        time_limit: float | None = None,
    ) -> None:
        self.first, self.span, self.accept = first, span, accept
        self.attention_accept = attention_accept(accept)
        self.max_sweeps, self.restarts, self.block, self.batch = max_sweeps, restarts, block, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.deadline = math.inf if time_limit is None else time.perf_counter() + time_limit
        self._passed: dict[tuple[int, ...], torch.Tensor] = {}
        self.settled = False

    @property
    def expired(self) -> bool:
        """Whether the search is over: its time budget is spent (it then returns the best it has), or ``settled``."""
        return self.settled or self.out_of_time

    @property
    def out_of_time(self) -> bool:
        """Whether the search's time budget is spent."""
        return time.perf_counter() > self.deadline

    def accepts(self, found: Found, confirm: Callable[[Found], bool] | None = None) -> bool:
        """Whether ``found`` passes the second layer (``accept``) and ``confirm``. The accepted sentences' first-layer
        outputs are kept; once they span the second layer's whole span, every sentence that reached the gradient
        is found (``settled``): an mlm sentence with nothing masked, or a repeat, sends no rows of its own, and
        searching on for it would only spend the time limit. Only accepted sentences count: on a random model's
        near-uniform attention, mixes of the batch's sentences pass the second layer too, and together they span it
        (random RoBERTa-tiny, B=2: the search stopped on them before finding either sentence). Clean updates only:
        under noise the span's rank undercounts the rows."""
        if found.score > self.accept or (confirm is not None and not confirm(found)):
            return False
        if self.span.noise == 0 and found.ids not in self._passed:
            self._passed[found.ids] = self.first(torch.tensor([found.ids]))[0].to(torch.float64)
            rows = torch.cat(list(self._passed.values()))
            if len(rows) >= self.span.rank and int(torch.linalg.matrix_rank(rows, rtol=SETTLED_RTOL)) >= self.span.rank:
                self.settled = True
        return True

    def rows(self, sentences: torch.Tensor) -> torch.Tensor:
        """(n, L): each first-layer output row's relative residual against the second layer's span."""
        return self.span.residual(self.first(sentences))

    def score(self, sentences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sentence (n, L): the search objective and the worst row's relative residual.

        The objective is the mean log residual over rows: a token fixes mostly its own row (the residual
        connection), so a sum rewards each right token even while other rows are still wrong; the worst row,
        used for acceptance, would not move.
        """
        objective, worst = [], []
        for start in range(0, sentences.shape[0], self.batch):
            rows = self.rows(sentences[start : start + self.batch])
            objective.append(_objective(rows))
            worst.append(rows.amax(dim=-1))
        return torch.cat(objective), torch.cat(worst)

    def search(
        self,
        start: list[int],
        options: list[list[int]],
        avoid: set[tuple[int, ...]] = frozenset(),
        restarts: int | None = None,
        reserve: list[list[int]] | None = None,
    ) -> Found:
        """Exchanges of token pairs (``swap``) and widening in ``start``, coordinate descent and one joint repair of
        its worst rows, then alternately from random starts and from the best sentence so far with 2-4 positions
        redrawn (iterated local search), until a sentence scores below ``accept``; at most ``restarts`` restarts
        (default: the search's own). A ``start`` that scores below ``accept`` is returned as it is.

        ``reserve``: each position's full candidate list, from which ``widen`` draws tokens the options lack."""
        options = [list(tokens) for tokens in options]  # widening adds to them
        # near a sentence, exchanges and widening first: the descent follows the mean log residual and can trade a
        # start's one wrong token for two (MiniLM RT B=4 batch 11: a 39-token proposal, worst row 0.14 -> 0.24)
        _, worst = self._scores(torch.tensor([start]), avoid)
        if float(worst[0]) <= self.accept:  # a descent from an accepted start costs a full sweep (BERT-base: 1-4 s)
            return Found(tuple(start), float(worst[0]))
        near = self.widen(self.swap(Found(tuple(start), float(worst[0])), options, avoid), options, reserve, avoid)
        best = self.repair(self.descend(list(near.ids), options, avoid), options, avoid)
        best = min(near, self.widen(self.swap(best, options, avoid), options, reserve, avoid), key=lambda f: f.score)
        free = [p for p, tokens in enumerate(options) if len(tokens) > 1]
        for attempt in range(self.restarts if restarts is None else restarts):
            if best.score <= self.accept or not free or self.expired:
                break
            kicked = list(best.ids)
            count = len(free) if attempt % 2 else 2 + attempt % 3  # alternate fresh starts and small kicks
            for k in torch.randperm(len(free), generator=self.generator)[:count].tolist():
                tokens = options[free[k]]
                kicked[free[k]] = tokens[int(torch.randint(len(tokens), (1,), generator=self.generator))]
            found = self.widen(self.descend(kicked, options, avoid), options, reserve, avoid)
            best = min(best, found, key=lambda f: f.score)
        return best

    def widen(
        self, found: Found, options: list[list[int]], reserve: list[list[int]] | None, avoid: set[tuple[int, ...]]
    ) -> Found:
        """Near a sentence, retry the worst rows' positions with every ``reserve`` token their options lack, one
        position at a time; the best improving token joins its position's options (in place) and the descent
        resumes from it. At most ``max_sweeps`` tokens are added.

        The narrow options hold each position's best-paired tokens; a true token the pairing ranked lower is out of
        their reach, and a sentence one such token away is stuck. Its wrong token's own row is among the worst.
        """
        if reserve is None:
            return found
        for _ in range(self.max_sweeps):
            if found.score <= self.accept or self.expired:
                break
            rows = self.rows(torch.tensor([found.ids]))[0]
            if float(rows.median()) > NEAR:
                break
            worst = [p for p in rows.argsort(descending=True).tolist() if set(reserve[p]) - set(options[p])]
            moves = [(p, t) for p in worst[:WIDEN_POSITIONS] for t in reserve[p] if t not in options[p]]
            if not moves:
                break
            variants = torch.tensor([list(found.ids)] * len(moves))
            variants[torch.arange(len(moves)), [p for p, _ in moves]] = torch.tensor([t for _, t in moves])
            objective, _ = self._scores(variants, avoid)
            k = int(objective.argmin())
            if float(objective[k]) >= float(_objective(rows)):
                break
            options[moves[k][0]].append(moves[k][1])
            found = self.descend(variants[k].tolist(), options, avoid)
        return found

    def swap(self, found: Found, options: list[list[int]], avoid: set[tuple[int, ...]]) -> Found:
        """Near a sentence, exchange the tokens of two of the worst rows' positions while that lowers both the search
        objective and the worst row; the exchanged tokens join those positions' options (in place) and the descent
        resumes. At most ``max_sweeps`` exchanges.

        The context proposals' typical near miss is a pair of tokens exchanged: a true token the narrow options
        lack at one position is replaced by another position's token, which takes the first one's place (MiniLM,
        RT B=4 batch 14: "as" and "that" ten positions apart, both among the three worst rows). One-token moves
        cannot undo it: each half of the exchange alone leaves a token twice.
        """
        for _ in range(self.max_sweeps):
            if found.score <= self.accept or self.expired:
                break
            ids = list(found.ids)
            rows = self.rows(torch.tensor([ids]))[0]
            if float(rows.median()) > NEAR:  # not near a sentence: its worst rows do not point at an exchange
                break
            worst = [p for p in rows.argsort(descending=True).tolist() if len(options[p]) > 1][:SWAP_POSITIONS]
            pairs = [(p, q) for p, q in itertools.combinations(worst, 2) if ids[p] != ids[q]]
            if not pairs:
                break
            variants = torch.tensor([ids] * len(pairs))
            for i, (p, q) in enumerate(pairs):
                variants[i, p], variants[i, q] = ids[q], ids[p]
            objective, scores = self._scores(variants, avoid)
            k = int(objective.argmin())
            if float(objective[k]) >= float(_objective(rows)) or float(scores[k]) >= found.score:
                break
            p, q = pairs[k]
            for position, token in ((p, ids[q]), (q, ids[p])):
                if token not in options[position]:
                    options[position].append(token)
            exchanged = Found(tuple(variants[k].tolist()), float(scores[k]))
            found = min(exchanged, self.descend(list(exchanged.ids), options, avoid), key=lambda f: f.score)
        return found

    def repair(self, found: Found, options: list[list[int]], avoid: set[tuple[int, ...]]) -> Found:
        """Try every combination of options at the worst rows' positions (at most ``block`` sentences).

        One wrong token lifts every row's residual (attention mixes the sentence) but its own row the most, so
        the worst rows point at the wrong positions; jointly re-choosing them escapes what one-token moves cannot.
        The descent from the best combination is kept only if it ends with a lower score than ``found``: it follows
        the mean log residual and can end in another sentence's basin, which ``widen`` cannot then bring back.
        """
        if found.score <= self.accept:
            return found
        rows = self.rows(torch.tensor([found.ids]))[0]
        chosen: list[int] = []
        size = 1
        for p in rows.argsort(descending=True).tolist():
            if len(options[p]) > 1 and size * len(options[p]) <= self.block:
                chosen.append(p)
                size *= len(options[p])
        if len(chosen) < 2:
            return found
        variants = torch.tensor([list(found.ids)] * size)
        variants[:, chosen] = torch.tensor(list(itertools.product(*(options[p] for p in chosen))))
        objective, worst = self._scores(variants, avoid)
        k = int(worst.argmin())
        if float(worst[k]) >= found.score:
            return found
        return min(found, self.descend(variants[k].tolist(), options, avoid), key=lambda f: f.score)

    def descend(self, start: list[int], options: list[list[int]], avoid: set[tuple[int, ...]]) -> Found:
        """Coordinate descent from ``start``: at each position with options, keep the best-scoring token.

        ``options[p]`` lists the tokens allowed at position p (empty: the position is fixed). Sentences in
        ``avoid`` (already found) score as infinitely bad, so the search moves on to a different sentence.
        """
        current, _, worst = coordinate_descent(
            start, options, lambda variants: self._scores(variants, avoid), self.max_sweeps, lambda: self.expired
        )
        return Found(tuple(current), worst)

    def _scores(self, variants: torch.Tensor, avoid: set[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        objective, worst = self.score(variants)
        for i, row in enumerate(variants.tolist()):
            if tuple(row) in avoid:
                objective[i] = worst[i] = float("inf")
        return objective, worst


def _objective(rows: torch.Tensor) -> torch.Tensor:
    """The search objective of sentences from their row residuals (..., L): the mean log residual."""
    return torch.log10(rows.clamp_min(1e-300)).mean(dim=-1)


def coordinate_descent(
    start: list[int],
    options: list[list[int]],
    score: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    sweeps: int,
    stop: Callable[[], bool],
) -> tuple[list[int], float, float]:
    """(sentence, objective, companion score): from ``start``, at each position with options keep the token whose
    variant scores lowest, sweeping until nothing changes, ``sweeps`` are done or ``stop()``.

    ``score(variants)`` gives each candidate sentence's objective and a companion score (carried, not minimised).
    """
    current = list(start)
    value, companion = (float(v[0]) for v in score(torch.tensor([current])))
    for _ in range(sweeps):
        if stop():
            break
        changed = False
        for p, tokens in enumerate(options):
            if len(tokens) < 2:
                continue
            variants = torch.tensor([current] * len(tokens))
            variants[:, p] = torch.tensor(tokens)
            objective, companions = score(variants)
            k = int(objective.argmin())
            if float(objective[k]) < value and tokens[k] != current[p]:
                current[p], value, companion, changed = tokens[k], float(objective[k]), float(companions[k]), True
        if not changed:
            break
    return current, value, companion


def assemble(
    search: SentenceSearch,
    lengths: list[int],
    options_for: Callable[[int, list[Found]], list[list[int]]],
    batch_size: int,
    accepted: list[Found] | None = None,
    quick: bool = False,
    budget: float | None = None,
    confirm: Callable[[Found], bool] | None = None,
    widths: Callable[[int, list[Found]], list[int]] | None = None,
    wide: int | None = None,
    stop_after: int | None = None,
) -> tuple[list[Found], list[Found]]:
    """Find up to ``batch_size`` sentences over the candidate ``lengths`` (best first), after any ``accepted`` ones;
    ``stop_after`` new sentences end the call (the span attack peels them off the update and starts over).

    ``quick``: one pass over the lengths, one descent each among each position's narrow favourites, no
    restarts (finds the easy sentences in seconds). ``budget`` (seconds) bounds the call within the search's time limit.
    ``confirm``: a second test a sentence must also pass (e.g. ``AttentionTest.confirms``). Under a time limit,
    time left after a round goes to further rounds over every length, each with twice the restarts.

    ``options_for(length, accepted)`` gives the allowed tokens per position, best first (the first option is the
    layer-1 favourite, fixed positions have one option). The search tries each position's first ``widths(length,
    accepted)[p]`` (default: ``batch_size``), then its first ``wide`` (default: all), and widens near misses from
    the whole list. Returns (accepted sentences, best rejected attempts).
    """
    accepted = list(accepted or [])
    wanted = batch_size if stop_after is None else min(batch_size, len(accepted) + stop_after)
    rejected: list[Found] = []
    found: set[tuple[int, ...]] = {f.ids for f in accepted}
    stop = math.inf if budget is None else time.perf_counter() + budget

    def over() -> bool:
        return search.expired or time.perf_counter() > stop

    restarts = 0 if quick else search.restarts
    while True:
        # lengths no sentence holds yet come first: each candidate length was seen to end a sentence
        held = {len(f.ids) for f in accepted}
        pending = [n for n in lengths if n not in held] + [n for n in lengths if n in held]
        progress = True
        while len(accepted) < wanted and progress and not over():
            progress = False
            for length in list(pending):
                if len(accepted) >= wanted or over():
                    break
                options = options_for(length, accepted)
                width = widths(length, accepted) if widths is not None else [batch_size] * len(options)
                result = _search_narrow_first(search, options, width, wide, accepted, found, quick, restarts)
                if search.accepts(result, confirm):
                    accepted.append(result)
                    found.add(result.ids)
                    progress = True
                else:
                    rejected.append(result)
                    pending.remove(length)
            if quick:  # one attempt per length: a repeat after a narrow miss elsewhere risks a near-miss sentence
                break
        # time left under a time limit: another round over every length, with twice the restarts
        if quick or len(accepted) >= wanted or over() or math.isinf(search.deadline):
            return accepted, rejected
        restarts = 2 * restarts + 1


def _search_narrow_first(
    search: SentenceSearch,
    options: list[list[int]],
    widths: list[int],
    wide: int | None,
    accepted: list[Found],
    found: set,
    quick: bool,
    restarts: int,
) -> Found:
    """Search among each position's first ``widths[p]`` candidates first (a position holds at most as many true
    tokens as sentences reach it, and near-passing tokens from elsewhere in the batch usually score worse), then
    among the first ``wide`` (``quick``: only the first). ``restarts`` per search; near misses widen from all."""
    taken = [f.ids for f in accepted]
    narrow = [tokens[: max(1, w)] for tokens, w in zip(options, widths, strict=True)]
    broad = [tokens[:wide] for tokens in options]
    result = search.search(_start_avoiding(narrow, taken), narrow, avoid=found, restarts=restarts, reserve=options)
    if result.score <= search.accept or narrow == broad or search.expired or quick:
        return result
    second = search.search(_start_avoiding(broad, taken), broad, avoid=found, restarts=restarts, reserve=options)
    return min(result, second, key=lambda f: f.score)


def _start_avoiding(options: list[list[int]], taken: list[tuple[int, ...]]) -> list[int]:
    """Layer-1 favourites, preferring at each position a token no found sentence uses there."""
    start = []
    for p, tokens in enumerate(options):
        used = {ids[p] for ids in taken if p < len(ids)}
        fresh = [t for t in tokens if t not in used]
        start.append((fresh or tokens)[0])
    return start


def assemble_by_anchors(
    search: SentenceSearch,
    test: AttentionTest,
    anchors: list[tuple[int, int]],
    lengths: list[int],
    options_for: Callable[[int, list[Found]], list[list[int]]],
    batch_size: int,
    budget: float | None = None,
    accepted: list[Found] | None = None,
    confirm: Callable[[Found], bool] | None = None,
) -> list[Found]:
    """Sentences grown around anchors (tokens that occur once in the batch, at their known position), after any
    ``accepted`` ones; ``confirm`` as in ``assemble``. Stops once every length the test can read holds a sentence
    (``lengths`` are the batch's sentence ends, one sentence each unless two share a length).

    ``budget`` (seconds) bounds this phase, leaving the rest of the search's time to the second-layer search.

    Two passes over the anchors, the second with restarts and with the first pass's sentences out of the way. For
    each anchor not yet in a found sentence and each candidate length, coordinate descent picks the tokens of
    the other positions that best explain the attention gradients of the anchors the sentence holds
    (``AttentionTest``); the best sentence is kept when the second layer's span confirms it. Lengths the test
    cannot read (too long for a head) are left to ``assemble``.
    """
    accepted = list(accepted or [])
    deadline = math.inf if budget is None else time.perf_counter() + budget

    def stop() -> bool:
        return search.expired or time.perf_counter() > deadline

    promise: dict[tuple[int, int], float] = {}  # each seed's best residual in the quick pass
    readable = [n for n in lengths if test.usable(n)]

    def done() -> bool:  # a sentence at every length the test can read: the rest are too long for it
        held = {len(f.ids) for f in accepted}
        return len(accepted) >= batch_size or all(n in held for n in readable)

    for restarts in (0, search.restarts):  # a quick pass, then one with restarts once others are found
        # the pass with restarts takes the most promising seeds first (a seed whose sentence is too long for a
        # head, or not among the lengths, stays far from zero)
        for token, position in sorted(anchors, key=lambda seed: promise.get(seed, 0.0)):
            if done() or stop():
                break
            if any(position < len(f.ids) and f.ids[position] == token for f in accepted):
                continue
            best = _grow(
                search, test, (token, position), anchors, lengths, options_for, accepted, batch_size, restarts, stop
            )
            if best is None:
                promise[token, position] = math.inf
                continue
            promise[token, position] = best[0]
            _, worst = search.score(torch.tensor([best[1]]))
            ids = tuple(best[1])
            found = Found(ids, float(worst[0]))
            fresh = all(ids != f.ids for f in accepted)
            if fresh and search.accepts(found, confirm):
                accepted.append(found)
    return accepted


def _grow(
    search: SentenceSearch,
    test: AttentionTest,
    seed: tuple[int, int],
    anchors: list[tuple[int, int]],
    lengths: list[int],
    options_for: Callable[[int, list[Found]], list[list[int]]],
    accepted: list[Found],
    batch_size: int,
    restarts: int,
    stop: Callable[[], bool],
) -> tuple[float, list[int]] | None:
    """(seed residual, sentence) of the best sentence around ``seed``: per length, one descent from the greedy
    (matching-pursuit) sentence among each position's ``batch_size`` favourites that may sit there (a once-seen
    token only at its own position), then among all candidates from there; then restarts on the two most promising
    lengths."""
    token, position = seed
    taken = [f.ids for f in accepted]
    anchor_set = set(anchors)
    once = {t for t, _ in anchors}
    trials: list[tuple[float, list[int], list[list[int]], set[tuple[int, int]]]] = []
    for length in lengths:
        if length <= position + 1 or not test.usable(length) or stop():
            continue
        options = [[t for t in tokens if test.knows(t)] for tokens in options_for(length, accepted)]
        options[position] = [token]
        if not all(options):
            continue
        placed = {(t, p) for t, p in anchors if p < length and t in options[p]}
        # a token seen once sits only at its own position; tokens seen more often may sit anywhere
        possible = [[t for t in tokens if t not in once or (t, p) in anchor_set] for p, tokens in enumerate(options)]
        narrow = [tokens[:batch_size] or options[p][:1] for p, tokens in enumerate(possible)]
        start = test.greedy(token, narrow)
        found = _descend_attention(search, test, seed, placed, narrow, taken, start, restarts=0, stop=stop)
        if found[0] > search.attention_accept:
            wide = _descend_attention(search, test, seed, placed, options, taken, found[1], restarts=0, stop=stop)
            found = min(found, wide)
        if found[0] <= search.attention_accept:
            return found
        trials.append((*found, options, placed))
    if not trials or not restarts:
        return min(trials, key=lambda trial: trial[0])[:2] if trials else None
    best = min(trials, key=lambda trial: trial[0])[:2]
    for _, sentence, options, placed in sorted(trials, key=lambda trial: trial[0])[:2]:
        if stop():
            break
        found = _descend_attention(search, test, seed, placed, options, taken, sentence, restarts=restarts, stop=stop)
        best = min(best, found)
        if best[0] <= search.attention_accept:
            break
    return best


class _AnchorObjective:
    """Mean log attention residual of the anchors a sentence holds at their positions (the seed always)."""

    def __init__(self, test: AttentionTest, seed: tuple[int, int], anchors: set[tuple[int, int]], length: int) -> None:
        self.test = test
        anchors = {(t, p) for t, p in anchors | {seed} if p < length}
        self.tokens = sorted({t for t, _ in anchors})
        self.seed = self.tokens.index(seed[0])
        self.ids = torch.tensor(self.tokens)
        self.where = torch.zeros(len(self.tokens), length, dtype=torch.bool)  # (token, position) is an anchor
        for t, p in anchors:
            self.where[self.tokens.index(t), p] = True

    def __call__(self, sentences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, seed residual) per sentence."""
        residual = self.test.residual(self.tokens, sentences)
        held = ((sentences[:, None, :] == self.ids[None, :, None]) & self.where[None]).any(-1)
        logs = torch.log10(residual.clamp_min(1e-300)).where(held, torch.zeros_like(residual))
        return logs.sum(1) / held.sum(1).clamp_min(1), residual[:, self.seed]


def _descend_attention(
    search: SentenceSearch,
    test: AttentionTest,
    seed: tuple[int, int],
    anchors: set[tuple[int, int]],
    options: list[list[int]],
    taken: list[tuple[int, ...]],
    start: list[int] | None = None,
    *,
    restarts: int,
    stop: Callable[[], bool],
) -> tuple[float, list[int]]:
    """(seed's attention residual, sentence): coordinate descent on the anchors' objective from ``start`` (default:
    the favourites), then
    alternately from random starts and small kicks of the best, until the seed's residual falls below
    ``search.attention_accept``; at most ``restarts`` restarts."""
    objective = _AnchorObjective(test, seed, anchors, len(options))
    free = [p for p, tokens in enumerate(options) if len(tokens) > 1]
    best: tuple[float, float, list[int]] | None = None  # (objective, seed residual, sentence)
    for attempt in range(restarts + 1):
        if attempt == 0 or best is None:
            current = list(start) if start is not None else _start_avoiding(options, taken)
        elif attempt % 2:
            current = [tokens[int(torch.randint(len(tokens), (1,), generator=search.generator))] for tokens in options]
        else:
            current = list(best[2])
            for k in torch.randperm(len(free), generator=search.generator)[: 2 + attempt % 3].tolist():
                tokens = options[free[k]]
                current[free[k]] = tokens[int(torch.randint(len(tokens), (1,), generator=search.generator))]
        current, value, seed_res = coordinate_descent(
            current, options, objective, 4 * search.max_sweeps, stop
        )
        if best is None or value < best[0]:
            best = (value, seed_res, current)
        if best[1] <= search.attention_accept or stop() or not free:
            break
    assert best is not None
    return best[1], best[2]
