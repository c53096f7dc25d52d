"""Curricula: which memories each distillation step trains on.

Difficulty of a memory, from the teacher's and the student's output distributions::

    D = 0.3 * (1 - max_k p_teacher) + 0.3 * H(p_teacher) / log(K) + 0.4 * min(KL(p_teacher || p_student) / 5, 1)

Samplers (all yield batches of row indices for one epoch):

* ``uniform``       - a fresh permutation each epoch (traditional KD).
* ``easy_to_hard``  - competence pacing: the easiest fraction of the data, growing from 30% to
                      100% over the first 60% of epochs (Platanios et al. 2019).
* ``hard_to_easy``  - the same pacing over the hardest fraction (anti-curriculum).
* ``adaptive``      - each epoch ``fraction`` (70%) of the data whose difficulty rank is nearest a
                      target that moves from easy to hard with progress.
* ``sec_bandit``    - Self-Evolving Curriculum: difficulty buckets are arms; every step picks an
                      arm by Boltzmann exploration (temperature ``tau``), trains on a batch from it,
                      and updates the arm's value by TD(0) ``Q <- a*r + (1-a)*Q`` with r = the drop
                      in distillation loss on that batch (the learning gain).

:func:`epoch_reward` scores an epoch for a curriculum agent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CURRICULA",
    "AdaptiveCurriculum",
    "Curriculum",
    "EasyToHard",
    "HardToEasy",
    "SECBandit",
    "UniformCurriculum",
    "difficulty_scores",
    "epoch_reward",
    "make_curriculum",
]


def difficulty_scores(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-row difficulty in [0, 1] (formula in the module docstring). Shapes [B, K] -> [B]."""
    log_pt = F.log_softmax(teacher_logits.float(), dim=-1)
    log_ps = F.log_softmax(student_logits.float(), dim=-1)
    pt = log_pt.exp()
    k = teacher_logits.shape[-1]
    confidence = pt.max(dim=-1).values
    entropy = -(pt * log_pt).sum(dim=-1) / math.log(k)
    kl = (pt * (log_pt - log_ps)).sum(dim=-1).clamp_min(0.0)
    return 0.3 * (1 - confidence) + 0.3 * entropy + 0.4 * torch.clamp(kl / 5.0, max=1.0)


def epoch_reward(val_improvement: float, loss_delta: float, accuracy: float, epoch: int, *,
                 accuracy_threshold: float = 0.8, early_epochs: int = 3, penalty_cap: float = 1.0) -> float:
    """Reward for a curriculum agent after one epoch.

    ``2.0 * val_improvement`` minus a penalty (capped at ``penalty_cap``) when the training loss
    rose (``loss_delta > 0``), plus 0.5 for accuracy >= 0.5 within the first ``early_epochs``
    epochs and 0.5 for accuracy above ``accuracy_threshold``.
    """
    r = 2.0 * val_improvement
    if loss_delta > 0:
        r -= min(loss_delta, penalty_cap)
    if epoch < early_epochs and accuracy >= 0.5:
        r += 0.5
    if accuracy > accuracy_threshold:
        r += 0.5
    return float(r)


def _batches(idx: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for s in range(0, idx.shape[0], batch_size):
        b = idx[s : s + batch_size]
        if b.shape[0] >= 2 or idx.shape[0] < 2:
            yield b


@dataclass
class Curriculum:
    """Base: subclasses choose rows per epoch. ``observe`` receives per-step learning gains."""

    name: str = "uniform"
    needs_feedback: bool = False

    def epoch_batches(self, epoch: int, n_epochs: int, difficulty: np.ndarray, batch_size: int,
                      rng: np.random.Generator) -> Iterator[tuple[np.ndarray, int | None]]:
        raise NotImplementedError

    def observe(self, arm: int | None, gain: float) -> None:  # noqa: B027 - optional hook
        """Feedback after a step on a batch drawn from ``arm``."""

    def state(self) -> dict[str, object]:
        return {"name": self.name}


@dataclass
class UniformCurriculum(Curriculum):
    name: str = "uniform"

    def epoch_batches(self, epoch, n_epochs, difficulty, batch_size, rng):  # type: ignore[no-untyped-def]
        for b in _batches(rng.permutation(difficulty.shape[0]), batch_size):
            yield b, None


def _competence(epoch: int, n_epochs: int, start: float = 0.3, ramp: float = 0.6) -> float:
    ramp_epochs = max(1.0, ramp * n_epochs)
    return min(1.0, start + (1.0 - start) * epoch / ramp_epochs)


@dataclass
class EasyToHard(Curriculum):
    name: str = "easy_to_hard"
    start: float = 0.3

    def _pool(self, order: np.ndarray, c: float) -> np.ndarray:
        return order[: max(2, int(math.ceil(c * order.shape[0])))]

    def epoch_batches(self, epoch, n_epochs, difficulty, batch_size, rng):  # type: ignore[no-untyped-def]
        order = np.argsort(difficulty, kind="stable")
        pool = self._pool(order, _competence(epoch, n_epochs, self.start))
        for b in _batches(rng.permutation(pool), batch_size):
            yield b, None


@dataclass
class HardToEasy(EasyToHard):
    name: str = "hard_to_easy"

    def _pool(self, order: np.ndarray, c: float) -> np.ndarray:
        return order[::-1][: max(2, int(math.ceil(c * order.shape[0])))]


@dataclass
class AdaptiveCurriculum(Curriculum):
    name: str = "adaptive"
    fraction: float = 0.7

    def epoch_batches(self, epoch, n_epochs, difficulty, batch_size, rng):  # type: ignore[no-untyped-def]
        n = difficulty.shape[0]
        ranks = np.empty(n, np.float64)
        ranks[np.argsort(difficulty, kind="stable")] = np.arange(n) / max(n - 1, 1)
        target = epoch / max(n_epochs - 1, 1)  # moves from easiest to hardest
        m = max(2, int(round(self.fraction * n)))
        pool = np.argsort(np.abs(ranks - target), kind="stable")[:m]
        for b in _batches(rng.permutation(pool), batch_size):
            yield b, None

    def state(self) -> dict[str, object]:
        return {"name": self.name, "fraction": self.fraction}


@dataclass
class SECBandit(Curriculum):
    name: str = "sec_bandit"
    needs_feedback: bool = True
    n_arms: int = 5
    tau: float = 1.0
    lr: float = 0.5
    q: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pulls: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        if self.q.shape[0] != self.n_arms:
            self.q = np.zeros(self.n_arms, np.float64)
            self.pulls = np.zeros(self.n_arms, np.int64)

    def probabilities(self) -> np.ndarray:
        z = self.q / max(self.tau, 1e-8)
        z = np.exp(z - z.max())
        return z / z.sum()

    def epoch_batches(self, epoch, n_epochs, difficulty, batch_size, rng):  # type: ignore[no-untyped-def]
        n = difficulty.shape[0]
        order = np.argsort(difficulty, kind="stable")
        buckets = [b for b in np.array_split(order, self.n_arms)]
        pools = [rng.permutation(b) for b in buckets]
        cursor = [0] * self.n_arms
        steps = max(1, int(math.ceil(n / batch_size)))
        for _ in range(steps):
            probs = self.probabilities()
            live = np.array([len(b) >= 2 for b in buckets], bool)
            if not live.any():
                return
            probs = np.where(live, probs, 0.0)
            arm = int(rng.choice(self.n_arms, p=probs / probs.sum()))
            pool = pools[arm]
            if cursor[arm] + batch_size > len(pool):
                pools[arm] = pool = rng.permutation(buckets[arm])
                cursor[arm] = 0
            b = pool[cursor[arm] : cursor[arm] + batch_size]
            cursor[arm] += len(b)
            self.pulls[arm] += 1
            yield b, arm

    def observe(self, arm: int | None, gain: float) -> None:
        if arm is None or not math.isfinite(gain):
            return
        self.q[arm] = self.lr * gain + (1 - self.lr) * self.q[arm]

    def state(self) -> dict[str, object]:
        return {"name": self.name, "q": self.q.round(5).tolist(), "pulls": self.pulls.tolist(),
                "tau": self.tau, "lr": self.lr}


CURRICULA: dict[str, type[Curriculum]] = {
    "uniform": UniformCurriculum,
    "easy_to_hard": EasyToHard,
    "hard_to_easy": HardToEasy,
    "adaptive": AdaptiveCurriculum,
    "sec_bandit": SECBandit,
}


def make_curriculum(name: str) -> Curriculum:
    try:
        return CURRICULA[name]()
    except KeyError:
        raise ValueError(f"unknown curriculum {name!r}: choose one of {sorted(CURRICULA)}") from None
