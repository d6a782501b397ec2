"""Shared fixtures: tiny randomly initialised BERTs with the real bert-base-uncased tokenizer, no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from textleak.models import LoadedModel, load_model  # noqa: E402

SENTENCE = "the cat sat on the mat."

# One thread: the tiny models gain nothing from more, and OpenMP threads that outnumber free cores (CI beside
# another job, or two test runs) spin-wait and slow the double-backward attacks down by ten times and more.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    """A 2-layer, 128-wide BERT with a masked-LM head (seeded); never mutate it in a test."""
    return load_model("random:bert-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_classifier() -> LoadedModel:
    return load_model("random:bert-tiny", head="classification", seed=0)
