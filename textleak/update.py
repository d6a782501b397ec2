"""The update a client sends: named gradient tensors plus metadata, saved as safetensors with a JSON header.

Update files come from other people, so they are never unpickled: tensors live in safetensors and the metadata
is a JSON string in the safetensors header under the key ``textleak``. Loading checks every tensor against the
model the attacker will use and names the first mismatch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from textleak.errors import UpdateFileError
from textleak.models import ModelSource

FORMAT_VERSION = 1
METADATA_KEY = "textleak"


@dataclass(frozen=True)
class Knowledge:
    """What the attacker is assumed to know besides the gradients (None = not known).

    lengths: real tokens per sequence, [CLS] and [SEP] included.
    labels: classification labels per sequence, or per-token label ids (-100 = ignored) for mlm / all-tokens.
    """

    lengths: tuple[int, ...] | None = None
    labels: tuple[Any, ...] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Knowledge:
        def as_tuple(value: Any) -> Any:
            return None if value is None else tuple(tuple(v) if isinstance(v, list) else v for v in value)

        return cls(lengths=as_tuple(data.get("lengths")), labels=as_tuple(data.get("labels")))


@dataclass(frozen=True)
class UpdateMetadata:
    """Everything about an update except its tensors; round-trips through JSON."""

    model: ModelSource
    task: str
    batch_size: int
    seq_len: int
    knowledge: Knowledge = field(default_factory=Knowledge)
    kind: str = "gradient"
    client_seed: int = 0
    defenses: tuple[dict[str, Any], ...] = ()
    local_hyperparams: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UpdateMetadata:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise UpdateFileError(
                f"update format version {data.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
            )
        data["model"] = ModelSource.from_dict(data["model"])
        data["knowledge"] = Knowledge.from_dict(data["knowledge"])
        data["defenses"] = tuple(data.get("defenses", ()))
        return cls(**data)


@dataclass(frozen=True)
class Update:
    """Named gradients (or weight deltas) as a client sends them, with metadata."""

    gradients: dict[str, torch.Tensor]
    metadata: UpdateMetadata

    def __repr__(self) -> str:
        meta = self.metadata
        return (
            f"Update({meta.kind} of {meta.model.spec!r}, task={meta.task}, batch={meta.batch_size}, "
            f"seq_len={meta.seq_len}, tensors={len(self.gradients)}, "
            f"knows lengths={meta.knowledge.lengths is not None} labels={meta.knowledge.labels is not None}, "
            f"defenses={[d.get('name') for d in meta.defenses]})"
        )

    def with_gradients(self, gradients: dict[str, torch.Tensor], **metadata_changes: Any) -> Update:
        """A copy with other tensors (e.g. after a defense) and optionally changed metadata."""
        return Update(gradients, replace(self.metadata, **metadata_changes))

    def save(self, path: str | Path) -> Path:
        """Write the update as safetensors with the metadata as a JSON header."""
        path = Path(path)
        check_finite(self.gradients)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.gradients.items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: self.metadata.to_json()})
        return path

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module | None = None) -> Update:
        """Read an update file; with ``model``, check names, shapes and dtypes against it."""
        path = Path(path)
        if not path.is_file():
            raise UpdateFileError(f"update file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                gradients = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except Exception as error:  # safetensors raises its own untyped errors on damaged files
            raise UpdateFileError(
                f"could not read update file {path}: {error} (truncated, or not a safetensors file?)"
            ) from error
        if METADATA_KEY not in header:
            raise UpdateFileError(f"update file {path} has no '{METADATA_KEY}' metadata header")
        try:
            metadata = UpdateMetadata.from_json(header[METADATA_KEY])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UpdateFileError(f"update file {path} has a malformed metadata header: {error}") from error
        update = cls(gradients, metadata)
        check_finite(update.gradients)
        if model is not None:
            check_matches_model(update, model)
        return update


def check_finite(gradients: dict[str, torch.Tensor]) -> None:
    """Raise naming the first tensor holding NaN or infinity."""
    for name, tensor in gradients.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise UpdateFileError(f"gradient {name!r} has {bad} non-finite values (NaN or infinity)")


def check_matches_model(update: Update, model: torch.nn.Module) -> None:
    """Raise naming the first tensor that is not a parameter of ``model`` with the same shape and a float dtype."""
    params = dict(model.named_parameters())
    for name, tensor in update.gradients.items():
        if name not in params:
            example = next(iter(params), "")
            raise UpdateFileError(
                f"update tensor {name!r} is not a parameter of the model ({len(params)} parameters, e.g. "
                f"{example!r}); was the update made with another model (update says {update.metadata.model.spec!r})?"
            )
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise UpdateFileError(
                f"update tensor {name!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(params[name].shape)}; the update was made with {update.metadata.model.spec!r}"
            )
        if not tensor.is_floating_point():
            raise UpdateFileError(f"update tensor {name!r} has dtype {tensor.dtype}; expected a float dtype")
