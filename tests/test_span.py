"""The span-check attack: exact recovery on tiny random BERTs, the vectorised scorer against a slow loop, limits."""

from __future__ import annotations

import math
import time
from collections import Counter
from functools import partial

import pytest
import torch

from textleak.attacks import span_pairing
from textleak.attacks.decoder_share import decoder_share
from textleak.attacks.span import UNIQUE_SHARE, SpanAttack, _agrees, _decoder_bias, auto_threshold
from textleak.attacks.span_assembly import Found, attention_accept
from textleak.attacks.span_attention import attention_test
from textleak.attacks.span_pairing import _orthogonal_places, pair_tokens
from textleak.attacks.span_peeling import lowers_rank
from textleak.attacks.span_scoring import (
    EmbeddingParts,
    candidate_residuals,
    embedding_parts,
    first_layer_inputs,
    qkv_gradient_names,
    span_basis,
    span_score,
    stacked_gradient,
)
from textleak.client import simulate_client
from textleak.defenses.client import defended_client
from textleak.errors import CapabilityError
from textleak.models import load_model

SENTENCES = ["the cat sat on the mat.", "a very good movie indeed, i liked it"]
MORE = ["dogs bark at night", "my old friend came home late"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine's two cores are shared: more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    """Loaded once: bert-tiny (2 layers) for all-tokens, bert-mini (4 layers) where layer 2 must not be the last."""
    return {
        ("random:bert-tiny", "mlm"): load_model("random:bert-tiny", head="mlm"),
        ("random:bert-mini", "mlm"): load_model("random:bert-mini", head="mlm"),
        ("random:bert-mini", "classification"): load_model("random:bert-mini", head="classification"),
    }


def _sorted(batch):
    return sorted(tuple(ids) for ids in batch)


def _client(target, sentences, task):
    """An update in which every sentence has a labelled slot (an mlm sentence with nothing masked leaves no trace).

    The client's mlm masking is drawn again on every call, so the test asserts on whatever it drew.
    """
    for seed in range(20):
        update, truth = simulate_client(target, sentences, task=task, seed=seed, reveal=())
        if task != "mlm" or all(any(label != -100 for label in row) for row in truth.labels):
            return update, truth
    raise AssertionError("no draw masked every sentence")


@pytest.mark.parametrize(
    ("spec", "task"),
    [("random:bert-tiny", "all-tokens"), ("random:bert-mini", "classification"), ("random:bert-mini", "mlm")],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_exact_recovery_without_known_lengths(models, spec, task, batch):
    target = models[(spec, "classification" if task == "classification" else "mlm")]
    update, truth = _client(target, SENTENCES[:batch], task)
    assert update.metadata.knowledge.lengths is None
    result = SpanAttack().reconstruct(update, target)
    assert _sorted(result.token_ids) == _sorted(truth.original_ids)
    assert result.warnings == []
    assert sorted(result.details["lengths"]) == sorted(len(ids) for ids in truth.input_ids)
    assert result.details["estimated_sequences"] == batch
    if task == "mlm":
        assert _sorted(result.details["input_ids"]) == _sorted(truth.input_ids)
        assert sorted(result.texts) == sorted(truth.sentences)


def test_vectorised_scorer_matches_slow_loop(models):
    """Every (token, position) residual of a 300-word vocabulary equals the per-candidate projection."""
    target = models[("random:bert-tiny", "mlm")]
    update, truth = simulate_client(target, SENTENCES[:1], task="all-tokens", seed=0)
    span = span_basis(stacked_gradient(update, qkv_gradient_names(target.model, 0)))
    full = embedding_parts(target.model)
    vocab = sorted(set(range(1000, 1300)) | set(truth.input_ids[0]))
    parts = EmbeddingParts(full.word[vocab], full.position, full.token_type, full.gamma, full.beta, full.eps)
    positions = update.metadata.seq_len
    fast, ids = candidate_residuals(parts, span, positions, [0, 1], keep=len(vocab), chunk=97)
    for p in range(positions):
        for k, kind in enumerate([0, 1]):
            slow = torch.stack(
                [
                    span.residual(first_layer_inputs(parts, *(torch.tensor([v]) for v in (w, p, kind))))[0]
                    for w in range(len(vocab))
                ]
            )
            order = ids[p, k]
            assert torch.allclose(fast[p, k], slow[order], rtol=1e-6, atol=1e-9)
    # the true token is the best candidate at every position, with type 0
    best = [vocab[int(i)] for i in ids[:, 0, 0]]
    assert best == list(truth.input_ids[0])
    # scoring only some token ids (a peeled rest's: the whole batch's candidates) gives those same residuals
    some = torch.tensor(sorted({int(i) for i in ids[:, 0, :3].flatten()}))
    part, part_ids = candidate_residuals(parts, span, positions, [0, 1], keep=len(some), chunk=7, vocabulary=some)
    assert set(part_ids.flatten().tolist()) == set(some.tolist())
    for p in range(positions):
        expected = dict(zip(ids[p, 0].tolist(), fast[p, 0].tolist(), strict=True))
        assert part[p, 0].tolist() == pytest.approx([expected[i] for i in part_ids[p, 0].tolist()], rel=1e-6, abs=1e-9)


def test_a_second_layer_without_a_rank_edge_is_flagged_as_too_many_tokens(models):
    """A clean update's second-layer rank is its token count; rows that fill the hidden size leave a spectrum without
    the float32 floor's edge (here: that layer's gradients replaced by full-rank matrices whose singular values fall
    smoothly from 1 to 1e-2, as 390 tokens' rows do in MiniLM's 384 dimensions), so nothing can be confirmed, and the
    attack says so at once with a partial answer instead of searching."""
    target = models[("random:bert-mini", "classification")]
    update, truth = simulate_client(target, SENTENCES, task="classification", labels=[0, 1], seed=0, reveal=())
    assert _sorted(SpanAttack().reconstruct(update, target).token_ids) == _sorted(truth.original_ids)
    generator = torch.Generator().manual_seed(0)

    def smooth(shape: torch.Size) -> torch.Tensor:
        left, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=generator))
        right, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=generator))
        values = torch.logspace(0, -2, min(shape))
        return left[:, : len(values)] @ torch.diag(values) @ right[:, : len(values)].T

    full = {
        name: smooth(grad.shape) if name in qkv_gradient_names(target.model, 1) else grad
        for name, grad in update.gradients.items()
    }
    result = SpanAttack().reconstruct(update.with_gradients(full), target)
    assert any("no rank edge" in w and "hidden size (256)" in w for w in result.warnings)
    assert result.details["partial"] is True


def test_duplicate_sentences_are_flagged_and_returned(models):
    target = models[("random:bert-tiny", "mlm")]
    update, truth = simulate_client(target, [SENTENCES[0]] * 2, task="all-tokens", seed=0, reveal=())
    result = SpanAttack().reconstruct(update, target)
    assert _sorted(result.token_ids) == _sorted(truth.original_ids)
    assert any("duplicates" in w for w in result.warnings)


def test_too_many_tokens_is_flagged_with_a_partial_answer(models):
    """bert-tiny has d=128; four sentences of 38 distinct words fill the span, so nothing can be exact."""
    target = models[("random:bert-tiny", "mlm")]
    words = [w for w in target.tokenizer.convert_ids_to_tokens(list(range(2000, 2400))) if w.isalpha()]
    sentences = [" ".join(words[38 * i : 38 * (i + 1)]) for i in range(4)]
    update, _ = simulate_client(target, sentences, task="all-tokens", seed=0)
    result = SpanAttack().reconstruct(update, target)
    assert any("full rank" in w for w in result.warnings)
    assert result.details["partial"] is True
    assert len(result.token_ids) == 4


def test_options_are_validated():
    with pytest.raises(TypeError):
        SpanAttack(no_such_option=1)
    with pytest.raises(ValueError, match="threshold"):
        SpanAttack(threshold=2.0)
    with pytest.raises(ValueError, match="max_candidates"):
        SpanAttack(max_candidates=0)


def test_update_without_first_layer_is_refused(models):
    target = models[("random:bert-tiny", "mlm")]
    update, _ = simulate_client(target, SENTENCES[:1], task="all-tokens", seed=0)
    kept = {n: g for n, g in update.gradients.items() if ".layer.0.attention" not in n}
    with pytest.raises(CapabilityError, match="first attention layer"):
        SpanAttack().reconstruct(update.with_gradients(kept), target)


def test_auto_threshold_cuts_at_the_gap_above_live_positions():
    best = torch.tensor([[1e-7, 1e-6, 0.3], [2e-7, 0.2, 0.4], [0.6, 0.7, 0.8]])  # last position: no live token
    threshold = auto_threshold(best)
    assert 1e-6 < threshold < 0.2


def test_classification_on_a_two_layer_model_says_the_second_layer_cannot_confirm():
    """bert-tiny's second layer is its last: for classification its gradient follows only the [CLS] path."""
    target = load_model("random:bert-tiny", head="classification")
    update, _ = simulate_client(target, SENTENCES, task="classification", seed=0, reveal=())
    result = SpanAttack(restarts=0).reconstruct(update, target)
    assert any("second layer's span" in w for w in result.warnings)
    assert len(result.token_ids) == 2


def test_pairing_puts_each_once_seen_token_at_its_position(models):
    """The embedding gradients pair tokens with positions: a token seen once in the batch gets (almost) all of its
    gradient at its true position, which no layer-1 residual can tell apart."""
    target = models[("random:bert-mini", "classification")]
    sentences = ["the cat sat on the mat.", "a very good movie indeed, i liked it", "dogs bark at night"]
    update, truth = simulate_client(target, sentences, task="classification", seed=0, reveal=())
    bag = sorted({t for ids in truth.input_ids for t in ids})
    pairing = pair_tokens(update, bag, update.metadata.seq_len)
    assert pairing is not None
    occurrences = Counter(t for ids in truth.input_ids for t in ids)
    once = {(t, p) for ids in truth.input_ids for p, t in enumerate(ids) if occurrences[t] == 1}
    assert len(once) >= 15
    assert pairing.residual < 0.01
    for t, p in once:  # the largest share of each once-seen token is at its true position
        assert int(pairing.weights[pairing.tokens.index(t)].argmax()) == p
    assert pairing.single_occurrences(UNIQUE_SHARE) <= once | {(t, 0) for t in bag}


def test_masked_lm_pairing_projects_the_decoder_out_and_leaves_the_mask_positions_to_the_pool(models):
    """A tied decoder adds the masked positions' head outputs to every word row: with them projected out, the
    quiet positions pair as a classifier's do, while the [MASK]-holding (loud) positions share the unplaced weight."""
    target = models[("random:bert-mini", "mlm")]
    mask = target.tokenizer.mask_token_id
    sentences = [*SENTENCES, "dogs bark at night"]
    update, truth = simulate_client(target, sentences, task="mlm", seed=4, reveal=())
    bag = sorted({t for ids in truth.input_ids for t in ids})
    assert pair_tokens(update, bag, update.metadata.seq_len) is None  # the decoder is only known to be one via [MASK]
    pairing = pair_tokens(update, bag, update.metadata.seq_len, mask=mask)
    assert pairing is not None
    occurrences = Counter(t for ids in truth.input_ids for t in ids)
    once = {(t, p) for ids in truth.input_ids for p, t in enumerate(ids) if occurrences[t] == 1}
    placed = pairing.single_occurrences(UNIQUE_SHARE)
    assert len(placed & once) >= 5  # none without the projection
    assert placed <= once | {(t, 0) for t in bag}
    masked = {p for ids in truth.input_ids for p, t in enumerate(ids) if t == mask}
    labelled = {p for row in truth.labels for p, label in enumerate(row) if label != -100}
    loud = {p for p, share in enumerate(pairing.weights[bag.index(mask)].tolist()) if share > 0}
    assert masked <= loud <= labelled


def test_a_once_seen_tokens_word_gradient_is_orthogonal_to_its_centred_input_only_at_its_own_position(models):
    """LayerNorm's Jacobian projects its centred input out of the gradient at an embedding sum: a classifier's word
    row of a token seen once (its one occurrence's gradient) is most nearly orthogonal at its true position."""
    target = models[("random:bert-mini", "classification")]
    update, truth = simulate_client(target, [*SENTENCES, *MORE], task="classification", seed=0, reveal=())
    word = update.gradients["bert.embeddings.word_embeddings.weight"]
    parts = embedding_parts(target.model)
    positions = torch.arange(update.metadata.seq_len)
    occurrences = Counter(t for ids in truth.input_ids for t in ids)
    once = [(t, p) for ids in truth.input_ids for p, t in enumerate(ids) if occurrences[t] == 1]
    assert len(once) >= 20
    for t, p in once:
        places, closeness = _orthogonal_places(word[t], t, positions, parts, 0)
        assert int(places[0]) == p and float(closeness[0]) == 1.0


def test_a_tied_decoders_fitted_share_leaves_a_once_seen_tokens_row_orthogonal_at_its_own_position(models):
    """On an mlm update every word row holds the tied decoder's share; fitted from the rows no input or label holds,
    it predicts those rows, and removing it from a once-seen token's row leaves the input side, most nearly
    orthogonal to the centred input at the token's own position (far more often than the raw row)."""
    target = models[("random:bert-mini", "mlm")]
    update, truth = simulate_client(target, [*SENTENCES, *MORE], task="mlm", seed=5, reveal=())
    word = update.gradients["bert.embeddings.word_embeddings.weight"]
    bias_gradient = update.gradients["cls.predictions.bias"]
    labels = [int(t) for t in (bias_gradient < 0).nonzero().flatten()]
    inside = sorted({t for ids in truth.input_ids for t in ids} | set(labels))
    basis = span_pairing._decoder_basis(word, inside)
    assert basis is not None and 2 <= basis.shape[1] <= 12  # one direction per masked position
    parts = embedding_parts(target.model)
    share = decoder_share(word, basis, inside, parts.word, None, bias_gradient)
    outside = [t for t in range(1000, 30000, 97) if t not in inside]
    misfit = sorted(float((word[t].double() - share(t)).norm() / word[t].double().norm()) for t in outside)
    assert misfit[len(misfit) // 2] < 0.05
    positions = torch.arange(update.metadata.seq_len)
    occurrences = Counter(t for ids in truth.input_ids for t in ids)
    once = [(t, p) for ids in truth.input_ids for p, t in enumerate(ids) if occurrences[t] == 1 and t not in labels]
    assert len(once) >= 15

    def at_own(rows: list[torch.Tensor]) -> int:
        firsts = [_orthogonal_places(row, t, positions, parts, 0)[0][0] for row, (t, _) in zip(rows, once, strict=True)]
        return sum(int(q) == p for q, (_, p) in zip(firsts, once, strict=True))

    fitted = at_own([word[t].double() - share(t) for t, _ in once])
    assert fitted >= 0.9 * len(once) and fitted > at_own([word[t] for t, _ in once])


def test_loud_splits_offer_the_edge_after_a_wider_gap_among_the_quiet_positions():
    """A quiet position that only one short sentence reaches can sit further below the next than the loud edge's
    gap: the split at that widest gap comes first, the loud edge next, and padding (zero rows) is never loud."""
    norms = torch.tensor([0.02, 0.1, 0.12, 0.2, 0.25, 0.5, 1.1, 1.3, 2.0, 2.9, 0.0])
    targets = torch.diag(norms).to(torch.float64)
    splits = span_pairing._loud_splits(targets)
    assert len(splits) >= 2
    assert splits[0].tolist() == [False, *([True] * 9), False]  # above 0.02: the widest gap (5x)
    assert splits[1].tolist() == [False] * 6 + [True] * 4 + [False]  # the loud edge (2.2x)


def test_masked_lm_pairing_keeps_a_pooled_token_at_its_nearly_orthogonal_loud_positions(models, monkeypatch):
    """Given the embedding tables, a pooled token keeps its weight only at the loud positions where its word row is
    nearly as orthogonal to the centred input as at its best (here: no other), which hold it; without the tables, or
    when no row is orthogonal enough, at every loud one."""
    target = models[("random:bert-mini", "mlm")]
    mask = target.tokenizer.mask_token_id
    update, truth = simulate_client(target, [*SENTENCES, *MORE], task="mlm", seed=5, reveal=())
    bag = sorted({t for ids in truth.input_ids for t in ids})
    wide = pair_tokens(update, bag, update.metadata.seq_len, mask=mask)
    monkeypatch.setattr(span_pairing, "ORTHOGONAL_RATIO", 1.0)
    narrow = pair_tokens(update, bag, update.metadata.seq_len, mask=mask, parts=embedding_parts(target.model))
    assert wide is not None and narrow is not None
    loud = wide.pooled.nonzero().flatten()
    assert len(loud) >= 4
    where = {t: p for ids in truth.input_ids for p, t in enumerate(ids)}
    narrowed = [t for i, t in enumerate(bag) if int((narrow.weights[i, loud] > 0).sum()) == 1]
    assert len(narrowed) >= 5
    for t in narrowed:
        i = bag.index(t)
        assert int((wide.weights[i, loud] > 0).sum()) == len(loud)
        assert float(narrow.weights[i, where[t]]) > 0
    monkeypatch.setattr(span_pairing, "ORTHOGONAL_MAX", 0.0)  # no row is that orthogonal: nothing is narrowed
    kept = pair_tokens(update, bag, update.metadata.seq_len, mask=mask, parts=embedding_parts(target.model))
    assert kept is not None and torch.equal(kept.weights, wide.weights)


def test_masked_lm_pairing_sets_a_once_seen_tokens_far_shares_apart_as_slack(models, monkeypatch):
    """The quiet fit spreads small shares of a once-seen token over other positions; with the decoder's share removed
    its row is orthogonal at its own position only, so those far shares move to the slack and its own stays."""
    target = models[("random:bert-mini", "mlm")]
    mask = target.tokenizer.mask_token_id
    update, truth = simulate_client(target, [*SENTENCES, *MORE], task="mlm", seed=5, reveal=())
    bag = sorted({t for ids in truth.input_ids for t in ids})
    options = {"mask": mask, "parts": embedding_parts(target.model), "decoder_bias": _decoder_bias(target.model)}
    narrow = pair_tokens(update, bag, update.metadata.seq_len, **options)
    monkeypatch.setattr(span_pairing, "FAR_RATIO", math.inf)
    wide = pair_tokens(update, bag, update.metadata.seq_len, **options)
    assert wide is not None and narrow is not None
    occurrences = Counter(t for ids in truth.input_ids for t in ids)
    where = {t: p for ids in truth.input_ids for p, t in enumerate(ids)}
    once = [bag.index(t) for t in bag if occurrences[t] == 1 and t != mask]

    def elsewhere(pairing) -> int:
        return sum(int((pairing.weights[i] > 0).sum()) - int(pairing.weights[i, where[bag[i]]] > 0) for i in once)

    def own(pairing) -> int:
        return sum(int(pairing.weights[i, where[bag[i]]] > 0) for i in once)

    assert elsewhere(wide) >= 30 and elsewhere(narrow) <= 0.2 * elsewhere(wide)
    assert own(narrow) == own(wide) >= 0.9 * len(once)
    # moved, not lost: a token seen twice whose one occurrence dominates looks the same
    assert torch.allclose(narrow.weights + narrow.slack, wide.weights)
    assert {t for t, _ in narrow.ranked(3, 0.01, slack=True)} <= {t for t, _ in wide.ranked(3, 0.01)}


def test_pairing_is_skipped_when_the_word_gradient_is_not_the_input_side_plus_a_decoder(models):
    """all-tokens labels every position (none is quiet), and noise fills the rows outside the bag."""
    target = models[("random:bert-tiny", "mlm")]
    mask = target.tokenizer.mask_token_id
    update, truth = _client(target, SENTENCES, "all-tokens")
    bag = sorted({t for ids in truth.input_ids for t in ids})
    assert pair_tokens(update, bag, update.metadata.seq_len, mask=mask) is None
    target = models[("random:bert-mini", "mlm")]
    update, truth = defended_client(
        target, SENTENCES, task="mlm", seed=3, reveal=(), defenses=["noise:sigma=1e-6"]
    )
    bag = sorted({t for ids in truth.input_ids for t in ids})
    assert pair_tokens(update, bag, update.metadata.seq_len, mask=mask) is None


def test_time_limit_returns_the_best_answer_with_a_warning(models):
    target = models[("random:bert-mini", "classification")]
    update, _ = simulate_client(target, SENTENCES, task="classification", seed=0, reveal=())
    result = SpanAttack(time_limit=1e-6).reconstruct(update, target)
    assert len(result.token_ids) == 2
    assert any("time limit" in w for w in result.warnings)


def test_a_failed_search_uses_the_rest_of_its_time_limit_then_says_so(models):
    target = models[("random:bert-mini", "classification")]
    update, _ = simulate_client(target, SENTENCES, task="classification", seed=0, reveal=())
    clock = time.perf_counter()
    result = SpanAttack(accept=1e-15, time_limit=2.0).reconstruct(update, target)  # nothing can pass
    assert time.perf_counter() - clock >= 2.0  # further rounds with more restarts until the limit
    assert result.details["estimated_sequences"] == 0
    assert any("time limit" in w for w in result.warnings)
    untimed = SpanAttack(accept=1e-15).reconstruct(update, target)  # no limit: one round, then the best attempts
    assert untimed.details["estimated_sequences"] == 0 and not any("time limit" in w for w in untimed.warnings)


def test_small_noise_leaves_a_flat_bulk_that_the_rank_estimate_sees_through():
    """Noise lifts every zero singular value to a flat bulk with no 10x fall; the signal values standing out of it
    still give the span, so a lightly noised sentence is recovered exactly, with the ambiguity said."""
    target = load_model("default", head="classification")
    sentence = "the more people you invite to dinner, the more food we need to cook."
    update, truth = defended_client(
        target, [sentence], task="classification", seed=0, reveal=(), defenses=["noise:sigma=3e-6"]
    )
    result = SpanAttack().reconstruct(update, target)
    assert result.token_ids == [list(truth.input_ids[0])]
    assert any("ambiguous" in w for w in result.warnings)


def test_gaussian_bulk_gives_the_signal_rank_and_a_true_row_s_residual():
    """Under i.i.d. noise the spectrum has no 10x fall: the bulk, scaled like a Gaussian matrix's, gives the signal
    rank and how far a true input row lies off the estimated span (first-order perturbation)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(12, 128, dtype=torch.float64, generator=generator)  # 12 true rows, as a gradient's inputs
    clean = torch.randn(384, 12, dtype=torch.float64, generator=generator) @ inputs
    assert span_basis(clean).rank == 12 and span_basis(clean).noise == 0
    for std in (1.0, 2.0):
        span = span_basis(clean + std * torch.randn(384, 128, dtype=torch.float64, generator=generator))
        assert span.rank == 12 and span.gap < 10  # no clear fall
        assert span.noise == pytest.approx(float(span.residual(inputs).median()), rel=0.2)


def test_the_spectrum_only_score_reads_the_basis_rank_and_the_nuclear_norm():
    """Peeling's label and rank tests read (rank, nuclear norm) from the singular values alone: the same rank as
    the basis cuts, clean (10x fall) and noised (bulk), and the sum of the singular values."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(384, 12, dtype=torch.float64, generator=generator) @ torch.randn(
        12, 128, dtype=torch.float64, generator=generator
    )
    noised = clean + torch.randn(384, 128, dtype=torch.float64, generator=generator)
    for stacked, rank in ((clean, 12), (noised, 12)):
        assert span_score(stacked)[0] == span_basis(stacked).rank == rank
        assert span_score(stacked)[1] == pytest.approx(float(torch.linalg.matrix_norm(stacked, "nuc")), rel=1e-9)


def test_noised_batch_is_accepted_at_the_noise_s_own_level(models):
    """Noise lifts a true sentence's second-layer rows well past the clean acceptance (1e-2) but not to a wrong
    token's: acceptance follows the estimated noise, so the lightly noised batch comes back exactly and confirmed
    (the clean acceptance confirmed only one of the two, after spending its whole 60 s limit)."""
    target = load_model("default", head="classification")
    update, truth = defended_client(
        target, SENTENCES, task="classification", seed=0, reveal=(), defenses=["noise:sigma=1e-6"]
    )
    # without peeling, which would read the second sentence from the rest alone, at that rest's own acceptance
    result = SpanAttack(time_limit=60, peel=False).reconstruct(update, target)
    assert sorted(result.token_ids) == sorted(list(ids) for ids in truth.input_ids)
    assert result.details["estimated_sequences"] == 2
    assert 1e-2 < result.details["accept"] <= 0.1


def test_with_nothing_accepted_distinct_attempts_come_before_repeats():
    from textleak.attacks.span import _complete
    from textleak.attacks.span_assembly import Found

    rejected = [Found((101, 7, 102), 0.2), Found((101, 7, 102), 0.3), Found((101, 5, 9, 102), 0.4)]
    out = _complete([], rejected, 3, [])
    assert [f.ids for f in out] == [(101, 7, 102), (101, 5, 9, 102), (101, 7, 102)]


def test_unfound_lengths_get_their_best_partial_attempt_before_repeats():
    """A failed search at a length no accepted sentence has is a search failure, not a duplicate: its best attempt
    (most tokens placed) beats repeating a found sentence; only then are repeats used."""
    from textleak.attacks.span import _complete
    from textleak.attacks.span_assembly import Found

    accepted = [Found((101, 7, 8, 102), 1e-7)]
    rejected = [Found((101, 5, 6, 9, 102), 3e-2), Found((101, 5, 4, 9, 102), 1e-2), Found((101, 7, 9, 102), 1e-3)]
    warnings: list[str] = []
    out = _complete(accepted, rejected, 3, warnings)
    assert [f.ids for f in out] == [(101, 7, 8, 102), (101, 5, 4, 9, 102), (101, 7, 8, 102)]
    assert any("partial" in w for w in warnings) and any("repeats" in w for w in warnings)


def _other_layout(kind: str, vocab_size: int | None = None):
    """A tiny random DistilBERT (no token types, ``q_lin``/``k_lin``, ``transformer.layer``) or RoBERTa (positions
    numbered from ``padding_idx + 1``) classifier with the packaged tokenizer."""
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    from textleak.models import LoadedModel, ModelSource

    tokenizer = load_model("random:bert-tiny", head="classification").tokenizer
    torch.manual_seed(0)
    if kind == "distilbert":
        config = DistilBertConfig(dim=128, n_layers=3, n_heads=2, hidden_dim=512, max_position_embeddings=64)
        model = DistilBertForSequenceClassification(config)
    else:
        config = RobertaConfig(
            vocab_size=vocab_size or len(tokenizer), hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=512, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id, type_vocab_size=1,
        )
        model = RobertaForSequenceClassification(config)
    return LoadedModel(model.eval(), tokenizer, ModelSource(spec=kind, head="classification"))


@pytest.mark.parametrize("kind", ["distilbert", "roberta"])
def test_distilbert_and_roberta_layouts_are_recovered_exactly(kind):
    target = _other_layout(kind)
    if kind == "roberta":
        assert embedding_parts(target.model).position_offset == target.tokenizer.pad_token_id + 1
    update, truth = simulate_client(target, SENTENCES, task="classification", labels=[0, 1], seed=0, reveal=())
    result = SpanAttack().reconstruct(update, target)
    assert _sorted(result.token_ids) == _sorted(truth.input_ids)
    assert not result.warnings


def test_word_rows_past_the_tokenizer_are_never_proposed_and_too_few_are_refused():
    padded = _other_layout("roberta", vocab_size=30600)  # models often pad their vocabulary to a round size
    update, truth = simulate_client(padded, SENTENCES, task="classification", labels=[0, 1], seed=0, reveal=())
    assert _sorted(SpanAttack().reconstruct(update, padded).token_ids) == _sorted(truth.input_ids)
    short = _other_layout("roberta", vocab_size=30000)  # the sentences' ids all lie below 30000
    update, _ = simulate_client(short, SENTENCES, task="classification", labels=[0, 1], seed=0, reveal=())
    with pytest.raises(ValueError, match="30522 tokens but the model only 30000 word embeddings"):
        SpanAttack().reconstruct(update, short)


@pytest.mark.parametrize("task", ["mlm", "classification"])
def test_search_stops_once_the_found_sentences_span_the_second_layer(models, task):
    """A sentence that sends no rows of its own (mlm: nothing masked in it; or a repeat) cannot be found: the search
    ends when the found sentences account for the whole second-layer span instead of running out its time limit."""
    target = models[("random:bert-mini", "classification" if task == "classification" else "mlm")]
    if task == "mlm":
        sentences = [*SENTENCES, "dogs bark at night"]
        update, truth = simulate_client(target, sentences, task="mlm", seed=0, reveal=())
        live = [ids for ids, row in zip(truth.original_ids, truth.labels, strict=True) if any(y != -100 for y in row)]
        assert len(live) == 2  # this draw masks nothing in the third sentence
    else:
        update, truth = simulate_client(target, [*SENTENCES, SENTENCES[0]], task=task, seed=0, reveal=())
        live = truth.original_ids
    result = SpanAttack(time_limit=30, peel=False).reconstruct(update, target)
    assert all(list(ids) in result.token_ids for ids in live)
    assert not any("time limit" in w for w in result.warnings)
    assert any("distinct sentences" in w for w in result.warnings)


def test_a_true_sentence_holding_only_shared_anchors_is_confirmed_by_the_rank_it_takes_out(models):
    """Minimal pairs put one token at one position in two sentences: the pairing takes it for a once-seen anchor,
    its attention gradient mixes both sentences, and the attention test fails a true sentence that holds only such
    anchors. Taking that sentence out of the update lowers the first layer's rank, which confirms it; a mix of the
    two sentences holds the same anchors and lowers nothing."""
    target = models[("random:bert-mini", "classification")]
    pair = ["which hat did mike quip that she never wore?", "which girl did mike quip never wore this hat?"]
    update, truth = simulate_client(target, pair, task="classification", labels=[0, 1], seed=0, reveal=())
    first, second = (tuple(ids) for ids in truth.input_ids)
    special = set(target.tokenizer.all_special_ids)
    shared = {(t, p) for p, (t, u) in enumerate(zip(first, second, strict=True)) if t == u and t not in special}
    bag = sorted(set(first) | set(second))
    test = attention_test(target.model, update, embedding_parts(target.model), bag, update.metadata.seq_len, [0])
    accept = attention_accept(1e-5)
    assert not test.confirms(first, shared, accept)
    assert not _agrees(test, shared, accept, None, Found(first, 0.0))
    rank_test = partial(lowers_rank, update, target)
    assert _agrees(test, shared, accept, rank_test, Found(first, 0.0))
    mix = first[:6] + second[6:]
    assert not _agrees(test, shared, accept, rank_test, Found(mix, 0.0))
