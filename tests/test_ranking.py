"""The student's within-group ranking head (best-of-n): fit, persistence, serving, and the scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fast_job
from langchain_memory_distill.scorer import RewardScorer, best_of_n

from memory_distill.features import N_TEXT_FEATURES
from memory_distill.jobs import run_consolidation
from memory_distill.models import RewardMLP
from memory_distill.predictor import Predictor, StudentRunner
from memory_distill.ranking import fit_ranking_head, within_group_spearman

CENTERS = np.linspace(0.0, 1.0, 10)


def _grouped(n_groups: int, per: int, d: int, seed: int) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_groups * per, d)).astype(np.float32)
    codes = np.repeat(np.arange(n_groups), per)
    return X, [f"g{c}" for c in codes], codes, rng.normal(size=d)


def test_head_learns_the_within_group_effect_and_ignores_group_offsets() -> None:
    X, groups, codes, w_true = _grouped(120, 6, 16, seed=0)
    within = 0.05 * (X @ w_true)
    rng = np.random.default_rng(1)
    r1 = within + 2.0 * rng.normal(size=120)[codes]  # group offsets 40x the within-group spread
    r2 = within + 10.0 * rng.normal(size=120)[codes]
    rows = np.arange(len(X))
    train, val, hold = rows[codes < 80], rows[(codes >= 80) & (codes < 100)], rows[codes >= 100]
    torch.manual_seed(0)
    student = RewardMLP(16, (8,), 10).eval()
    fit1 = fit_ranking_head(student, torch.from_numpy(X), r1, groups, train, val, CENTERS)
    assert fit1.attached, fit1.reason
    assert fit1.n_groups == 100 and fit1.n_val_groups == 20
    assert fit1.val_within_spearman is not None and fit1.val_within_spearman > 0.9
    assert fit1.weight_mean is not None and fit1.weight_mean >= 0
    w1 = student.rank_w.clone()
    fit2 = fit_ranking_head(student, torch.from_numpy(X), r2, groups, train, val, CENTERS)
    # fixed effects: a constant per group changes nothing
    assert fit2.ridge == fit1.ridge and fit2.weight_mean == pytest.approx(fit1.weight_mean)
    torch.testing.assert_close(student.rank_w, w1, rtol=1e-4, atol=1e-6)
    cos = float(w1.double() @ torch.from_numpy(w_true)) / (float(w1.double().norm()) * np.linalg.norm(w_true))
    assert cos > 0.95
    with torch.no_grad():
        adv = student.advantage(torch.from_numpy(X[hold])).numpy()
    rho, n = within_group_spearman(adv, r1[hold], codes[hold])
    assert n == 20 and rho > 0.9
    # across groups the head means nothing: the raw rewards are ranked by the offsets, not the head
    assert abs(np.corrcoef(adv, r1[hold])[0, 1]) < 0.5


def test_no_groups_means_no_head_and_a_clear_error() -> None:
    X, _, _, w_true = _grouped(60, 5, 8, seed=2)
    r = X @ w_true
    singletons = [f"m{i}" for i in range(len(X))]
    student = RewardMLP(8, (8,), 10).eval()
    fit = fit_ranking_head(student, torch.from_numpy(X), r, singletons, np.arange(200), np.arange(200, 300), CENTERS)
    assert not fit.attached and "0 training groups" in fit.reason
    assert not student.has_ranking
    with pytest.raises(ValueError, match="no ranking head"):
        student.advantage(torch.from_numpy(X))
    # NaN rewards (pending) do not count towards a group
    groups = [f"g{i // 2}" for i in range(len(X))]
    r_nan = r.copy()
    r_nan[1::2] = np.nan
    fit = fit_ranking_head(student, torch.from_numpy(X), r_nan, groups, np.arange(200), np.arange(200, 300), CENTERS)
    assert not fit.attached and fit.n_rows == 0
    # validation groups whose answers all got the same reward cannot choose a strength
    r_flat = r.copy()
    r_flat[200:] = np.repeat(np.arange(50), 2) / 50.0
    fit = fit_ranking_head(student, torch.from_numpy(X), r_flat, groups, np.arange(200), np.arange(200, 300), CENTERS)
    assert not fit.attached and "no validation group has two different rewards" in fit.reason
    assert not student.has_ranking


def test_head_round_trips_and_the_numpy_runner_matches_torch() -> None:
    torch.manual_seed(0)
    m = RewardMLP(12, (16,), 10, n_features=N_TEXT_FEATURES).eval()
    m.set_feature_stats(torch.randn(100, N_TEXT_FEATURES) + 3)
    m.set_ranking(torch.randn(12 + N_TEXT_FEATURES), mean_weight=0.7, centers=torch.linspace(0, 1, 10))
    with pytest.raises(ValueError, match="16 entries"):
        RewardMLP(12, (16,), 10, n_features=N_TEXT_FEATURES).set_ranking(torch.randn(12))
    m2 = RewardMLP.from_arch(m.arch())
    m2.load_state_dict(m.state_dict())
    assert m2.has_ranking and m.arch()["ranking"] is True
    X = np.random.default_rng(0).normal(size=(7, 12)).astype(np.float32)
    F = (np.random.default_rng(1).normal(size=(7, N_TEXT_FEATURES)) + 3).astype(np.float32)
    F[2, 1] = np.nan
    with torch.no_grad():
        want = m2.advantage(torch.from_numpy(np.concatenate([X, F], 1))).numpy()
        want_emb_only = m2.advantage(torch.from_numpy(X)).numpy()
        linear = m2.standardized(torch.from_numpy(np.concatenate([X, F], 1))) @ m2.rank_w
        mean = torch.softmax(m2(torch.from_numpy(np.concatenate([X, F], 1))), -1) @ torch.linspace(0, 1, 10)
    np.testing.assert_allclose(want, (linear + 0.7 * mean).numpy(), rtol=1e-5, atol=1e-6)  # head + weight * E[r]
    with torch.no_grad():  # a precomputed expected reward gives the same score without a second forward pass
        np.testing.assert_allclose(m2.advantage(torch.from_numpy(np.concatenate([X, F], 1)), mean).numpy(), want,
                                   rtol=1e-5, atol=1e-6)
    runner = StudentRunner(m2)
    np.testing.assert_allclose(runner.advantage(X, F), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runner.advantage(X, F, mean=mean.numpy()), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runner.advantage(X), want_emb_only, rtol=1e-5, atol=1e-5)
    m2.set_ranking(None)
    assert not m2.has_ranking and "rank_w" not in m2.state_dict()
    # an artifact without a head (older versions) still loads, with no head
    arch = m.arch()
    del arch["ranking"]
    assert not RewardMLP.from_arch(arch).has_ranking


def _confounded_episodes(n_groups: int, seed: int) -> list[dict]:
    """Answers to the same prompt differ by how often they say 'verified' (more is better within a
    prompt), but prompts whose answers say it a lot are the hard ones (lower reward overall)."""
    rng = np.random.default_rng(seed)
    topics = ["invoices", "flights", "recipes", "contracts", "weather", "tickets", "payroll", "shipping"]
    eps = []
    for g in range(n_groups):
        base = float(rng.uniform(0.05, 0.55))
        m0 = int(round(40 * (0.6 - base)))  # hard prompts: many "verified" in every answer
        topic = f"{topics[g % len(topics)]} case {g}"
        for j in rng.permutation(4):
            eps.append({
                "id": f"p{g}-a{j}",
                "text": f"Prompt about {topic}. Answer: " + " ".join(["verified"] * (m0 + 2 * j)) + " done.",
                "reward": round(float(np.clip(base + 0.12 * j + rng.normal(0, 0.01), 0, 1)), 4),
                "metadata": {"group": f"p{g}"},
                "created_at": 1.7e9 + g * 60.0 + j,
            })
    return eps


def test_consolidation_attaches_the_head_and_best_of_n_uses_it(store, registry) -> None:  # type: ignore[no-untyped-def]
    emb = store.embedder
    store.add_many(_confounded_episodes(150, seed=0))
    report = run_consolidation(store, registry, fast_job())
    assert report.ranking is not None and report.ranking.attached, report.ranking
    assert report.ranking.holdout_within_spearman is not None and report.ranking.holdout_within_spearman > 0.8
    manifest = registry.manifest(report.version)
    assert manifest["ranking"]["attached"] is True

    pred = Predictor(registry, emb, version=report.version)
    assert pred.has_ranking
    new = _confounded_episodes(40, seed=9)
    batch = pred.predict_batch([e["text"] for e in new])
    assert batch.advantage is not None and batch[0].advantage == pytest.approx(float(batch.advantage[0]))
    scorer = RewardScorer(pred, auto_refresh=False)
    hits_rank = hits_mean = 0
    for g in range(40):
        cands = [e for e in new if e["metadata"]["group"] == f"p{g}"]
        best = max(range(len(cands)), key=lambda i: cands[i]["reward"])
        i, _, preds = best_of_n([c["text"] for c in cands], scorer)  # by="auto" -> the ranking head
        assert preds[0].advantage is not None
        hits_rank += i == best
        hits_mean += best_of_n([c["text"] for c in cands], scorer, by="mean")[0] == best
    assert hits_rank >= 36 and hits_rank > hits_mean

    # a second run warm-starts from a student that has a head: the head is refit, not carried over
    report2 = run_consolidation(store, registry, fast_job(warm_start=True))
    assert report2.warm_started and report2.ranking is not None and report2.ranking.attached


def test_best_of_n_without_a_head(store, registry, episodes) -> None:  # type: ignore[no-untyped-def]
    store.add_many(episodes)
    report = run_consolidation(store, registry, fast_job(ranking=False))
    assert report.ranking is None and registry.manifest(report.version)["ranking"] is None
    pred = Predictor(registry, store.embedder, version=report.version)
    assert not pred.has_ranking
    scorer = RewardScorer(pred, auto_refresh=False)
    cands = ["The agent guessed the answer and did not check it.",
             "The agent searched the web, cross-checked two sources and cited them in the answer."]
    assert scorer.score_batch(cands).advantage is None and scorer.invoke(cands[0]).advantage is None
    assert best_of_n(cands, scorer)[0] == best_of_n(cands, scorer, by="mean")[0] == 1
    with pytest.raises(ValueError, match="ranking head.*'group'"):
        best_of_n(cands, scorer, by="rank")
    with pytest.raises(TypeError, match="list of candidates, got one str"):  # not its characters, one by one
        best_of_n(cands[1], scorer)
    for call in (scorer.batch, scorer.score_batch):
        with pytest.raises(TypeError, match="take a list of inputs, got one str"):
            call(cands[1])


def test_where_the_expected_reward_already_ranks_well_the_head_adds_it(trained) -> None:  # type: ignore[no-untyped-def]
    # the synthetic episodes come in groups of 4 per task, and the reward follows the strategy,
    # which the distribution head learns well: stacking gives the expected reward a positive weight
    _, reg, report = trained
    fit = report.ranking
    assert fit is not None and fit.attached and fit.weight_mean is not None and fit.weight_mean > 0
    assert fit.val_within_spearman_mean is not None and fit.val_within_spearman >= fit.val_within_spearman_mean - 0.05
    assert reg.manifest(report.version)["ranking"]["weight_mean"] == pytest.approx(fit.weight_mean)
