"""LAMP-style attack (Balunovic et al. 2022) with candidate constraints: continuous steps, discrete moves, a prior.

Continuous phase: Adam on dummy input embeddings against the gradient distance (cosine, or TAG's L2 + L1), with a
regulariser pulling the dummy rows' mean norm to the mean word-embedding norm, from the best of ``init_samples``
random starts. When a side channel narrows the vocabulary (``constraints``, see ``constraints.py``), each position
is instead a softmax mixture over its candidate tokens' embeddings, so the optimisation never leaves the set.
Every ``discrete_every`` steps the current tokens (nearest allowed neighbour) are improved by discrete moves (swap
two tokens, move a token, move a span, move a prefix to the end; with candidate sets also replace a token by
another candidate; with B > 1 also trade the tokens at one position, or from one position on, with another
sentence). Each candidate batch is scored by its gradient distance (``score_chunk`` candidates at a time
under ``torch.func.vmap``; log10 by default) plus ``prior_weight`` times the language prior's log-perplexity (plus
``coverage_weight`` times the fraction of tokens known to be in the batch that it leaves out); the best is kept.
The answer is the best-scoring token batch seen in any discrete phase; the search stops early once its gradient
distance is below ``stop_distance`` (a batch whose gradient matches to float precision is the batch; 0: never).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from textleak.attacks.base import Progress, Reconstruction
from textleak.attacks.constraints import CONSTRAINTS, ROW_RATIO, Candidates, build_candidates
from textleak.attacks.decode import allowed_tokens, nearest_tokens
from textleak.attacks.loop import LoopConfig, match_gradients
from textleak.attacks.optimization import GradientProblem, OptimizationAttack, TextAttackConfig, cosine_distance
from textleak.models import LoadedModel
from textleak.priors import LanguagePrior, load_prior, mean_negative_log_prob
from textleak.update import Update

#: logit given to a token that a discrete move placed, when positions are mixtures over candidates
PLACED_LOGIT = 5.0
#: a mixture over more candidates than this is no narrowing: positions stay free embeddings
MAX_MIXTURE = 2048
MOVES = ("swap", "move", "span", "prefix", "replace")
#: how the gradient distance enters a candidate's score: log10 (near an exact match a linear distance is too flat
#: for the prior not to outvote it) or linear (LAMP's)
SCORE_SCALES = ("log", "linear")
LOG_FLOOR = 1e-12


@dataclass(frozen=True, kw_only=True)
class LampConfig(TextAttackConfig):
    """Options of the lamp attack on top of the shared optimisation options (all recorded with each result)."""

    distance: str = "cosine"
    optimizer: str = "adam"
    lr: float = 0.01
    iterations: int = 300
    discrete_every: int = 75
    init_samples: int = 16
    norm_weight: float = 1.0
    mixture_lr: float = 0.1
    moves: int = 64
    discrete_rounds: int = 4
    prior: str | None = None
    prior_weight: float = 0.2
    coverage_weight: float = 1.0
    score_scale: str = "log"
    constraints: str = "all"
    span_top_k: int = 8
    position_top_k: int = 3
    row_ratio: float = ROW_RATIO
    score_chunk: int = 4
    stop_distance: float = 1e-9

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score_scale not in SCORE_SCALES:
            raise ValueError(f"score_scale must be one of {SCORE_SCALES}, got {self.score_scale!r}")
        if self.constraints not in CONSTRAINTS:
            raise ValueError(f"constraints must be one of {CONSTRAINTS}, got {self.constraints!r}")
        if self.restarts != 1:
            raise ValueError("lamp starts from the best of init_samples random draws; restarts must be 1")
        for name in ("discrete_every", "init_samples", "moves", "span_top_k", "position_top_k", "score_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if min(self.discrete_rounds, self.norm_weight, self.prior_weight, self.coverage_weight, self.row_ratio) < 0:
            raise ValueError("discrete_rounds, norm_weight, prior_weight, coverage_weight, row_ratio must be >= 0")
        if self.stop_distance < 0:
            raise ValueError(f"stop_distance must be >= 0, got {self.stop_distance!r}")
        if not self.mixture_lr > 0:
            raise ValueError(f"mixture_lr must be > 0, got {self.mixture_lr}")


@dataclass
class Move:
    """A candidate edit of one sequence: its new free tokens and, per slot, the old slot it came from (-1: new)."""

    sequence: int
    tokens: list[int]
    source: list[int]


class SequenceScorer:
    """Gradient distance of whole token batches (vmapped over candidates) plus a weighted prior log-perplexity."""

    def __init__(
        self,
        problem: GradientProblem,
        distance: Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor],
        *,
        prior: LanguagePrior | None,
        prior_weight: float,
        chunk: int,
        required: Sequence[int] = (),
        coverage_weight: float = 0.0,
        scale: str = "log",
    ) -> None:
        self.problem, self.distance, self.prior, self.prior_weight, self.chunk = (
            problem,
            distance,
            prior,
            prior_weight,
            chunk,
        )
        self.required, self.coverage_weight = torch.tensor(list(required), dtype=torch.long), coverage_weight
        self.scale = scale
        self.target = [t.to(torch.float64) for t in problem.target]  # 1 - cos cancels badly in float32
        norm = torch.sqrt(sum((t * t).sum() for t in self.target))  # type: ignore[arg-type]
        self.unit_target = [(t / norm.clamp_min(1e-30)).to(problem.target[0].dtype) for t in self.target]
        self._label_leaves: list[torch.Tensor] = []
        self.params = {n: p.detach() for n, p in zip(problem.names, problem.matched, strict=True)}
        self.scored = 0
        self._prior_cache: dict[tuple[int, ...], float] = {}
        self._distances: dict[tuple[int, ...], float] = {}  # gradient distance per batch under the current labels

    @property
    def label_leaves(self) -> list[torch.Tensor]:
        """The soft-label leaves the gradients are taken with (none when labels are known)."""
        return self._label_leaves

    @label_leaves.setter
    def label_leaves(self, leaves: list[torch.Tensor]) -> None:
        self._label_leaves, self._distances = leaves, {}

    def gradient_distance(self, ids: torch.Tensor) -> float:
        """The gradient distance of one (B, L) batch, reused if this batch was scored under the current labels."""
        key = tuple(ids.flatten().tolist())
        if key not in self._distances:
            self.gradient_terms(ids[None])
        return self._distances[key]

    def content(self, ids: torch.Tensor, row: int) -> tuple[int, ...]:
        """The free tokens of sequence ``row`` of a (B, L) batch."""
        return tuple(int(t) for t in ids[row][self.problem.layout.free[row]])

    def prior_terms(self, batches: torch.Tensor) -> torch.Tensor:
        """Mean prior log-perplexity over each candidate batch's sequences (cached per sequence)."""
        if self.prior is None or self.prior_weight == 0:
            return torch.zeros(len(batches), dtype=torch.float64)
        rows = [[self.content(ids, b) for b in range(ids.shape[0])] for ids in batches]
        missing = list(dict.fromkeys(r for batch in rows for r in batch if r not in self._prior_cache))
        if missing:
            values = mean_negative_log_prob(self.prior, missing)
            self._prior_cache.update(zip(missing, values.tolist(), strict=True))
        return torch.tensor([sum(self._prior_cache[r] for r in batch) / len(batch) for batch in rows])

    def gradient_terms(self, batches: torch.Tensor) -> torch.Tensor:
        """Gradient distance of each (B, L) token batch in ``batches`` (N, B, L)."""
        problem, labels = self.problem, [t.detach() for t in self.label_leaves]
        embeds = problem.table[batches]

        def one(embed: torch.Tensor) -> torch.Tensor:
            grads = torch.func.grad(lambda p: problem.loss(embed, labels, params=p))(self.params)
            return self.compare([grads[n] for n in problem.names])

        with torch.no_grad():
            distances = torch.func.vmap(one, chunk_size=self.chunk)(embeds)
        self._distances.update(zip(map(tuple, batches.flatten(1).tolist()), distances.tolist(), strict=True))
        return distances

    def compare(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The distance of one candidate's gradients to the target.

        Cosine is taken as half the squared distance of the unit vectors: its terms are positive and do not cancel
        near a match (the true batch scores about 1e-13 in float32), so only per-tensor sums need float64, not a
        float64 copy of every gradient."""
        if self.distance is not cosine_distance:
            return self.distance([g.to(torch.float64) for g in grads], self.target)
        norm = torch.sqrt(sum((g * g).sum().to(torch.float64) for g in grads))  # type: ignore[arg-type]
        scale = (1 / norm.clamp_min(1e-30)).to(grads[0].dtype)
        squares = [((g * scale - u) ** 2).sum().to(torch.float64) for g, u in zip(grads, self.unit_target, strict=True)]
        return 0.5 * sum(squares)  # type: ignore[return-value]

    def coverage_terms(self, batches: torch.Tensor) -> torch.Tensor:
        """Fraction of the tokens known to be in the batch that each candidate batch leaves out."""
        if len(self.required) == 0 or self.coverage_weight == 0:
            return torch.zeros(len(batches), dtype=torch.float64)
        present = (batches.reshape(len(batches), -1, 1) == self.required).any(1)
        return (~present).sum(-1).to(torch.float64) / len(self.required)

    def __call__(self, batches: torch.Tensor) -> torch.Tensor:
        """Total score (lower is better) of each candidate batch."""
        self.scored += len(batches)
        gradient = self.gradient_terms(batches)
        if self.scale == "log":
            gradient = torch.log10(gradient.clamp_min(0) + LOG_FLOOR)
        prior = self.prior_weight * self.prior_terms(batches)
        return gradient + prior + self.coverage_weight * self.coverage_terms(batches)


def propose_moves(
    tokens: list[int], sequence: int, count: int, generator: torch.Generator, options: list[list[int]] | None
) -> list[Move]:
    """Up to ``count`` distinct moves of one sequence's free tokens (``options``: candidates per slot).

    When every single replacement by another candidate fits in half the budget, they are all proposed (a
    coordinate-descent sweep); random moves fill the rest. A move that puts a token where its slot's candidates
    exclude it is not proposed: with per-position sets most reorderings are, and scoring them wasted the budget.
    """
    n = len(tokens)
    kinds = [k for k in MOVES if k != "replace" or options is not None] if n >= 2 else ["replace"]
    if options is None and n < 2:
        return []
    seen, moves = {tuple(tokens)}, []
    allowed = None if options is None else [set(o) for o in options]
    if options is not None:
        sweep = [(i, t) for i in range(n) for t in options[i] if t != tokens[i]]
        if len(sweep) <= count // 2:
            for i, t in sweep:
                new = [*tokens[:i], t, *tokens[i + 1 :]]
                seen.add(tuple(new))
                moves.append(Move(sequence, new, [*range(i), -1, *range(i + 1, n)]))
    for _ in range(count * 4):
        if len(moves) >= count:
            break
        kind = kinds[int(torch.randint(len(kinds), (1,), generator=generator))]
        order = list(range(n))
        new = list(tokens)
        if kind == "replace":
            i = int(torch.randint(n, (1,), generator=generator))
            choices = [t for t in options[i] if t != tokens[i]]  # type: ignore[index]
            if not choices:
                continue
            new[i] = choices[int(torch.randint(len(choices), (1,), generator=generator))]
            order[i] = -1
        else:
            i, j = (int(x) for x in torch.randint(n, (2,), generator=generator))
            if kind == "swap":
                order[i], order[j] = order[j], order[i]
            elif kind == "move":
                order.insert(j, order.pop(i))
            elif kind == "span":
                start, stop = min(i, j), max(i, j) + 1
                part, rest = order[start:stop], order[:start] + order[stop:]
                at = int(torch.randint(len(rest) + 1, (1,), generator=generator))
                order = rest[:at] + part + rest[at:]
            else:
                cut = max(i, 1)
                order = order[cut:] + order[:cut]
            new = [tokens[k] for k in order]
            if allowed is not None and any(t not in allowed[k] for k, t in enumerate(new)):
                continue
        if tuple(new) not in seen:
            seen.add(tuple(new))
            moves.append(Move(sequence, new, order))
    return moves


def propose_exchanges(
    current: torch.Tensor, row: int, free: torch.Tensor, count: int, generator: torch.Generator
) -> list[list[Move]]:
    """Up to ``count`` distinct edits that trade tokens between sequence ``row`` and another at the same positions:
    one position, or every shared position from one on (a crossover). Each edit is one Move per sequence.

    With B > 1 the position channel says which tokens sit at a position but not in which sentence, so the errors it
    leaves are tokens in the wrong sentence at the right position, which moves within one sentence cannot fix.
    """
    batch = current.shape[0]
    seen, edits = set(), []
    for _ in range(count * 4):
        if len(edits) >= count:
            break
        other = int(torch.randint(batch - 1, (1,), generator=generator))
        other += other >= row
        shared = (free[row] & free[other]).nonzero().flatten().tolist()
        if not shared:
            continue
        start = shared[int(torch.randint(len(shared), (1,), generator=generator))]
        crossover = bool(torch.randint(2, (1,), generator=generator))
        positions = [p for p in shared if p >= start] if crossover else [start]
        if (other, tuple(positions)) in seen or all(current[row, p] == current[other, p] for p in positions):
            continue
        seen.add((other, tuple(positions)))
        edit = []
        for mine, theirs in ((row, other), (other, row)):
            slots = free[mine].nonzero().flatten().tolist()
            tokens = [int(current[theirs, p] if p in positions else current[mine, p]) for p in slots]
            edit.append(Move(mine, tokens, [-1 if p in positions else k for k, p in enumerate(slots)]))
        edits.append(edit)
    return edits


def refine_tokens(
    ids: torch.Tensor,
    scorer: Callable[[torch.Tensor], torch.Tensor],
    free: torch.Tensor,
    *,
    rounds: int,
    moves: int,
    generator: torch.Generator,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, list[Move]]:
    """Greedy discrete search from the (B, L) token batch ``ids``: each round scores ``moves`` random edits of one
    sequence (round robin; with B > 1 half of them trade tokens with another sequence) and keeps the best if it
    beats the current batch. Returns the batch, its score, and the accepted moves in order."""
    current, best = ids.clone(), float(scorer(ids[None])[0])
    accepted: list[Move] = []
    batch = ids.shape[0]
    for step in range(rounds):
        row = step % batch
        slots = free[row].nonzero().flatten()
        tokens = [int(t) for t in current[row, slots]]
        options = None
        if allowed is not None:
            options = [allowed[row, int(p)].nonzero().flatten().tolist() for p in slots]
        own = moves - moves // 2 if batch > 1 else moves
        edits = [[move] for move in propose_moves(tokens, row, own, generator, options)]
        if batch > 1:
            edits += propose_exchanges(current, row, free, moves - own, generator)
        if not edits:
            continue
        candidates = current.expand(len(edits), *current.shape).clone()
        for k, edit in enumerate(edits):
            for move in edit:
                candidates[k, move.sequence, free[move.sequence]] = torch.tensor(move.tokens)
        scores = scorer(candidates)
        k = int(scores.argmin())
        if float(scores[k]) < best:
            best, current = float(scores[k]), candidates[k]
            accepted.extend(edits[k])
    return current, best, accepted


class LampAttack(OptimizationAttack):
    """LAMP: continuous embedding steps alternated with discrete moves scored by gradient distance and a prior."""

    name = "lamp"
    config: LampConfig

    def __init__(self, **options: Any) -> None:
        self.config = LampConfig(**options)
        self._priors: dict[str, LanguagePrior] = {}

    def prior_for(self, target: LoadedModel) -> LanguagePrior | None:
        """The configured prior over the target's tokenizer (built once per attack object)."""
        spec = self.config.prior
        if spec is None or spec == "none":
            return None
        if spec not in self._priors:
            self._priors[spec] = load_prior(spec, target.tokenizer)
        return self._priors[spec]

    def setup(self, update: Update, target: LoadedModel) -> tuple[GradientProblem, Candidates, SequenceScorer]:
        """The matching problem, the candidate sets the constraints give, and the sequence scorer."""
        config = self.config
        problem = self.prepare(update, target)
        base = allowed_tokens(
            target.tokenizer, problem.table.shape[0], candidates=config.candidates, allow_mask=problem.task == "mlm"
        )
        candidates = build_candidates(
            update,
            target.model,
            problem.layout,
            base,
            config.constraints,
            row_ratio=config.row_ratio,
            top_k=config.span_top_k,
            position_top_k=config.position_top_k,
        )
        if candidates.allowed is None:
            candidates.allowed = base.expand(*problem.layout.free.shape, base.shape[0])
            candidates.details["unconstrained"] = True
        scorer = SequenceScorer(
            problem,
            self._distance(),
            prior=self.prior_for(target),
            prior_weight=config.prior_weight,
            chunk=config.score_chunk,
            required=candidates.required,
            coverage_weight=config.coverage_weight,
            scale=config.score_scale,
        )
        return problem, candidates, scorer

    def refine(self, update: Update, target: LoadedModel, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Only the discrete phase, started from ``token_ids`` (one full sequence per batch row, specials included)."""
        problem, candidates, scorer = self.setup(update, target)
        generator = torch.Generator().manual_seed(self.config.seed)
        scorer.label_leaves = problem.init_labels(generator)
        start = problem.layout.fixed_ids.clone()
        for row, ids in enumerate(token_ids):
            start[row, : len(ids)] = torch.tensor(list(ids))
        ids, _, _ = refine_tokens(
            start,
            scorer,
            problem.layout.free,
            rounds=self.config.discrete_rounds,
            moves=self.config.moves,
            generator=generator,
            allowed=self._replace_options(candidates),
        )
        return problem.layout.fill(ids)

    def reconstruct(self, update: Update, target: LoadedModel, *, progress: Progress | None = None) -> Reconstruction:
        config, tokenizer = self.config, target.tokenizer
        clock = time.perf_counter()
        problem, candidates, scorer = self.setup(update, target)
        layout, allowed = problem.layout, candidates.allowed
        assert allowed is not None
        setup_s = time.perf_counter() - clock
        widest = int(allowed[layout.free].sum(-1).max())
        mixture = not candidates.details.get("unconstrained") and widest <= MAX_MIXTURE
        param = _Mixture(problem, candidates, config) if mixture else _FreeEmbeddings(problem, allowed, config)
        generator = torch.Generator().manual_seed(config.seed)
        distance = self._distance()

        def objective_gradients(leaves: list[torch.Tensor], create_graph: bool = True) -> Sequence[torch.Tensor]:
            return problem.gradients(param.embeds(leaves[0]), leaves[1:], create_graph=create_graph)

        clock = time.perf_counter()
        init_losses = []
        state: list[torch.Tensor] = []
        for sample in range(config.init_samples):
            leaves = [param.init(generator, config.init_scale), *problem.init_labels(generator)]
            if sample == 0 and candidates.start is not None:  # the side channel's guess competes with the draws
                leaves[0] = param.placed(leaves[0], candidates.start)
            leaves = [t.requires_grad_(True) for t in leaves]
            loss = float(distance(objective_gradients(leaves, create_graph=False), problem.target))
            init_losses.append(loss)
            if loss <= min(init_losses):
                state = [t.detach() for t in leaves]
        init_s = time.perf_counter() - clock

        loop_config = LoopConfig(
            iterations=1,
            optimizer=config.optimizer,
            lr=config.mixture_lr if mixture else config.lr,
            seed=config.seed,
            grad_clip=config.grad_clip,
            line_search=config.line_search,
        )
        segments = _segments(config.iterations, config.discrete_every)
        curve: list[float] = []
        best_ids, best_score = layout.fixed_ids, float("inf")
        if candidates.start is not None:  # the side channel's guess is an answer unless the search beats it
            scorer.label_leaves = state[1:]
            best_ids = torch.where(layout.free, candidates.start, layout.fixed_ids)
            best_score = float(scorer(best_ids[None])[0])
        accepted_moves, continuous_s, discrete_s, warnings = 0, 0.0, 0.0, list(candidates.warnings)
        replace_options = self._replace_options(candidates)
        done = 0
        matched = best_score < float("inf") and scorer.gradient_distance(best_ids) < config.stop_distance
        for index, length in enumerate(segments):
            if matched:
                break

            def report(step: int, total: int, offset: int = done) -> None:
                if progress is not None:
                    progress(offset + step, config.iterations)

            result = match_gradients(
                init=lambda _generator, start=state: start,
                dummy_gradients=objective_gradients,
                target=problem.target,
                distance=distance,
                config=dataclasses.replace(loop_config, iterations=length, seed=config.seed + index),
                regulariser=param.regulariser,
                progress=report,
            )
            done += length
            continuous_s += result.seconds
            curve += result.curve
            warnings += result.warnings
            state = [t.detach() for t in result.leaves]
            clock = time.perf_counter()
            scorer.label_leaves = state[1:]
            ids = torch.where(layout.free, param.decode(state[0]), layout.fixed_ids)
            ids, score, moves = refine_tokens(
                ids,
                scorer,
                layout.free,
                rounds=config.discrete_rounds,
                moves=config.moves,
                generator=generator,
                allowed=replace_options,
            )
            accepted_moves += len(moves)
            state[0] = param.place(state[0], ids, moves)
            if score < best_score:
                best_ids, best_score = ids, score
                matched = scorer.gradient_distance(best_ids) < config.stop_distance
            discrete_s += time.perf_counter() - clock

        token_ids = layout.fill(best_ids)
        total_s = setup_s + init_s + continuous_s + discrete_s
        final_distance = scorer.gradient_distance(best_ids)
        return Reconstruction(
            attack=self.name,
            token_ids=token_ids,
            texts=[tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids],
            loss_curve=curve,
            timings={
                "total_s": total_s,
                "per_sentence_s": total_s / layout.fixed_ids.shape[0],
                "setup_s": setup_s,
                "init_s": init_s,
                "continuous_s": continuous_s,
                "discrete_s": discrete_s,
                "iterations": done,
                "per_iteration_s": continuous_s / max(done, 1),
                "candidates_scored": scorer.scored,
                "per_candidate_s": discrete_s / max(scorer.scored, 1),
            },
            config=config.to_dict(),
            warnings=problem.warnings + warnings,
            details={
                "final_distance": final_distance,
                "final_score": best_score,
                "init_distances": init_losses,
                "matched_parameters": len(problem.names),
                "labels": problem.plan.source,
                "parametrisation": "mixture" if mixture else "embeddings",
                "candidate_sets": candidates.details,
                "accepted_moves": accepted_moves,
                "stopped_early": matched,
                "prior": config.prior,
            },
        )

    @staticmethod
    def _replace_options(candidates: Candidates) -> torch.Tensor | None:
        """Candidate sets for the replace move, only when a constraint made them small."""
        if candidates.details.get("unconstrained") or candidates.allowed is None:
            return None
        return candidates.allowed


def _segments(iterations: int, every: int) -> list[int]:
    """Continuous-phase lengths: ``every`` steps each, the remainder last."""
    full, rest = divmod(iterations, every)
    return [every] * full + ([rest] if rest else [])


class _FreeEmbeddings:
    """Positions are free dummy embeddings, decoded by nearest allowed neighbour; LAMP's norm regulariser."""

    def __init__(self, problem: GradientProblem, allowed: torch.Tensor, config: LampConfig) -> None:
        self.problem, self.allowed, self.config = problem, allowed, config
        usable = problem.table[allowed.any((0, 1))]
        self.mean_norm = float(usable.norm(dim=-1).mean())

    def init(self, generator: torch.Generator, scale: float) -> torch.Tensor:
        table = self.problem.table
        return torch.randn(*self.problem.layout.fixed_ids.shape, table.shape[1], generator=generator) * (
            float(table.std()) * scale
        )

    def embeds(self, leaf: torch.Tensor) -> torch.Tensor:
        return self.problem.embed(leaf)

    def regulariser(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        norms = leaves[0][self.problem.layout.free].norm(dim=-1)
        return self.config.norm_weight * (norms.mean() - self.mean_norm) ** 2

    def decode(self, leaf: torch.Tensor) -> torch.Tensor:
        return nearest_tokens(leaf, self.problem.table, self.allowed, metric=self.config.decode)

    def placed(self, leaf: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``leaf`` with the free positions set to the rows of tokens ``ids`` (B, L)."""
        return torch.where(self.problem.layout.free[..., None], self.problem.table[ids], leaf)

    def place(self, leaf: torch.Tensor, ids: torch.Tensor, moves: list[Move]) -> torch.Tensor:
        """Apply accepted moves to the embeddings: permuted rows follow their token, new tokens get their row."""
        leaf = leaf.clone()
        for move in moves:
            slots = self.problem.layout.free[move.sequence].nonzero().flatten()
            old = leaf[move.sequence, slots].clone()
            for k, src in enumerate(move.source):
                leaf[move.sequence, slots[k]] = self.problem.table[move.tokens[k]] if src < 0 else old[src]
        return leaf


class _Mixture:
    """Positions are softmax mixtures over their candidate tokens' embeddings; decoded by the largest weight."""

    def __init__(self, problem: GradientProblem, candidates: Candidates, config: LampConfig) -> None:
        self.problem, self.config = problem, config
        self.ids, self.valid = candidates.padded(problem.layout)
        self.rows = problem.table[self.ids]  # (B, L, C, d)
        self.required = torch.tensor(candidates.required, dtype=torch.long)

    def init(self, generator: torch.Generator, scale: float) -> torch.Tensor:
        return torch.randn(*self.ids.shape, generator=generator) * scale

    def weights(self, leaf: torch.Tensor) -> torch.Tensor:
        weights = leaf.masked_fill(~self.valid, -torch.inf).softmax(-1)
        return torch.nan_to_num(weights)  # positions without candidates (special slots) have no weight

    def embeds(self, leaf: torch.Tensor) -> torch.Tensor:
        return self.problem.embed((self.weights(leaf)[..., None] * self.rows).sum(-2))

    def regulariser(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        """Coverage: every token known to be in the batch should get a total weight of at least one."""
        if len(self.required) == 0 or self.config.coverage_weight == 0:
            return torch.zeros(())
        weights = self.weights(leaves[0]) * self.problem.layout.free[..., None]
        # a required token may be no position's candidate (the side channels disagree): it counts as missing
        size = max(int(self.ids.max()), int(self.required.max())) + 1
        counts = torch.zeros(size).scatter_add(0, self.ids.flatten(), weights.flatten())
        missing = (1 - counts[self.required]).clamp_min(0).sum() / len(self.required)
        return self.config.coverage_weight * missing

    def decode(self, leaf: torch.Tensor) -> torch.Tensor:
        best = leaf.masked_fill(~self.valid, -torch.inf).argmax(-1, keepdim=True)
        return self.ids.gather(-1, best)[..., 0]

    def place(self, leaf: torch.Tensor, ids: torch.Tensor, moves: list[Move]) -> torch.Tensor:
        """Positions whose token a move changed get a confident weight on that token (where it is a candidate)."""
        if not moves:
            return leaf
        return self.placed(leaf, ids, (ids != self.decode(leaf)) & self.problem.layout.free)

    def placed(self, leaf: torch.Tensor, ids: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """A confident weight on token ``ids`` (B, L) at the positions ``where`` (default: every free one)."""
        leaf = leaf.clone()
        for b, p in (self.problem.layout.free if where is None else where).nonzero().tolist():
            hit = (self.ids[b, p] == ids[b, p]) & self.valid[b, p]
            if hit.any():
                leaf[b, p] = torch.where(hit, PLACED_LOGIT, 0.0)
        return leaf
