"""Exceptions. Every message says what was received and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ArtifactError",
    "ConsolidationError",
    "DeviceError",
    "EmbedderMismatchError",
    "EmbeddingError",
    "InvalidMemoryError",
    "JobLockedError",
    "MemoryDistillError",
    "MemoryNotFoundError",
    "NoModelError",
    "NotEnoughDataError",
    "StoreError",
    "UnchangedDataError",
]


class MemoryDistillError(Exception):
    """Base class of every error raised on purpose by memory_distill."""


class InvalidMemoryError(MemoryDistillError, ValueError):
    """A memory (or a line of an import) failed validation; the message names the item and field."""


class EmbeddingError(MemoryDistillError):
    """The embedder failed (API errors after retries, malformed responses, wrong dimensions)."""


class EmbedderMismatchError(MemoryDistillError):
    """A store or model was built with a different embedder (name or dimension) than the one given."""


class StoreError(MemoryDistillError):
    """The memory store refused an operation (duplicate ids, bad filters, server unreachable)."""


class MemoryNotFoundError(StoreError, KeyError):
    """No memory with the given id."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class NotEnoughDataError(MemoryDistillError):
    """Too few rewarded memories to train or evaluate."""


class ArtifactError(MemoryDistillError):
    """A model artifact is missing, corrupt or incompatible."""


class NoModelError(ArtifactError):
    """No model has been published yet."""


class ConsolidationError(MemoryDistillError):
    """A consolidation job failed; nothing was published."""


class DeviceError(MemoryDistillError, RuntimeError):
    """The configured device is not there (``device="cuda"`` on a machine or torch build without a GPU)."""


class JobLockedError(MemoryDistillError):
    """Another consolidation holds the single-writer lock of this registry."""


class UnchangedDataError(MemoryDistillError):
    """A run asked to skip unchanged data (``skip_unchanged=True``, what the worker does) found the memories and
    the job's settings exactly as the current model's last run saw them: nothing new to learn, nothing trained."""

    def __init__(self, message: str, *, version: str, fingerprint: str, n_rewarded: int = 0) -> None:
        super().__init__(message)
        self.version = version
        """The current model, still serving."""
        self.fingerprint = fingerprint
        self.n_rewarded = n_rewarded


def nearest_name(name: str, names: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The one of ``names`` that ``name`` most likely misspells, ignoring case (``Rewrd`` -> ``reward``), as spelt
    in ``names``; ``None`` when none is close. For "did you mean ...?" hints."""
    by_lower = {n.lower(): n for n in names}
    near = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=cutoff)
    return by_lower[near[0]] if near else None
