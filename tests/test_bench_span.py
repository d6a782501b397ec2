"""scripts/bench_span.py: the mlm figures over the sentences that reached the gradient."""

from types import SimpleNamespace

import pytest
from conftest import load_script

from textleak.metrics import score_batch
from textleak.models import load_model


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_span")


def test_live_figures_leave_out_the_sentences_with_nothing_masked(bench):
    tokenizer = load_model("random:bert-tiny", head="mlm").tokenizer
    first, second = (tokenizer(text)["input_ids"] for text in ("the cat sat on the mat", "a good movie"))
    # the second sentence had nothing masked: no gradient, so the answer repeats the first in its place
    truth = SimpleNamespace(original_ids=[first, second], labels=[[-100, first[1]] + [-100] * (len(first) - 2),
                                                                  [-100] * len(second)])
    answer = [first, first]
    scores = score_batch(answer, truth.original_ids, tokenizer)
    assert scores.without_special["exact_match"] == 0.5
    assert bench._exact_live(answer, truth, "mlm") == 1.0
    assert bench._rouge1_live(answer, truth, "mlm", tokenizer, scores) == 1.0
    # a classifier's sentences all reach the gradient: the figures are the batch's
    assert bench._exact_live(answer, truth, "classification") == 0.5
    assert bench._rouge1_live(answer, truth, "classification", tokenizer, scores) == scores.without_special["rouge1"]
