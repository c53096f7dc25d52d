"""Phase 2: distil the frozen teacher into the student, on rows a curriculum chooses.

Teacher logits are computed once (the teacher is frozen), so each step costs one student
forward/backward. Loss: ``alpha * KL(teacher_T || student_T) * T^2 + beta * CE(student, targets)``;
rows without a reward contribute through the KL term only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import DistillConfig
from .curriculum import Curriculum, difficulty_scores, epoch_reward, make_curriculum
from .losses import distillation_loss, kd_kl
from .models import ModelInputs, effective_batch_size
from .teacher import EarlyStopping

__all__ = ["DistillReport", "distill", "teacher_logits"]

log = logging.getLogger(__name__)


@dataclass
class DistillReport:
    curriculum: str = "uniform"
    epochs_run: int = 0
    best_epoch: int = -1
    best_val_loss: float = float("inf")
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_kl: list[float] = field(default_factory=list)
    """Mean KL(teacher || student) at T=1 on validation rows, per epoch."""
    val_agreement: list[float] = field(default_factory=list)
    """Teacher/student argmax agreement on validation rows, per epoch."""
    samples_per_epoch: list[int] = field(default_factory=list)
    epoch_rewards: list[float] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    samples_seen: int = 0
    # adaptive teaching
    agreement_rate: float = 0.0
    cumulative_reward: float = 0.0
    transfer_rate_per_1k: float = 0.0
    curriculum_state: dict[str, object] = field(default_factory=dict)

    def samples_to_kl(self, target_kl: float) -> int | None:
        """Training samples seen when validation KL first fell to ``target_kl`` (None if never)."""
        seen = 0
        for n, kl in zip(self.samples_per_epoch, self.val_kl, strict=False):
            seen += n
            if kl <= target_kl:
                return seen
        return None


@torch.no_grad()
def teacher_logits(model: torch.nn.Module, X: torch.Tensor | ModelInputs, batch_size: int = 8192,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits for every row of ``X`` (or for ``X[rows]``, gathered chunk by chunk), in eval mode."""
    model.eval()
    n = X.shape[0] if rows is None else rows.shape[0]
    if n == 0:
        return torch.zeros((0, 0), device=X.device)
    return torch.cat([model(X[s : s + batch_size] if rows is None else X[rows[s : s + batch_size]])
                      for s in range(0, n, batch_size)])


def _student_logits(model: torch.nn.Module, X: torch.Tensor | ModelInputs, batch_size: int = 8192,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    return teacher_logits(model, X, batch_size, rows)


def agreement_similarity(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """exp(-KL(teacher || student)) at T=1, per row, in (0, 1]: 1 when the distributions match.

    (The Bhattacharyya coefficient of two smooth 64-bin distributions is almost always > 0.8,
    so it cannot separate agreement from disagreement; exp(-KL) can.)
    """
    return torch.exp(-kd_kl(s_logits, t_logits, 1.0, reduction="none"))


def distill(
    student: torch.nn.Module,
    X: torch.Tensor | ModelInputs,
    t_logits: torch.Tensor,
    Y: torch.Tensor,
    labeled: torch.Tensor,
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    cfg: DistillConfig,
    *,
    generator: torch.Generator,
    curriculum: Curriculum | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    rows: torch.Tensor | None = None,
) -> DistillReport:
    """Train ``student`` to match ``t_logits`` (precomputed on X) and the targets ``Y``.

    ``labeled`` [n] bool marks rows with a reward. ``val`` = (X, teacher logits, Y, labeled).
    ``rows`` (optional): distil on ``X[rows]`` without copying it; ``t_logits``, ``Y`` and
    ``labeled`` are then aligned with ``rows``.
    Early stopping on validation distillation loss restores the best weights.
    """
    t0 = time.perf_counter()
    cur = curriculum or make_curriculum(cfg.curriculum)
    report = DistillReport(curriculum=cur.name)
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    T, a, b = cfg.temperature, cfg.alpha, cfg.beta
    stopper = EarlyStopping(cfg.patience)
    prev_train = None
    agree_hits = agree_total = 0
    n = X.shape[0] if rows is None else rows.shape[0]
    batch_size = effective_batch_size(n, cfg.batch_size, cfg.min_steps)
    first_agreement = None

    def x_rows(idx: torch.Tensor) -> torch.Tensor:
        return X[idx] if rows is None else X[rows[idx]]

    def loss_fn(s_logits, idx, weights=None, reduction="mean"):  # type: ignore[no-untyped-def]
        return distillation_loss(s_logits, t_logits[idx], Y[idx], temperature=T, alpha=a, beta=b,
                                 labeled=labeled[idx], weights=weights, reduction=reduction)

    for epoch in range(cfg.epochs):
        if cur.name != "uniform" or cfg.adaptive_teaching:
            diff = difficulty_scores(t_logits, _student_logits(student, X, rows=rows)).cpu().numpy()
        else:
            diff = np.zeros(n, np.float32)
        student.train()
        # sums stay on the device: no host sync per step unless the curriculum needs feedback
        total, seen = torch.zeros((), dtype=torch.float64, device=X.device), 0
        hits = torch.zeros((), dtype=torch.int64, device=X.device)
        for idx_np, arm in cur.epoch_batches(epoch, cfg.epochs, diff, batch_size, rng):
            idx = torch.from_numpy(np.ascontiguousarray(idx_np)).to(X.device)
            s_logits = student(x_rows(idx))
            weights = None
            if cfg.adaptive_teaching:
                with torch.no_grad():
                    agree = agreement_similarity(t_logits[idx], s_logits) >= cfg.agreement_threshold
                    weights = torch.where(agree, 0.5, 1.5).to(s_logits.dtype)
                    hits += agree.sum()
                    agree_total += int(agree.numel())
            loss = loss_fn(s_logits, idx, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cur.needs_feedback:
                with torch.no_grad():
                    after = loss_fn(student(x_rows(idx)), idx, weights)
                cur.observe(arm, float(loss.detach() - after))
            total += loss.detach().double() * idx.numel()
            seen += idx.numel()
        agree_hits += int(hits)
        report.samples_seen += seen
        report.samples_per_epoch.append(seen)
        train_loss = float(total) / max(seen, 1)
        report.train_loss.append(train_loss)
        if val is not None and len(val[0]):
            Xv, Tv, Yv, Lv = val
            with torch.no_grad():
                sv = _student_logits(student, Xv)
                vloss = float(distillation_loss(sv, Tv, Yv, temperature=T, alpha=a, beta=b, labeled=Lv))
                vkl = float(kd_kl(sv, Tv, 1.0))
                vagree = float((sv.argmax(-1) == Tv.argmax(-1)).float().mean())
        else:
            vloss, vkl, vagree = train_loss, float("nan"), float("nan")
        if first_agreement is None:
            first_agreement = vagree
        report.val_loss.append(vloss)
        report.val_kl.append(vkl)
        report.val_agreement.append(vagree)
        improvement = (report.best_val_loss - vloss) if np.isfinite(report.best_val_loss) else 0.0
        report.epoch_rewards.append(epoch_reward(improvement, 0.0 if prev_train is None else train_loss - prev_train,
                                                 0.0 if np.isnan(vagree) else vagree, epoch))
        prev_train = train_loss
        if on_epoch:
            on_epoch(epoch, train_loss, vloss)
        log.debug("distill epoch %d train %.4f val %.4f kl %.4f agree %.3f", epoch, train_loss, vloss, vkl, vagree)
        if stopper.update(student, vloss, epoch, report):
            break
    stopper.restore(student)
    student.eval()
    if cfg.adaptive_teaching and agree_total:
        report.agreement_rate = agree_hits / agree_total
        report.cumulative_reward = float(agree_hits)
    if report.val_agreement and first_agreement is not None and not np.isnan(first_agreement):
        gained = report.val_agreement[report.best_epoch if report.best_epoch >= 0 else -1] - first_agreement
        report.transfer_rate_per_1k = 1000.0 * gained / max(report.samples_seen, 1)
    report.curriculum_state = cur.state()
    report.seconds = time.perf_counter() - t0
    return report
