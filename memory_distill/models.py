"""RewardMLP and the two builders: the one place a config becomes constructor arguments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import DistillConfig, TeacherConfig, as_config
from .errors import DeviceError

__all__ = ["ModelInputs", "RewardMLP", "model_inputs", "build_student", "build_teacher", "compression_ratio", "effective_batch_size", "param_count", "resolve_device"]


FEATURE_CLIP = 3.0
"""Standardised text features are clipped to +-3: a text far longer or shorter than any seen in
training reads as "very long/short", not as a 20-sigma input the network never saw."""
FEATURE_MIN_STD = 0.25
"""Floor of a feature's std (log1p units, about a 28% change): a feature that barely varied in
training does not turn small differences into large inputs."""


class RewardMLP(nn.Module):
    """[embedding | text features] -> [Linear (-> BatchNorm) -> ReLU -> Dropout] x len(hidden) -> Linear -> logits.

    Outputs **logits** over reward bins; softmax happens only in losses and prediction. With a histogram mix
    attached (:meth:`set_histogram_mix`, after distillation) the outputs are the log of the mixed distribution.

    With ``n_features > 0`` the input is ``[n, in_dim + n_features]``: the embedding followed by
    text features (:mod:`memory_distill.features`). The features are standardised inside the
    model with the buffers ``feat_mean``/``feat_std`` (set from the training rows by
    :meth:`set_feature_stats`, saved with the weights) and clipped to ``+-FEATURE_CLIP``; a ``NaN``
    feature, or an input of width ``in_dim`` (embedding only), counts as the training mean. A model without features ignores
    any extra columns, so old and new models can be evaluated on the same input matrix.
    """

    feat_mean: torch.Tensor
    feat_std: torch.Tensor
    # only when a ranking head is attached (set_ranking)
    rank_w: torch.Tensor
    rank_mean_w: torch.Tensor
    rank_centers: torch.Tensor
    # only when a histogram mix is attached (set_histogram_mix)
    mix_w: torch.Tensor
    mix_prior: torch.Tensor

    def __init__(self, in_dim: int, hidden: Sequence[int], n_bins: int, *, dropout: float = 0.0,
                 batchnorm: bool = False, n_features: int = 0) -> None:
        super().__init__()
        if in_dim < 1 or n_bins < 2 or n_features < 0 or any(h < 1 for h in hidden):
            raise ValueError(f"bad RewardMLP shape: in_dim={in_dim}, hidden={tuple(hidden)}, n_bins={n_bins}, "
                             f"n_features={n_features}")
        self.in_dim, self.hidden, self.n_bins = int(in_dim), tuple(int(h) for h in hidden), int(n_bins)
        self.dropout, self.batchnorm, self.n_features = float(dropout), bool(batchnorm), int(n_features)
        if self.n_features:
            self.register_buffer("feat_mean", torch.zeros(self.n_features))
            self.register_buffer("feat_std", torch.ones(self.n_features))
        layers: list[nn.Module] = []
        prev = in_dim + self.n_features
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

    @property
    def input_dim(self) -> int:
        """Width of the full input: embedding plus text features."""
        return self.in_dim + self.n_features

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        """What the first layer sees: the embedding, then the standardised, clipped features (``NaN`` -> 0)."""
        width = x.shape[-1]
        if not self.n_features:
            if width < self.in_dim:
                raise ValueError(f"input must be [n, {self.in_dim}] (embedding), got {list(x.shape)}")
            return x[:, : self.in_dim] if width > self.in_dim else x
        if width not in (self.in_dim, self.input_dim):
            raise ValueError(f"input must be [n, {self.in_dim}] (embedding) or [n, {self.input_dim}] "
                             f"(embedding + {self.n_features} text features), got {list(x.shape)}")
        if width == self.in_dim:
            f = x.new_zeros(x.shape[0], self.n_features)
        else:
            z = ((x[:, self.in_dim :] - self.feat_mean) / self.feat_std).clamp(-FEATURE_CLIP, FEATURE_CLIP)
            f = torch.nan_to_num(z, nan=0.0)
        return torch.cat([x[:, : self.in_dim], f], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.standardized(x))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """Logits from the standardised input ``z``; with a histogram mix attached, the log of the mixed
        distribution (its softmax is the mix, so every reader of logits gets the served distribution)."""
        logits = self.net(z)
        if not self.has_mix:
            return logits
        w = self.mix_w.to(logits.dtype)
        return torch.logaddexp(torch.log1p(-w) + torch.log_softmax(logits, -1), torch.log(w * self.mix_prior.to(logits.dtype)))

    # ------------------------------------------------------------ histogram mix

    @property
    def has_mix(self) -> bool:
        """Whether this model's distribution is mixed with the training rewards' histogram (:meth:`set_histogram_mix`)."""
        return hasattr(self, "mix_w")

    @torch.no_grad()
    def set_histogram_mix(self, weight: float | None, prior: torch.Tensor | np.ndarray | None = None) -> None:
        """Serve ``(1 - weight) * softmax(logits) + weight * prior`` (or with ``None`` / ``0``, the softmax alone).

        ``prior``: a distribution over the bins, the training rewards' histogram
        (:func:`memory_distill.evaluate.reward_histogram`). The mix keeps the order of the expected rewards (it moves
        each one ``weight`` of the way to the prior's mean) and widens every distribution by the same share:
        the shrinkage towards the base rate that a network overconfident on new groups needs.
        """
        if not weight:
            for k in ("mix_w", "mix_prior"):
                self._buffers.pop(k, None)
            return
        if not 0.0 < float(weight) < 1.0:
            raise ValueError(f"histogram mix weight must be in [0, 1), got {weight}")
        if prior is None:
            raise ValueError("set_histogram_mix needs the prior distribution with a weight")
        p = torch.as_tensor(prior, dtype=torch.float32).reshape(-1)
        if p.shape[0] != self.n_bins or bool((p < 0).any()) or abs(float(p.sum()) - 1.0) > 1e-3:
            raise ValueError(f"prior must be a distribution over the {self.n_bins} bins (>= 0, summing to 1)")
        dev = next(self.parameters()).device
        self.register_buffer("mix_w", torch.tensor([float(weight)], device=dev))
        self.register_buffer("mix_prior", (p / p.sum()).to(dev).clone())

    # ------------------------------------------------------------ ranking head

    @property
    def has_ranking(self) -> bool:
        """Whether this model carries a within-group ranking head (:mod:`memory_distill.ranking`)."""
        return hasattr(self, "rank_w")

    @torch.no_grad()
    def set_ranking(self, weights: torch.Tensor | None, *, mean_weight: float = 0.0,
                    centers: torch.Tensor | None = None) -> None:
        """Attach (or with ``None`` remove) the ranking head.

        ``weights``: one per standardised input column; ``mean_weight`` times the expected reward
        over the bin ``centers`` is added to the score.
        """
        if weights is None:
            for k in ("rank_w", "rank_mean_w", "rank_centers"):
                self._buffers.pop(k, None)
            return
        w = weights.detach().to(torch.float32).reshape(-1)
        if w.shape[0] != self.input_dim:
            raise ValueError(f"ranking weights must have {self.input_dim} entries, got {w.shape[0]}")
        c = torch.zeros(self.n_bins) if centers is None else centers.detach().to(torch.float32).reshape(-1)
        if c.shape[0] != self.n_bins:
            raise ValueError(f"centers must have {self.n_bins} entries, got {c.shape[0]}")
        dev = next(self.parameters()).device
        self.register_buffer("rank_w", w.to(dev).clone())
        self.register_buffer("rank_mean_w", torch.tensor([float(mean_weight)], device=dev))
        self.register_buffer("rank_centers", c.to(dev).clone())

    def advantage(self, x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """The ranking head's score: how much better than the other answers to the same prompt.

        ``standardized(x) @ rank_w + rank_mean_w * expected reward``. Only differences between
        rows of one group mean anything (the head is fit on rewards centred within each group).
        ``mean``: the expected reward of these rows when already computed (saves a forward pass).
        """
        if not self.has_ranking:
            raise ValueError("this model has no ranking head (consolidation found no groups with several rewarded memories)")
        z = self.standardized(x)
        out = z @ self.rank_w
        if float(self.rank_mean_w) != 0.0:
            if mean is None:
                mean = torch.softmax(self.head(z), -1) @ self.rank_centers
            out = out + self.rank_mean_w * mean.to(out)
        return out

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Standardise text features with these rows' mean and std (``NaN`` entries ignored)."""
        if not self.n_features:
            return
        f = features.to(self.feat_mean.device, torch.float32)
        ok = ~torch.isnan(f)
        cnt = ok.sum(0).clamp_min(1)
        mean = torch.where(ok, f, 0.0).sum(0) / cnt
        var = torch.where(ok, (f - mean) ** 2, 0.0).sum(0) / cnt
        std = var.sqrt()
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std.clamp_min(FEATURE_MIN_STD))

    def arch(self) -> dict[str, object]:
        """Everything needed to rebuild this module (stored in artifact manifests)."""
        return {"in_dim": self.in_dim, "hidden": list(self.hidden), "n_bins": self.n_bins,
                "dropout": self.dropout, "batchnorm": self.batchnorm, "n_features": self.n_features,
                "ranking": self.has_ranking, "histogram_mix": self.has_mix}

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> RewardMLP:
        m = cls(int(arch["in_dim"]), [int(h) for h in arch["hidden"]], int(arch["n_bins"]),
                dropout=float(arch["dropout"]), batchnorm=bool(arch["batchnorm"]),
                n_features=int(arch.get("n_features", 0)))
        if arch.get("ranking"):
            m.set_ranking(torch.zeros(m.input_dim))  # the saved buffers are loaded over these
        if arch.get("histogram_mix"):
            m.register_buffer("mix_w", torch.zeros(1))  # likewise
            m.register_buffer("mix_prior", torch.zeros(m.n_bins))
        return m

    @classmethod
    def load(cls, arch: dict[str, Any], state_dict: Mapping[str, torch.Tensor]) -> RewardMLP:
        """Rebuild a saved model from its :meth:`arch` and weights.

        Built on the meta device and handed the saved tensors, so loading draws no random initial weights: it takes
        nothing from torch's global RNG, which a consolidation training in another thread may be using (and which
        the application owns). A ``state_dict`` that does not fit ``arch`` raises ``RuntimeError``.
        """
        with torch.device("meta"):
            m = cls.from_arch(arch)
        m.load_state_dict(state_dict, assign=True)
        return m

    def flops_per_sample(self) -> int:
        """Multiply-adds x2 of the Linear layers (what a matmul-bound forward pass costs)."""
        dims = [self.input_dim, *self.hidden, self.n_bins]
        return sum(2 * a * b for a, b in zip(dims, dims[1:], strict=False))


class ModelInputs:
    """The embedding matrix and the text features, indexed as one ``[n, dim + k]`` input.

    Indexing (``inputs[idx]``, ``inputs[s:e]``) concatenates just those rows, so training
    gathers batches without ever building a second copy of the embedding matrix.
    """

    def __init__(self, embeddings: torch.Tensor, features: torch.Tensor) -> None:
        if features.shape[0] != embeddings.shape[0]:
            raise ValueError(f"features has {features.shape[0]} rows, embeddings {embeddings.shape[0]}")
        self.embeddings, self.features = embeddings, features

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.embeddings.shape[0], self.embeddings.shape[1] + self.features.shape[1]])

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __getitem__(self, idx: Any) -> torch.Tensor:
        return torch.cat([self.embeddings[idx], self.features[idx]], dim=1)

    def to(self, device: torch.device | str) -> ModelInputs:
        return ModelInputs(self.embeddings.to(device), self.features.to(device))

    def cpu(self) -> ModelInputs:
        return self.to("cpu")


def model_inputs(embeddings: np.ndarray, features: np.ndarray | None, device: torch.device | str = "cpu",
                 ) -> torch.Tensor | ModelInputs:
    """What the models are trained and evaluated on: the embeddings, plus text features when given."""
    X = torch.from_numpy(np.ascontiguousarray(embeddings, np.float32)).to(device)
    if features is None:
        return X
    return ModelInputs(X, torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(device))


def build_teacher(cfg: TeacherConfig, in_dim: int, n_bins: int, n_features: int = 0) -> RewardMLP:
    """The teacher MLP: ``in_dim`` embedding (+ ``n_features`` side features) -> ``cfg.hidden`` -> ``n_bins`` logits,
    with BatchNorm and dropout as configured (default 1024-512-256-128). ``cfg`` may be a dict of its fields."""
    cfg = as_config(cfg, TeacherConfig, "cfg")
    return RewardMLP(in_dim, cfg.hidden, n_bins, dropout=cfg.dropout, batchnorm=cfg.batchnorm, n_features=n_features)


def build_student(cfg: DistillConfig, in_dim: int, n_bins: int, n_features: int = 0) -> RewardMLP:
    """The compact student MLP (default 256-128), without BatchNorm so it serves as a chain of matmuls. ``cfg`` may
    be a dict of its fields."""
    cfg = as_config(cfg, DistillConfig, "cfg")
    return RewardMLP(in_dim, cfg.hidden, n_bins, dropout=cfg.dropout, batchnorm=False, n_features=n_features)


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
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device must be 'auto', 'cpu' or 'cuda' (or 'cuda:N'), got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={name!r} was asked for but torch {torch.__version__} sees no GPU: use "
                          "device='auto' or 'cpu' (JobConfig.device, --device, MEMORY_DISTILL_JOB__DEVICE)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device={name!r} was asked for but torch sees {torch.cuda.device_count()} GPU(s): use "
                          "'cuda' or 'cuda:N' with N below that")
    return dev
