"""Text statistics the reward models see next to the embedding.

Embeddings are L2-normalised, so they carry almost nothing about how long or how structured a
text is, and on real judged data that is one of the strongest signals there is (GPT-4 judges
prefer longer, structured answers; failed agent trajectories ramble). Four cheap statistics put it
back: log1p of characters, words, line breaks and distinct lowercase words.

The store keeps the raw counts with every memory (one metadata string, written at ``add``), so
consolidation reads them with the metadata it already pages through and never re-reads texts.
The models standardise the features with statistics of their training rows (kept in the
weights), and a row without them (``NaN``, e.g. a memory written by an older version, or a
prediction from an embedding alone) gets the training mean: a neutral input, not a guess.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["N_TEXT_FEATURES", "TEXT_FEATURES", "decode_stats", "encode_stats", "text_stats"]

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
    if isinstance(texts, str):
        raise TypeError("text_stats takes a list of texts: wrap a single text as [text]")
    out = np.array([_counts(t) for t in texts], np.float32).reshape(len(texts), N_TEXT_FEATURES)
    return np.log1p(out, out=out)
