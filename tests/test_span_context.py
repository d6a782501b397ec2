"""The first attention layer's context span: whole sentences proposed around once-seen tokens."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from textleak.attacks import span_context
from textleak.attacks.span import SpanAttack
from textleak.attacks.span_assembly import FirstLayer, Found, SentenceSearch
from textleak.attacks.span_context import (
    CLEAR_EXACT,
    FIRST_STEPS,
    REFINED_WORSE,
    SPARE_LENGTHS,
    Simplices,
    _rounded,
    assemble_by_context,
    context_solver,
    solve_on_simplices,
)
from textleak.attacks.span_scoring import embedding_parts, qkv_gradient_names, span_basis, stacked_gradient
from textleak.client import simulate_client
from textleak.models import load_model
from textleak.update import Update

SENTENCES = [
    "the cat sat on the mat near the old door.",
    "a very good movie indeed, with a fine cast",
    "dogs bark at night when the moon is full",
    "rain fell all week on the quiet little town",
]


@pytest.fixture(scope="module")
def mini():
    """The packaged MiniLM: its trained attention sets tokens apart by position, where a random model's near-uniform
    attention makes a sentence's context rows nearly blind to word order."""
    return load_model("default", head="classification", seed=0)


def _solver(target, update, truth, distractors: int = 3):
    """A solver whose candidates per position are the batch's tokens there plus ``distractors`` tokens from elsewhere
    in the batch; tokens seen more than once may sit anywhere."""
    tok = target.tokenizer
    count = Counter(t for ids in truth.input_ids for t in ids)
    bag = sorted(count)
    options = []
    for p in range(update.metadata.seq_len):
        here = {ids[p] for ids in truth.input_ids if p < len(ids)}
        others = [t for t in bag if t not in here and t != tok.cls_token_id][p : p + distractors]
        options.append(sorted(here | set(others) | ({tok.sep_token_id} if p else {tok.cls_token_id})))
    anywhere = [t for t, c in count.items() if c > 1 and t not in tok.all_special_ids]
    return context_solver(target.model, update, embedding_parts(target.model), options, 0, anywhere), count


def _second_layer_search(target, update) -> SentenceSearch:
    """The sentence search against the update's second-layer span."""
    span2 = span_basis(stacked_gradient(update, qkv_gradient_names(target.model, 1)))
    return SentenceSearch(FirstLayer(target.model), span2, accept=1e-4, seed=0)


def _batch_tokens(truth, tok):
    """``options_for`` allowing at each position the batch's tokens there."""
    special = set(tok.all_special_ids)

    def options_for(length, accepted):
        middle = [sorted({ids[p] for ids in truth.input_ids if p < len(ids)} - special) for p in range(1, length - 1)]
        return [[tok.cls_token_id], *middle, [tok.sep_token_id]]

    return options_for


def test_a_once_seen_token_gets_its_own_sentence_proposed(mini):
    update, truth = simulate_client(mini, SENTENCES, task="classification", seed=0, reveal=())
    solver, count = _solver(mini, update, truth)
    assert solver is not None
    tok = mini.tokenizer
    for ids in truth.input_ids:
        anchor = next((t, p) for p, t in enumerate(ids) if count[t] == 1 and 0 < p < len(ids) - 1)
        residual, sentence = solver.propose(anchor, len(ids), tok.cls_token_id, tok.sep_token_id)
        assert sentence == list(ids)
        assert residual < 1e-3
        wrong = solver.propose(anchor, len(ids) - 1, tok.cls_token_id, tok.sep_token_id)
        assert wrong is not None and wrong[0] > 10 * residual


def test_crowding_says_in_advance_which_first_solves_are_capped(mini, monkeypatch):
    """``crowding`` (free unknowns per equation) says in advance which first solves are capped: over lists with far
    more candidates than one anchor's equations, each position keeps its best-ranked ones, as many as fit, and the
    solve still lands on the sentence when those hold the truth; tight lists are solved whole."""
    update, truth = simulate_client(mini, SENTENCES, task="classification", seed=0, reveal=())
    tok = mini.tokenizer
    count = Counter(t for ids in truth.input_ids for t in ids)
    bag = sorted(count)
    here = [sorted({ids[p] for ids in truth.input_ids if p < len(ids)}) for p in range(update.metadata.seq_len)]
    tight = [h + [tok.sep_token_id] if p else [tok.cls_token_id] for p, h in enumerate(here)]
    wide = [h + [t for t in bag[:40] if t not in h] if p else h for p, h in enumerate(tight)]  # the truth first
    ids = truth.input_ids[0]
    anchor = next((t, p) for p, t in enumerate(ids) if count[t] == 1 and 0 < p < len(ids) - 1)
    parts = embedding_parts(mini.model)
    loose, solver = (context_solver(mini.model, update, parts, lists, 0, []) for lists in (wide, tight))
    assert loose is not None and solver is not None
    equations = solver.off.shape[1]
    monkeypatch.setattr(span_context, "UNDERDETERMINED", 2 * solver.crowding(len(ids)))  # room for the truth and more
    assert loose.crowding(len(ids)) > span_context.UNDERDETERMINED > solver.crowding(len(ids))
    capped = loose.first_solve(anchor, len(ids), tok.cls_token_id, tok.sep_token_id)
    assert capped is not None and len(capped.live) - len(ids) <= span_context.UNDERDETERMINED * equations
    kept = Counter(int(p) for p in loose.position[capped.live])
    assert max(kept.values()) < max(len(wide[p]) for p in range(len(ids)))  # capped, and evenly
    frame = {tok.cls_token_id, tok.sep_token_id}
    for p in range(1, len(ids) - 1):  # each position keeps a prefix of its ranked list (the frame's tokens aside)
        if p != anchor[1]:
            ranked = [t for t in wide[p] if t not in frame]
            assert [loose.occurrences[int(j)][0] for j in capped.live if loose.position[j] == p] == ranked[: kept[p]]
    assert loose.proposal(capped)[1] == list(ids)  # priced and refined, as the context phase does
    start = solver.first_solve(anchor, len(ids), tok.cls_token_id, tok.sep_token_id)
    assert start is not None and torch.equal(start.live, (start.allowed & solver.narrow).nonzero().flatten())
    assert solver.rounded(start) == list(ids)
    # the wide solver restricted to the tight lists is the tight solver, without building it again
    narrowed = loose.restricted(tight)
    assert narrowed.occurrences == solver.occurrences and torch.equal(narrowed.narrow, solver.narrow)
    assert np.allclose(narrowed.off, solver.off, atol=1e-12) and torch.allclose(narrowed.keys, solver.keys)
    again = narrowed.first_solve(anchor, len(ids), tok.cls_token_id, tok.sep_token_id)
    assert again is not None and math.isclose(again.residual, start.residual, rel_tol=1e-9, abs_tol=1e-12)
    assert narrowed.crowding(len(ids)) == solver.crowding(len(ids))
    with pytest.raises(ValueError, match="does not"):
        solver.restricted(wide)


def test_an_anchor_that_is_no_candidate_gets_no_proposal(mini):
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    solver, _ = _solver(mini, update, truth)
    tok = mini.tokenizer
    assert solver.propose((7592, 2), len(truth.input_ids[0]), tok.cls_token_id, tok.sep_token_id) is None
    assert solver.propose((truth.input_ids[0][1], 1), 1, tok.cls_token_id, tok.sep_token_id) is None


def test_no_solver_without_the_output_projection_gradient(mini):
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    kept = {n: g for n, g in update.gradients.items() if "layer.0.attention.output.dense" not in n}
    solver, _ = _solver(mini, Update(gradients=kept, metadata=update.metadata), truth)
    assert solver is None


def test_a_batch_of_four_is_recovered_from_context_proposals(mini):
    update, truth = simulate_client(mini, SENTENCES, task="classification", seed=0, reveal=())
    result = SpanAttack(quick=False, seed=0).reconstruct(update, mini)
    assert sorted(map(tuple, result.token_ids)) == sorted(map(tuple, truth.input_ids))
    assert result.details["context_sentences"] >= 3
    assert "context" in result.timings


def test_a_sentence_whose_end_the_pairing_missed_is_found_at_a_spare_length(mini):
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    solver, count = _solver(mini, update, truth)
    tok = mini.tokenizer
    search, options_for = _second_layer_search(mini, update), _batch_tokens(truth, tok)
    target = list(truth.input_ids[0])
    anchors = [(t, p) for p, t in enumerate(target) if count[t] == 1 and 0 < p < len(target) - 1][:2]
    wrong_end = next(n for n in range(len(target) - 1, 3, -1) if n not in {len(ids) for ids in truth.input_ids})
    missed = assemble_by_context(search, solver, anchors, [wrong_end], options_for, 1, first=tok.cls_token_id,
                                 last=tok.sep_token_id)
    assert missed == []
    found = assemble_by_context(search, solver, anchors, [wrong_end], options_for, 1, first=tok.cls_token_id,
                                last=tok.sep_token_id, spare=[3, len(target)])
    assert [list(f.ids) for f in found] == [target]


def test_a_length_beyond_the_spare_ones_is_found_by_screening_every_candidate_length(mini):
    """The pairing's end and the first spare lengths are all wrong (as at B=8, where the ends hold few true
    lengths): quick solves over every other candidate length rank the true one and its proposal is found."""
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    solver, count = _solver(mini, update, truth)
    tok = mini.tokenizer
    target = list(truth.input_ids[0])
    anchors = [(t, p) for p, t in enumerate(target) if count[t] == 1 and 0 < p < len(target) - 1][:1]
    others = [n for n in range(5, update.metadata.seq_len + 1) if n not in {len(ids) for ids in truth.input_ids}]
    spare = [*others[1 : 1 + SPARE_LENGTHS], len(target), *others[1 + SPARE_LENGTHS :]]
    found = assemble_by_context(_second_layer_search(mini, update), solver, anchors, others[:1],
                                _batch_tokens(truth, tok), 1, first=tok.cls_token_id, last=tok.sep_token_id,
                                spare=spare)
    assert [list(f.ids) for f in found] == [target]


def test_two_sentences_of_one_length_are_both_proposed_beside_a_spurious_end(mini):
    """Ends are distinct lengths, so a length two sentences share is held after the first: the second sentence's
    anchors must still try it, not only the unheld (here spurious) end."""
    pair = [SENTENCES[2], SENTENCES[3]]  # 11 tokens each
    update, truth = simulate_client(mini, pair, task="classification", seed=0, reveal=())
    assert len(truth.input_ids[0]) == len(truth.input_ids[1])
    solver, count = _solver(mini, update, truth)
    tok = mini.tokenizer
    span2 = span_basis(stacked_gradient(update, qkv_gradient_names(mini.model, 1)))
    search = SentenceSearch(FirstLayer(mini.model), span2, accept=1e-4, seed=0)
    special = set(tok.all_special_ids)
    anchors = [
        next((t, p) for p, t in enumerate(ids) if count[t] == 1 and 0 < p < len(ids) - 1) for ids in truth.input_ids
    ]

    def options_for(length, accepted):  # the batch's tokens at each position
        middle = [sorted({ids[p] for ids in truth.input_ids if p < len(ids)} - special) for p in range(1, length - 1)]
        return [[tok.cls_token_id], *middle, [tok.sep_token_id]]

    length = len(truth.input_ids[0])
    found = assemble_by_context(search, solver, anchors, [length, length - 3], options_for, 2,
                                first=tok.cls_token_id, last=tok.sep_token_id)
    assert sorted(f.ids for f in found) == sorted(map(tuple, truth.input_ids))


def test_a_true_token_the_narrow_options_lack_is_drawn_from_the_reserve(mini):
    """The proposal and the narrow options both miss one true token; the search widens to it from the reserve."""
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    tok = mini.tokenizer
    target = list(truth.input_ids[0])
    count = Counter(t for ids in truth.input_ids for t in ids)
    once = [p for p in range(1, len(target) - 1) if count[target[p]] == 1]
    anchors, lacking = [(target[p], p) for p in once[:2]], once[-1]
    special = set(tok.all_special_ids)

    def reserve_for(length, accepted):  # the batch's tokens at each position
        middle = [sorted({ids[p] for ids in truth.input_ids if p < len(ids)} - special) for p in range(1, length - 1)]
        return [[tok.cls_token_id], *middle, [tok.sep_token_id]]

    def options_for(length, accepted):  # the same, less the true token at one position
        options = reserve_for(length, accepted)
        options[lacking] = [t for t in options[lacking] if t != target[lacking]] or [tok.unk_token_id]
        return options

    solve_options = options_for(update.metadata.seq_len, [])
    anywhere = [t for t, c in count.items() if c > 1 and t not in special]
    solver = context_solver(mini.model, update, embedding_parts(mini.model), solve_options, 0, anywhere)
    span2 = span_basis(stacked_gradient(update, qkv_gradient_names(mini.model, 1)))
    search = SentenceSearch(FirstLayer(mini.model), span2, accept=1e-4, seed=0)

    def run(reserve):
        return assemble_by_context(search, solver, anchors, [len(target)], options_for, 1, first=tok.cls_token_id,
                                   last=tok.sep_token_id, reserve_for=reserve)

    assert run(None) == []
    assert [list(f.ids) for f in run(reserve_for)] == [target]


def test_a_refinement_that_inflates_the_residual_gives_way_to_the_first_solve(mini):
    update, truth = simulate_client(mini, SENTENCES, task="classification", seed=0, reveal=())
    solver, count = _solver(mini, update, truth)
    tok = mini.tokenizer
    ids = list(truth.input_ids[2])
    anchor = next((t, p) for p, t in enumerate(ids) if count[t] == 1 and 0 < p < len(ids) - 1)
    start = solver.first_solve(anchor, len(ids), tok.cls_token_id, tok.sep_token_id)
    residual, sentence = solver.refine(start)
    assert residual <= REFINED_WORSE * start.residual and sentence == ids  # a good refinement is kept
    # the same first solve claiming a far tighter fit: the refinement's residual now exceeds it over 3x
    tight = replace(start, residual=residual / (10 * REFINED_WORSE))
    assert solver.refine(tight)[0] == tight.residual  # the first solve's own answer comes back
    loose = replace(start, residual=math.inf)  # no fit at all: the refinement is kept
    assert solver.refine(loose)[0] == pytest.approx(residual, rel=1e-6)


def test_pricing_adds_a_repeated_token_the_narrow_lists_lack_where_it_sits(mini):
    """As the pairing does, "the" (five times in the batch) is left off the narrow lists at its positions and only
    allowed anywhere: the first solve cannot place it and misses the sentence; pricing adds exactly those
    occurrences and the solve lands on the sentence."""
    update, truth = simulate_client(mini, SENTENCES, task="classification", seed=0, reveal=())
    tok = mini.tokenizer
    the = tok.convert_tokens_to_ids("the")
    solver, count = _solver(mini, update, truth)
    narrow_the = solver.narrow & (solver.token == the)
    ids = list(truth.input_ids[0])
    held = [p for p, t in enumerate(ids) if t == the]
    assert count[the] == 5 and len(held) == 3 and bool(narrow_the[[solver.index[(the, p)] for p in held]].all())
    solver.narrow &= solver.token != the  # the pairing's blind spot
    anchor = next((t, p) for p, t in enumerate(ids) if count[t] == 1 and 0 < p < len(ids) - 1)
    start = solver.first_solve(anchor, len(ids), tok.cls_token_id, tok.sep_token_id)
    assert _rounded(start.m, solver.position[start.live], start.live, len(ids), solver.occurrences) != ids
    assert not start.priced
    priced = solver.price(start)
    added = {solver.occurrences[int(j)] for j in priced.live[len(start.live):]}
    assert {(the, p) for p in held} <= added and priced.priced and priced.residual < start.residual
    assert _rounded(priced.m, solver.position[priced.live], priced.live, len(ids), solver.occurrences) == ids
    assert solver.price(priced) is priced  # priced once


def test_the_projection_onto_each_positions_simplex_matches_a_slow_reference():
    gen = np.random.default_rng(0)
    at = gen.integers(0, 6, 40)
    at[:6] = np.arange(6)  # every position holds a candidate
    v = gen.standard_normal(40) * 2
    out = Simplices(at, 6).project(v)
    for position in range(6):
        group = v[at == position]
        low, high = group.min() - 1, group.max()
        for _ in range(200):  # bisection on the shift that makes the clipped weights sum to one
            mid = (low + high) / 2
            low, high = (mid, high) if np.maximum(group - mid, 0).sum() > 1 else (low, mid)
        np.testing.assert_allclose(out[at == position], np.maximum(group - low, 0), atol=1e-9)
    assert out.min() >= 0 and np.allclose(np.bincount(at, weights=out), 1.0)


def test_the_membership_solve_lands_exactly_on_a_planted_sentence_from_fewer_equations_than_unknowns():
    """12 positions x 8 candidates (84 free unknowns) against 60 equations that the planted 0/1 sentence solves:
    equality-constrained least squares has a whole space of exact solutions; the non-negative solve (with its
    rounding) returns exactly the sentence."""
    gen = np.random.default_rng(0)
    length, per, equations = 12, 8, 60
    at = np.repeat(np.arange(length), per)
    truth = np.zeros(length * per)
    truth[np.arange(length) * per + gen.integers(0, per, length)] = 1.0
    basis = np.linalg.qr(np.column_stack([truth, gen.standard_normal((len(at), len(at) - 1))]))[0]
    design = basis[:, 1 : 1 + equations].T  # orthonormal rows, all orthogonal to the planted membership
    simplices = Simplices(at, length)
    found = simplices.project(np.full(len(at), 1.0 / per))
    for _ in range(FIRST_STEPS):  # as the solve's alternation calls it
        found = solve_on_simplices(design.T @ design, found, simplices)
    assert np.array_equal(found, truth)
    sums = np.eye(length)[at]
    system = np.block([[design.T @ design, sums], [sums.T, np.zeros((length, length))]])
    plain = np.linalg.lstsq(system, np.concatenate([np.zeros(len(at)), np.ones(length)]), rcond=None)[0][: len(at)]
    assert np.abs(design @ plain).max() < 1e-8 and np.abs(plain - truth).max() > 0.1


def test_a_sentence_among_many_distractors_per_position_is_still_proposed(mini):
    """45 extra vocabulary tokens at every position: more free unknowns than the span's equations (the old solve
    skipped such anchors), yet the sentence comes back exactly."""
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    tok = mini.tokenizer
    count = Counter(t for ids in truth.input_ids for t in ids)
    gen = np.random.default_rng(1)
    options = []
    for p in range(update.metadata.seq_len):
        here = {ids[p] for ids in truth.input_ids if p < len(ids)}
        extra = {int(t) for t in gen.integers(2000, 20000, 45)} if p else set()
        options.append(sorted(here | extra | ({tok.sep_token_id} if p else {tok.cls_token_id})))
    anywhere = [t for t, c in count.items() if c > 1 and t not in tok.all_special_ids]
    solver = context_solver(mini.model, update, embedding_parts(mini.model), options, 0, anywhere)
    ids = list(truth.input_ids[0])
    anchor = next((t, p) for p, t in enumerate(ids) if count[t] == 1 and 0 < p < len(ids) - 1)
    start = solver.first_solve(anchor, len(ids), tok.cls_token_id, tok.sep_token_id)
    assert (len(start.live) - len(ids)) > 1.25 * solver.off.shape[1]  # beyond the old limit
    assert solver.refine(start)[1] == ids


def test_two_exchanged_tokens_are_swapped_back(mini):
    """A proposal with two tokens exchanged, one of which the narrow options lack where it belongs: one-token moves
    cannot undo it (each half leaves a token twice), the pairwise exchange does."""
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    span2 = span_basis(stacked_gradient(update, qkv_gradient_names(mini.model, 1)))
    search = SentenceSearch(FirstLayer(mini.model), span2, accept=1e-4, seed=0)
    target = list(truth.input_ids[1])
    p, q = 2, len(target) - 3
    assert target[p] != target[q]
    exchanged = list(target)
    exchanged[p], exchanged[q] = target[q], target[p]
    options = [[t] for t in target]
    for position in range(1, len(target) - 1):
        options[position] = sorted({ids[position] for ids in truth.input_ids if position < len(ids)} | {target[q]})
    options[p] = [t for t in options[p] if t != target[p]] + [target[q]]  # the true token is missing at p
    start = Found(tuple(exchanged), float(search.score(torch.tensor([exchanged]))[1][0]))
    assert search.descend(exchanged, [list(o) for o in options], set()).ids != tuple(target)
    assert search.swap(start, [list(o) for o in options], set()).ids == tuple(target)



def _two_sentences(mini):
    """Two test sentences' classification update: its truth, context solver and token counts, a second-layer search,
    the batch's tokens as options, the first sentence and a token seen once in it, as (token, position)."""
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    solver, count = _solver(mini, update, truth)
    search, options_for = _second_layer_search(mini, update), _batch_tokens(truth, mini.tokenizer)
    target = list(truth.input_ids[0])
    anchor = next((t, p) for p, t in enumerate(target) if count[t] == 1 and 0 < p < len(target) - 1)
    return truth, solver, count, search, options_for, target, anchor


def test_an_exact_first_solve_is_searched_as_it_is_without_the_other_lengths(mini):
    """A first solve within ``CLEAR_EXACT`` at the first end is the sentence: the anchor's other lengths are not
    solved, nothing is priced or refined, and the search returns the accepted proposal without a descent."""
    truth, solver, count, search, options_for, target, anchor = _two_sentences(mini)
    tok = mini.tokenizer
    ends = [len(target), len(truth.input_ids[1]), len(target) + 2]
    solved, calls = [], []
    first_solve = solver.first_solve
    solver.first_solve = lambda a, n, *args, **kwargs: solved.append(n) or first_solve(a, n, *args, **kwargs)
    solver.price = lambda start: calls.append("price") or start
    solver.refine = lambda start: calls.append("refine") or (start.residual, solver.rounded(start))
    search.descend = lambda *args, **kwargs: calls.append("descend") or Found((), math.inf)
    found = assemble_by_context(search, solver, [anchor], ends, options_for, 1, first=tok.cls_token_id,
                                last=tok.sep_token_id)
    assert [list(f.ids) for f in found] == [target]
    assert solved == [len(target)] and calls == []
    # the other sentence's anchor: its solve at the first end (a wrong length) is not exact, so the next is solved,
    # and the exact one there ends the anchor's lengths
    other = list(truth.input_ids[1])
    anchor = next((t, p) for p, t in enumerate(other) if count[t] == 1 and 0 < p < len(other) - 1)
    solved.clear()
    found = assemble_by_context(search, solver, [anchor], [len(target), len(other), len(other) + 2], options_for, 1,
                                first=tok.cls_token_id, last=tok.sep_token_id)
    assert [list(f.ids) for f in found] == [other]
    assert solved == [len(target), len(other)] and calls == []


def test_an_earlier_rounds_record_limits_an_anchor_to_its_best_lengths_and_new_ends(mini):
    """In a peeled rest an anchor the parent round solved is solved again only at its ``CARRIED_LENGTHS`` best
    lengths there (lowest residual first) and at the ends the record lacks; the round's solves go into the record."""
    truth, solver, count, search, options_for, target, anchor = _two_sentences(mini)
    tok = mini.tokenizer
    n = len(target)
    solved_at = []
    first_solve = solver.first_solve
    solver.first_solve = lambda a, length, *args, **kwargs: (
        solved_at.append(length) or first_solve(a, length, *args, **kwargs)
    )
    record = {anchor: {n + 3: 0.9, n + 1: 0.6, n: 0.2, n + 2: 0.4}}
    ends = [n + 3, n + 2, n + 1, n + 4]
    found = assemble_by_context(search, solver, [anchor], ends, options_for, 1, first=tok.cls_token_id,
                                last=tok.sep_token_id, solved=record)
    assert [list(f.ids) for f in found] == [target]
    assert solved_at == [n] and record[anchor][n] <= CLEAR_EXACT  # the best earlier length first, exact there
    solved_at.clear()
    record = {anchor: {n + 3: 0.9, n + 1: 0.6, n + 2: 0.4}}  # the true length was not among the earlier ends
    found = assemble_by_context(search, solver, [anchor], [n + 3, n + 2, n], options_for, 1,
                                first=tok.cls_token_id, last=tok.sep_token_id, solved=record)
    assert [list(f.ids) for f in found] == [target]
    assert solved_at == [n + 2, n + 1, n]  # two best earlier lengths, then the new end


def test_a_phase_that_may_find_two_sentences_ends_when_it_lingers_past_the_first(mini):
    """With ``linger`` the phase ends that many seconds after its first new sentence, even short of ``stop_after``;
    without it, it goes on to the second."""
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    solver, count = _solver(mini, update, truth)
    tok = mini.tokenizer
    options_for = _batch_tokens(truth, tok)
    anchors = [next((t, p) for p, t in enumerate(ids) if count[t] == 1 and 0 < p < len(ids) - 1)
               for ids in truth.input_ids]
    ends = sorted({len(ids) for ids in truth.input_ids})
    kwargs = {"first": tok.cls_token_id, "last": tok.sep_token_id, "stop_after": 2}
    both = assemble_by_context(_second_layer_search(mini, update), solver, anchors, ends, options_for, 2, **kwargs)
    assert sorted(f.ids for f in both) == sorted(map(tuple, truth.input_ids))
    search = _second_layer_search(mini, update)
    one = assemble_by_context(search, solver, anchors, ends, options_for, 2, linger=0.0, **kwargs)
    assert len(one) == 1 and one[0].ids in set(map(tuple, truth.input_ids))


def test_a_fall_in_the_float_floors_tail_is_not_taken_for_the_spans_edge(mini):
    """A peeled rest's output-projection gradient can end with a fall wider than the span's edge, far below the
    float32 floor (1.3e-11 to 3.8e-14 of the largest value on random BERT-base); the solver reads the edge, not the
    tail, and still finds the sentence."""
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    name = next(n for n in update.gradients if n.endswith("layer.0.attention.output.dense.weight"))
    u, sigma, vh = torch.linalg.svd(update.gradients[name].double())
    logs = torch.log10(sigma)
    rank = int((logs[:-1] - logs[1:]).argmax()) + 1  # the edge, as read on the clean gradient
    top, bottom = math.log10(sigma[rank - 1] / 300), math.log10(sigma[0] * 1e-11)
    floor = torch.logspace(top, bottom, len(sigma) - rank - 1, dtype=torch.float64)  # 2.5 decades below the edge
    bent = torch.cat([sigma[:rank], floor, sigma[:1] * 1e-14])  # then the tail falls 3 decades
    tailed = update.with_gradients({name: (u * bent) @ vh})
    solver, _ = _solver(mini, tailed, truth)
    assert solver is not None and solver.off.shape[1] == len(sigma) - rank
    ids = list(truth.input_ids[0])
    anchor = next((t, p) for p, t in enumerate(ids) if Counter(ids)[t] == 1 and 0 < p < len(ids) - 1)
    residual, sentence = solver.propose(anchor, len(ids), mini.tokenizer.cls_token_id, mini.tokenizer.sep_token_id)
    assert sentence == ids


def test_a_proposal_that_mixes_sentences_is_not_searched(mini):
    """A refined proposal far from every sentence (half of one long sentence, half of another) is dropped before the
    second layer's search, which would spend seconds descending from it; one wrong token still gets searched."""
    long = [
        "the old harbour town woke slowly as fishing boats returned with their nets full and gulls circled over the "
        "wet stones of the quay",
        "a quiet film about grief that never raises its voice yet leaves you shaken and moved long after the final "
        "scene has faded slowly to black",
    ]
    update, truth = simulate_client(mini, long, task="classification", seed=0, reveal=())
    solver, count = _solver(mini, update, truth)
    tok = mini.tokenizer
    ids, other = list(truth.input_ids[0]), list(truth.input_ids[1])
    assert len(ids) >= 25 and len(other) >= len(ids)
    anchor = next((t, p) for p, t in enumerate(ids) if count[t] == 1 and 0 < p < len(ids) - 1)
    mixed = ids[: len(ids) // 2] + other[len(ids) // 2 : len(ids) - 1] + [tok.sep_token_id]
    near = list(ids)
    near[len(ids) // 2] = tok.unk_token_id
    search = _second_layer_search(mini, update)
    searched = []
    original = search.search
    search.search = lambda start, *args, **kwargs: searched.append(list(start)) or original(start, *args, **kwargs)

    def options_for(length, accepted):
        return [[t] for t in ids]  # nothing to choose: only whether the proposal is searched matters

    for proposal, expected in ((mixed, []), (near, [near])):
        solver.refine = lambda first, proposal=proposal: (0.0, proposal)
        solver.rounded = lambda first, proposal=proposal: proposal  # an exact first solve is taken unrefined
        searched.clear()
        assemble_by_context(search, solver, [anchor], [len(ids)], options_for, 1, first=tok.cls_token_id,
                            last=tok.sep_token_id)
        assert searched == expected


def test_an_anchor_whose_length_the_ends_miss_waits_while_a_clear_one_is_finished(mini):
    """The first anchor's length is neither an end nor among the first spare lengths, so only screening would find
    it; the second anchor's first solve at an end is clear. A peeling caller (``stop_after=1``) gets the second
    anchor's sentence at once; without the stop, the waiting anchor is screened afterwards and found too. Without
    ``defer`` (masked-LM pairings) every anchor is still tried at its ends before any is screened, so the second
    anchor's sentence comes first there too, and the first anchor's after its screening."""
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    solver, count = _solver(mini, update, truth)
    tok = mini.tokenizer
    first, second = (list(ids) for ids in truth.input_ids)
    assert len(first) != len(second)
    anchors = [next((t, p) for p, t in enumerate(ids) if count[t] == 1 and 0 < p < len(ids) - 1)
               for ids in (first, second)]
    wrong = [n for n in range(5, update.metadata.seq_len + 1) if n not in (len(first), len(second))]
    spare = [*wrong[:SPARE_LENGTHS], len(first)]

    def run(stop_after, defer=True):
        return assemble_by_context(_second_layer_search(mini, update), solver, anchors, [len(second)],
                                   _batch_tokens(truth, tok), 2, first=tok.cls_token_id, last=tok.sep_token_id,
                                   spare=spare, stop_after=stop_after, defer=defer)

    assert [list(f.ids) for f in run(1)] == [second]
    assert sorted(list(f.ids) for f in run(None)) == sorted([first, second])
    assert [list(f.ids) for f in run(1, defer=False)] == [second]
    assert [list(f.ids) for f in run(None, defer=False)] == [second, first]
