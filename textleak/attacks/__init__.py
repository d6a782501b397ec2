"""Attack registry: a plain dict from name to class; ``get_attack`` builds one with validated options."""

from __future__ import annotations

from typing import Any

from textleak.attacks.base import Attack, Reconstruction
from textleak.attacks.lamp import LampAttack
from textleak.attacks.optimization import DLG, TAG, CosineAttack
from textleak.attacks.span import SpanAttack
from textleak.errors import unknown_name

ATTACKS: dict[str, type] = {
    "cosine": CosineAttack,
    "dlg": DLG,
    "lamp": LampAttack,
    "span": SpanAttack,
    "tag": TAG,
}


def get_attack(name: str, **options: Any) -> Attack:
    """The attack called ``name`` configured with ``options``; unknown names and options are errors."""
    if name not in ATTACKS:
        raise unknown_name("attack", name, ATTACKS)
    try:
        return ATTACKS[name](**options)
    except TypeError as error:
        raise ValueError(f"bad option for attack {name!r}: {error}") from error


__all__ = ["ATTACKS", "Attack", "Reconstruction", "get_attack"]
