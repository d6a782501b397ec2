"""Quantization of the sent tensors, dequantised back to float32 as the server would before using them.

fp16 / bf16: a round trip through the half-precision type (DLG: fp16 does not stop the attack). int8: symmetric
per-tensor quantization with ``scale = max|g| / 127`` and round-to-nearest, so every entry is off by at most
``scale / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textleak.defenses.base import Gradients, GradientTransform, check_choice

DTYPES = ("fp16", "bf16", "int8")
INT8_LEVELS = 127


def int8_round_trip(tensor: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``tensor`` quantized to int8 with one scale and dequantised, and that scale."""
    scale = float(tensor.abs().max()) / INT8_LEVELS if tensor.numel() else 0.0
    if scale == 0.0:
        return torch.zeros_like(tensor, dtype=torch.float32), 0.0
    quantized = torch.round(tensor.float() / scale).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return quantized.float() * scale, scale


@dataclass(frozen=True, kw_only=True)
class Quantize(GradientTransform):
    """Send every tensor in ``dtype`` (fp16, bf16 or int8 with a per-tensor scale)."""

    name = "quantize"
    dtype: str = "fp16"

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, DTYPES)

    def __call__(self, gradients: Gradients, generator: torch.Generator) -> Gradients:
        if self.dtype == "int8":
            return {name: int8_round_trip(t)[0] for name, t in gradients.items()}
        half = torch.float16 if self.dtype == "fp16" else torch.bfloat16
        return {name: t.to(half).float() for name, t in gradients.items()}
