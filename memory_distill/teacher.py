"""Phase 1: train the teacher on rewarded memories (cross-entropy to bin targets)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import TeacherConfig
from .losses import soft_cross_entropy
from .models import ModelInputs, effective_batch_size

__all__ = ["TeacherReport", "train_teacher"]

log = logging.getLogger(__name__)


@dataclass
class TeacherReport:
    epochs_run: int = 0
    best_epoch: int = -1
    best_val_loss: float = float("inf")
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    samples_seen: int = 0


def _batch_indices(n: int, batch_size: int, generator: torch.Generator,
                   device: torch.device | None = None) -> list[torch.Tensor]:
    """One epoch's shuffled row batches (drawn on the CPU generator, moved to ``device`` in one copy)."""
    perm = torch.randperm(n, generator=generator)
    if device is not None:
        perm = perm.to(device)
    out = [perm[s : s + batch_size] for s in range(0, n, batch_size)]
    if len(out) > 1 and out[-1].numel() < 2:  # BatchNorm cannot train on one row: it joins the batch before
        last = out.pop()
        out[-1] = torch.cat([out[-1], last])
    return out


@torch.no_grad()
def eval_loss(model: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int = 4096) -> float:
    model.eval()
    total = 0.0
    for s in range(0, X.shape[0], batch_size):
        total += float(soft_cross_entropy(model(X[s : s + batch_size]), Y[s : s + batch_size], reduction="none").sum())
    return total / max(X.shape[0], 1)


class EarlyStopping:
    """Keeps the best weights by validation loss; ``update`` says when ``patience`` epochs went without
    improvement and keeps a report's epoch bookkeeping. Shared by the teacher and distillation loops."""

    def __init__(self, patience: int, min_delta: float = 1e-5) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch, self.bad = float("inf"), -1, 0
        self._state: dict[str, torch.Tensor] | None = None

    def update(self, model: torch.nn.Module, val_loss: float, epoch: int, report: Any = None) -> bool:
        """Record this epoch; True when training should stop.

        ``report`` (a Teacher/DistillReport) gets ``epochs_run``, ``best_val_loss``, ``best_epoch``
        and ``stopped_early``.
        """
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.bad = val_loss, epoch, 0
            self._state = copy.deepcopy(model.state_dict())
        else:
            self.bad += 1
        stop = self.bad >= self.patience
        if report is not None:
            report.epochs_run = epoch + 1
            report.best_val_loss, report.best_epoch = self.best_loss, self.best_epoch
            report.stopped_early = stop
        return stop

    def restore(self, model: torch.nn.Module) -> None:
        if self._state is not None:
            model.load_state_dict(self._state)


def train_teacher(
    model: torch.nn.Module,
    X: torch.Tensor | ModelInputs,
    Y: torch.Tensor,
    X_val: torch.Tensor | None,
    Y_val: torch.Tensor | None,
    cfg: TeacherConfig,
    *,
    generator: torch.Generator,
    on_epoch: Callable[[int, float, float], None] | None = None,
    rows: torch.Tensor | None = None,
) -> TeacherReport:
    """AdamW on soft cross-entropy; early stopping on validation loss restores the best weights.

    ``X`` [n, dim] and ``Y`` [n, bins] (target distributions) must already be on the model's device.
    ``rows`` (optional, on the device): train on these rows of ``X``/``Y`` only, gathered batch by
    batch, so the caller never materialises a copy of the training slice of the embedding matrix.
    """
    t0 = time.perf_counter()
    report = TeacherReport()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stopper = EarlyStopping(cfg.patience)
    n = X.shape[0] if rows is None else rows.shape[0]
    batch_size = effective_batch_size(n, cfg.batch_size, cfg.min_steps)
    for epoch in range(cfg.epochs):
        model.train()
        # the loss is summed on the device: no host sync per step (matters on CUDA)
        total, seen = torch.zeros((), dtype=torch.float64, device=X.device), 0
        for idx in _batch_indices(n, batch_size, generator, X.device):
            if rows is not None:
                idx = rows[idx]
            loss = soft_cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * idx.numel()
            seen += idx.numel()
        report.samples_seen += seen
        report.train_loss.append(float(total) / max(seen, 1))
        val = eval_loss(model, X_val, Y_val) if X_val is not None and Y_val is not None and len(X_val) else report.train_loss[-1]
        report.val_loss.append(val)
        if on_epoch:
            on_epoch(epoch, report.train_loss[-1], val)
        log.debug("teacher epoch %d train %.4f val %.4f", epoch, report.train_loss[-1], val)
        if stopper.update(model, val, epoch, report):
            break
    stopper.restore(model)
    model.eval()
    report.seconds = time.perf_counter() - t0
    return report
