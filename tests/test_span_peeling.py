"""Peeling found sentences off a classification or mlm update: the rest is the update of the other sentences alone."""

from __future__ import annotations

import pytest
import torch

from textleak.attacks import span as span_module
from textleak.attacks.mlm_labels import sentence_labels
from textleak.attacks.span import SpanAttack
from textleak.attacks.span_peeling import lowers_rank, peel, peel_refusal
from textleak.client import ClientBatch, batch_gradients, encode_batch, simulate_client
from textleak.defenses.client import defended_client
from textleak.models import load_model

SENTENCES = ["the cat sat on the mat.", "a very good movie indeed, i liked it", "rain fell all night over the old town"]
LABELS = [1, 0, 1]


@pytest.fixture(scope="module")
def mini():
    return load_model("random:bert-mini", head="classification")


def test_peeling_a_true_sentence_leaves_the_update_of_the_others_alone(mini):
    update, truth = simulate_client(mini, SENTENCES, task="classification", labels=LABELS, seed=0, reveal=())
    others, _ = simulate_client(mini, SENTENCES[1:], task="classification", labels=LABELS[1:], seed=0, reveal=())
    peeled = peel(update, mini, [truth.input_ids[0]])
    assert peeled is not None
    assert peeled.labels == (1,) and peeled.ids == (tuple(truth.input_ids[0]),)
    assert peeled.update.metadata.batch_size == 2
    for name, expected in others.gradients.items():
        got = peeled.update.gradients[name]
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-9, name
    # word rows only the peeled sentence used are exactly zero again, as in the other sentences' own update
    word = next(n for n in others.gradients if n.endswith("word_embeddings.weight"))
    assert torch.equal(peeled.update.gradients[word].abs().sum(1) == 0, others.gradients[word].abs().sum(1) == 0)
    # a caller that reads only some gradients gets the rest of just those, with the same values
    first_layer = [n for n in update.gradients if ".layer.0." in n]
    kept = peel(update, mini, [truth.input_ids[0]], keep=first_layer)
    assert kept is not None and sorted(kept.update.gradients) == sorted(first_layer)
    for name in first_layer:
        assert torch.equal(kept.update.gradients[name], peeled.update.gradients[name]), name


def test_each_sentence_gets_its_own_label_and_a_stranger_is_not_peeled(mini):
    update, truth = simulate_client(mini, SENTENCES, task="classification", labels=LABELS, seed=0, reveal=())
    stranger = mini.tokenizer("a sentence that is not in the batch")["input_ids"]
    peeled = peel(update, mini, [truth.input_ids[1], stranger, truth.input_ids[2]])
    assert peeled is not None
    assert peeled.ids == (tuple(truth.input_ids[1]), tuple(truth.input_ids[2])) and peeled.labels == (0, 1)
    assert peel(update, mini, [stranger]) is None


def test_only_updates_linear_in_the_batch_are_peeled(mini):
    noised, _ = defended_client(mini, SENTENCES, task="classification", labels=LABELS, defenses=["noise:sigma=1e-6"])
    assert peel_refusal(noised) is None
    pruned, truth = defended_client(mini, SENTENCES, task="classification", labels=LABELS, defenses=["prune:ratio=0.5"])
    assert "prune" in peel_refusal(pruned)
    assert peel(pruned, mini, [truth.input_ids[0]]) is None
    lm = load_model("random:bert-mini", head="mlm")
    every, _ = simulate_client(lm, SENTENCES, task="all-tokens", seed=0, reveal=())
    assert "all-tokens" in peel_refusal(every)


def test_an_mlm_sentence_is_peeled_with_the_labels_its_head_gradients_show():
    """The masked positions and their labels are read per sentence; the rest is the others' update under the same
    masks, averaged over their own masked positions."""
    lm = load_model("random:bert-mini", head="mlm")
    update, truth = simulate_client(lm, SENTENCES, task="mlm", seed=3, reveal=())
    assert all(any(y != -100 for y in row) for row in truth.labels)  # this draw masks something in every sentence
    peeled = peel(update, lm, [truth.input_ids[0]])
    assert peeled is not None
    length = len(truth.input_ids[0])
    assert peeled.labels == (truth.labels[0][:length],)
    assert peeled.originals == (truth.original_ids[0],)
    batch, _ = encode_batch(lm.tokenizer, SENTENCES, task="mlm", seed=3)
    rest = ClientBatch(batch.input_ids[1:], batch.attention_mask[1:], batch.token_type_ids[1:], batch.labels[1:], "mlm")
    expected = batch_gradients(lm.model, rest)
    assert peeled.update.metadata.batch_size == 2
    for name, want in expected.items():
        got = peeled.update.gradients[name]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-9, name


def test_the_span_attack_peels_what_it_finds_and_reads_the_rest(mini):
    update, truth = simulate_client(mini, SENTENCES, task="classification", labels=LABELS, seed=0, reveal=())
    result = SpanAttack(seed=0).reconstruct(update, mini)
    assert sorted(map(tuple, result.token_ids)) == sorted(map(tuple, truth.input_ids))
    assert result.warnings == []
    assert result.details["peeled_sentences"] == 2  # the last sentence is read from what the other two leave
    peeled = [ids for ids in result.token_ids[:2]]
    assert result.details["peeled_labels"] == [LABELS[truth.input_ids.index(tuple(ids))] for ids in peeled]
    assert result.details["estimated_sequences"] == 3
    assert sum(result.details[f"{phase}_sentences"] for phase in ("context", "quick", "anchored")) >= 2
    unpeeled = SpanAttack(seed=0, peel=False).reconstruct(update, mini)
    assert sorted(map(tuple, unpeeled.token_ids)) == sorted(map(tuple, truth.input_ids))
    assert "peeled_sentences" not in unpeeled.details


def test_mlm_labels_are_read_only_for_sentences_that_sent_a_gradient():
    """A sentence with nothing masked has no hidden state in the head's row space: no labels, nothing to peel."""
    lm = load_model("random:bert-mini", head="mlm")
    update, truth = simulate_client(lm, SENTENCES, task="mlm", seed=4, reveal=())
    counts = [sum(y != -100 for y in row) for row in truth.labels]
    assert counts[2] == 0 and counts[0] > 0  # this draw masks nothing in the third sentence
    assert sentence_labels(update, lm, list(truth.input_ids[2])) is None
    labels, masked = sentence_labels(update, lm, list(truth.input_ids[0]))
    assert labels == list(truth.labels[0][: len(truth.input_ids[0])])
    assert masked == sum(counts)
    assert peel(update, lm, [truth.input_ids[2]]) is None


def test_only_a_sentence_of_the_batch_lowers_the_first_layers_rank(mini):
    """A true sentence holds rows no other sentence holds; a stranger adds rows, and a prefix of a true sentence or
    a mix of two leaves every row still needed by the true ones."""
    update, truth = simulate_client(mini, SENTENCES, task="classification", labels=LABELS, seed=0, reveal=())
    first, second = list(truth.input_ids[1]), list(truth.input_ids[2])
    assert all(lowers_rank(update, mini, ids) for ids in truth.input_ids)
    assert not lowers_rank(update, mini, mini.tokenizer("a sentence that is not in the batch")["input_ids"])
    assert not lowers_rank(update, mini, first[:5] + first[-1:])  # a prefix, closed with [SEP]
    assert not lowers_rank(update, mini, first[:5] + second[5:])  # the first half of one, the second of the other
    pruned, _ = defended_client(mini, SENTENCES, task="classification", labels=LABELS, defenses=["prune:ratio=0.5"])
    assert not lowers_rank(pruned, mini, first)


def test_a_span_under_half_a_wide_hidden_size_is_peeled_after_every_two_context_sentences(mini, monkeypatch):
    """Where the first layer's span leaves each anchor more equations than the batch has tokens, and at least
    ``ROUND_EQUATIONS``, a first solve is determined before peeling, and the context phase ends after
    ``ROUND_SENTENCES`` new sentences; after one otherwise."""
    asked = []
    original = span_module.assemble_by_context

    def recording(*args, **kwargs):
        asked.append(kwargs["stop_after"])
        return original(*args, **kwargs)

    monkeypatch.setattr(span_module, "assemble_by_context", recording)
    assert span_module.sentences_per_round(383, 768) == span_module.ROUND_SENTENCES  # BERT-base, under half
    assert span_module.sentences_per_round(384, 768) == 1
    assert span_module.sentences_per_round(100, 384) == 1  # MiniLM: too few equations left for each anchor
    monkeypatch.setattr(span_module, "ROUND_EQUATIONS", 128)  # bert-mini's 256 dimensions
    update, truth = simulate_client(mini, SENTENCES, task="classification", labels=LABELS, seed=0, reveal=())
    result = SpanAttack(seed=0).reconstruct(update, mini)
    assert sorted(map(tuple, result.token_ids)) == sorted(map(tuple, truth.input_ids))
    assert asked[0] == span_module.ROUND_SENTENCES  # about 30 tokens in 256 dimensions
