"""Exceptions with messages that say what was expected and what was found."""

from __future__ import annotations


class TextleakError(Exception):
    """Base class of every error textleak raises on purpose."""


class ModelLoadError(TextleakError):
    """A model spec could not be turned into a model."""


class UpdateFileError(TextleakError):
    """An update file is unreadable, or does not match the model it is used with."""


class UnknownNameError(TextleakError, KeyError):
    """An attack, defense or task name that no registry knows."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0]) if self.args else ""


class CapabilityError(TextleakError):
    """An attack was given an update that lacks what it needs."""


def unknown_name(kind: str, name: str, known: object) -> UnknownNameError:
    """The error for a name missing from a registry, listing the names that exist."""
    return UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")  # type: ignore[arg-type]
