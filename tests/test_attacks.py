"""Optimisation attacks against real gradients of a tiny random BERT (DLG's own setting, scaled down)."""

import pytest
import torch
from conftest import SENTENCE

from textleak.attacks import get_attack
from textleak.attacks.decode import allowed_tokens, nearest_tokens
from textleak.attacks.layout import Layout, recovered_length, resolve_lengths
from textleak.attacks.leakage import label_bag, labelled_slot_count, single_label
from textleak.client import simulate_client
from textleak.errors import CapabilityError, UnknownNameError
from textleak.metrics import bag_of_tokens, token_accuracy


def test_dlg_recovers_a_sentence_with_unknown_labels(tiny):
    update, truth = simulate_client(tiny, [SENTENCE], task="all-tokens", seed=0)
    assert update.metadata.knowledge.labels is None
    result = get_attack("dlg", iterations=50, seed=0).reconstruct(update, tiny)
    accuracy = token_accuracy(result.token_ids[0], truth.original_ids[0])
    assert accuracy >= 0.9, (result.texts, accuracy)
    assert result.details["labels"] == "inferred"
    assert result.loss_curve[-1] < result.loss_curve[0] / 100
    assert result.timings["iterations"] == 50 and result.timings["total_s"] > 0


def test_cosine_and_tag_recover_most_tokens(tiny):
    update, truth = simulate_client(tiny, [SENTENCE], task="all-tokens", seed=0)
    for name in ("cosine", "tag"):
        result = get_attack(name, iterations=100).reconstruct(update, tiny)
        assert bag_of_tokens(result.token_ids[0], truth.original_ids[0])["f1"] >= 0.75, (name, result.texts)


def test_label_leakage_from_the_output_bias(tiny, tiny_classifier):
    update, truth = simulate_client(tiny, [SENTENCE, "we love paris"], task="all-tokens")
    assert label_bag(update) == sorted({t for row in truth.original_ids for t in row})
    mlm, _ = simulate_client(tiny, [SENTENCE, "we love paris in spring"], task="mlm", seed=2, reveal=("labels",))
    masked = [t for row in mlm.metadata.knowledge.labels for t in row if t != -100]
    assert label_bag(mlm) == sorted(set(masked))
    assert labelled_slot_count(mlm) == len(masked)
    cls, _ = simulate_client(tiny_classifier, ["good"], task="classification", labels=[1])
    assert single_label(cls) == 1


def test_length_is_recovered_from_position_gradients(tiny):
    update, truth = simulate_client(tiny, [SENTENCE, "hi"], task="all-tokens", reveal=())
    assert recovered_length(update) == len(truth.input_ids[0])
    lengths, warnings = resolve_lengths(update, "auto")
    assert lengths == [len(truth.input_ids[0])] * 2 and "longest length" in warnings[0]
    with pytest.raises(CapabilityError, match="does not reveal sequence lengths"):
        resolve_lengths(update, "known")


def test_layout_places_special_tokens_like_the_tokenizer(tiny):
    layout = Layout.build(tiny.tokenizer, [4, 3], 5)
    assert layout.fixed_ids.tolist() == [[101, 0, 0, 102, 0], [101, 0, 102, 0, 0]]
    assert layout.free.tolist() == [[False, True, True, False, False], [False, True, False, False, False]]
    filled = layout.fill(torch.full((2, 5), 7))
    assert filled == [[101, 7, 7, 102], [101, 7, 102]]


def test_decoding_respects_the_candidate_set(tiny):
    table = tiny.model.get_input_embeddings().weight.detach()
    allowed = allowed_tokens(tiny.tokenizer, table.shape[0], candidates=[2000, 3000])
    picked = nearest_tokens(table[[2000, 3000, 4000, 101]], table, allowed)
    assert set(picked.tolist()) <= {2000, 3000} and picked[:2].tolist() == [2000, 3000]
    full = allowed_tokens(tiny.tokenizer, table.shape[0])
    assert not full[[101, 102, 0, 103, 1]].any()  # [CLS] [SEP] [PAD] [MASK] [unused0]
    update, _ = simulate_client(tiny, [SENTENCE], task="all-tokens")
    result = get_attack("cosine", iterations=3, candidates=(1996, 4937)).reconstruct(update, tiny)
    assert set(result.token_ids[0][1:-1]) <= {1996, 4937}


def test_known_labels_need_revealed_labels(tiny):
    update, _ = simulate_client(tiny, [SENTENCE], task="all-tokens")
    with pytest.raises(CapabilityError, match="does not reveal labels"):
        get_attack("dlg", labels="known", iterations=1).reconstruct(update, tiny)


def test_bad_attack_names_and_options():
    with pytest.raises(UnknownNameError, match="unknown attack 'dgl'; known: cosine, dlg"):
        get_attack("dgl")
    with pytest.raises(ValueError, match="bad option for attack 'tag'.*learning_rate"):
        get_attack("tag", learning_rate=0.1)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        get_attack("dlg", iterations=0)
    with pytest.raises(ValueError, match="distance must be one of"):
        get_attack("dlg", distance="l3")


def test_parameter_selection(tiny):
    update, _ = simulate_client(tiny, [SENTENCE], task="all-tokens")
    result = get_attack("cosine", iterations=2, params="layer.0.,layer.1.").reconstruct(update, tiny)
    assert result.details["matched_parameters"] == 32  # 16 tensors per BERT layer
    with pytest.raises(CapabilityError, match="matches no gradient"):
        get_attack("cosine", iterations=2, params="decoder.nothing").reconstruct(update, tiny)


def test_device_option_is_validated_and_recorded(tiny):
    with pytest.raises(ValueError, match="device must"):
        get_attack("tag", device="not-a-device")
    with pytest.raises(ValueError, match="device must be 'cpu'"):
        get_attack("dlg", device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            get_attack("cosine", device="cuda")
    update, _ = simulate_client(tiny, [SENTENCE], task="all-tokens", seed=0)
    if torch.cuda.is_available():  # lamp has its own loop, not moved to a device yet: it refuses one
        with pytest.raises(ValueError, match="CPU only"):
            get_attack("lamp", device="cuda", iterations=1).reconstruct(update, tiny)
    plain = get_attack("tag", iterations=5).reconstruct(update, tiny)
    on_cpu = get_attack("tag", iterations=5, device="cpu").reconstruct(update, tiny)
    assert on_cpu.config["device"] == "cpu" and on_cpu.token_ids == plain.token_ids


def test_problem_moves_to_a_device_as_a_copy(tiny):
    update, _ = simulate_client(tiny, [SENTENCE], task="all-tokens", seed=0)
    attack = get_attack("cosine", iterations=1)
    problem = attack.prepare(update, tiny)
    assert problem.to("cpu") is problem
    if torch.cuda.is_available():  # only where a GPU exists
        moved = problem.to("cuda")
        assert moved.model is not problem.model and moved.target[0].is_cuda and moved.layout.free.is_cuda
        assert next(problem.model.parameters()).device.type == "cpu"
        result = get_attack("cosine", iterations=5, device="cuda").reconstruct(update, tiny)
        assert len(result.token_ids) == 1
