"""Features the reward models see next to the embedding: text statistics and metadata categories.

Embeddings are L2-normalised, so they carry almost nothing about how long or how structured a
text is, and on real judged data that is one of the strongest signals there is (GPT-4 judges
prefer longer, structured answers; failed agent trajectories ramble). Four cheap statistics put it
back: log1p of characters, words, line breaks and distinct lowercase words.

The store keeps the raw counts with every memory (one metadata string, written at ``add``), so
consolidation reads them with the metadata it already pages through and never re-reads texts.
The models standardise the features with statistics of their training rows (kept in the
weights), and a row without them (``NaN``, e.g. a memory written by an older version, or a
prediction from an embedding alone) gets the training mean: a neutral input, not a guess.

Metadata features (``JobConfig.metadata_features``, e.g. ``("agent",)``): the episode's own
record of *which* action, agent, tool or prompt produced it, one 0/1 column per value seen in
training (:class:`FeatureSpec`), or, for a key whose values are all numbers (a cost, a latency, a
step count; not a handful of whole-number codes), one column of ``sign(x) * log1p(|x|)``. That is often what decides the reward,
and no embedding of the text shows it reliably. The spec is saved in the artifact manifest, so predictions encode new
memories exactly as in training.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .types import text_list

__all__ = ["N_TEXT_FEATURES", "TEXT_FEATURES", "FeatureSpec", "decode_stats", "encode_stats", "metadata_columns",
           "text_stats"]

TEXT_FEATURES = "text-stats-v1"
"""Name of the feature set, recorded in artifact manifests."""
N_TEXT_FEATURES = 4


def _counts(text: str) -> tuple[int, int, int, int]:
    words = text.split()
    return len(text), len(words), text.count("\n"), len({w.lower() for w in words})


def encode_stats(text: str) -> str:
    """Raw counts as the compact metadata string the store writes (``"chars,words,lines,unique"``)."""
    return ",".join(str(c) for c in _counts(text))


def decode_stats(values: Sequence[str | None]) -> np.ndarray:
    """Metadata strings -> features [n, 4] (float32, log1p); ``NaN`` rows where a value is missing or bad."""
    out = np.full((len(values), N_TEXT_FEATURES), np.nan, np.float32)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            continue
        parts = v.split(",")
        if len(parts) != N_TEXT_FEATURES:
            continue
        try:
            out[i] = [float(p) for p in parts]
        except ValueError:
            continue
    return np.log1p(out, out=out)


def text_stats(texts: Sequence[str]) -> np.ndarray:
    """Features [n, 4] (float32): log1p of characters, words, line breaks and distinct lowercase words."""
    texts = text_list(texts, "text_stats")
    out = np.array([_counts(t) for t in texts], np.float32).reshape(len(texts), N_TEXT_FEATURES)
    return np.log1p(out, out=out)


# ---------------------------------------------------------------------------- metadata features

METADATA_MAX_VALUES = 64
"""At most this many values of one metadata key get a column (the most frequent ones)."""
METADATA_MIN_COUNT = 2
"""A value must occur in at least this many memories to get a column."""
METADATA_INT_CATEGORIES = 16
"""A key of whole numbers with at most this many distinct values is read as categories (codes like
``strategy=3``); with more (step counts, token counts) it is read as a number."""


def metadata_columns(rows: Sequence[Mapping[str, Any] | None], keys: Sequence[str]) -> dict[str, list[Any]]:
    """Row-wise metadata dicts -> ``{key: [value or None per row]}`` for these keys."""
    return {k: [None if r is None else r.get(k) for r in rows] for k in keys}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and bool(np.isfinite(v))


def _number(v: Any) -> float:
    """``sign(x) * log1p(|x|)``: heavy-tailed counts and costs on a scale the models can standardise; NaN if not a number."""
    return float(np.sign(v) * np.log1p(abs(v))) if _is_number(v) else float("nan")


def _category(v: Any) -> str | None:
    if v is None or isinstance(v, float) and v != v:
        return None
    return str(v)


@dataclass(frozen=True)
class FeatureSpec:
    """What a model reads after the embedding, in column order.

    First the four text statistics (when ``text``), then for each metadata key its block: for a
    key in ``numeric``, one column ``sign(x) * log1p(|x|)``; otherwise one 0/1 column per known
    value (``metadata`` = ``((key, (value, ...)), ...)``; a numeric key has no values there). A key
    is numeric when every training value of it is a number (``int``/``float``, not ``bool``) and
    they are not a few whole numbers (:meth:`fit`); a key that mixes numbers with strings is
    categorical, numbers by their string. A memory
    without the key, with a value not seen in training, or with a non-number for a numeric key,
    gets ``NaN`` in that key's columns, which the models read as the training mean: a neutral
    input, so a new agent or tool is neither favoured nor penalised.
    """

    text: bool = True
    metadata: tuple[tuple[str, tuple[str, ...]], ...] = ()
    numeric: tuple[str, ...] = ()
    """Keys encoded as one number column each (in ``metadata`` with no values)."""

    def _block(self, key: str, vals: tuple[str, ...]) -> int:
        return 1 if key in self.numeric else len(vals)

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.metadata]

    @property
    def metadata_width(self) -> int:
        return sum(self._block(k, v) for k, v in self.metadata)

    @property
    def width(self) -> int:
        """Number of feature columns (the models' ``n_features``)."""
        return (N_TEXT_FEATURES if self.text else 0) + self.metadata_width

    @property
    def columns(self) -> list[str]:
        """Column names: ``chars, words, lines, unique`` then ``key=value``, or ``key`` for a numeric key."""
        head = ["chars", "words", "lines", "unique"] if self.text else []
        return head + [c for k, vals in self.metadata for c in ([k] if k in self.numeric else [f"{k}={v}" for v in vals])]

    @classmethod
    def fit(cls, *, text: bool, columns: Mapping[str, Sequence[Any]] | None = None,
            max_values: int = METADATA_MAX_VALUES, min_count: int = METADATA_MIN_COUNT) -> FeatureSpec:
        """The vocabulary of each metadata key in ``columns`` (``{key: values per row}``).

        A key whose present values are all numbers is numeric (one column) when one of them is
        not a whole number or there are more than :data:`METADATA_INT_CATEGORIES` distinct ones;
        a few whole numbers are category codes. Otherwise: values seen at least ``min_count`` times, the ``max_values`` most
        frequent, in sorted order (so the columns do not move when counts change). A key with
        fewer than two such values gets no columns (one value says nothing); it is still recorded.
        """
        meta: list[tuple[str, tuple[str, ...]]] = []
        numeric: list[str] = []
        for key, values in (columns or {}).items():
            present = [v for v in values if _category(v) is not None and not (isinstance(v, float) and np.isinf(v))]
            if present and all(_is_number(v) for v in present):
                distinct = {float(v) for v in present}
                if len(distinct) > METADATA_INT_CATEGORIES or any(not v.is_integer() for v in distinct):
                    meta.append((key, ()))
                    numeric.append(key)
                    continue
            counts = Counter(c for c in map(_category, values) if c is not None)
            kept = [v for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count][:max_values]
            meta.append((key, tuple(sorted(kept)) if len(kept) >= 2 else ()))
        return cls(bool(text), tuple(meta), tuple(numeric))

    def reads_as_unknown(self, key: str, value: Any) -> bool:
        """Whether the model reads this value of metadata ``key`` as unknown (the training mean): missing (``None``),
        a value not seen in training, or a non-number for a numeric key."""
        if key in self.numeric:
            return not _is_number(value)
        vals = dict(self.metadata).get(key, ())
        return _category(value) not in vals

    def encode_metadata(self, columns: Mapping[str, Sequence[Any]] | None, n: int) -> np.ndarray:
        """Metadata features [n, metadata_width] (float32): one-hot blocks and number columns; ``NaN`` where unknown."""
        out = np.zeros((n, self.metadata_width), np.float32)
        col = 0
        for key, vals in self.metadata:
            width = self._block(key, vals)
            if not width:
                continue
            index = {v: i for i, v in enumerate(vals)}
            block = out[:, col : col + width]
            given = (columns or {}).get(key)
            if given is None:
                block[:] = np.nan
            else:
                if len(given) != n:
                    raise ValueError(f"metadata column {key!r} has {len(given)} values for {n} rows")
                if key in self.numeric:
                    block[:, 0] = [_number(v) for v in given]
                    col += width
                    continue
                for i, v in enumerate(given):
                    j = index.get(_category(v))  # type: ignore[arg-type]
                    if j is None:
                        block[i] = np.nan
                    else:
                        block[i, j] = 1.0
            col += width
        return out

    def build(self, n: int, *, text_features: np.ndarray | None = None,
              metadata: Mapping[str, Sequence[Any]] | None = None) -> np.ndarray | None:
        """The feature matrix [n, width] (``None`` when the spec has no columns).

        ``text_features``: :func:`text_stats` of the rows (``None``: unknown, the training mean;
        ignored when the spec has no text columns).
        ``metadata``: ``{key: value per row}`` (see :func:`metadata_columns`).
        """
        if not self.width:
            return None
        parts = []
        if self.text:
            if text_features is None:
                parts.append(np.full((n, N_TEXT_FEATURES), np.nan, np.float32))
            else:
                tf = np.asarray(text_features, np.float32)
                if tf.shape != (n, N_TEXT_FEATURES):
                    raise ValueError(f"text features must be [{n}, {N_TEXT_FEATURES}], got {list(tf.shape)}")
                parts.append(tf)
        if self.metadata_width:
            parts.append(self.encode_metadata(metadata, n))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"text": TEXT_FEATURES if self.text else None,
                             "metadata": {k: list(v) for k, v in self.metadata}}
        if self.numeric:
            d["numeric"] = list(self.numeric)
        return d

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], n_features: int) -> FeatureSpec:
        """The spec a published model was trained with (artifacts from before metadata features: text only)."""
        d = manifest.get("feature_spec")
        if isinstance(d, Mapping):
            spec = cls(d.get("text") is not None,
                       tuple((str(k), tuple(str(x) for x in v)) for k, v in (d.get("metadata") or {}).items()),
                       tuple(str(k) for k in d.get("numeric") or ()))
        else:
            spec = cls(text=n_features == N_TEXT_FEATURES)
        if spec.width != n_features:
            raise ValueError(f"the manifest's features ({spec.width} columns) do not match the model's {n_features}")
        return spec
