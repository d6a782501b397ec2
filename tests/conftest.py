"""Shared fixtures: tiny randomly initialised BERTs with the real bert-base-uncased tokenizer, no network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

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


def load_script(name: str) -> ModuleType:
    """A script under ``scripts/`` imported as a module (scripts are not a package), for testing its helpers."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
