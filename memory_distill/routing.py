"""Routing between a cheap and a strong model by the cheap model's predicted reward.

A student trained on the cheap agent's episodes predicts, from the question alone, how good
the cheap answer will be. ``route`` sends the question to the cheap model when the prediction
clears ``threshold``, else to the strong model. :func:`routing_curve` evaluates every threshold
on questions where both models' real rewards are known.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["RoutingPoint", "routing_curve"]


@dataclass
class RoutingPoint:
    threshold: float
    cheap_fraction: float
    """Share of questions answered by the cheap model."""
    quality: float
    """Mean realised reward of the routed answers."""
    quality_kept: float
    """quality / quality of always using the strong model."""
    cost: float
    """Mean cost per question."""
    cost_saved: float
    """1 - cost / cost of always using the strong model."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def routing_curve(predicted_cheap: np.ndarray, cheap_reward: np.ndarray, strong_reward: np.ndarray, *,
                  cost_cheap: float = 1.0, cost_strong: float = 10.0,
                  thresholds: np.ndarray | None = None) -> list[RoutingPoint]:
    """Quality/cost trade-off for each threshold (answer cheap when predicted >= threshold)."""
    p = np.asarray(predicted_cheap, np.float64)
    c, s = np.asarray(cheap_reward, np.float64), np.asarray(strong_reward, np.float64)
    if not (p.shape == c.shape == s.shape) or p.size == 0:
        raise ValueError(f"need equal non-empty arrays, got {p.shape}, {c.shape}, {s.shape}")
    if thresholds is None:
        thresholds = np.unique(np.concatenate([[-np.inf], np.quantile(p, np.linspace(0, 1, 21)), [np.inf]]))
    strong_q, strong_cost = float(s.mean()), cost_strong
    out = []
    for t in thresholds:
        cheap = p >= t
        q = float(np.where(cheap, c, s).mean())
        cost = float(np.where(cheap, cost_cheap, cost_strong).mean())
        out.append(RoutingPoint(float(t), float(cheap.mean()), q, q / strong_q if strong_q else 1.0, cost,
                                1 - cost / strong_cost))
    return out
