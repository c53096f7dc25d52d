"""Train a teacher/student pair on a TrainingData: the part of consolidation that needs no store.

Shared by :func:`memory_distill.jobs.run_consolidation`, the seed-compatible
:class:`memory_distill.consolidation.ModelDistillation` facade and the curriculum experiments.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._faults import fault_point
from .config import JobConfig
from .curriculum import Curriculum
from .distill import DistillReport, distill, teacher_logits
from .evaluate import HistogramMix, fit_histogram_mix, predict_probs, reward_histogram
from .models import ModelInputs, RewardMLP, build_student, build_teacher, model_inputs
from .ranking import RankingFit, fit_ranking_head
from .rewards import RewardBins
from .store import TrainingData
from .teacher import TeacherReport, train_teacher

__all__ = ["ModelInputs", "Split", "TrainedPair", "model_inputs", "split_by_group_and_time", "train_pair"]



@dataclass
class Split:
    """Row indices into a TrainingData: train/val/holdout (rewarded) and transfer (unrewarded)."""

    train: np.ndarray
    val: np.ndarray
    holdout: np.ndarray
    transfer: np.ndarray
    groups: np.ndarray
    """Each row's group as an integer code (rows with equal codes share a ``group``)."""


def split_by_group_and_time(data: TrainingData, holdout_fraction: float, val_fraction: float,
                            rng: np.random.Generator) -> Split:
    """Hold out the most recent groups (by their latest memory); validation groups are random.

    Rows sharing a ``group`` (metadata key; else each memory is its own group) never straddle
    splits. Unrewarded rows from train/val groups become transfer data for the KL term.
    """
    rewarded = data.rewarded
    groups = np.asarray(data.groups, dtype=object)
    uniq, inv = np.unique(groups, return_inverse=True)
    latest = np.full(len(uniq), -np.inf)
    np.maximum.at(latest, inv, data.created_at)
    n_rew_per_group = np.bincount(inv, weights=rewarded.astype(np.float64), minlength=len(uniq))
    total_rew = n_rew_per_group.sum()
    order = np.argsort(-latest, kind="stable")  # newest first
    # take rewarded groups, newest first, until they hold holdout_fraction of the rewarded rows
    # (vectorised: a group is taken when the rewarded rows before it fall short of the target)
    counts = n_rew_per_group[order]
    before = np.cumsum(counts) - counts
    # (never the last group with rewards: a store of one or two big groups still trains)
    hold = order[(before < holdout_fraction * total_rew) & (counts > 0) & (before + counts < total_rew)]
    is_hold_group = np.zeros(len(uniq), bool)
    is_hold_group[hold] = True
    rest = np.flatnonzero(~is_hold_group & (n_rew_per_group > 0)).astype(np.int64)
    rest = rng.permutation(rest)
    counts = n_rew_per_group[rest]
    before = np.cumsum(counts) - counts
    left = total_rew - n_rew_per_group[hold].sum()
    val = rest[(before < val_fraction * left) & (before + counts < left)]  # (nor the last one left for training)
    is_val_group = np.zeros(len(uniq), bool)
    is_val_group[val] = True
    is_hold = is_hold_group[inv]
    is_val = is_val_group[inv]
    idx = np.arange(len(data))
    return Split(
        train=idx[rewarded & ~is_hold & ~is_val],
        val=idx[rewarded & is_val],
        holdout=idx[rewarded & is_hold],
        transfer=idx[~rewarded & ~is_hold],
        groups=inv,
    )


@dataclass
class TrainedPair:
    teacher: RewardMLP
    student: RewardMLP
    teacher_report: TeacherReport
    distill_report: DistillReport
    X: torch.Tensor | ModelInputs
    """All rows of the data on the training device (index with split indices): the model inputs."""
    ranking: RankingFit | None = None
    """The within-group ranking head's fit (``None`` when ``cfg.ranking`` is off)."""
    histogram_mix: HistogramMix | None = None
    """The student's mix with the training rewards' histogram (``None`` when ``cfg.histogram_mix`` is off)."""


def _bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", leave=False)


log = logging.getLogger(__name__)
_TRAINING = threading.Lock()


@contextmanager
def seeded_training(seed: int, device: torch.device) -> Iterator[None]:
    """Train inside this block for a model that depends only on the data and ``seed``.

    Building modules (weight init) and dropout draw from torch's global random generators, which every thread of
    the process shares. So the block seeds them (the CPU's, and ``device``'s when it is a GPU), holds a
    process-wide lock, so two consolidations in one process (threads, :class:`ConsolidationExecutor`, one per
    namespace) train one after the other instead of drawing from each other's stream, and puts the caller's
    generator states back afterwards, so a consolidation does not reseed the application's torch RNG.
    """
    cuda = device.type == "cuda"
    if not _TRAINING.acquire(blocking=False):
        log.info("another consolidation in this process is training: this one trains after it (same seed, same model)")
        _TRAINING.acquire()
    try:
        with torch.random.fork_rng(devices=[device.index if device.index is not None else torch.cuda.current_device()]
                                   if cuda else []):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        _TRAINING.release()


def train_pair(
    data: TrainingData,
    split: Split,
    bins: RewardBins,
    cfg: JobConfig,
    *,
    device: torch.device,
    generator: torch.Generator,
    curriculum: Curriculum | None = None,
    init: tuple[RewardMLP, RewardMLP] | None = None,
    progress: bool = False,
) -> TrainedPair:
    """Phase 1 (teacher on rewarded train rows) then phase 2 (distil on train + unrewarded transfer rows).

    ``init`` = (teacher, student) to warm-start from (same shapes). With ``data.features`` and
    ``cfg.text_features`` or ``cfg.metadata_features`` the models also see those features
    (:class:`~memory_distill.features.FeatureSpec`), standardised with the training rows'
    statistics (a warm start keeps the incumbent's).
    """
    use_features = bool((cfg.text_features or cfg.metadata_features) and data.features is not None)
    X_all = model_inputs(data.embeddings, data.features if use_features else None, device)
    Y_all = torch.from_numpy(bins.targets(np.nan_to_num(data.rewards, nan=bins.low), cfg.bins.target)).to(device)
    dim = data.embeddings.shape[1]
    k = data.features.shape[1] if use_features and data.features is not None else 0

    def rows(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(idx).to(device)

    teacher = build_teacher(cfg.teacher, dim, bins.n_bins, k)
    student = build_student(cfg.distill, dim, bins.n_bins, k)
    if init is not None:
        teacher.load_state_dict(init[0].state_dict())
        # the ranking head and the histogram mix are refit below at every run, never carried over
        student.load_state_dict({k: v for k, v in init[1].state_dict().items() if not k.startswith(("rank_", "mix_"))})
    elif k and data.features is not None:
        fit = torch.from_numpy(data.features[split.train])
        teacher.set_feature_stats(fit)
        student.set_feature_stats(fit)
    teacher.to(device)
    student.to(device)
    tr, va = rows(split.train), rows(split.val)
    bar = _bar(progress, cfg.teacher.epochs, "teacher")
    # the training rows are gathered batch by batch (rows=...): no copy of the embedding matrix
    t_report = train_teacher(teacher, X_all, Y_all, X_all[va], Y_all[va], cfg.teacher, generator=generator,
                             on_epoch=lambda e, a, b: bar.update(1) if bar else None, rows=tr)
    if bar:
        bar.close()
    fault_point("mid_training")

    d_idx = np.concatenate([split.train, split.transfer])
    di = rows(d_idx)
    labeled = torch.from_numpy(data.rewarded[d_idx]).to(device)
    val = (X_all[va], teacher_logits(teacher, X_all[va]), Y_all[va],
           torch.ones(len(split.val), dtype=torch.bool, device=device))
    bar = _bar(progress, cfg.distill.epochs, "distill")
    d_report = distill(student, X_all, teacher_logits(teacher, X_all, rows=di), Y_all[di], labeled, val, cfg.distill,
                       generator=generator, curriculum=curriculum,
                       on_epoch=lambda e, a, b: bar.update(1) if bar else None, rows=di)
    if bar:
        bar.close()
    mix = None
    if cfg.histogram_mix:  # before the ranking head, which then stacks on the served expected reward
        prior = reward_histogram(data.rewards[split.train], bins)
        mix = fit_histogram_mix(predict_probs(student, X_all[va]), data.rewards[split.val], prior, bins)
        student.set_histogram_mix(mix.weight, prior)
    ranking = None
    if cfg.ranking:
        ranking = fit_ranking_head(student, X_all, data.rewards, split.groups, split.train, split.val, bins.centers)
    return TrainedPair(teacher, student, t_report, d_report, X_all, ranking, mix)
