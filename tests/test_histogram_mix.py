"""The served distribution mixed with the training rewards' histogram: the fit, the model, serving, consolidation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fast_job

from memory_distill.evaluate import crps, fit_histogram_mix, reward_histogram
from memory_distill.features import N_TEXT_FEATURES
from memory_distill.jobs import run_consolidation
from memory_distill.models import RewardMLP
from memory_distill.predictor import Predictor, StudentRunner
from memory_distill.report import feature_lines
from memory_distill.rewards import RewardBins

BINS = RewardBins(0.0, 1.0, 16)


def _sure(rewards_guess: np.ndarray) -> np.ndarray:
    """Point-mass forecasts at these rewards' bins."""
    return BINS.hard_targets(rewards_guess)


def test_an_overconfident_forecast_is_mixed_and_a_right_one_is_not() -> None:
    rng = np.random.default_rng(0)
    r = (rng.random(400) < 0.3).astype(np.float64)  # pass/fail, 30% pass
    prior = reward_histogram(r, BINS)
    assert prior is not None
    # sure of itself and right 70% of the time: far too sure
    guess = np.where(rng.random(400) < 0.7, r, 1.0 - r)
    fit = fit_histogram_mix(_sure(guess), r, prior, BINS)
    assert 0.2 <= fit.weight <= 0.9, fit
    assert fit.val_crps < fit.val_crps_student - 0.05 and fit.n_val == 400
    assert fit.val_crps == pytest.approx(crps((1 - fit.weight) * _sure(guess) + fit.weight * prior, r, BINS))
    soft = np.random.default_rng(1).dirichlet(np.full(16, 0.3), size=400)  # the closed form in w is the CRPS
    for w in (0.1, 0.45, 0.9):
        assert fit_histogram_mix(soft, r, prior, BINS, grid=(w,)).val_crps == pytest.approx(
            crps((1 - w) * soft + w * prior, r, BINS), rel=1e-6)
    # sure and right: nothing to temper
    right = fit_histogram_mix(_sure(r), r, prior, BINS)
    assert right.weight == 0.0 and right.val_crps == right.val_crps_student <= BINS.width / 2 + 1e-9
    # too few rows to choose on, or pending rewards only: the student's distribution as distilled
    few = fit_histogram_mix(_sure(guess[:10]), r[:10], prior, BINS)
    assert few.weight == 0.0 and "10 rewarded validation rows, needs 20" in few.reason
    pending = fit_histogram_mix(_sure(guess), np.full(400, np.nan), prior, BINS)
    assert pending.weight == 0.0 and pending.n_val == 0


def test_the_mixed_model_serves_the_mix_keeps_the_order_and_round_trips() -> None:
    torch.manual_seed(0)
    m = RewardMLP(12, (16,), 10, n_features=N_TEXT_FEATURES).eval()
    m.set_feature_stats(torch.randn(100, N_TEXT_FEATURES) + 3)
    centers = torch.linspace(0, 1, 10)
    x = torch.cat([torch.randn(50, 12), torch.randn(50, N_TEXT_FEATURES) + 3], 1)
    with torch.no_grad():
        raw = torch.softmax(m(x), -1)
    prior = torch.tensor([0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0.5])  # empty bins: log 0 must not poison the mix
    m.set_histogram_mix(0.4, prior)
    with torch.no_grad():
        mixed = torch.softmax(m(x), -1)
    assert torch.isfinite(m(x)).all()
    torch.testing.assert_close(mixed, 0.6 * raw + 0.4 * prior, rtol=1e-5, atol=1e-6)
    # each expected reward moves 40% of the way to the prior's mean (0.5): the order is the same
    torch.testing.assert_close(mixed @ centers, 0.6 * (raw @ centers) + 0.4 * 0.5, rtol=1e-5, atol=1e-6)
    m.set_ranking(torch.randn(12 + N_TEXT_FEATURES), mean_weight=0.7, centers=centers)

    loaded = RewardMLP.load(m.arch(), m.state_dict())  # as an artifact is read: arch + weights
    assert loaded.arch()["histogram_mix"] is True and float(loaded.mix_w) == pytest.approx(0.4)
    X, F = x[:, :12].numpy(), x[:, 12:].numpy().copy()
    F[3, 1] = np.nan
    xf = torch.from_numpy(np.concatenate([X, F], 1))
    with torch.no_grad():
        want = torch.softmax(loaded(xf), -1).numpy()
        want_adv = loaded.advantage(xf).numpy()
    runner = StudentRunner(loaded)  # the CPU serving path (numpy) gives the same distributions and scores
    np.testing.assert_allclose(runner.probs(X, F), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(runner.logits(X, F)), -1).numpy(), want,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runner.advantage(X, F), want_adv, rtol=1e-5, atol=1e-5)

    bn = RewardMLP(12, (16,), 10, batchnorm=True).eval()  # no numpy fast path: the runner reads the module
    bn.set_histogram_mix(0.4, prior)
    with torch.no_grad():
        np.testing.assert_allclose(StudentRunner(bn).probs(X), torch.softmax(bn(torch.from_numpy(X)), -1).numpy(),
                                   rtol=1e-5, atol=1e-6)
    assert (StudentRunner(bn).probs(X)[:, [0, 9]] >= 0.4 * 0.5 - 1e-6).all()  # the prior's share of its two bins

    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        m.set_histogram_mix(1.0, prior)
    with pytest.raises(ValueError, match="distribution over the 10 bins"):
        m.set_histogram_mix(0.3, torch.ones(10))
    m.set_histogram_mix(0.0)
    assert not m.has_mix and "mix_w" not in m.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(m(x), -1), raw)
    arch = loaded.arch()
    del arch["histogram_mix"]  # a model published before the mix existed loads unmixed
    assert not RewardMLP.from_arch(arch).has_mix


def _overconfident_episodes(n_groups: int) -> list[dict]:
    """Pass/fail episodes whose words say nothing about the reward: whatever the student learns from them is noise it
    is sure of on new groups."""
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(300)]
    out = []
    for g in range(n_groups):
        for j in range(4):
            text = " ".join(rng.choice(words, size=12))
            out.append({"text": f"Task {g}: {text}", "reward": float(rng.random() < 0.3),
                        "metadata": {"group": f"g{g}"}, "created_at": 1.7e9 + g * 10 + j})
    return out


def test_consolidation_mixes_a_student_that_is_too_sure_and_serves_the_mix(store, registry):
    store.add_many(_overconfident_episodes(150))
    job = fast_job(teacher={"epochs": 30, "patience": 30, "dropout": 0.0}, distill={"epochs": 30, "patience": 30})
    rep = run_consolidation(store, registry, job)
    mix = rep.histogram_mix
    assert mix is not None and mix.weight >= 0.3, mix
    assert mix.val_crps < mix.val_crps_student
    # on the held-out groups the served distribution is no worse than the base rate (the unmixed one is)
    assert rep.evaluation.student.crps <= rep.evaluation.histogram_crps + 0.01
    assert f"histogram mix: {mix.weight:.2f} of the served distribution is that histogram (validation CRPS" in \
        "\n".join(feature_lines(rep))  # the CLI summary and report.md say so
    assert registry.history()[-1]["histogram_mix"] == mix.weight
    manifest = registry.manifest(rep.version)
    assert manifest["histogram_mix"]["weight"] == mix.weight and manifest["student"]["arch"]["histogram_mix"]

    pred = Predictor(registry, store.embedder)
    got = pred.predict(["Task 999: w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12"])[0]
    student = registry.load().student
    assert student.has_mix and float(student.mix_w) == pytest.approx(mix.weight)
    # every prediction keeps at least the histogram's share of the base rate's mass in its two bins
    prior = student.mix_prior.numpy()
    assert np.all(got.probs >= mix.weight * prior - 1e-6)

    off = run_consolidation(store, registry, job.model_copy(update={"histogram_mix": False}))
    assert off.histogram_mix is None and not registry.load(off.version).student.has_mix
    # same data, seed and training: the order of the held-out expected rewards is the mix's as well
    assert off.evaluation.student.spearman == pytest.approx(rep.evaluation.student.spearman, abs=1e-6)
    assert off.evaluation.student.crps > rep.evaluation.student.crps


def test_a_warm_start_from_a_mixed_model_refits_the_mix(store, registry):
    store.add_many(_overconfident_episodes(80))
    job = fast_job()
    first = run_consolidation(store, registry, job)
    assert first.histogram_mix is not None
    warm = run_consolidation(store, registry, job.model_copy(update={"warm_start": True, "seed": 1}))
    assert warm.warm_started and warm.histogram_mix is not None


def test_the_summary_says_why_a_run_served_no_mix() -> None:
    from types import SimpleNamespace

    from memory_distill.evaluate import HistogramMix

    def line(mix: HistogramMix) -> str:
        return [x for x in feature_lines(SimpleNamespace(histogram_mix=mix)) if x.startswith("histogram mix")][0]

    assert line(HistogramMix(0.0, 0.0401, 0.0401, 324)) == (
        "histogram mix: none (the student alone had the lowest validation CRPS, 0.0401 on 324 rows)")
    assert line(HistogramMix(0.0, float("nan"), float("nan"), 5, "not mixed: 5 rewarded validation rows, needs 20",
                             not_tried="5 rewarded validation rows, needs 20")) \
        == "histogram mix: none (5 rewarded validation rows, needs 20)"
    few = fit_histogram_mix(np.full((5, 8), 1 / 8), np.linspace(0, 1, 5), np.full(8, 1 / 8), RewardBins(0, 1, 8))
    assert few.not_tried == "5 rewarded validation rows, needs 20" and line(few).endswith("needs 20)")
