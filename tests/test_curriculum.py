import math

import numpy as np
import pytest
import torch

from memory_distill.curriculum import (
    AdaptiveCurriculum,
    EasyToHard,
    HardToEasy,
    SECBandit,
    UniformCurriculum,
    difficulty_scores,
    epoch_reward,
    make_curriculum,
)


def test_difficulty_formula_closed_form():
    k = 4
    t = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    s = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    p = np.array([0.7, 0.1, 0.1, 0.1])
    ent = -(p * np.log(p)).sum() / math.log(k)
    kl = (p * np.log(p / 0.25)).sum()
    expected = 0.3 * 0.3 + 0.3 * ent + 0.4 * min(kl / 5, 1)
    assert difficulty_scores(t, s).item() == pytest.approx(expected, rel=1e-5)
    # a confident teacher the student matches is easy; a uniform teacher is hard
    assert difficulty_scores(t, t).item() < difficulty_scores(s, s).item()


def _all(cur, epoch, n_epochs, diff, bs=10, seed=0):
    return list(cur.epoch_batches(epoch, n_epochs, diff, bs, np.random.default_rng(seed)))


def test_uniform_covers_everything_once():
    diff = np.random.default_rng(0).random(95)
    idx = np.concatenate([b for b, _ in _all(UniformCurriculum(), 0, 5, diff)])
    assert sorted(idx.tolist()) == list(range(95))


def test_easy_to_hard_paces_from_easiest():
    diff = np.arange(100) / 100
    first = np.concatenate([b for b, _ in _all(EasyToHard(), 0, 10, diff)])
    assert len(first) == 30 and first.max() < 30  # the 30% easiest
    later = np.concatenate([b for b, _ in _all(EasyToHard(), 6, 10, diff)])
    assert len(later) == 100
    hard = np.concatenate([b for b, _ in _all(HardToEasy(), 0, 10, diff)])
    assert hard.min() >= 70


def test_adaptive_targets_move_with_progress():
    diff = np.arange(100) / 100
    early = np.concatenate([b for b, _ in _all(AdaptiveCurriculum(), 0, 10, diff)])
    late = np.concatenate([b for b, _ in _all(AdaptiveCurriculum(), 9, 10, diff)])
    assert len(early) == len(late) == 70
    assert early.mean() < 40 < 60 < late.mean()


def test_sec_bandit_boltzmann_and_td0():
    b = SECBandit(n_arms=3, tau=1.0, lr=0.5)
    np.testing.assert_allclose(b.probabilities(), [1 / 3] * 3)
    b.observe(2, 1.0)
    assert b.q.tolist() == [0.0, 0.0, 0.5]  # Q <- 0.5 * 1.0 + 0.5 * 0
    b.observe(2, 0.0)
    assert b.q[2] == pytest.approx(0.25)
    b.q = np.array([0.0, 0.0, 5.0])
    diff = np.arange(300) / 300
    arms = [a for _, a in _all(b, 0, 1, diff, bs=10, seed=1)]
    assert arms.count(2) > 0.9 * len(arms)  # exploits the arm with the largest learning gain
    batch, arm = _all(b, 0, 1, diff, bs=10, seed=2)[0]
    assert arm == 2 and batch.min() >= 200  # drawn from the hardest bucket
    cold = SECBandit(n_arms=3, tau=100.0)
    cold.q = np.array([0.0, 0.0, 5.0])
    assert cold.probabilities().max() < 0.4  # high temperature explores


def test_epoch_reward():
    assert epoch_reward(0.1, -0.1, 0.3, 5) == pytest.approx(0.2)
    assert epoch_reward(0.0, 5.0, 0.3, 5) == pytest.approx(-1.0)  # capped penalty
    assert epoch_reward(0.0, 0.0, 0.6, 0) == pytest.approx(0.5)  # early accuracy bonus
    assert epoch_reward(0.0, 0.0, 0.9, 10) == pytest.approx(0.5)  # above threshold


def test_unknown_curriculum():
    with pytest.raises(ValueError, match="choose one of"):
        make_curriculum("random_walk")


def test_every_curriculum_distills_and_bandit_learns(trained):
    from memory_distill.config import DistillConfig
    from memory_distill.distill import distill, teacher_logits
    from memory_distill.models import build_student

    store, reg, _ = trained
    loaded = reg.load(with_teacher=True)
    data = store.load_training_data(rewarded_only=True)
    X = torch.from_numpy(data.embeddings)
    T = teacher_logits(loaded.teacher, X)
    Y = torch.from_numpy(loaded.bins.targets(data.rewards))
    lab = torch.ones(len(X), dtype=torch.bool)
    for name in ("uniform", "easy_to_hard", "hard_to_easy", "adaptive", "sec_bandit"):
        cfg = DistillConfig(hidden=(32,), epochs=6, curriculum=name, adaptive_teaching=name == "uniform")
        torch.manual_seed(0)
        student = build_student(cfg, X.shape[1], loaded.bins.n_bins)
        cur = make_curriculum(name)
        rep = distill(student, X, T, Y, lab, (X[:100], T[:100], Y[:100], lab[:100]), cfg,
                      generator=torch.Generator().manual_seed(0), curriculum=cur)
        assert rep.val_kl[-1] < rep.val_kl[0], name
        assert len(rep.epoch_rewards) == rep.epochs_run
        if name == "sec_bandit":
            assert cur.pulls.sum() > 0 and np.abs(cur.q).sum() > 0
        if name == "uniform":
            assert 0 < rep.agreement_rate <= 1 and rep.cumulative_reward > 0
