"""Secure aggregation (Bonawitz et al. 2017): the server learns only the sum of M clients' updates.

The cryptography is not simulated, only what it leaves the attacker: one update holding the sum of every
client's tensors, with the clients' batches counted together. Client defenses run on each client first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from textleak.defenses.base import Defense
from textleak.tasks import IGNORE_INDEX
from textleak.update import Knowledge, Update


@dataclass(frozen=True, kw_only=True)
class SecureAggregation(Defense):
    """Split the batch over ``clients`` clients and send only the sum of their updates."""

    name = "secure-aggregation"
    clients: int = 2

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"option clients must be >= 1, got {self.clients!r}")


def _joined(values: Sequence[tuple | None], seq_len: int) -> tuple | None:
    """Per-sequence facts of all clients in order; per-token rows padded with -100 (ignored) to ``seq_len``."""
    if any(v is None for v in values):
        return None
    rows = [row for value in values for row in value]  # type: ignore[union-attr]
    return tuple(row + (IGNORE_INDEX,) * (seq_len - len(row)) if isinstance(row, tuple) else row for row in rows)


def aggregate(updates: Sequence[Update], record: SecureAggregation | None = None) -> Update:
    """The sum of ``updates`` (same model, task, kind and tensor names), as the server sees it."""
    if not updates:
        raise ValueError("secure aggregation needs at least one update")
    first = updates[0].metadata
    for update in updates[1:]:
        meta = update.metadata
        for field in ("model", "task", "kind", "local_hyperparams", "defenses"):
            if getattr(meta, field) != getattr(first, field):
                raise ValueError(
                    f"cannot aggregate updates with different {field}: {getattr(first, field)!r} "
                    f"and {getattr(meta, field)!r}"
                )
        if update.gradients.keys() != updates[0].gradients.keys():
            raise ValueError("cannot aggregate updates that carry different tensors")
    summed = {name: sum(u.gradients[name] for u in updates) for name in updates[0].gradients}
    record = record or SecureAggregation(clients=len(updates))
    seq_len = max(u.metadata.seq_len for u in updates)
    knowledge = Knowledge(
        lengths=_joined([u.metadata.knowledge.lengths for u in updates], seq_len),
        labels=_joined([u.metadata.knowledge.labels for u in updates], seq_len),
    )
    sizes_record = {**record.record(), "client_batch_sizes": [u.metadata.batch_size for u in updates]}
    metadata = replace(
        first,
        batch_size=sum(u.metadata.batch_size for u in updates),
        seq_len=seq_len,
        knowledge=knowledge,
        defenses=first.defenses + (sizes_record,),
    )
    return Update(summed, metadata)  # type: ignore[arg-type]
