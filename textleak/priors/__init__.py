"""Language priors for discrete search: an n-gram model we train ourselves, or a local causal-LM checkpoint.

``load_prior(spec, tokenizer)`` builds one from an attack option:

- ``ngram:PATH``: an n-gram model saved by ``NgramPrior.save`` (safetensors);
- ``ngram-train:PATH``: a trigram trained on the non-blank lines of the text file PATH;
- ``causal-lm:FOLDER``: ``AutoModelForCausalLM.from_pretrained(FOLDER)``.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from textleak.errors import unknown_name
from textleak.priors.base import LanguagePrior, mean_negative_log_prob
from textleak.priors.causal_lm import CausalLMPrior
from textleak.priors.ngram import NgramPrior, train_ngram

PRIORS: dict[str, Callable[[str, PreTrainedTokenizerBase], LanguagePrior]] = {
    "causal-lm": lambda arg, tokenizer: CausalLMPrior(arg, tokenizer),
    "ngram": lambda arg, tokenizer: NgramPrior.load(arg),
    "ngram-train": lambda arg, tokenizer: train_ngram(arg, tokenizer),
}


def load_prior(spec: str, tokenizer: PreTrainedTokenizerBase) -> LanguagePrior:
    """The prior described by ``spec`` (``kind:argument``) over ``tokenizer``'s ids; unknown kinds are errors."""
    kind, sep, argument = spec.partition(":")
    if kind not in PRIORS:
        raise unknown_name("prior", kind, PRIORS)
    if not sep or not argument:
        raise ValueError(f"prior spec {spec!r} needs an argument: '{kind}:<path>'")
    prior = PRIORS[kind](argument, tokenizer)
    vocab = getattr(prior, "vocab_size", None)
    if vocab is not None and vocab != len(tokenizer):
        raise ValueError(f"prior {spec!r} covers {vocab} tokens but the attacked tokenizer has {len(tokenizer)}")
    return prior


__all__ = [
    "PRIORS",
    "CausalLMPrior",
    "LanguagePrior",
    "NgramPrior",
    "load_prior",
    "mean_negative_log_prob",
    "train_ngram",
]
