"""What every attack shares: the Reconstruction it returns, the Attack protocol, and capability checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

from textleak.errors import CapabilityError
from textleak.models import LoadedModel
from textleak.update import Update

#: progress(done, total) callback; the CLI passes a progress bar, the library never prints.
Progress = Callable[[int, int], None]

#: Names of things an attack may need, checked against an update before any work is done.
REQUIREMENTS = ("lengths", "labels", "position_grads", "first_layer_grads", "gradient_update")


@dataclass
class Reconstruction:
    """An attack's answer: token ids and text per sequence, how the optimisation went, and how long it took."""

    attack: str
    token_ids: list[list[int]]
    texts: list[str]
    loss_curve: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Attack(Protocol):
    """An attack: configuration in the constructor, data in ``reconstruct``."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]]

    def reconstruct(
        self, update: Update, target: LoadedModel, *, progress: Progress | None = None
    ) -> Reconstruction: ...


def missing_requirements(update: Update, requires: tuple[str, ...]) -> list[str]:
    """The requirements in ``requires`` that ``update`` does not satisfy, each with the reason."""
    meta, grads = update.metadata, update.gradients
    reasons = {
        "lengths": (meta.knowledge.lengths is not None, "sequence lengths are not known to the attacker"),
        "labels": (meta.knowledge.labels is not None, "labels are not known to the attacker"),
        "position_grads": (
            any(name.endswith("position_embeddings.weight") for name in grads),
            "the update has no position-embedding gradient",
        ),
        "first_layer_grads": (
            any(".layer.0.attention" in name for name in grads),
            "the update has no gradient of the first attention layer",
        ),
        "gradient_update": (meta.kind == "gradient", f"the update is a {meta.kind}, not a single gradient"),
    }
    unknown = set(requires) - set(reasons)
    if unknown:
        raise ValueError(f"unknown requirement(s) {sorted(unknown)}; known: {REQUIREMENTS}")
    return [reasons[r][1] for r in requires if not reasons[r][0]]


def check_requirements(attack_name: str, update: Update, requires: tuple[str, ...]) -> None:
    """Refuse up front, with every reason, an update that lacks what the attack needs."""
    missing = missing_requirements(update, requires)
    if missing:
        raise CapabilityError(f"attack {attack_name!r} cannot use this update: {'; '.join(missing)}")
