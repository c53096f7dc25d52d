"""Pure loss functions. Shapes: logits and targets are [B, K]; ``weights`` is [B].

Every loss returns the **mean over the batch** (a batch of one row equals a batch of 32
copies of it) unless ``reduction="none"``, which returns the per-row loss [B].
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss", "kd_kl", "soft_cross_entropy"]

Reduction = Literal["mean", "none"]


def _reduce(per_row: torch.Tensor, weights: torch.Tensor | None, reduction: Reduction) -> torch.Tensor:
    if weights is not None:
        per_row = per_row * weights
    if reduction == "none":
        return per_row
    if reduction == "mean":
        return per_row.mean() if per_row.numel() else per_row.sum()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, *,
                       weights: torch.Tensor | None = None, reduction: Reduction = "mean") -> torch.Tensor:
    """CE(targets, softmax(logits)) = -sum_k t_k log q_k per row. Equals NLL for one-hot targets."""
    per_row = -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return _reduce(per_row, weights, reduction)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *,
          weights: torch.Tensor | None = None, reduction: Reduction = "mean") -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2 per row (Hinton et al. 2015).

    The T^2 factor keeps gradient magnitudes comparable across temperatures.
    """
    T = float(temperature)
    log_p_t = F.log_softmax(teacher_logits / T, dim=-1)
    log_p_s = F.log_softmax(student_logits / T, dim=-1)
    per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * (T * T)
    return _reduce(per_row, weights, reduction)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_probs: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    beta: float,
    labeled: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """alpha * KL(teacher_T || student_T) * T^2 + beta * CE(student, targets).

    ``labeled`` [B] bool marks rows that have a reward: CE applies to those only, so memories
    without a reward still teach through the KL term. Per-row loss is averaged over the batch.
    """
    per_row = alpha * kd_kl(student_logits, teacher_logits, temperature, reduction="none")
    if beta and target_probs is not None:
        ce = soft_cross_entropy(student_logits, target_probs, reduction="none")
        if labeled is not None:
            ce = torch.where(labeled, ce, torch.zeros_like(ce))
        per_row = per_row + beta * ce
    return _reduce(per_row, weights, reduction)
