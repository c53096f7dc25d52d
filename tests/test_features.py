"""Text features: stored with each memory, read by consolidation, used by the models and the predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fast_job

from memory_distill.evaluate import spearman
from memory_distill.features import N_TEXT_FEATURES, decode_stats, encode_stats, text_stats
from memory_distill.jobs import run_consolidation
from memory_distill.models import FEATURE_CLIP, RewardMLP
from memory_distill.predictor import Predictor, StudentRunner
from memory_distill.store import STATS


def test_text_stats_values_and_round_trip() -> None:
    t = "Hello world\nhello again"
    f = text_stats([t, ""])
    assert f.shape == (2, N_TEXT_FEATURES) and f.dtype == np.float32
    np.testing.assert_allclose(f[0], np.log1p([len(t), 4, 1, 3]), rtol=1e-6)  # 4 words, 1 newline, 3 distinct
    np.testing.assert_allclose(f[1], 0.0)
    np.testing.assert_allclose(decode_stats([encode_stats(t), None, "1,2", "a,b,c,d"])[0], f[0], rtol=1e-6)
    assert np.isnan(decode_stats([None, "1,2", "a,b,c,d"])).all()
    with pytest.raises(TypeError, match="list of texts"):
        text_stats("one string")
    with pytest.raises(TypeError, match="text_stats takes a list of texts, got NoneType"):
        text_stats(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, got int"):  # ("'int' object has no attribute")
        text_stats(["a", 1])  # type: ignore[list-item]


def test_store_keeps_stats_and_training_data_reads_them(store) -> None:  # type: ignore[no-untyped-def]
    texts = ["short", "a much longer text\nwith two lines and more words in it", "mid sized text here"]
    store.add_many([{"id": f"m{i}", "text": t, "reward": 0.5} for i, t in enumerate(texts)])
    assert STATS not in store.get("m1").metadata  # reserved keys stay out of the user's metadata
    # a row written without stats (as by an older version) reads as NaN, and set_reward backfills it
    vec = store.embedder.embed(["legacy row"])
    store._col.add(ids=["old"], embeddings=vec, documents=["legacy row"],
                   metadatas=[{"_md_ns": "default", "_md_created": 1.0, "_md_has_reward": False}])
    data = store.load_training_data()
    by_id = dict(zip(data.ids, data.features, strict=True))
    for i, t in enumerate(texts):
        np.testing.assert_allclose(by_id[f"m{i}"], text_stats([t])[0], rtol=1e-6)
    assert np.isnan(by_id["old"]).all()
    store.set_reward("old", 0.7)
    data = store.load_training_data()
    np.testing.assert_allclose(dict(zip(data.ids, data.features, strict=True))["old"], text_stats(["legacy row"])[0])


def test_model_feature_inputs_and_numpy_runner_match_torch() -> None:
    torch.manual_seed(0)
    m = RewardMLP(16, (32, 8), 10, n_features=N_TEXT_FEATURES).eval()
    F_train = torch.randn(200, N_TEXT_FEATURES) * 2 + 5
    m.set_feature_stats(F_train)
    np.testing.assert_allclose(m.feat_mean.numpy(), F_train.mean(0).numpy(), rtol=1e-5)
    X = torch.randn(5, 16)
    F = torch.randn(5, N_TEXT_FEATURES) * 2 + 5
    F[1, 2] = float("nan")
    F[2] = 1e6  # far outside training: clipped, not extrapolated
    with torch.no_grad():
        full = m(torch.cat([X, F], 1))
        emb_only = m(X)
        at_mean = m(torch.cat([X, m.feat_mean.expand(5, -1)], 1))
        nan_all = m(torch.cat([X, torch.full((5, N_TEXT_FEATURES), float("nan"))], 1))
        clipped = m(torch.cat([X, (m.feat_mean + FEATURE_CLIP * m.feat_std).expand(5, -1)], 1))
    torch.testing.assert_close(emb_only, at_mean)  # embedding-only input = features at the training mean
    torch.testing.assert_close(emb_only, nan_all)
    torch.testing.assert_close(full[2], clipped[2])
    assert not torch.allclose(full, emb_only)
    runner = StudentRunner(m)
    np.testing.assert_allclose(runner.logits(X.numpy(), F.numpy()), full.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runner.logits(X.numpy()), emb_only.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"features must be \[5, 4\]"):
        runner.logits(X.numpy(), F.numpy()[:, :2])
    # a model without features ignores extra columns (incumbents are gated on the same input matrix)
    plain = RewardMLP(16, (8,), 10).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(torch.cat([X, F], 1)), plain(X))
    with pytest.raises(ValueError, match="text features"):
        m(torch.randn(2, 18))
    # round trip through arch + state_dict keeps the feature statistics
    m2 = RewardMLP.from_arch(m.arch())
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m2.eval()(torch.cat([X, F], 1)), full)


def _length_episodes(n: int, seed: int) -> list[dict]:
    """Reward = how long the answer is (stored with random embeddings that know nothing of it)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(5, 120))
        text = "Answer: " + " ".join(["step"] * k)
        out.append({"id": f"e{i}", "text": text, "reward": round(k / 120, 4), "created_at": float(i),
                    "metadata": {"group": f"g{i // 5}"}})
    return out


def test_text_features_let_the_student_learn_what_embeddings_cannot_see(store, registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from memory_distill.artifacts import ArtifactRegistry

    eps = _length_episodes(400, 0)
    rand = np.random.default_rng(0).standard_normal((400, store.embedder.dim)).astype(np.float32)
    store.add_many(eps, embeddings=rand / np.linalg.norm(rand, axis=1, keepdims=True))
    plain = run_consolidation(store, ArtifactRegistry(tmp_path / "plain"), fast_job(text_features=False))
    rep = run_consolidation(store, registry, fast_job())
    assert rep.evaluation.student.spearman > 0.8
    assert plain.evaluation.student.spearman < rep.evaluation.student.spearman - 0.3
    loaded = registry.load(rep.version)
    assert loaded.manifest["features"] == "text-stats-v1" and loaded.student.n_features == N_TEXT_FEATURES

    pred = Predictor(registry, store.embedder)
    assert pred.uses_text_features
    new = _length_episodes(60, 1)
    texts = [e["text"] for e in new]
    p = pred.predict(texts)
    assert spearman(np.array([x.mean for x in p]), np.array([e["reward"] for e in new])) > 0.8
    X = store.embedder.embed(texts)
    np.testing.assert_allclose(pred.predict_embeddings(X, texts=texts).mean, [x.mean for x in p], rtol=1e-5)
    # embeddings alone: the features sit at their training mean, so the length signal is gone
    assert np.ptp(pred.predict_embeddings(X).mean) < 0.1 * np.ptp([x.mean for x in p])
    with pytest.raises(ValueError, match="one text per row"):
        pred.predict_embeddings(X, texts=texts[:3])

    # a model trained without features is not warm-started into one with them (shapes differ)
    rep2 = run_consolidation(store, ArtifactRegistry(tmp_path / "plain"), fast_job(warm_start=True))
    assert not rep2.warm_started and rep2.evaluation.student.spearman > 0.8
    rep3 = run_consolidation(store, registry, fast_job(warm_start=True))
    assert rep3.warm_started
