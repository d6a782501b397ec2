"""The lamp attack: discrete moves with a prior, candidate constraints, batched scoring, recorded details."""

import pytest
import torch
from conftest import SENTENCE

from textleak.attacks import get_attack
from textleak.attacks.constraints import Candidates, build_candidates, embedding_row_tokens
from textleak.attacks.decode import allowed_tokens
from textleak.attacks.lamp import _Mixture, refine_tokens
from textleak.attacks.span_pairing import pair_tokens
from textleak.client import simulate_client
from textleak.defenses.client import defended_client
from textleak.priors import mean_negative_log_prob, train_ngram

OTHER_TEXT = "a dog sat on the rug.\nthe cat ate the fish.\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prior") / "text.txt"
    path.write_text(SENTENCE + "\n" + OTHER_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sent(tiny_classifier):
    return simulate_client(tiny_classifier, [SENTENCE], task="classification", labels=[1], seed=0)


def swapped(ids, i, j):
    ids = list(ids)
    ids[i], ids[j] = ids[j], ids[i]
    return ids


def test_discrete_moves_fix_a_swapped_sentence(tiny_classifier, sent, text_file):
    update, truth = sent
    true_ids = list(truth.input_ids[0])
    start = swapped(true_ids, 2, 5)  # "the cat the on sat mat ."
    attack = get_attack("lamp", prior=f"ngram-train:{text_file}", constraints="none", moves=32, discrete_rounds=6)
    assert attack.refine(update, tiny_classifier, [start]) == [true_ids]
    # the prior alone (no gradient term) also puts the words back in the order it was trained on
    prior = train_ngram(text_file, tiny_classifier.tokenizer)
    free = torch.zeros(1, len(true_ids), dtype=torch.bool)
    free[0, 1:-1] = True

    def prior_only(batches):
        return mean_negative_log_prob(prior, [row[0, 1:-1].tolist() for row in batches])

    ids, _, moves = refine_tokens(
        torch.tensor([start]), prior_only, free, rounds=6, moves=32, generator=torch.Generator().manual_seed(0)
    )
    assert ids[0].tolist() == true_ids and moves


def test_batched_scores_equal_one_by_one_gradient_distances(tiny_classifier, sent):
    update, truth = sent
    attack = get_attack("lamp", constraints="none")
    problem, _, scorer = attack.setup(update, tiny_classifier)
    true_ids = torch.tensor(truth.input_ids[0])
    batches = torch.stack([true_ids, torch.tensor(swapped(true_ids.tolist(), 1, 4)), torch.flip(true_ids, (0,))])
    batched = scorer.gradient_terms(batches[:, None])
    for k in range(3):
        grads = problem.gradients(problem.table[batches[k]][None], [], create_graph=False)
        one = attack._distance()([g.double() for g in grads], [t.double() for t in problem.target])
        assert float(batched[k]) == pytest.approx(float(one), rel=1e-4, abs=1e-12)
    assert float(batched[0]) < 1e-9 < float(batched[1])  # the true sentence matches the gradient exactly


def test_embedding_row_constraint_restricts_and_recovers(tiny_classifier, sent):
    update, truth = sent
    rows = embedding_row_tokens(update, ratio=2.0)
    assert rows is not None and rows.exact and set(rows.ids) == set(truth.input_ids[0])
    result = get_attack("lamp", iterations=150, constraints="embedding-rows", seed=0).reconstruct(
        update, tiny_classifier
    )
    assert set(result.token_ids[0]) <= set(rows.ids)
    assert result.token_ids == [list(truth.input_ids[0])]  # the tiny model gives the sentence back word for word
    sets = result.details["candidate_sets"]
    assert sets["sources"] == ["embedding_rows"] and sets["vocabulary_size"] == len(set(truth.input_ids[0])) - 2
    assert sets["required_tokens"] == sets["vocabulary_size"] and result.details["parametrisation"] == "mixture"
    assert result.timings["per_sentence_s"] > 0 and result.timings["candidates_scored"] > 0


def test_position_rows_name_the_token_at_each_position(tiny_classifier, sent):
    update, truth = sent
    ids = list(truth.input_ids[0])
    _, candidates, _ = get_attack("lamp", constraints="positions", position_top_k=1).setup(update, tiny_classifier)
    assert candidates.details["sources"] == ["position_top_k"] and candidates.details["per_position_max"] == 1
    for p, token in enumerate(ids[1:-1], start=1):
        if ids.count(token) == 1:  # a repeated token's row is the sum of its positions' rows
            assert bool(candidates.allowed[0, p, token])


def test_position_channel_start_is_the_sentence_and_lamp_keeps_it(tiny_classifier, sent):
    update, truth = sent
    ids = list(truth.input_ids[0])
    attack = get_attack("lamp", constraints="positions", iterations=2, discrete_every=1, discrete_rounds=0)
    _, candidates, _ = attack.setup(update, tiny_classifier)
    assert candidates.start is not None and candidates.start[0, 1:-1].tolist() == ids[1:-1]
    # two continuous steps cannot find the order, but the guess is scored first and nothing beats it
    result = attack.reconstruct(update, tiny_classifier)
    assert result.token_ids == [ids] and result.details["final_distance"] < 1e-9
    assert result.details["stopped_early"] and result.timings["iterations"] == 0  # an exact match ends the search
    full = get_attack("lamp", constraints="positions", iterations=2, discrete_every=1, stop_distance=0)
    assert full.reconstruct(update, tiny_classifier).timings["iterations"] == 2
    rows_only = get_attack("lamp", constraints="embedding-rows")
    assert rows_only.setup(update, tiny_classifier)[1].start is None  # no positional channel, no guess


def test_pairing_narrows_positions_at_b2_also_under_noise(tiny_classifier):
    sentences = ["the cat sat on a mat.", "my dog ran to her rug."]  # the pairing is exact for unique tokens
    update, truth = defended_client(
        tiny_classifier, sentences, task="classification", labels=[1, 0], seed=0, defenses=["noise:sigma=1e-6"]
    )
    _, candidates, _ = get_attack("lamp", constraints="positions").setup(update, tiny_classifier)
    assert candidates.start is None and candidates.details["per_position_max"] <= 4
    for k, ids in enumerate(truth.input_ids):
        for p, token in enumerate(ids[1:-1], start=1):
            assert bool(candidates.allowed[k, p, token])  # every true token is allowed where it sits
    bag = sorted({t for ids in truth.input_ids for t in ids})
    assert pair_tokens(update, bag, len(truth.input_ids[0])) is None  # span's exact pairing refuses noisy updates


def test_span_candidates_per_position_bound_the_output(tiny, tiny_classifier, sent):
    update, _ = sent
    problem, candidates, _ = get_attack("lamp", constraints="span", span_top_k=3).setup(update, tiny_classifier)
    assert candidates.details["span_top_k"] == 3 and candidates.details["per_position_max"] <= 3
    result = get_attack("lamp", iterations=4, constraints="span", span_top_k=3, moves=8).reconstruct(
        update, tiny_classifier
    )
    for p, token in enumerate(result.token_ids[0][1:-1], start=1):
        assert bool(candidates.allowed[0, p, token])
    # mlm labels alone narrow nothing; an explicit candidate list does
    mlm, _ = simulate_client(tiny, [SENTENCE], task="mlm", seed=1)
    base = allowed_tokens(tiny.tokenizer, 30522, allow_mask=True)
    problem = get_attack("lamp").prepare(mlm, tiny)
    assert build_candidates(mlm, tiny.model, problem.layout, base, "labels").allowed is None
    result = get_attack("lamp", iterations=2, constraints="none", candidates=(1996, 4937), moves=4).reconstruct(
        mlm, tiny
    )
    assert set(result.token_ids[0][1:-1]) <= {1996, 4937}


def test_lamp_options_are_checked():
    with pytest.raises(ValueError, match="constraints must be one of"):
        get_attack("lamp", constraints="rows")
    with pytest.raises(ValueError, match="restarts must be 1"):
        get_attack("lamp", restarts=2)
    with pytest.raises(ValueError, match="distance must be one of"):
        get_attack("lamp", distance="l3")


def test_coverage_counts_a_required_token_no_position_offers_as_missing(tiny_classifier, sent):
    """A side channel can require a token that no position's candidate set holds (BERT-base, SST-2, B=8 crashed on
    it): the coverage term counts it as wholly missing instead of indexing past the candidates."""
    update, truth = sent
    attack = get_attack("lamp", constraints="none")
    problem, _, _ = attack.setup(update, tiny_classifier)
    offered = sorted(set(truth.input_ids[0]))
    vocabulary = problem.table.shape[0]
    allowed = torch.zeros(*problem.layout.free.shape, vocabulary, dtype=torch.bool)
    allowed[..., offered] = True
    required = [*offered, vocabulary - 1]  # the last token is offered nowhere
    mixture = _Mixture(problem, Candidates(allowed, required=required), attack.config)
    leaf = mixture.init(torch.Generator().manual_seed(0), 1.0)
    value = float(mixture.regulariser([leaf]))
    assert value >= attack.config.coverage_weight / len(required)


def test_noised_rows_are_required_and_the_position_guess_outlives_noisy_span_sets():
    """Under noise 1e-4 (MiniLM) the word-embedding rows of the sentence's tokens stand far above the noise, so
    each is required; the span's top candidates at the last position lose the final "." to "the", and the
    positions channel's guess keeps it allowed (it was excluded before: "... of the rocks the")."""
    from textleak.models import load_model

    target = load_model("default", head="classification")
    update, truth = defended_client(
        target, ["The sailors rode the breeze clear of the rocks."], task="classification", labels=[1], seed=0,
        defenses=["noise:sigma=1e-4"],
    )
    ids = list(truth.input_ids[0])
    _, candidates, _ = get_attack("lamp", constraints="all").setup(update, target)
    assert set(candidates.required) == set(ids[1:-1])
    for p, token in enumerate(ids[1:-1], start=1):
        assert bool(candidates.allowed[0, p, token])


def test_at_b4_under_noise_the_pairings_sets_are_not_cut_by_the_noisy_span_sets_and_sure_rows_stay_required():
    """Under noise 1e-4 (MiniLM, B=4) the span's top tokens per position miss many of the batch's, and intersecting
    them with the pairing's sets left 20 of 34 true tokens allowed where they sit; the pairing's sets alone keep
    nearly all of them, and the attack records that the span sets went unused."""
    from textleak.models import load_model

    target = load_model("default", head="classification")
    sentences = [
        "the old boat drifted past the harbour wall.",
        "my sister painted a small blue door.",
        "nobody heard the train arrive that night.",
        "we kept the letters in a wooden box.",
    ]
    update, truth = defended_client(
        target, sentences, task="classification", labels=[1, 0, 1, 0], seed=0, defenses=["noise:sigma=1e-4"]
    )
    _, candidates, _ = get_attack("lamp", constraints="all", row_ratio=2.0).setup(update, target)
    assert "span_unused" in candidates.details and candidates.details["span_top_k"] is None
    true = [(k, p, t) for k, ids in enumerate(truth.input_ids) for p, t in enumerate(ids[1:-1], start=1)]
    allowed = sum(bool(candidates.allowed[k, p, t]) for k, p, t in true)
    assert allowed >= 0.9 * len(true)
    # the default, looser row ratio widens the vocabulary, and the rows above SURE_RATIO stay required
    _, looser, _ = get_attack("lamp", constraints="all").setup(update, target)
    assert looser.required == candidates.required and candidates.required
    assert looser.details["vocabulary_size"] >= candidates.details["vocabulary_size"]
