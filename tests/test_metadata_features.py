"""Metadata features: the spec, consolidation, serving (predictor, scorer, retriever, drift, CLI)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fast_job
from langchain_core.documents import Document
from langchain_memory_distill.retriever import ValueAwareRetriever
from langchain_memory_distill.scorer import RewardScorer, best_of_n
from pydantic import ValidationError

from memory_distill.config import JobConfig
from memory_distill.errors import ArtifactError
from memory_distill.features import N_TEXT_FEATURES, FeatureSpec, metadata_columns
from memory_distill.jobs import drift_report, run_consolidation
from memory_distill.predictor import Predictor

AGENT_REWARD = {"planner": 0.85, "react": 0.5, "guesser": 0.15}
TOPICS = ["Oslo population", "miles to km", "Hooli founder", "auth unit test", "tax rate 2021", "river length",
          "prime factors", "capital of Peru", "boiling point", "first moon landing"]


def _episodes(n_groups: int, seed: int, agents: dict[str, float] = AGENT_REWARD) -> list[dict]:
    """Every group: the same task answered by each agent in the same words; only the agent decides the reward."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        topic = TOPICS[g % len(TOPICS)]
        for a, base in agents.items():
            words = rng.choice(["searched", "checked", "answered", "looked", "wrote", "cited", "tried"], 6)
            out.append({"text": f"Task {g}: {topic}. The agent {' '.join(words)} and replied.",
                        "reward": float(np.clip(base + rng.normal(0, 0.1), 0, 1)),
                        "metadata": {"group": f"task-{seed}-{g}", "agent": a}})
    return out


# ---------------------------------------------------------------------------- the spec


def test_spec_vocabulary_encoding_and_manifest_round_trip() -> None:
    cols = {"agent": ["b", "a", "a", "b", "c", None, 3, 3], "tool": ["x"] * 8}
    spec = FeatureSpec.fit(text=True, columns=cols)
    # values seen >= 2 times, sorted; a number is a category by its string; one value -> no columns
    assert spec.metadata == (("agent", ("3", "a", "b")), ("tool", ()))
    assert spec.width == N_TEXT_FEATURES + 3 and spec.keys == ["agent", "tool"]
    assert spec.columns[-3:] == ["agent=3", "agent=a", "agent=b"]
    F = spec.build(4, metadata=metadata_columns([{"agent": "b"}, {"agent": 3}, {"agent": "new"}, None], spec.keys))
    assert F is not None and F.shape == (4, 7)
    assert np.isnan(F[:, :N_TEXT_FEATURES]).all()  # no texts given: neutral text features
    np.testing.assert_array_equal(F[:2, N_TEXT_FEATURES:], [[0, 0, 1], [1, 0, 0]])
    assert np.isnan(F[2:, N_TEXT_FEATURES:]).all()  # unseen value and missing row: neutral, not "none of these"
    assert FeatureSpec.fit(text=False, columns={"agent": ["a", "b"] * 2}).build(4) is not None
    assert FeatureSpec(text=False).build(3) is None
    capped = FeatureSpec.fit(text=False, columns={"k": [f"v{i % 10}" for i in range(100)] + ["v0"] * 5}, max_values=3)
    assert capped.metadata[0][1][0] == "v0" and len(capped.metadata[0][1]) == 3

    assert FeatureSpec.from_manifest({"feature_spec": spec.to_dict()}, spec.width) == spec
    assert FeatureSpec.from_manifest({}, N_TEXT_FEATURES) == FeatureSpec(text=True)  # artifacts from before
    assert FeatureSpec.from_manifest({}, 0) == FeatureSpec(text=False)
    with pytest.raises(ValueError, match="do not match"):
        FeatureSpec.from_manifest({"feature_spec": spec.to_dict()}, N_TEXT_FEATURES)
    with pytest.raises(ValueError, match="has 1 values for 2 rows"):
        spec.build(2, metadata={"agent": ["a"]})


def test_numeric_keys_get_one_log_scaled_column() -> None:
    cols = {"steps": [1, 4, 4.5, None, 120, float("inf")], "agent": ["a", "b", "a", "b", 3, 3],
            "flag": [True, False, True, False, True, False], "const": [7, 7, 7, None, 7, 7], "code": [1, 2, 1, 2, 1, 2]}
    spec = FeatureSpec.fit(text=False, columns=cols)
    # all numbers (missing and inf aside) -> numeric; strings mixed with numbers, bools, a few whole-number codes
    # -> categories
    assert spec.numeric == ("steps",)
    assert spec.metadata == (("steps", ()), ("agent", ("3", "a", "b")), ("flag", ("False", "True")), ("const", ()),
                             ("code", ("1", "2")))
    assert spec.columns == ["steps", "agent=3", "agent=a", "agent=b", "flag=False", "flag=True", "code=1", "code=2"]
    many = FeatureSpec.fit(text=False, columns={"tokens": list(range(17)) * 2})
    assert many.numeric == ("tokens",)  # more whole numbers than METADATA_INT_CATEGORIES: a count
    assert FeatureSpec.fit(text=False, columns={"tokens": list(range(16)) * 2}).numeric == ()
    F = spec.build(5, metadata={"steps": [0, 9, -9, None, "many"], "agent": ["a"] * 5, "flag": [True] * 5,
                                "code": [1] * 5})
    assert F is not None
    np.testing.assert_allclose(F[:3, 0], [0.0, np.log(10), -np.log(10)], rtol=1e-6)
    assert np.isnan(F[3:, 0]).all()  # missing, or not a number: neutral
    assert spec.build(2) is not None and np.isnan(spec.build(2)[:, 0]).all()  # type: ignore[index]
    assert FeatureSpec.from_manifest({"feature_spec": spec.to_dict()}, spec.width) == spec
    assert spec.to_dict()["numeric"] == ["steps"]


def test_config_rejects_reserved_and_repeated_keys() -> None:
    for bad, msg in ((["group"], "not 'group'"), (["_md_reward"], "_md_"), ([""], "not empty"),
                     (["agent", "agent"], "twice")):
        with pytest.raises(ValidationError, match="metadata_features") as e:
            JobConfig(metadata_features=bad)
        assert msg in str(e.value)


# ---------------------------------------------------------------------------- end to end


@pytest.fixture
def agent_models(tmp_path_factory, embedder):  # type: ignore[no-untyped-def]
    """One store of agent episodes, consolidated with and without the agent as a feature."""
    from memory_distill.artifacts import ArtifactRegistry
    from memory_distill.config import StoreConfig
    from memory_distill.store import MemoryStore

    root = tmp_path_factory.mktemp("agents")
    store = MemoryStore(embedder, StoreConfig(path=root / "chroma"))
    store.add_many(_episodes(120, seed=0))
    with_meta, without = ArtifactRegistry(root / "with"), ArtifactRegistry(root / "without")
    rep = run_consolidation(store, with_meta, fast_job(metadata_features=("agent",)))
    rep0 = run_consolidation(store, without, fast_job())
    return store, with_meta, without, rep, rep0


def test_consolidation_learns_which_agent_pays_off(agent_models, embedder, caplog) -> None:  # type: ignore[no-untyped-def]
    store, with_meta, without, rep, rep0 = agent_models
    assert rep.features == FeatureSpec(text=True, metadata=(("agent", ("guesser", "planner", "react")),))
    assert rep.evaluation.student.spearman > 0.8  # the agent explains the reward
    assert rep0.evaluation.student.spearman < 0.3  # the text alone does not
    manifest = with_meta.load(rep.version).manifest
    assert manifest["feature_spec"]["metadata"] == {"agent": ["guesser", "planner", "react"]}

    pred = Predictor(with_meta, embedder)
    assert pred.metadata_features == ["agent"] and pred.feature_spec.width == N_TEXT_FEATURES + 3
    text = "Task 999: capital of Peru. The agent checked cited wrote and replied."
    means = {a: pred.predict_one(text, {"agent": a}).mean for a in [*AGENT_REWARD, "brand-new-agent"]}
    assert means["planner"] > means["react"] + 0.2 > means["guesser"] + 0.4
    # an unseen agent, no metadata at all, and the embedding-only call all read as the training mean
    assert means["guesser"] < means["brand-new-agent"] < means["planner"]
    with caplog.at_level("WARNING", logger="memory_distill.predictor"):
        neutral = pred.predict([text])[0].mean
        pred.predict([text])
    assert sum("reads metadata features ['agent'] but none were given" in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="memory_distill.predictor"):  # a near miss of the key: named, once
        assert pred.predict([text], metadata=[{"agnet": "planner"}])[0].mean == pytest.approx(neutral, abs=1e-6)
        pred.predict([text], metadata=[{"agnet": "planner"}])
        pred.predict([text], metadata=[{"Agent": "planner", "agent": "react"}])  # the real key is given too
        pred.predict([text], metadata=[{"user": "bob", "agent": "planner"}])  # not a near miss
    assert [r.getMessage() for r in caplog.records] == [
        f"model {pred.version} reads the metadata key 'agent', and the metadata given has 'agnet' instead: did "
        "you mean 'agent'? (rows without it are predicted with its training mean)"]
    assert neutral == pytest.approx(means["brand-new-agent"], abs=1e-6)
    X = embedder.embed([text] * 2)
    batch = pred.predict_embeddings(X, texts=[text] * 2, metadata=[{"agent": "planner"}, None])
    assert batch.mean[0] == pytest.approx(means["planner"], abs=1e-5)
    assert batch.mean[1] == pytest.approx(neutral, abs=1e-5)
    with pytest.raises(ValueError, match="one dict"):
        pred.predict_embeddings(X, metadata=[{"agent": "planner"}])
    with pytest.raises(TypeError, match="one dict per row"):
        pred.predict_embeddings(X, metadata={"agent": "planner"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="one dict per row, got one str"):
        pred.predict_embeddings(X, metadata="agent")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metadata takes one dict per text, got the str 'agent'"):  # not "5 items"
        pred.predict([text], metadata="agent")  # type: ignore[arg-type]
    # not "'str' object has no attribute 'keys'"
    with pytest.raises(TypeError, match=r"metadata\[1\] must be a dict \(or None\), got str"):
        pred.predict([text, text], metadata=[{"agent": "planner"}, "planner"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="predict_one takes one metadata dict, got list"):
        pred.predict_one(text, [{"agent": "planner"}])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="agent=planner"):
        pred.predict_embeddings(X, features=np.zeros((2, 5), np.float32))


def test_best_of_n_picks_the_agent_that_pays_off(agent_models, embedder) -> None:  # type: ignore[no-untyped-def]
    _, with_meta, without, _, _ = agent_models
    new = _episodes(30, seed=7)
    scorers = {"with": RewardScorer(Predictor(with_meta, embedder)), "without": RewardScorer(Predictor(without, embedder))}
    realised = {}
    for name, scorer in scorers.items():
        got = []
        for g in range(30):
            cands = [Document(page_content=e["text"], metadata={"agent": e["metadata"]["agent"]})
                     for e in new[3 * g : 3 * g + 3]]
            i, _, _ = best_of_n(cands, scorer)
            got.append(new[3 * g + i]["reward"])
        realised[name] = float(np.mean(got))
    assert realised["with"] > 0.8  # the planner every time (its rewards average 0.85)
    assert realised["without"] < realised["with"] - 0.2


def test_retriever_and_drift_read_the_stored_metadata(agent_models, embedder) -> None:  # type: ignore[no-untyped-def]
    store, with_meta, _, _, _ = agent_models
    pred = Predictor(with_meta, embedder)
    docs = ValueAwareRetriever(store=store, predictor=pred, k=30, fetch_k=60).invoke("capital of Peru")
    by_agent: dict[str, list[float]] = {}
    for d in docs:
        by_agent.setdefault(d.metadata["agent"], []).append(d.metadata["predicted_mean"])
    assert np.mean(by_agent["planner"]) > np.mean(by_agent["react"]) > np.mean(by_agent["guesser"])

    # rewards that arrive after publication: the drift report encodes their agents like training did
    late = _episodes(10, seed=3)
    store.add_many(late)
    rep = drift_report(store, with_meta, min_samples=5)
    assert rep.n == len(late) and rep.mae is not None and rep.mae < 0.15


def _aged(eps: list[dict], t0: float) -> list[dict]:
    return [{**e, "created_at": t0 + i} for i, e in enumerate(eps)]


def test_warm_start_needs_the_same_columns(store, registry, embedder) -> None:  # type: ignore[no-untyped-def]
    cfg = fast_job(metadata_features=("agent",), warm_start=True)
    store.add_many(_aged(_episodes(60, seed=0), 1.7e9))
    assert not run_consolidation(store, registry, cfg).warm_started
    assert run_consolidation(store, registry, cfg).warm_started  # same agents, same columns

    # a new agent seen only in the newest memories (the held-out slice) gets no column yet: no weight was
    # trained for it, so it reads as neutral, and the columns (and the warm start) stay as they were
    store.add_many(_aged(_episodes(8, seed=1, agents={"critic": 0.95}), 1.8e9))
    rep = run_consolidation(store, registry, cfg)
    assert rep.warm_started and rep.features is not None and "critic" not in rep.features.metadata[0][1]
    pred = Predictor(registry, embedder, version=rep.version)
    text = "Task 3: tax rate 2021. The agent wrote cited tried and replied."
    assert pred.predict_one(text, {"agent": "critic"}).mean == pytest.approx(pred.predict_one(text).mean, abs=1e-6)

    # once it is in the training rows it is a new input column: train from scratch
    store.add_many(_aged(_episodes(20, seed=2, agents={"critic": 0.95}), 1.0e9))
    rep = run_consolidation(store, registry, cfg)
    assert not rep.warm_started
    assert rep.features is not None and "critic" in rep.features.metadata[0][1]
    assert rep.incumbent_metrics is not None and rep.incumbent_metrics.spearman > 0.5  # gated on its own columns
    # dropping the key: the incumbent is still scored with the agent it was trained to read
    rep2 = run_consolidation(store, registry, fast_job(warm_start=True))
    assert not rep2.warm_started and rep2.features == FeatureSpec(text=True)
    assert rep2.incumbent_metrics is not None and rep2.incumbent_metrics.spearman > 0.5


def test_a_manifest_that_disagrees_with_the_model_is_refused(agent_models, embedder) -> None:  # type: ignore[no-untyped-def]
    _, with_meta, _, rep, _ = agent_models
    path = with_meta.versions_dir / rep.version / "manifest.json"
    import json

    m = json.loads(path.read_text())
    m["feature_spec"]["metadata"]["agent"] = ["planner"]
    path.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="do not match the model"):
        Predictor(with_meta, embedder, version=rep.version)


def test_predict_tool_estimates_for_the_calling_agent(agent_models, embedder) -> None:  # type: ignore[no-untyped-def]
    from langchain_memory_distill.tools import make_predict_tool

    _, with_meta, _, _, _ = agent_models
    pred = Predictor(with_meta, embedder)
    plan = "Task 5: river length. The agent looked searched cited and replied."
    est = {a: float(make_predict_tool(pred, metadata={"agent": a}).invoke({"plan": plan}).split()[2])
           for a in ("planner", "guesser")}
    assert est["planner"] > est["guesser"] + 0.3


def test_a_numeric_key_generalises_to_values_never_seen(store, registry, embedder) -> None:  # type: ignore[no-untyped-def]
    """Reward falls with the number of steps an agent took; new step counts are placed on that scale
    (as categories they would all read as neutral)."""
    rng = np.random.default_rng(0)
    seen = [1, 2, 3, 5, 6, 8, 9, 11, 13, 16, 19, 21, 25, 34, 40, 47, 55, 64, 89, 99]
    eps = []
    for g in range(150):
        for steps in rng.choice(seen, 4, replace=False):
            words = " ".join(rng.choice(["searched", "checked", "answered", "looked", "wrote", "cited"], 5))
            eps.append({"text": f"Task {g}: {TOPICS[g % len(TOPICS)]}. The agent {words}.",
                        "reward": float(np.clip(0.95 - 0.18 * np.log1p(steps) + rng.normal(0, 0.05), 0, 1)),
                        "metadata": {"group": f"t{g}", "steps": int(steps)}})
    store.add_many(eps)
    rep = run_consolidation(store, registry, fast_job(metadata_features=("steps",)))
    assert rep.features is not None and rep.features.numeric == ("steps",) and rep.evaluation.student.spearman > 0.8
    pred = Predictor(registry, embedder)
    text = "Task 7: boiling point. The agent checked wrote cited looked searched."
    means = [pred.predict_one(text, {"steps": s}).mean for s in (4, 10, 30, 75)]  # none of them seen
    assert means == sorted(means, reverse=True) and means[0] > means[-1] + 0.3


def test_a_key_no_training_memory_has_is_named_with_the_nearest_real_one(store, registry, caplog) -> None:  # type: ignore[no-untyped-def]
    """A misspelt key would silently add nothing (one constant column): consolidation warns and names a real key."""
    from memory_distill.config import DistillConfig, TeacherConfig

    store.add_many(_episodes(12, seed=0))
    quick = {"teacher": TeacherConfig(hidden=(16,), epochs=1), "distill": DistillConfig(hidden=(8,), epochs=1)}
    for keys, absent, hint in ((("agnet", "agent"), "agnet", "did you mean 'agent'?"),
                               (("zzz",), "zzz", "their metadata keys include 'agent', 'group'")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="memory_distill.jobs"):
            rep = run_consolidation(store, registry, fast_job(metadata_features=keys, **quick))
        warned = [r.getMessage() for r in caplog.records if "metadata_features" in r.getMessage()]
        assert warned == [f"JobConfig.metadata_features: no training memory has the metadata key {absent!r}, so it "
                          f"adds no feature ({hint})"]
        assert rep.features is not None and (absent, ()) in rep.features.metadata
    caplog.clear()
    with caplog.at_level("WARNING", logger="memory_distill.jobs"):
        run_consolidation(store, registry, fast_job(metadata_features=("agent",), **quick))
    assert not [r for r in caplog.records if "metadata_features" in r.getMessage()]


def test_a_key_with_one_value_throughout_is_named(tmp_path, embedder, caplog) -> None:  # type: ignore[no-untyped-def]
    """Every memory recorded by the same agent: the feature is there but constant, so it got no column in silence."""
    from memory_distill import ArtifactRegistry, MemoryStore
    from memory_distill.config import DistillConfig, StoreConfig, TeacherConfig

    store = MemoryStore(embedder, StoreConfig(path=tmp_path / "one-agent"))
    store.add_many([{**e, "metadata": {**e["metadata"], "agent": "planner", "run": f"r{i}"}}
                    for i, e in enumerate(_episodes(12, seed=0))])
    quick = {"teacher": TeacherConfig(hidden=(16,), epochs=1), "distill": DistillConfig(hidden=(8,), epochs=1)}
    with caplog.at_level("WARNING", logger="memory_distill.jobs"):
        rep = run_consolidation(store, ArtifactRegistry(tmp_path / "models"),
                                fast_job(metadata_features=("agent", "run"), **quick))
    warned = [r.getMessage() for r in caplog.records if "metadata_features" in r.getMessage()]
    assert warned == [
        "JobConfig.metadata_features: 'agent' adds no feature: every training memory that has it says 'planner'; it "
        "helps once memories differ in it",
        f"JobConfig.metadata_features: 'run' adds no feature: none of its {rep.n_train} values is on 2+ training "
        "memories (an id?); a value helps once 2+ memories share it"]
