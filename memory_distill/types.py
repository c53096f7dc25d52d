"""Data types shared across layers: memories, predictions and search hits."""

from __future__ import annotations

import datetime
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

__all__ = ["Memory", "MetadataValue", "PredictionBatch", "RewardPrediction", "SearchHit"]

MetadataValue = str | int | float | bool
RESERVED_PREFIX = "_md_"


def _new_id() -> str:
    return uuid.uuid4().hex


def not_utf8(what: str, s: str) -> str | None:
    """Why ``s`` cannot be stored or embedded (a lone surrogate, e.g. from ``bytes.decode(errors="surrogateescape")``
    or broken JSON escapes, has no UTF-8 form), or ``None`` when it can. Called on every text stored or
    embedded: an ASCII string (a flag CPython keeps) is not encoded."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"{what} holds {s[e.start]!r} at position {e.start}, a lone surrogate with no UTF-8 form: decode the "
                "source with errors='replace' or drop the character")
    return None


def check_metadata(v: Any, *, allow_none: bool = False) -> dict[str, Any]:
    """Validate memory metadata (a dict of str/int/float/bool scalars under non-reserved keys); returns it.

    A ``None`` value means "no value", as in Chroma: it is dropped from the returned copy (LangChain loaders often
    emit ``{"page": None}``). With ``allow_none`` it is kept (``MemoryStore.update_metadata``: remove the key).
    A numpy scalar (a pandas column's ``int64``, a ``bool_``) becomes the Python value in the returned copy.
    """
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"metadata must be a dict of scalars, got {type(v).__name__}")
    has_none = False
    if any(isinstance(value, np.generic) for value in v.values()):
        v = {key: value.item() if isinstance(value, np.generic) else value for key, value in v.items()}
    for key, value in v.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata key {key!r} must be a non-empty string")
        if bad := not_utf8(f"metadata key {key!r}", key):
            raise ValueError(bad)
        if key.startswith(RESERVED_PREFIX) or key.startswith(("$", "#", "chroma:")):
            raise ValueError(
                f"metadata key {key!r} uses a reserved prefix ({RESERVED_PREFIX!r}, '$', '#', 'chroma:'): rename it"
            )
        if value is None:
            has_none = True
            continue
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(
                f"metadata[{key!r}] must be a str, int, float or bool, got "
                f"{type(value).__name__}: flatten it or json.dumps it into a string"
            )
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ValueError(f"metadata[{key!r}] = {value} does not fit in 64 bits: store it as a string")
        if isinstance(value, str) and (bad := not_utf8(f"metadata[{key!r}]", value)):
            raise ValueError(bad)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metadata[{key!r}] must be finite, got {value!r}")
    if allow_none or not has_none:
        return v
    return {key: value for key, value in v.items() if value is not None}


def is_int(v: Any) -> bool:
    """``v`` is a whole number: an int or a numpy integer, not a bool (``True`` is an int to Python)."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def check_flag(v: Any, name: str, what: str = "") -> bool:
    """``v`` as a bool, else a ``TypeError`` naming ``name`` (``"no"`` or ``1`` is truthy: taken as True, it turned
    on what the caller meant to turn off). ``what``: what the flag does, for the message."""
    if not isinstance(v, bool | np.bool_):
        raise TypeError(f"{name} must be True or False{f' ({what})' if what else ''}, got {type(v).__name__} {v!r}")
    return bool(v)


def text_list(texts: Any, who: str) -> list[str]:
    """``texts`` as a list of str; one str (whose letters would be taken one by one), ``None``, a dict or a non-str
    item is a ``TypeError`` naming ``who`` and the fix."""
    if isinstance(texts, str):
        raise TypeError(f"{who} takes a list of texts, got a single str: wrap it as [text]")
    if isinstance(texts, bytes | Mapping) or not isinstance(texts, Iterable):
        raise TypeError(f"{who} takes a list of texts, got {type(texts).__name__}")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
    return out


def is_real(v: Any) -> bool:
    """``v`` is a real number: an int, a float or a numpy one, not a bool (NaN and inf included: check them apart)."""
    return isinstance(v, Real) and not isinstance(v, bool)


def check_reward_value(v: Any, name: str = "reward") -> float:
    """``v`` as a float when it is a finite number (numpy's included, not a bool); a ``ValueError`` naming ``name``
    otherwise. (The store's range is checked apart: it is the store's setting.)"""
    if not is_real(v):
        raise ValueError(f"{name} must be a number or null, got {type(v).__name__} {v!r}")
    if not math.isfinite(float(v)):
        raise ValueError(f"{name} must be finite, got {v!r}: drop the memory or give a real score")
    return float(v)


def check_unix_time(v: float, name: str) -> float:
    """``v`` when it is a Unix time in seconds; a ``ValueError`` naming ``name`` and the fix otherwise."""
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a Unix time in seconds (e.g. time.time()), got {v!r}")
    if v > 1e11:  # after the year 5000: milliseconds (JavaScript's Date.now()) or microseconds
        raise ValueError(f"{name} {v!r} is in milliseconds or finer: give seconds (e.g. ms / 1000)")
    return v


def as_unix_time(v: Any, name: str) -> Any:
    """A ``datetime`` with a timezone, or ISO 8601 text with an offset (``2026-11-28T09:30:00Z``), as Unix seconds;
    other values pass through (numbers are checked by :func:`check_unix_time`). A time without a timezone is refused:
    it could be any of 24 hours."""
    if isinstance(v, str):
        try:
            float(v)
            return v  # a number as text: read as seconds
        except ValueError:
            pass
        try:
            v = datetime.datetime.fromisoformat(v.strip())
        except ValueError:
            raise ValueError(f"{name} {v!r} is neither Unix seconds nor an ISO 8601 time (e.g. 2026-11-28T09:30:00Z)") \
                from None
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError(f"{name} {v.isoformat()} has no timezone: give one (datetime.now(timezone.utc), or an "
                             "ISO time ending in Z or +hh:mm), or Unix seconds")
        return v.timestamp()
    if isinstance(v, datetime.date):
        raise ValueError(f"{name} must be a time, got the date {v.isoformat()}: give a datetime with a timezone, or "
                         "Unix seconds")
    return v


class Memory(BaseModel):
    """One episode: what the agent saw/did/answered, and the reward it earned (maybe later).

    Range checks on ``reward`` against the store's configured range happen in the store,
    which knows the range; here it must only be a finite number or ``None`` (pending).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    id: str = Field(default_factory=_new_id, min_length=1, max_length=512)
    """Unique id within the store (a random hex uuid by default)."""
    text: str
    """The episode as text (input, actions, answer)."""
    reward: float | None = None
    """Scalar reward; ``None`` while the reward has not arrived (set it later with ``set_reward``)."""
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    """Scalar metadata (str, int, float, bool), filterable in search."""
    namespace: str = Field(default="default", min_length=1, max_length=256)
    """Isolation unit: searches in one namespace never see another's memories."""
    created_at: float = Field(default_factory=time.time)
    """Unix time the episode happened (a ``datetime`` with a timezone, or ISO 8601 text with an offset, is converted)."""
    rewarded_at: float | None = None
    """Unix time the reward was set (converted as ``created_at`` is)."""

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError(f"text must be a string (the episode's content), got {type(v).__name__} {v!r:.80}")
        if not v.strip():
            raise ValueError("text is empty: give the episode's content (what was seen/done/answered)")
        if bad := not_utf8("text", v):
            raise ValueError(bad)
        return v

    @field_validator("namespace", "id", mode="before")
    @classmethod
    def _label(cls, v: Any, info: ValidationInfo) -> Any:
        what = "a team, user or project name" if info.field_name == "namespace" else "omit it for a random one"
        if not isinstance(v, str) or not v.strip():  # (" " is a namespace nobody would find again)
            raise ValueError(f"{info.field_name} must be a non-empty string ({what}), got {type(v).__name__} {v!r}")
        if bad := not_utf8(str(info.field_name), v):
            raise ValueError(bad)
        return v

    @field_validator("reward", mode="before")
    @classmethod
    def _reward(cls, v: Any) -> Any:
        return None if v is None else check_reward_value(v)

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, v: Any) -> Any:
        return check_metadata(v)

    @field_validator("created_at", "rewarded_at", mode="before")
    @classmethod
    def _datetime(cls, v: Any, info: ValidationInfo) -> Any:
        return as_unix_time(v, str(info.field_name))

    @field_validator("created_at", "rewarded_at")
    @classmethod
    def _time(cls, v: float | None, info: ValidationInfo) -> float | None:
        return None if v is None else check_unix_time(v, str(info.field_name))

    @property
    def has_reward(self) -> bool:
        return self.reward is not None


def _threshold(t: Any) -> float:
    """A reward threshold: a number, not NaN (every comparison with NaN is False: P(reward > NaN) read 0)."""
    if not is_real(t) or math.isnan(t):
        raise ValueError(f"threshold must be a reward (a number), got {t!r}")
    return float(t)


@dataclass(frozen=True)
class RewardPrediction:
    """The student's belief about the reward of one memory.

    ``probs`` is the distribution over ``support`` (bin centres); ``quantiles`` maps
    0.1/0.25/0.5/0.75/0.9 to rewards.
    """

    mean: float
    std: float
    entropy: float
    quantiles: dict[float, float]
    probs: np.ndarray = field(repr=False)
    support: np.ndarray = field(repr=False)
    model_version: str | None = None
    advantage: float | None = None
    """The ranking head's score (when the student has one): higher = better than the other answers
    to the same prompt. Compare it only between answers to one prompt (best-of-n)."""

    def prob_above(self, threshold: float) -> float:
        """P(reward > threshold) under the predicted distribution (bin-centre approximation)."""
        return float(self.probs[self.support > _threshold(threshold)].sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "std": self.std,
            "entropy": self.entropy,
            "quantiles": {str(k): v for k, v in self.quantiles.items()},
            "model_version": self.model_version,
            "advantage": self.advantage,
        }


@dataclass(frozen=True)
class PredictionBatch:
    """Vectorised predictions for n inputs (arrays of length n, ``probs`` is n x bins)."""

    probs: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    entropy: np.ndarray
    quantiles: dict[float, np.ndarray]
    support: np.ndarray
    model_version: str | None = None
    advantage: np.ndarray | None = None
    """The ranking head's scores (``None`` when the student has none); see :class:`RewardPrediction`."""

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def prob_above(self, threshold: float) -> np.ndarray:
        return self.probs[:, self.support > _threshold(threshold)].sum(axis=1)

    def __getitem__(self, i: int) -> RewardPrediction:
        return RewardPrediction(
            mean=float(self.mean[i]),
            std=float(self.std[i]),
            entropy=float(self.entropy[i]),
            quantiles={q: float(v[i]) for q, v in self.quantiles.items()},
            probs=self.probs[i],
            support=self.support,
            model_version=self.model_version,
            advantage=None if self.advantage is None else float(self.advantage[i]),
        )

    def to_list(self) -> list[RewardPrediction]:
        return [self[i] for i in range(len(self))]


@dataclass(frozen=True)
class SearchHit:
    """A memory returned by search with its cosine similarity to the query (1 = identical)."""

    memory: Memory
    similarity: float
    embedding: np.ndarray | None = field(default=None, repr=False)
