"""Defense registry: a plain dict from name to class; specs like ``"prune:ratio=0.9"`` build configured defenses.

Gradient transforms (noise, prune, mask, quantize, freeze) see only named tensors; client procedures (dpsgd,
fedavg) need the model and the batch; secure aggregation sums several clients' updates. ``defended_client`` in
``textleak.defenses.client`` applies them to a text client in the order given.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

from textleak.defenses.base import ClientProcedure, Defense, GradientTransform, TrainingData, apply_defense
from textleak.defenses.dpsgd import DPSGD
from textleak.defenses.fedavg import FedAvg
from textleak.defenses.freezing import Freeze
from textleak.defenses.noise import Noise
from textleak.defenses.pruning import Prune, RandomMask
from textleak.defenses.quantization import Quantize
from textleak.defenses.secure_aggregation import SecureAggregation, aggregate
from textleak.errors import unknown_name

DEFENSES: dict[str, type[Defense]] = {
    "dpsgd": DPSGD,
    "fedavg": FedAvg,
    "freeze": Freeze,
    "mask": RandomMask,
    "noise": Noise,
    "prune": Prune,
    "quantize": Quantize,
    "secure-aggregation": SecureAggregation,
}

TUPLE_SEPARATOR = "+"
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _options(cls: type[Defense]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def build_defense(name: str, **options: Any) -> Defense:
    """The defense called ``name`` configured with ``options``; unknown names and options are errors."""
    if name not in DEFENSES:
        raise unknown_name("defense", name, DEFENSES)
    known = _options(DEFENSES[name])
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for defense {name!r}; known: {', '.join(known) or 'none'}")
    try:
        return DEFENSES[name](**options)
    except TypeError as error:  # a required option is missing
        raise ValueError(f"defense {name!r}: {error}; options: {', '.join(known)}") from error


def _coerce(option: str, text: str, kind: Any) -> Any:
    """Turn the text of an option into the type its dataclass field declares."""
    args = typing.get_args(kind)
    if type(None) in args:
        if text.lower() == "none":
            return None
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) is tuple:
        return tuple(part for part in text.split(TUPLE_SEPARATOR) if part)
    if kind is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"option {option} expects true or false, got {text!r}")
        return text.lower() in _TRUE
    try:
        return kind(text)
    except ValueError as error:
        raise ValueError(f"option {option} expects a {kind.__name__}, got {text!r}") from error


def parse_defense(spec: str) -> Defense:
    """A defense from ``name`` or ``name:option=value,option=value``.

    Values take the type of the option's field; tuple values are joined with ``+`` (so a ``freeze`` pattern given
    in a spec cannot contain ``+``: build ``Freeze(patterns=...)`` directly for such a pattern).
    """
    name, _, rest = spec.strip().partition(":")
    if name not in DEFENSES:
        raise unknown_name("defense", name, DEFENSES)
    known = _options(DEFENSES[name])
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals:
            raise ValueError(f"defense spec {spec!r}: expected option=value, got {item!r}")
        if key not in known:
            raise ValueError(f"unknown option {key!r} for defense {name!r}; known: {', '.join(known) or 'none'}")
        options[key] = _coerce(key, text.strip(), known[key])
    return build_defense(name, **options)


def as_defenses(defenses: Sequence[str | Defense]) -> list[Defense]:
    """Defense objects from specs or objects, in order."""
    return [parse_defense(d) if isinstance(d, str) else d for d in defenses]


__all__ = [
    "DEFENSES",
    "DPSGD",
    "ClientProcedure",
    "Defense",
    "FedAvg",
    "Freeze",
    "GradientTransform",
    "Noise",
    "Prune",
    "Quantize",
    "RandomMask",
    "SecureAggregation",
    "TrainingData",
    "aggregate",
    "apply_defense",
    "as_defenses",
    "build_defense",
    "parse_defense",
]
