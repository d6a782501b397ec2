"""Every registered attack obeys the same contract (captum-style table-driven tests)."""

import json

import pytest
from conftest import SENTENCE

from textleak.attacks import ATTACKS, get_attack
from textleak.client import simulate_client

#: the smallest configuration of each attack that still runs the whole method
SMALL = {"span": {}, "lamp": {"iterations": 2, "init_samples": 2, "moves": 8, "discrete_rounds": 2}}


@pytest.fixture(scope="module")
def update(tiny):
    return simulate_client(tiny, [SENTENCE, "hello there"], task="all-tokens", seed=0)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_contract(name, tiny, update):
    sent, truth = update
    options = {**SMALL.get(name, {"iterations": 2}), "seed": 3}
    first = get_attack(name, **options).reconstruct(sent, tiny)
    again = get_attack(name, **options).reconstruct(sent, tiny)
    assert first.attack == name
    assert sorted(len(ids) for ids in first.token_ids) == sorted(len(ids) for ids in truth.input_ids)
    assert all(ids[0] == 101 and ids[-1] == 102 for ids in first.token_ids)
    assert len(first.texts) == 2
    assert first.token_ids == again.token_ids and first.loss_curve == again.loss_curve  # seeded
    json.dumps(first.to_dict())  # results and configuration serialise
    assert first.config["seed"] == 3 and first.timings["total_s"] > 0
    assert all(p.grad is None for p in tiny.model.parameters())  # nothing left on the model
    assert not tiny.model._forward_hooks and not tiny.model._backward_hooks
