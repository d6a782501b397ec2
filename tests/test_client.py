import pytest
import torch
from conftest import SENTENCE

from textleak.client import simulate_client
from textleak.tasks import IGNORE_INDEX


def test_all_tokens_labels_every_real_token(tiny):
    update, truth = simulate_client(tiny, [SENTENCE, "hi"], task="all-tokens")
    assert truth.input_ids == truth.original_ids
    ids = tiny.tokenizer(SENTENCE)["input_ids"]
    assert truth.input_ids[0] == tuple(ids)
    assert update.metadata.knowledge.lengths == (len(ids), 3)
    assert update.metadata.knowledge.labels is None  # not revealed by default
    assert truth.labels[1] == (101, 7632, 102, *([IGNORE_INDEX] * (len(ids) - 3)))


def test_gradients_equal_hugging_face_training_step(tiny):
    """The update is exactly what a Trainer-style step computes: HF's own loss, backward, .grad."""
    update, truth = simulate_client(tiny, [SENTENCE, "the end"], task="mlm", seed=3, reveal=("labels",))
    model = tiny.model
    enc = tiny.tokenizer([SENTENCE, "the end"], padding=True, return_tensors="pt")
    labels = torch.tensor(update.metadata.knowledge.labels)
    inputs = enc["input_ids"].clone()
    for row, ids in enumerate(truth.input_ids):
        inputs[row, : len(ids)] = torch.tensor(ids)
    model.zero_grad()
    model(input_ids=inputs, attention_mask=enc["attention_mask"], labels=labels).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(update.gradients[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)


def test_mlm_masking_is_seeded_and_follows_the_labels(tiny):
    text = ["one two three four five six seven eight nine ten eleven twelve thirteen fourteen"] * 4
    a = simulate_client(tiny, text, task="mlm", seed=5, reveal=("labels",))
    b = simulate_client(tiny, text, task="mlm", seed=5, reveal=("labels",))
    c = simulate_client(tiny, text, task="mlm", seed=6, reveal=("labels",))
    assert a[1].input_ids == b[1].input_ids and a[0].metadata.knowledge.labels == b[0].metadata.knowledge.labels
    assert a[0].metadata.knowledge.labels != c[0].metadata.knowledge.labels
    labels, (inputs, originals) = a[0].metadata.knowledge.labels, (a[1].input_ids, a[1].original_ids)
    for lab, inp, orig in zip(labels, inputs, originals, strict=True):
        for pos, (label, i, o) in enumerate(zip(lab, inp, orig, strict=False)):
            if label == IGNORE_INDEX:
                assert i == o, pos  # unmasked positions are unchanged
            else:
                assert label == o  # the label is the original token
        assert lab[0] == IGNORE_INDEX and lab[len(orig) - 1] == IGNORE_INDEX  # never [CLS]/[SEP]
    assert any(103 in row for row in inputs)  # some tokens became [MASK]


def test_classification_labels_and_head_check(tiny, tiny_classifier):
    update, truth = simulate_client(
        tiny_classifier, ["good", "bad"], task="classification", labels=[1, 0], reveal=("labels",)
    )
    assert truth.labels == (1, 0) and update.metadata.knowledge.labels == (1, 0)
    assert "classifier.weight" in update.gradients
    with pytest.raises(ValueError, match="load it with head='classification'"):
        simulate_client(tiny, ["good"], task="classification")
    with pytest.raises(ValueError, match="got 1 labels for 2 sentences"):
        simulate_client(tiny_classifier, ["good", "bad"], task="classification", labels=[1])


def test_bad_client_input(tiny):
    with pytest.raises(ValueError, match="at least one sentence"):
        simulate_client(tiny, [], task="mlm")
    with pytest.raises(KeyError, match="unknown task 'translation'"):
        simulate_client(tiny, ["x"], task="translation")
    with pytest.raises(ValueError, match="cannot reveal"):
        simulate_client(tiny, ["x"], task="mlm", reveal=("sentences",))


def test_model_keeps_no_gradient_state(tiny):
    simulate_client(tiny, [SENTENCE], task="all-tokens")
    assert all(p.grad is None for p in tiny.model.parameters())
