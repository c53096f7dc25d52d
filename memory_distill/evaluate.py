"""Metrics for reward-distribution models, teacher/student comparison, and the promotion gate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .config import GateConfig
from .models import compression_ratio, param_count
from .rewards import QUANTILES, RewardBins, summarize_probs

__all__ = ["EvalReport", "HistogramMix", "ModelMetrics", "compare_teacher_student", "crps", "fit_histogram_mix",
           "model_metrics", "pit_coverage", "reward_histogram", "should_promote", "spearman"]


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (0.0 when either side is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2:
        return 0.0
    ra, rb = _rank(a), _rank(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


@dataclass
class ModelMetrics:
    """Held-out quality of one model against real rewards."""

    n: int
    mae: float
    spearman: float
    nll: float
    calibration_error: float
    """Mean |coverage - q| over q in 0.1/0.25/0.5/0.75/0.9 (0 = calibrated): the fraction of rewards at or below each
    predicted quantile level, read from the probability integral transform at bin resolution (see :func:`pit_coverage`),
    so rewards that take a few values (pass/fail, a 1-10 grade) are judged fairly."""
    within_1_bin: float
    within_3_bins: float
    crps: float
    """Continuous ranked probability score in reward units (lower is better; 0 = all mass on the reward): how far
    the whole predicted distribution is from each reward. Compare it with :func:`crps` of the training rewards'
    histogram, the forecast that knows nothing of the episode."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def pit_coverage(probs: np.ndarray, rewards: np.ndarray, bins: RewardBins,
                 levels: Sequence[float] = QUANTILES) -> np.ndarray:
    """Fraction of ``rewards`` at or below each predicted quantile level, one value per level (ideal: the level).

    The probability integral transform of a reward in bin ``j`` is spread uniformly over ``[F(j-1), F(j)]``, the
    predicted CDF below and at its bin (the non-randomised PIT of Czado, Gneiting and Held, 2009), so the coverage
    is exact in expectation at bin resolution and does not depend on where in its bin a reward falls. Comparing
    rewards with bin-centre quantiles instead misjudges rewards that take a few values: a forecast that puts
    P(pass) on the pass bin would look miscalibrated whenever the pass reward lies above its bin's centre.
    """
    p = np.asarray(probs, np.float64)
    idx = bins.to_index(np.asarray(rewards, np.float64))
    cdf = np.cumsum(p, axis=1)
    hi = cdf[np.arange(len(idx)), idx]
    width = p[np.arange(len(idx)), idx]  # the reward's bin's probability: its PIT is uniform on [hi - width, hi]
    lo = hi - width
    out = []
    for q in levels:
        frac = np.where(width > 1e-12, (q - lo) / np.maximum(width, 1e-12), (q >= hi).astype(np.float64))
        out.append(float(np.clip(frac, 0.0, 1.0).mean()) if len(idx) else float("nan"))
    return np.asarray(out)


def crps(probs: np.ndarray, rewards: np.ndarray, bins: RewardBins) -> float:
    """Mean continuous ranked probability score of distributions over the bin centres (lower is better).

    ``E|X - r| - E|X - X'| / 2`` for ``X, X'`` drawn from the predicted distribution: the mean absolute error of
    the whole distribution, less its own spread, in reward units. A point forecast's CRPS is its absolute error.
    """
    p = np.asarray(probs, np.float64)
    r = np.asarray(rewards, np.float64)
    if len(r) == 0:
        return float("nan")
    cdf = np.cumsum(p, axis=1)[:, :-1]
    spread = _mean_abs_diff(cdf, cdf, bins.width)
    return float(((p * _abs_errors(r, bins)).sum(axis=1) - spread / 2.0).mean())


def _abs_errors(rewards: np.ndarray, bins: RewardBins) -> np.ndarray:
    """``|centre - reward|`` [n, n_bins]."""
    return np.abs(bins.centers.astype(np.float64)[None, :] - rewards[:, None])


def _mean_abs_diff(cdf_a: np.ndarray, cdf_b: np.ndarray, width: float) -> np.ndarray:
    """``E|X - Y|`` per row for independent ``X``, ``Y`` on the bin centres, from their CDFs at the first
    ``n_bins - 1`` centres: each gap between neighbouring centres counts when one falls below it and the other above.
    With ``cdf_a is cdf_b``, a distribution's own spread ``E|X - X'| = 2 * width * sum F (1 - F)``."""
    return width * (cdf_a * (1.0 - cdf_b) + cdf_b * (1.0 - cdf_a)).sum(axis=-1)


def model_metrics(probs: np.ndarray, rewards: np.ndarray, bins: RewardBins) -> ModelMetrics:
    s = summarize_probs(probs, bins.centers)
    r = np.asarray(rewards, np.float64)
    idx = bins.to_index(r)
    p_true = np.clip(probs[np.arange(len(r)), idx], 1e-12, None)
    coverage = pit_coverage(probs, r, bins)
    dist = np.abs(probs.argmax(axis=1) - idx)
    return ModelMetrics(
        n=int(len(r)),
        mae=float(np.abs(s["mean"] - r).mean()),
        spearman=spearman(s["mean"], r),
        nll=float(-np.log(p_true).mean()),
        calibration_error=float(np.mean([abs(c - q) for c, q in zip(coverage, QUANTILES, strict=True)])),
        within_1_bin=float((dist <= 1).mean()),
        within_3_bins=float((dist <= 3).mean()),
        crps=crps(probs, r, bins),
    )


@dataclass
class EvalReport:
    """Teacher vs student on held-out memories."""

    teacher: ModelMetrics
    student: ModelMetrics
    prediction_match: float
    """Teacher/student argmax agreement."""
    kl_divergence: float
    """Mean KL(teacher || student) at T=1."""
    compression_ratio: float
    teacher_params: int
    student_params: int
    student_latency_ms: float
    """Median single-row forward time of the student (no embedding)."""
    retention: float
    """Student Spearman / teacher Spearman (1.0 when the teacher has none to retain)."""
    histogram_crps: float | None = None
    """CRPS on the same rows of the training rewards' histogram, the same forecast for every memory: the student's
    ``crps`` below it means its distributions know something about each memory beyond the base rate."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["teacher"], d["student"] = self.teacher.to_dict(), self.student.to_dict()
        return d


@torch.no_grad()
def predict_probs(model: torch.nn.Module, X: torch.Tensor) -> np.ndarray:
    """The model's reward distributions (softmax of its logits) on ``X``, in eval mode."""
    model.eval()
    return torch.softmax(model(X), dim=-1).cpu().numpy()


@torch.no_grad()
def _latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int = 50) -> float:
    model.eval()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def compare_teacher_student(teacher: torch.nn.Module, student: torch.nn.Module, X: torch.Tensor,
                            rewards: np.ndarray, bins: RewardBins, *,
                            student_probs: np.ndarray | None = None,
                            train_rewards: np.ndarray | None = None) -> EvalReport:
    """All held-out metrics of both models on the same rows ``X`` with real ``rewards``.

    ``student_probs``: the student's distributions on ``X``, when the caller already has them
    (:func:`predict_probs`). ``train_rewards``: the rewards trained on, for ``histogram_crps``."""
    if len(X) == 0:
        raise ValueError("compare_teacher_student needs at least one held-out row")
    pt = predict_probs(teacher, X)
    ps = predict_probs(student, X) if student_probs is None else student_probs
    tm, sm = model_metrics(pt, rewards, bins), model_metrics(ps, rewards, bins)
    kl = float((pt * (np.log(np.clip(pt, 1e-12, None)) - np.log(np.clip(ps, 1e-12, None)))).sum(1).mean())
    retention = sm.spearman / tm.spearman if tm.spearman > 1e-6 else 1.0
    return EvalReport(
        teacher=tm,
        student=sm,
        prediction_match=float((pt.argmax(1) == ps.argmax(1)).mean()),
        kl_divergence=kl,
        compression_ratio=compression_ratio(teacher, student),
        teacher_params=param_count(teacher),
        student_params=param_count(student),
        student_latency_ms=_latency_ms(student, X[:1]),
        retention=float(retention),
        histogram_crps=None if train_rewards is None else _histogram_crps(train_rewards, rewards, bins),
    )


def reward_histogram(rewards: np.ndarray, bins: RewardBins) -> np.ndarray | None:
    """The share of ``rewards`` (NaN: pending, skipped) in each bin: the base-rate forecast, the same for every
    memory. None without a reward."""
    seen = np.asarray(rewards, np.float64)
    seen = seen[np.isfinite(seen)]
    if not seen.size:
        return None
    return np.bincount(bins.to_index(seen), minlength=bins.n_bins) / seen.size  # no one-hot matrix per row


MIX_GRID = tuple(round(0.05 * i, 2) for i in range(19))
"""Histogram-mix weights tried: 0, 0.05, ..., 0.9 (never 1, which would forget the student)."""


@dataclass
class HistogramMix:
    """What :func:`fit_histogram_mix` found (stored in the artifact manifest under ``"histogram_mix"``)."""

    weight: float
    """The histogram's share of the served distribution (0: the student's distribution as distilled)."""
    val_crps: float
    """CRPS on the validation rows with that weight."""
    val_crps_student: float
    """CRPS on the validation rows of the student's distribution alone."""
    n_val: int
    reason: str = ""
    not_tried: str = ""
    """Why no weight was fitted (too few validation rows, no training rewards); empty when one was."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_histogram_mix(probs: np.ndarray, rewards: np.ndarray, prior: np.ndarray | None, bins: RewardBins, *,
                      grid: Sequence[float] = MIX_GRID, min_rows: int = 20) -> HistogramMix:
    """The weight ``w`` of the prior (the training rewards' histogram) in ``(1 - w) * probs + w * prior`` that
    gives the lowest CRPS on these rows (the validation groups: answers to prompts the models never trained on),
    the smallest such ``w`` on ties; 0 with fewer than ``min_rows`` rewarded rows or no prior.

    A network fit to a few hundred groups is often surer on new groups than it has reason to be: on the real
    data (``benchmarks/run.py --only uncertainty``) this linear pool with the base rate lowers held-out CRPS and
    calibration error where the student is overconfident, and picks ``w`` near 0 where it is not. The expected
    rewards keep their order, so rankings and best-of-n picks do not change.
    """
    r = np.asarray(rewards, np.float64)
    ok = np.isfinite(r)
    p, r = np.asarray(probs, np.float64)[ok], r[ok]
    if prior is None or len(r) < min_rows:
        why = "no training rewards" if prior is None else f"{len(r)} rewarded validation rows, needs {min_rows}"
        base = crps(p, r, bins) if len(r) else float("nan")
        return HistogramMix(0.0, base, base, int(len(r)), f"not mixed: {why}", not_tried=why)
    # CRPS = E|X - r| - E|X - X'| / 2 is quadratic in w for the mix: the first term is linear, the second mixes
    # E|X - X'| within and across the two distributions (one pass over the rows, then every weight for free)
    h = np.asarray(prior, np.float64)
    dist = _abs_errors(r, bins)
    a_p, a_h = float((p * dist).sum(1).mean()), float((dist @ h).mean())
    fp, fh = np.cumsum(p, axis=1)[:, :-1], np.cumsum(h)[:-1]
    s_pp = float(_mean_abs_diff(fp, fp, bins.width).mean())
    s_hh = float(_mean_abs_diff(fh, fh, bins.width))
    s_ph = float(_mean_abs_diff(fp, fh, bins.width).mean())

    def mixed(w: float) -> float:
        return (1 - w) * a_p + w * a_h - ((1 - w) ** 2 * s_pp + 2 * w * (1 - w) * s_ph + w**2 * s_hh) / 2

    alone = mixed(0.0)
    scores = [mixed(float(w)) for w in grid]
    best = int(np.argmin(scores))
    w = float(grid[best])
    return HistogramMix(w, float(scores[best]), float(alone), int(len(r)),
                        f"validation CRPS {scores[best]:.4f} with weight {w:.2f} vs {alone:.4f} for the student alone, "
                        f"{len(r)} rows")


def _histogram_crps(train_rewards: np.ndarray, rewards: np.ndarray, bins: RewardBins) -> float | None:
    hist = reward_histogram(train_rewards, bins)
    return None if hist is None else crps(np.broadcast_to(hist, (len(rewards), bins.n_bins)), rewards, bins)


HIGHER_IS_BETTER = {"spearman": True, "mae": False, "nll": False, "crps": False}


def should_promote(candidate: ModelMetrics, incumbent: ModelMetrics | None, gate: GateConfig,
                   *, incumbent_stale: bool = False) -> tuple[bool, str]:
    """Promote unless the candidate regresses the incumbent by more than ``gate.tolerance``."""
    if incumbent is None:
        return True, "no published model yet"
    if incumbent_stale:
        return True, "the published model was trained on deleted memories and must be replaced"
    if candidate.n < gate.min_holdout:
        return False, (f"only {candidate.n} held-out memories (< gate.min_holdout={gate.min_holdout}): "
                       "too few to prove a replacement is not worse")
    c, i = getattr(candidate, gate.metric), getattr(incumbent, gate.metric)
    worse_by = (i - c) if HIGHER_IS_BETTER[gate.metric] else (c - i)
    if worse_by > gate.tolerance:
        return False, (f"{gate.metric} {c:.4f} regresses the published model's {i:.4f} by {worse_by:.4f} "
                       f"(> tolerance {gate.tolerance})")
    return True, f"{gate.metric} {c:.4f} vs published {i:.4f} (within tolerance {gate.tolerance})"
