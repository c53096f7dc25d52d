"""End-to-end consolidation on synthetic data and on the real episodes in ../shared/data."""

import numpy as np
import pytest
from conftest import SHARED_DATA, fast_job

from memory_distill import (
    ArtifactRegistry,
    HashingEmbedder,
    MemoryStore,
    Predictor,
    StoreConfig,
    run_consolidation,
)
from memory_distill.config import DistillConfig, JobConfig
from memory_distill.evaluate import spearman


def test_synthetic_consolidation_learns_and_distills(trained):
    store, reg, rep = trained
    ev = rep.evaluation
    assert rep.promoted and rep.version == reg.current_version()
    assert rep.n_holdout >= 100 and rep.n_transfer > 0  # pending memories were used as transfer data
    assert ev.student.spearman > 0.8 and ev.teacher.spearman > 0.8
    assert ev.retention >= 0.95
    assert rep.distill.val_kl[-1] < 0.5 * rep.distill.val_kl[0]  # the student moves towards the teacher
    assert ev.compression_ratio > 3.7
    assert ev.student.calibration_error < 0.1
    assert ev.student.crps < 0.5 * ev.histogram_crps  # its distributions know each memory, not just the base rate
    assert ev.student.mae < 0.15


def test_predictions_rank_strategies(trained):
    store, reg, _ = trained
    pred = Predictor(reg, store.embedder)
    # shaped like the stored episodes: the models read text statistics too
    good = ("Task: summarise the quarterly report of Acme. The agent searched the web, cross-checked two sources "
            "and cited them in the answer. Outcome: final answer given.")
    bad = ("Task: summarise the quarterly report of Acme. The agent looped on the same tool call until the step "
           "limit and gave up. Outcome: no usable answer.")
    g, b = pred.predict([good, bad])
    assert g.mean > b.mean + 0.4
    assert g.prob_above(0.5) > 0.8 and b.prob_above(0.5) < 0.2
    assert abs(sum(g.probs) - 1) < 1e-5 and g.std > 0
    assert g.quantiles[0.1] <= g.quantiles[0.5] <= g.quantiles[0.9]


def test_same_seed_same_model(tmp_path, episodes):
    outs = []
    for k in range(2):
        st = MemoryStore(HashingEmbedder(dim=64), StoreConfig(path=tmp_path / f"c{k}"))
        st.add_many(episodes)
        rep = run_consolidation(st, ArtifactRegistry(tmp_path / f"a{k}"), fast_job(seed=7))
        outs.append(rep.evaluation.student.mae)
    assert outs[0] == outs[1]


@pytest.mark.skipif(not (SHARED_DATA / "tree_of_thoughts").exists(), reason="../shared/data not present")
@pytest.mark.parametrize("name", ["creative_writing", "arena"])
def test_real_data_pipeline(tmp_path, name):
    from memory_distill.datasets import load_episodes

    eps = load_episodes(name, data_dir=SHARED_DATA, max_records=1500, seed=0)
    st = MemoryStore(HashingEmbedder(dim=512), StoreConfig(path=tmp_path / "c"))
    st.add_many(eps)
    rep = run_consolidation(st, ArtifactRegistry(tmp_path / "a"), JobConfig(distill=DistillConfig(epochs=20)))
    ev = rep.evaluation
    assert rep.n_holdout > 150
    assert ev.student.spearman > 0.1  # well above chance on held-out groups
    assert ev.retention >= 0.95
    assert min(rep.distill.val_kl) < 0.6 * rep.distill.val_kl[0]
    # the student's held-out ranking is real: recompute it independently from the artifact
    pred = Predictor(ArtifactRegistry(tmp_path / "a"), st.embedder)
    held_out = set(_holdout_ids(st, rep))
    hold = [e for e in eps if e["id"] in held_out]
    if hold:
        means = pred.predict_batch([h["text"] for h in hold]).mean
        assert spearman(means, np.array([h["reward"] for h in hold])) == pytest.approx(ev.student.spearman, abs=1e-4)


def _holdout_ids(st, rep):
    trained_on = set(ArtifactRegistry(st.config.path.parent / "a").train_ids(rep.version))
    data = st.load_training_data(rewarded_only=True)
    return [i for i in data.ids if i not in trained_on]
