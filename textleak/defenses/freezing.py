"""Frozen parameters: the client does not train them, so their gradients are not in the update at all.

Freezing the word embeddings removes the bag-of-tokens leak of their gradient rows. ``patterns`` are regular
expressions searched in each parameter name; ``first_layers=k`` also freezes transformer blocks 0..k-1, found by
the block index in names such as ``encoder.layer.3.attention...`` (Hugging Face naming).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from textleak.defenses.base import Gradients, GradientTransform, check_range

BLOCK_INDEX = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


@dataclass(frozen=True, kw_only=True)
class Freeze(GradientTransform):
    """Drop the gradients of parameters whose name matches ``patterns`` or lies in the first ``first_layers``."""

    name = "freeze"
    patterns: tuple[str, ...] = ("word_embeddings",)
    first_layers: int = 0

    def __post_init__(self) -> None:
        check_range("first_layers", self.first_layers, 0)
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"option patterns has an invalid regular expression {pattern!r}: {error}") from error

    def is_frozen(self, name: str) -> bool:
        """Whether the parameter called ``name`` is frozen."""
        if any(re.search(pattern, name) for pattern in self.patterns):
            return True
        block = BLOCK_INDEX.search(name)
        return block is not None and int(block.group(1)) < self.first_layers

    def __call__(self, gradients: Gradients, generator: torch.Generator) -> Gradients:
        kept = {name: t for name, t in gradients.items() if not self.is_frozen(name)}
        if not kept:
            raise ValueError(f"freezing {self.patterns} and {self.first_layers} first layers leaves nothing to send")
        return kept
