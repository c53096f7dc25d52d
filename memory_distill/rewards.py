"""RewardBins: scalar rewards <-> distributions over a fixed support.

The support is fixed per model (configured, or fitted once from the data with a margin and
then frozen in the model manifest); it is never re-normalised per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import BinsConfig
from .types import is_int, is_real

__all__ = ["QUANTILES", "RewardBins", "summarize_probs"]

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class RewardBins:
    """``n_bins`` equal-width bins over ``[low, high]``."""

    low: float
    high: float
    n_bins: int = 64
    sigma_ratio: float = 0.75

    def __post_init__(self) -> None:
        if not (is_real(self.low) and is_real(self.high) and math.isfinite(self.low) and math.isfinite(self.high)
                and self.low < self.high):
            raise ValueError(f"bins need finite low < high, got [{self.low!r}, {self.high!r}]")
        if not is_int(self.n_bins) or self.n_bins < 2:  # (2.5 was taken, and failed in linspace)
            raise ValueError(f"n_bins must be a whole number >= 2, got {self.n_bins!r}")
        if not is_real(self.sigma_ratio) or not 0 < self.sigma_ratio < math.inf:  # (-1 made every soft target NaN)
            raise ValueError(f"sigma_ratio must be a number > 0 (the soft targets' width in bins), got "
                             f"{self.sigma_ratio!r}")

    # ------------------------------------------------------------- construction

    @classmethod
    def fit(cls, rewards: np.ndarray, config: BinsConfig | None = None) -> RewardBins:
        """Support from config, or the observed range widened by ``margin`` on each side."""
        cfg = config or BinsConfig()
        r = np.asarray(rewards, np.float64)
        r = r[np.isfinite(r)]
        if cfg.low is not None and cfg.high is not None:
            return cls(cfg.low, cfg.high, cfg.n_bins, cfg.sigma_ratio)
        if r.size == 0:
            raise ValueError("cannot fit reward bins without rewards: give BinsConfig(low=, high=)")
        lo, hi = float(r.min()), float(r.max())
        span = hi - lo if hi > lo else max(abs(hi), 1.0)
        low = cfg.low if cfg.low is not None else lo - cfg.margin * span
        high = cfg.high if cfg.high is not None else hi + cfg.margin * span
        return cls(low, high, cfg.n_bins, cfg.sigma_ratio)

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "n_bins": self.n_bins, "sigma_ratio": self.sigma_ratio}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RewardBins:
        return cls(float(d["low"]), float(d["high"]), int(d["n_bins"]), float(d.get("sigma_ratio", 0.75)))

    # ------------------------------------------------------------- geometry

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.n_bins

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, self.n_bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return ((e[:-1] + e[1:]) / 2).astype(np.float32)

    def to_index(self, rewards: np.ndarray) -> np.ndarray:
        """Bin index of each reward (values outside the support go to the end bins)."""
        r = np.asarray(rewards, np.float64)
        idx = np.floor((r - self.low) / self.width).astype(np.int64)
        return np.clip(idx, 0, self.n_bins - 1)

    # ------------------------------------------------------------- targets

    def hard_targets(self, rewards: np.ndarray) -> np.ndarray:
        """One-hot [n, n_bins] float32."""
        idx = self.to_index(rewards)
        out = np.zeros((idx.shape[0], self.n_bins), np.float32)
        out[np.arange(idx.shape[0]), idx] = 1.0
        return out

    def hl_gauss_targets(self, rewards: np.ndarray) -> np.ndarray:
        """HL-Gauss: mass of N(reward, (sigma_ratio * width)^2) in each bin, renormalised over the support."""
        r = np.clip(np.asarray(rewards, np.float64), self.low, self.high)[:, None]
        sigma = self.sigma_ratio * self.width
        z = (self.edges[None, :] - r) / (sigma * math.sqrt(2.0))
        cdf = 0.5 * (1.0 + _erf(z))
        mass = np.diff(cdf, axis=1)
        mass /= mass.sum(axis=1, keepdims=True)
        return mass.astype(np.float32)

    def targets(self, rewards: np.ndarray, kind: str = "hl_gauss") -> np.ndarray:
        if kind == "hard":
            return self.hard_targets(rewards)
        if kind == "hl_gauss":
            return self.hl_gauss_targets(rewards)
        raise ValueError(f"unknown target kind {kind!r}: use 'hl_gauss' or 'hard'")

    # ------------------------------------------------------------- predictions

    def summarize(self, logits: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """probs, mean, std, entropy and quantiles for a batch of logits [n, n_bins]."""
        if isinstance(logits, torch.Tensor):
            probs = torch.softmax(logits.detach().float(), dim=-1).cpu().numpy()
        else:
            x = np.asarray(logits, np.float64)
            x = x - x.max(axis=-1, keepdims=True)
            probs = np.exp(x)
            probs /= probs.sum(axis=-1, keepdims=True)
            probs = probs.astype(np.float32)
        return summarize_probs(probs, self.centers)

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        """Differentiable expected reward [n] from logits."""
        c = torch.as_tensor(self.centers, device=logits.device, dtype=logits.dtype)
        return torch.softmax(logits, dim=-1) @ c


def summarize_probs(probs: np.ndarray, centers: np.ndarray) -> dict[str, Any]:
    """Moments, entropy and quantiles of distributions over ``centers`` (vectorised)."""
    p = np.asarray(probs, np.float64)
    mean = p @ centers
    var = np.maximum(p @ (centers.astype(np.float64) ** 2) - mean**2, 0.0)
    ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    cdf = np.cumsum(p, axis=1)
    quant = {}
    for q in QUANTILES:
        j = np.minimum((cdf < q).sum(axis=1), p.shape[1] - 1)
        quant[q] = centers[j].astype(np.float32)
    return {
        "probs": p.astype(np.float32),
        "mean": mean.astype(np.float32),
        "std": np.sqrt(var).astype(np.float32),
        "entropy": ent.astype(np.float32),
        "quantiles": quant,
    }


def _erf(x: np.ndarray) -> np.ndarray:
    return torch.special.erf(torch.from_numpy(np.asarray(x, np.float64))).numpy()
