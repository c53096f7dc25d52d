"""RewardMLP and the two builders: the one place a config becomes constructor arguments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import DistillConfig, TeacherConfig

__all__ = ["RewardMLP", "build_student", "build_teacher", "compression_ratio", "effective_batch_size", "param_count", "resolve_device"]


class RewardMLP(nn.Module):
    """embedding -> [Linear (-> BatchNorm) -> ReLU -> Dropout] x len(hidden) -> Linear -> logits.

    Outputs **logits** over reward bins; softmax happens only in losses and prediction.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], n_bins: int, *, dropout: float = 0.0,
                 batchnorm: bool = False) -> None:
        super().__init__()
        if in_dim < 1 or n_bins < 2 or any(h < 1 for h in hidden):
            raise ValueError(f"bad RewardMLP shape: in_dim={in_dim}, hidden={tuple(hidden)}, n_bins={n_bins}")
        self.in_dim, self.hidden, self.n_bins = int(in_dim), tuple(int(h) for h in hidden), int(n_bins)
        self.dropout, self.batchnorm = float(dropout), bool(batchnorm)
        layers: list[nn.Module] = []
        prev = in_dim
        for h in self.hidden:
            layers.append(nn.Linear(prev, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = h
        layers.append(nn.Linear(prev, n_bins))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def arch(self) -> dict[str, object]:
        """Everything needed to rebuild this module (stored in artifact manifests)."""
        return {"in_dim": self.in_dim, "hidden": list(self.hidden), "n_bins": self.n_bins,
                "dropout": self.dropout, "batchnorm": self.batchnorm}

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> RewardMLP:
        return cls(int(arch["in_dim"]), [int(h) for h in arch["hidden"]], int(arch["n_bins"]),
                   dropout=float(arch["dropout"]), batchnorm=bool(arch["batchnorm"]))

    def flops_per_sample(self) -> int:
        """Multiply-adds x2 of the Linear layers (what a matmul-bound forward pass costs)."""
        dims = [self.in_dim, *self.hidden, self.n_bins]
        return sum(2 * a * b for a, b in zip(dims, dims[1:], strict=False))


def build_teacher(cfg: TeacherConfig, in_dim: int, n_bins: int) -> RewardMLP:
    return RewardMLP(in_dim, cfg.hidden, n_bins, dropout=cfg.dropout, batchnorm=cfg.batchnorm)


def build_student(cfg: DistillConfig, in_dim: int, n_bins: int) -> RewardMLP:
    return RewardMLP(in_dim, cfg.hidden, n_bins, dropout=cfg.dropout, batchnorm=False)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compression_ratio(teacher: nn.Module, student: nn.Module) -> float:
    return param_count(teacher) / max(param_count(student), 1)


def effective_batch_size(n_rows: int, batch_size: int, min_steps: int) -> int:
    """``batch_size``, reduced so that ``n_rows`` give at least ``min_steps`` steps (never below 16)."""
    return max(2, min(batch_size, max(16, -(-n_rows // min_steps))))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no GPU: use device='auto' or 'cpu'")
    return torch.device(name)
