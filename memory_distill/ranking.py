"""The student's ranking head: which of several answers to the same prompt is best.

The reward distribution head is trained on every memory at once, so most of what it learns is
*between* prompts (some tasks are hard, some easy). Best-of-n only needs the *within* prompt
part: among the answers to one prompt, which is better. On real judged data these differ. In the
reflexion trajectories, questions with long trajectories are the hard ones (Spearman of a
question's mean length in characters with its mean reward: -0.60), yet within one question
length says little (mean within-question Spearman -0.12). On arena answers, the number of
distinct words ranks the answers to one prompt (0.37) better than it ranks prompts (0.26). A
model fit on rewards pooled over prompts mixes the two and picks worse.

When memories carry a ``group`` (answers to the same prompt or task), consolidation fits a
linear head on the student's own inputs (embedding plus standardised text features) to the
rewards centred within each group: a fixed-effects ridge regression, solved in closed form in
float64 with one pass over the rows, group by group (the embedding matrix is never copied).
The ridge strength is chosen on the validation groups by within-group squared error (the loss
the ridge itself minimises: smoother than a rank statistic over groups of two or three); there too,
a one-weight within-group regression adds the student's expected reward where it explains what
the head leaves (stacking), so the served score is ``head + weight_mean * expected reward``. It
is refit at every consolidation (milliseconds to seconds; nothing is carried over by warm
starts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .evaluate import spearman
from .models import ModelInputs, RewardMLP

__all__ = ["RankingFit", "fit_ranking_head", "group_codes", "within_group_spearman"]

RIDGE_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
"""Ridge strengths tried, relative to the mean diagonal of the centred Gram matrix."""


@dataclass
class RankingFit:
    """What :func:`fit_ranking_head` found (stored in the artifact manifest under ``"ranking"``)."""

    attached: bool
    """Whether the head was attached (enough groups to fit and check it)."""
    reason: str
    n_groups: int
    """Training + validation groups with >= 2 rewarded memories."""
    n_rows: int
    ridge: float | None = None
    """Chosen strength, relative to the mean diagonal of the Gram matrix."""
    weight_mean: float | None = None
    """Weight of the student's expected reward added to the linear head's score (fit on validation groups, >= 0)."""
    val_within_spearman: float | None = None
    """Mean within-group Spearman of the served score on validation groups (where its two weights were fit)."""
    val_within_spearman_mean: float | None = None
    """The same for the student's expected reward (what best-of-n uses without the head)."""
    n_val_groups: int = 0
    holdout_within_spearman: float | None = None
    """Mean within-group Spearman of the head on the held-out groups (set by the job; reported, not gated)."""
    holdout_within_spearman_mean: float | None = None
    """The same for the student's expected reward."""


def within_group_spearman(score: np.ndarray, reward: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Mean Spearman between ``score`` and ``reward`` inside each group with >= 2 distinct rewards."""
    rhos = []
    order = np.argsort(groups, kind="stable")
    g, s, r = groups[order], score[order], reward[order]
    cuts = np.flatnonzero(g[1:] != g[:-1]) + 1
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(g)], strict=True):
        if b - a >= 2 and np.ptp(r[a:b]) > 0:
            rhos.append(spearman(s[a:b], r[a:b]))
    return (float(np.mean(rhos)) if rhos else float("nan")), len(rhos)


def _multi_rows(rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``rows`` of groups that have >= 2 of them, sorted by group (stable)."""
    if len(rows) == 0:
        return rows
    c = codes[rows]
    counts = np.bincount(c)
    keep = rows[counts[c] >= 2]
    return keep[np.argsort(codes[keep], kind="stable")]


def _centred_gram(model: RewardMLP, X: torch.Tensor | ModelInputs, rows: np.ndarray, codes: np.ndarray,
                  rewards: np.ndarray, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Z_c^T Z_c and Z_c^T y_c over ``rows`` (sorted by group), Z = the model's standardised inputs,
    each row centred on its group's mean. Chunks end on group boundaries, so each group's mean is
    computed from all its rows."""
    d = model.input_dim
    dev = X.device
    A = torch.zeros((d, d), dtype=torch.float64, device=dev)
    b = torch.zeros(d, dtype=torch.float64, device=dev)
    c = codes[rows]
    starts = np.r_[0, np.flatnonzero(c[1:] != c[:-1]) + 1]
    bounds = [*starts.tolist(), len(rows)]
    a = 0
    while a < len(rows):
        # extend to at least `chunk` rows, ending on a group boundary
        stop = bounds[min(int(np.searchsorted(bounds, a + chunk)), len(bounds) - 1)]
        idx = rows[a:stop]
        with torch.no_grad():
            Z = model.standardized(X[torch.from_numpy(idx).to(dev)]).to(torch.float64)
        inv = torch.from_numpy(np.unique(codes[idx], return_inverse=True)[1]).to(dev)
        n_g = int(inv.max()) + 1
        cnt = torch.zeros(n_g, dtype=torch.float64, device=dev).index_add_(0, inv, torch.ones(len(idx), dtype=torch.float64, device=dev))
        y = torch.from_numpy(rewards[idx].astype(np.float64)).to(dev)
        Z -= (torch.zeros((n_g, d), dtype=torch.float64, device=dev).index_add_(0, inv, Z) / cnt[:, None])[inv]
        y -= (torch.zeros(n_g, dtype=torch.float64, device=dev).index_add_(0, inv, y) / cnt)[inv]
        A += Z.T @ Z
        b += Z.T @ y
        a = stop
    return A, b


def _centre(v: np.ndarray, g: np.ndarray) -> np.ndarray:
    n = int(g.max()) + 1 if len(g) else 0
    cnt = np.maximum(np.bincount(g, minlength=n), 1)
    return v - (np.bincount(g, weights=v, minlength=n) / cnt)[g]


def _mean_weight(head: np.ndarray, mean: np.ndarray, r: np.ndarray, g: np.ndarray) -> float:
    """How much of the expected reward to add to the head: the within-group least-squares weight of
    the expected reward on what the head leaves unexplained (``>= 0``)."""
    h, m, y = _centre(head, g), _centre(mean, g), _centre(r, g)
    den = float(m @ m)
    return max(float((y - h) @ m) / den, 0.0) if den > 0 else 0.0


def group_codes(groups: Sequence[str] | np.ndarray) -> np.ndarray:
    """Integer codes for group labels (an integer array is taken as codes already)."""
    g = np.asarray(groups)
    if g.dtype.kind in "iu":
        return g
    return np.unique(np.asarray(groups, dtype=object), return_inverse=True)[1]


def fit_ranking_head(student: RewardMLP, X: torch.Tensor | ModelInputs, rewards: np.ndarray,
                     groups: Sequence[str] | np.ndarray,
                     train: np.ndarray, val: np.ndarray, centers: np.ndarray, *, min_groups: int = 5,
                     chunk: int = 8192) -> RankingFit:
    """Fit the within-group ranking head and attach it to ``student`` (``student.set_ranking``).

    1. On ``train`` rows: the fixed-effects ridge of the rewards on the student's standardised
       inputs, for each strength in :data:`RIDGE_GRID` (one eigendecomposition).
    2. On ``val`` rows: the strength whose scores fit the validation rewards best within their
       groups (squared error after centring both on each group), then the weight of the student's expected reward: the within-group
       least-squares fit of what the head leaves unexplained (stacking; ``>= 0``). The served
       score is ``head + weight_mean * expected reward``, so where the distribution head ranks
       well it keeps a say (both are in reward units).
    3. The linear head is refit on train + validation rows with the chosen strength.

    ``groups``: each row's group label, or integer codes (``Split.groups``). ``centers`` are the
    reward bins' centres. Rows with a ``NaN`` reward are ignored. Needs >=
    ``min_groups`` training groups and 2 validation groups with two or more rewarded memories;
    otherwise the student keeps no head and best-of-n ranks by the expected reward.
    """
    student.set_ranking(None)
    codes = group_codes(groups)
    ok = ~np.isnan(rewards)
    tr = _multi_rows(train[ok[train]], codes)
    va = _multi_rows(val[ok[val]], codes)
    n_groups_tr = len(np.unique(codes[tr]))
    if n_groups_tr < min_groups:
        return RankingFit(False, f"{n_groups_tr} training groups with >= 2 rewarded memories (needs {min_groups})",
                          n_groups_tr, len(tr))
    n_val_groups = len(np.unique(codes[va])) if len(va) else 0
    if n_val_groups < 2:
        return RankingFit(False, f"{n_val_groups} validation groups with >= 2 rewarded memories: cannot check the head",
                          n_groups_tr, len(tr))
    student.eval()
    A_tr, b_tr = _centred_gram(student, X, tr, codes, rewards, chunk)
    scale = float(torch.diagonal(A_tr).mean()) or 1.0
    evals, Q = torch.linalg.eigh(A_tr)
    qb = Q.T @ b_tr
    with torch.no_grad():
        zv = student.standardized(X[torch.from_numpy(va).to(X.device)])
        Zv = zv.to(torch.float64)
        mean_v = torch.softmax(student.head(zv), -1).cpu().numpy().astype(np.float64) @ np.asarray(centers, np.float64)
    r_v, g_v = rewards[va].astype(np.float64), np.unique(codes[va], return_inverse=True)[1]
    base, _ = within_group_spearman(mean_v, r_v, g_v)
    fit = RankingFit(False, "", n_groups_tr + n_val_groups, len(tr) + len(va), val_within_spearman_mean=base,
                     n_val_groups=n_val_groups)
    if not np.abs(_centre(r_v, g_v)).max() > 1e-12:
        fit.reason = "no validation group has two different rewards"
        return fit
    # within-group squared error on validation rows (rows of one group are centred together); on
    # this data it picked better strengths than within-group Spearman, which is coarse in groups of 2-3
    y_c = _centre(r_v, g_v)
    best: tuple[float, float, np.ndarray] | None = None
    for lam in RIDGE_GRID:
        h = (Zv @ (Q @ (qb / (evals.clamp_min(0) + lam * scale)))).cpu().numpy()
        err = float(((y_c - _centre(h, g_v)) ** 2).mean())
        if best is None or err < best[0]:
            best = (err, lam, h)
    assert best is not None
    fit.ridge = best[1]
    b = _mean_weight(best[2], mean_v, r_v, g_v)
    fit.weight_mean = b
    fit.val_within_spearman = within_group_spearman(best[2] + b * mean_v, r_v, g_v)[0]
    A_va, b_va = _centred_gram(student, X, va, codes, rewards, chunk)
    A = A_tr + A_va
    A.diagonal().add_(best[1] * float(torch.diagonal(A).mean()))
    w = torch.linalg.solve(A, b_tr + b_va)
    student.set_ranking(w.to(torch.float32), mean_weight=b, centers=torch.from_numpy(np.asarray(centers, np.float32)))
    fit.attached = True
    fit.reason = (f"within-group Spearman on validation groups {fit.val_within_spearman:.3f} "
                  f"vs {base:.3f} for the expected reward alone")
    return fit
