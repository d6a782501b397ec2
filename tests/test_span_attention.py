"""The first attention layer's per-token gradients: which tokens share a sentence, and batches grown around anchors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from textleak.attacks.span import SpanAttack
from textleak.attacks.span_assembly import ATTENTION_ACCEPT, attention_accept
from textleak.attacks.span_attention import attention_test
from textleak.attacks.span_scoring import embedding_parts
from textleak.client import simulate_client
from textleak.defenses.client import defended_client
from textleak.models import load_model

SENTENCES = ["the cat sat on the mat.", "a very good movie indeed", "dogs bark at night", "rain fell all week"]


@pytest.fixture(scope="module")
def mini():
    """bert-mini (4 layers, head size 64): the second layer is not the last, so sentences can be confirmed."""
    return load_model("random:bert-mini", head="classification", seed=0)


def _test_for(target, update, truth):
    bag = sorted({t for ids in truth.input_ids for t in ids})
    return attention_test(target.model, update, embedding_parts(target.model), bag, update.metadata.seq_len, [0])


def test_a_once_seen_token_fits_only_its_own_complete_sentence(mini):
    update, truth = simulate_client(mini, SENTENCES, task="classification", seed=0, reveal=())
    test = _test_for(mini, update, truth)
    assert test is not None and test.usable(max(len(ids) for ids in truth.input_ids))
    count = Counter(t for ids in truth.input_ids for t in ids)
    checked = 0
    for ids in truth.input_ids:
        others = [o for o in truth.input_ids if o is not ids]
        for p, t in enumerate(ids):
            if count[t] != 1:
                continue
            right = float(test.residual([t], torch.tensor([ids]))[0, 0])
            q = 1 if p != 1 else 2  # swap another position for the token another sentence has there
            wrong = list(ids)
            wrong[q] = next(o[q] for o in others if len(o) > q and o[q] != ids[q])
            assert right < 1e-5
            assert float(test.residual([t], torch.tensor([wrong]))[0, 0]) > 100 * right
            checked += 1
    assert checked >= 12


def test_the_test_refuses_tokens_outside_its_bag(mini):
    update, truth = simulate_client(mini, SENTENCES[:2], task="classification", seed=0, reveal=())
    test = _test_for(mini, update, truth)
    ids = list(truth.input_ids[0])
    ids[1] = 7592  # "hello": not in either sentence
    assert not test.knows(7592)
    with pytest.raises(ValueError, match="outside the bag"):
        test.residual([ids[2]], torch.tensor([ids]))


def test_a_batch_of_four_is_grown_around_anchors_and_recovered_exactly(mini):
    update, truth = simulate_client(mini, SENTENCES, task="classification", seed=0, reveal=())
    expected = sorted(map(tuple, truth.input_ids))
    # the anchors alone, before the full search (no context proposals: they would take the sentences first; no
    # peeling, which would start the phases over after the first sentence found)
    grown = SpanAttack(quick=False, context=False, peel=False).reconstruct(update, mini)
    assert sorted(map(tuple, grown.token_ids)) == expected
    assert grown.details["anchored_sentences"] >= 3 and grown.details["quick_sentences"] == 0
    both = SpanAttack(context=False, peel=False).reconstruct(update, mini)  # the quick pass, then the anchors
    assert sorted(map(tuple, both.token_ids)) == expected
    assert both.details["quick_sentences"] >= 1
    assert "anchors" in both.timings and "quick" in both.timings
    without = SpanAttack(attention=False).reconstruct(update, mini)
    assert without.details["anchored_sentences"] == without.details["quick_sentences"] == 0


def test_an_fp16_rounded_batch_is_recovered_exactly_on_the_packaged_minilm():
    """Rounding the update to fp16 lifts a true sentence's attention residuals to about 5e-4; the acceptance follows
    the second layer's, so the sentences are still confirmed (a fixed 1e-4 rejected all four and ran out of time).
    The packaged MiniLM, not a random model: rounding flattens a random model's tiny gradients beyond any rank gap."""
    target = load_model("default", head="classification", seed=0)
    update, truth = defended_client(
        target, SENTENCES, task="classification", defenses=["quantize:dtype=fp16"], seed=0, reveal=()
    )
    result = SpanAttack(time_limit=30).reconstruct(update, target)
    assert sorted(map(tuple, result.token_ids)) == sorted(map(tuple, truth.input_ids))
    assert result.warnings == [] and result.details["estimated_sequences"] == 4
    assert attention_accept(result.details["accept"]) > ATTENTION_ACCEPT
