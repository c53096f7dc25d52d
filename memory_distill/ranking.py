"""The student's ranking head: which of several answers to the same prompt is best.

The reward distribution head is trained on every memory at once, so most of what it learns is
*between* prompts (some tasks are hard, some easy). Best-of-n only needs the *within* prompt
part: among the answers to one prompt, which is better. On real judged data these differ (on
arena answers, length goes with a lower reward across prompts but a higher one within a
prompt), and a model fit on rewards pooled over prompts picks worse.

When memories carry a ``group`` (answers to the same prompt or task), consolidation fits a
linear head on the student's own inputs (embedding plus standardised text features) to the
rewards centred within each group: a fixed-effects ridge regression, solved in closed form in
float64 with one pass over the rows, group by group (the embedding matrix is never copied).
The ridge strength is chosen on the validation groups by mean within-group Spearman, and the
head is kept only when it ranks the validation groups better than the student's expected
reward does. It is refit at every consolidation (a few milliseconds to seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .evaluate import spearman
from .models import ModelInputs, RewardMLP

__all__ = ["RankingFit", "fit_ranking_head", "within_group_spearman"]

RIDGE_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
"""Ridge strengths tried, relative to the mean diagonal of the centred Gram matrix."""


@dataclass
class RankingFit:
    """What :func:`fit_ranking_head` found (stored in the artifact manifest under ``"ranking"``)."""

    attached: bool
    """Whether the head was kept (it ranks validation groups better than the expected reward)."""
    reason: str
    n_groups: int
    """Training + validation groups with >= 2 rewarded memories."""
    n_rows: int
    ridge: float | None = None
    """Chosen strength, relative to the mean diagonal of the Gram matrix."""
    val_within_spearman: float | None = None
    """Mean within-group Spearman of the head on validation groups."""
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


def fit_ranking_head(student: RewardMLP, X: torch.Tensor | ModelInputs, rewards: np.ndarray, groups: list[str],
                     train: np.ndarray, val: np.ndarray, centers: np.ndarray, *, min_groups: int = 5,
                     chunk: int = 8192) -> RankingFit:
    """Fit the within-group ranking head on ``train`` rows, choose its ridge strength and keep it or
    not on ``val`` rows, refit on both, and attach it to ``student`` (``student.set_ranking``).

    ``centers`` are the reward bins' centres (for the expected reward it is compared with). Rows
    with a ``NaN`` reward are ignored. Needs >= ``min_groups`` training groups with two or
    more rewarded memories; otherwise the student keeps no head and best-of-n ranks by the expected
    reward.
    """
    student.set_ranking(None)
    codes = np.unique(np.asarray(groups, dtype=object), return_inverse=True)[1]
    ok = ~np.isnan(rewards)
    tr = _multi_rows(train[ok[train]], codes)
    va = _multi_rows(val[ok[val]], codes)
    n_groups_tr = len(np.unique(codes[tr]))
    if n_groups_tr < min_groups:
        return RankingFit(False, f"{n_groups_tr} training groups with >= 2 rewarded memories (needs {min_groups})",
                          n_groups_tr, len(tr))
    student.eval()
    A_tr, b_tr = _centred_gram(student, X, tr, codes, rewards, chunk)
    scale = float(torch.diagonal(A_tr).mean()) or 1.0
    evals, Q = torch.linalg.eigh(A_tr)
    qb = Q.T @ b_tr
    n_val_groups = len(np.unique(codes[va])) if len(va) else 0
    if n_val_groups < 2:
        return RankingFit(False, f"{n_val_groups} validation groups with >= 2 rewarded memories: cannot check the head",
                          n_groups_tr, len(tr))
    with torch.no_grad():
        dev = X.device
        Zv = student.standardized(X[torch.from_numpy(va).to(dev)]).to(torch.float64)
        probs_v = torch.softmax(student(X[torch.from_numpy(va).to(dev)]), -1).cpu().numpy()
    r_v, g_v = rewards[va], codes[va]
    base, _ = within_group_spearman(probs_v.astype(np.float64) @ np.asarray(centers, np.float64), r_v, g_v)
    best: tuple[float, float] | None = None
    for lam in RIDGE_GRID:
        w = Q @ (qb / (evals.clamp_min(0) + lam * scale))
        rho, _ = within_group_spearman((Zv @ w).cpu().numpy(), r_v, g_v)
        if not np.isnan(rho) and (best is None or rho > best[0]):
            best = (rho, lam)
    fit = RankingFit(False, "", n_groups_tr + n_val_groups, len(tr) + len(va), val_within_spearman_mean=base,
                     n_val_groups=n_val_groups)
    if best is None:
        fit.reason = "no validation group has two different rewards"
        return fit
    fit.val_within_spearman, fit.ridge = best
    if not np.isnan(base) and best[0] <= base:
        fit.reason = (f"the head ranks validation groups no better than the expected reward "
                      f"(within-group Spearman {best[0]:.3f} vs {base:.3f})")
        return fit
    A_va, b_va = _centred_gram(student, X, va, codes, rewards, chunk)
    A = A_tr + A_va
    A.diagonal().add_(best[1] * float(torch.diagonal(A).mean()))
    w = torch.linalg.solve(A, b_tr + b_va)
    student.set_ranking(w.to(torch.float32))
    fit.attached = True
    fit.reason = f"within-group Spearman on validation groups {best[0]:.3f} vs {base:.3f} for the expected reward"
    return fit
