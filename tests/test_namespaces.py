"""Per-namespace models: consolidating one team's memories never gates against or replaces another's model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import fast_job

from memory_distill import (
    ArtifactRegistry,
    ConsolidationWorker,
    HashingEmbedder,
    MemoryDistill,
    MemoryStore,
    NoModelError,
    StoreConfig,
)
from memory_distill.cli import main

SEARCH = "the agent searched the web and cited two sources before answering"
GUESS = "the agent guessed the answer without checking anything"


def _episodes(namespace: str, search_reward: float, n: int = 120) -> list[dict]:
    """Team a is paid for searching, team b for guessing (opposite lessons from the same kinds of episode)."""
    rng = np.random.default_rng(len(namespace) + int(search_reward * 10))
    out = []
    for i in range(n):
        searched = i % 2 == 0
        base = search_reward if searched else 1 - search_reward
        out.append({"text": f"{SEARCH if searched else GUESS} (task {i})", "namespace": namespace,
                    "reward": float(np.clip(base + rng.normal(0, 0.05), 0, 1)),
                    "metadata": {"group": f"{namespace}-{i // 2}"}, "created_at": 1.7e9 + i})
    return out


@pytest.fixture
def mem(tmp_path) -> MemoryDistill:  # type: ignore[no-untyped-def]
    store = MemoryStore(HashingEmbedder(dim=128), StoreConfig(path=tmp_path / "chroma"))
    m = MemoryDistill(store, ArtifactRegistry(tmp_path / "models"), fast_job())
    m.add_many(_episodes("team-a", 0.9) + _episodes("team-b", 0.1))
    return m


def test_each_namespace_trains_gates_and_serves_its_own_model(mem, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NoModelError, match="no model serves namespace 'team-a' yet"):
        mem.predict(SEARCH, namespace="team-a")
    ra = mem.consolidate(namespace="team-a")
    rb = mem.consolidate(namespace="team-b")
    # both are the first model of their own registry: promoted, not gated against the other team's
    assert (ra.version, ra.promoted, ra.incumbent_version) == ("v000001", True, None)
    assert (rb.version, rb.promoted, rb.incumbent_version) == ("v000001", True, None)
    assert ra.n_rows == rb.n_rows == 120  # each trained on its own rows only
    a_search, a_guess = (p.mean for p in mem.predict([SEARCH, GUESS], namespace="team-a"))
    b_search, b_guess = (p.mean for p in mem.predict([SEARCH, GUESS], namespace="team-b"))
    assert a_search > a_guess + 0.4 and b_guess > b_search + 0.4

    # the top-level registry has no model: an unknown namespace falls back to it, and the error says both ways out
    with pytest.raises(NoModelError, match="neither its own .*consolidate --namespace team-c.* nor a top-level"):
        mem.predict(SEARCH, namespace="team-c")
    with pytest.raises(NoModelError, match="registry.scoped"):  # the top-level predictor points to the scoped ones
        mem.predict(SEARCH)
    assert mem.registry.current_version() is None
    assert sorted(mem.registry.namespaces()) == ["team-a", "team-b"]

    # a second run of team a is gated against team a's model only; team b's stays current
    ra2 = mem.consolidate(namespace="team-a")
    assert ra2.version == "v000002" and ra2.incumbent_version == "v000001"
    assert mem.registry.scoped("team-b").current_version() == "v000001"

    # a model trained on every namespace serves the namespaces without their own
    root = mem.consolidate()
    assert root.n_rows == 240 and mem.predictor_for("team-c").registry.root == mem.registry.root
    assert mem.predictor_for("team-a").registry.namespace == "team-a"
    # no memory has an empty namespace: asking for its model silently served the top-level one
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="namespace .* is empty: give a namespace's name, or None"):
            mem.predictor_for(empty)
    with pytest.raises(TypeError, match="namespace must be None .* or a str, got int"):
        mem.registry.scoped(5)  # type: ignore[arg-type]  # (a regex error deep inside)

    # deleting a training row of team a marks team a's models stale, not team b's
    a_row = next(m.id for ms, _ in mem.store.iter_memories(namespace="team-a") for m in ms)
    entry = mem.forget([a_row])
    assert "team-a/v000001" in entry["stale_versions"] and not any("team-b" in v for v in entry["stale_versions"])
    assert entry["stale_versions"][0] == root.version  # the all-namespace model read it too


def test_worker_publishes_into_its_namespace(mem) -> None:  # type: ignore[no-untyped-def]
    w = ConsolidationWorker(mem.store, mem.registry, fast_job(namespace="team-b"), every_s=None, min_new=10)
    assert w.run_once() is not None
    assert w.registry.namespace == "team-b" and w.registry.current_version() == "v000001"
    assert mem.registry.current_version() is None
    assert w.due() == (False, "not due")  # its own history, not the top-level one


def test_cli_namespace_models(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEMORY_DISTILL_EMBEDDER__DIM", "128")
    home = str(tmp_path / "home")
    MemoryDistill.open(home).add_many(_episodes("team-a", 0.9) + _episodes("team-b", 0.1))
    for ns in ("team-a", "team-b"):
        assert main(["-q", "--home", home, "consolidate", "--namespace", ns, "--epochs", "12"]) == 0
    capsys.readouterr()
    assert main(["-q", "--home", home, "stats"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["model"] is None and st["namespace_models"] == {"team-a": "v000001", "team-b": "v000001"}
    assert main(["-q", "--home", home, "predict", SEARCH, "--namespace", "team-b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["mean"] < 0.4
    assert main(["-q", "--home", home, "predict", SEARCH, "--namespace", "team-a"]) == 0
    assert "(model v000001, namespace 'team-a')" in capsys.readouterr().out
    assert main(["-q", "--home", home, "consolidate", "--namespace", "team-c"]) == 2
    assert "0 rewarded memories in namespace 'team-c' (the store's namespaces: 'team-a', 'team-b')" in \
        capsys.readouterr().err
    assert main(["-q", "--home", home, "models", "--namespace", "team-c"]) == 0
    assert "no models for namespace 'team-c' yet" in capsys.readouterr().out
    assert main(["-q", "--home", home, "models", "--namespace", "team-a"]) == 0
    assert "v000001" in capsys.readouterr().out
    assert main(["-q", "--home", home, "models"]) == 0
    assert "v000001" not in capsys.readouterr().out
    assert main(["-q", "--home", home, "history", "--namespace", "team-b", "--json"]) == 0
    assert [h["outcome"] for h in json.loads(capsys.readouterr().out)] == ["promoted"]


def test_a_namespace_predictor_switches_to_the_namespace_model_when_it_appears(mem, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mem.consolidate()  # top-level model, trained on both teams: searching and guessing average out
    served = mem.predictor_for("team-b")  # e.g. handed to a long-running agent's middleware
    assert served.registry.namespace is None and served.version == "v000001"
    top_gap = abs(served.predict([SEARCH])[0].mean - served.predict([GUESS])[0].mean)

    # another process consolidates team b; the agent's predictor picks it up on its next refresh
    other = MemoryDistill(MemoryStore(HashingEmbedder(dim=128), StoreConfig(path=tmp_path / "chroma")),
                          ArtifactRegistry(tmp_path / "models"), fast_job())
    other.consolidate(namespace="team-b")
    assert served.refresh() is True and served.refresh() is False
    assert served.registry.namespace == "team-b"
    b_search, b_guess = (p.mean for p in served.predict([SEARCH, GUESS]))
    assert b_guess - b_search > top_gap + 0.3


def test_a_namespace_per_user_shares_the_fallback_model_and_keeps_recent_predictors(mem) -> None:  # type: ignore[no-untyped-def]
    """Many namespaces without models of their own: their predictors share the top-level weights, and the facade
    keeps the most recently used MAX_PREDICTORS of them (an evicted one is made again on demand)."""
    mem.consolidate()
    mem.MAX_PREDICTORS = 3
    means = [mem.predict(SEARCH, namespace=f"user-{i}")[0].mean for i in range(5)]
    assert len(set(means)) == 1 and list(mem._predictors) == ["user-2", "user-3", "user-4"]
    assert len({id(p.runner) for p in mem._predictors.values()}) == 1
    mem.predict(SEARCH, namespace="user-2")  # used: now the most recent
    mem.predict(SEARCH, namespace="user-0")  # made again; user-3 is the least recently used
    assert list(mem._predictors) == ["user-4", "user-2", "user-0"]
    assert mem.predict(SEARCH, namespace="user-0")[0].mean == means[0]


def test_predictors_for_many_namespaces_from_many_threads(mem) -> None:  # type: ignore[no-untyped-def]
    """An agent server's threads ask for many users' predictors at once while the least recently used are dropped."""
    import threading

    mem.consolidate()
    mem.MAX_PREDICTORS = 2
    errors: list[BaseException] = []
    want = mem.predict(SEARCH)[0].mean

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for i in range(1500):
                p = mem.predictor_for(f"user-{rng.integers(6)}")
                if i % 100 == 0:
                    assert p.predict([SEARCH])[0].mean == want
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and len(mem._predictors) <= 2


def test_namespace_workers_keep_one_model_per_namespace(mem, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from memory_distill import NamespaceWorkers

    mem.add_many([{"text": f"{SEARCH} (tiny {i})", "reward": 0.5, "namespace": "team-tiny"} for i in range(5)])
    nw = NamespaceWorkers(mem.store, mem.registry, fast_job(), every_s=3600, min_new=10)
    first = nw.run_once()
    assert sorted(first) == ["team-a", "team-b"]  # team-tiny has 5 rewarded memories: not due, not failed
    assert nw.workers["team-tiny"].due()[0] is False and mem.registry.scoped("team-tiny").history() == []
    assert {ns: r.version for ns, r in first.items()} == {"team-a": "v000001", "team-b": "v000001"}
    calls = {"count": 0, "namespace_counts": 0}
    for name in calls:
        def spy(*a, _name=name, _real=getattr(mem.store, name), **kw):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _real(*a, **kw)
        setattr(mem.store, name, spy)
    # nothing written since the last poll (same total and rewarded counts, no forget): its counts stand
    assert nw.run_once() == {} and calls == {"count": 2, "namespace_counts": 0}
    pending = mem.record("a pending episode", namespace="team-a")  # a write: counted again, one filtered count each
    assert nw.run_once() == {} and calls == {"count": 2 + 2 + 3, "namespace_counts": 0}
    # past one_pass_above namespaces a poll counts them all in one pass over the metadata
    nw.one_pass_above = 2
    mem.record("another pending one", namespace="team-b")
    assert nw.run_once() == {} and calls == {"count": 7 + 2, "namespace_counts": 1}
    assert nw.run_once() == {} and calls == {"count": 9 + 2, "namespace_counts": 1}
    mem.forget(namespace="team-tiny")  # a forget: counted again (team-tiny's count drops to 0)
    assert nw.run_once() == {} and calls == {"count": 11 + 2, "namespace_counts": 2}
    assert nw._counts == mem.store.namespace_counts(rewarded_only=True) == {
        ns: mem.store.count(namespace=ns, rewarded_only=True) for ns in ("team-a", "team-b")}
    before = nw._counts["team-a"]
    mem.set_reward(pending, 0.5)  # a reward arriving changes no total: the rewarded count shows it
    assert nw.run_once() == {} and nw._counts["team-a"] == before + 1
    mem.add_many(_episodes("team-b", 0.1, n=12))
    assert list(nw.run_once()) == ["team-b"]  # only the namespace whose rewards arrived
    assert mem.registry.scoped("team-b").current_version() in ("v000001", "v000002")
    assert len(mem.registry.scoped("team-b").history()) == 2 and len(mem.registry.scoped("team-a").history()) == 1
    with pytest.raises(ValueError, match="leave JobConfig.namespace unset"):
        NamespaceWorkers(mem.store, mem.registry, fast_job(namespace="team-a"))

    home = str(tmp_path / "home")
    MemoryDistill.open(home).add_many(_episodes("x", 0.9) + _episodes("y", 0.1))
    assert main(["-q", "--home", home, "worker", "--each-namespace", "--epochs", "6", "--max-runs", "2",
                 "--poll", "0"]) == 0
    out = capsys.readouterr().out
    assert "namespace 'x' v000001" in out and "namespace 'y' v000001" in out


def test_a_facade_configured_for_one_namespace_serves_what_it_trains(mem) -> None:  # type: ignore[no-untyped-def]
    team_b = MemoryDistill(mem.store, mem.registry, fast_job(namespace="team-b"))  # e.g. MEMORY_DISTILL_JOB__NAMESPACE
    assert team_b.try_predictor() is None
    rep = team_b.consolidate()
    assert mem.registry.scoped("team-b").current_version() == rep.version and mem.registry.current_version() is None
    s, g = (p.mean for p in team_b.predict([SEARCH, GUESS]))  # no namespace= needed
    assert g > s + 0.4 and team_b.predictor.registry.namespace == "team-b" and team_b.try_predictor() is not None
    # a config naming one namespace and namespace= another: one was dropped, silently
    with pytest.raises(ValueError, match="namespace='team-a' and the config's namespace 'team-b' differ: give one"):
        mem.consolidate(fast_job(namespace="team-b"), namespace="team-a")
    assert mem.registry.scoped("team-a").history() == []


def test_a_failed_first_run_leaves_no_namespace_registry_behind(mem) -> None:  # type: ignore[no-untyped-def]
    from memory_distill import ConsolidationError
    with pytest.raises(ConsolidationError, match="only 0 rewarded memories in namespace 'team-x'.*'team-a', 'team-b'"):
        mem.consolidate(namespace="team-x")  # a typo
    mem.add_many([{"text": f"one of few {i}", "reward": 0.5, "namespace": "small"} for i in range(5)])
    with pytest.raises(ConsolidationError, match="only 5 rewarded memories in namespace 'small'"):
        mem.consolidate(namespace="small")
    assert mem.registry.namespaces() == {}
    assert mem.registry.scoped("team-x").history() == [] and not mem.registry.scoped("small").exists()
    # the namespace can still get its model, and a later failure of a namespace with models is logged as before
    mem.add_many([{**e, "namespace": "small"} for e in _episodes("x", 0.9)])
    assert mem.consolidate(namespace="small").promoted and list(mem.registry.namespaces()) == ["small"]
    with pytest.raises(ConsolidationError):
        mem.consolidate(fast_job(min_rewarded=10_000), namespace="small")
    assert [h["outcome"] for h in mem.registry.scoped("small").history()] == ["promoted", "failed"]


def test_stopped_namespace_workers_start_no_further_runs(mem) -> None:  # type: ignore[no-untyped-def]
    """stop() (the CLI worker's SIGTERM) takes effect between namespaces, not after every due one has run."""
    from memory_distill import NamespaceWorkers

    workers = NamespaceWorkers(mem.store, mem.registry, fast_job(), every_s=None, min_new=1)
    assert all(workers.workers[ns].due()[0] for ns in workers.discover())  # both teams are due
    workers.stop()
    assert workers.run_once() == {} and mem.registry.namespaces() == {}


def test_forgetting_a_whole_namespace_retires_its_model(mem) -> None:  # type: ignore[no-untyped-def]
    """A user's namespace forgotten whole: the user's own model trained on nothing but deleted memories, and no
    run can replace it, so it stops serving (the namespace falls back to the top-level model) and its files go.
    Forgetting the whole store stops the top-level model the same way, until a new one is published."""
    from memory_distill import ConsolidationError

    top = mem.consolidate().version
    top_held = mem.predictor_for(None)
    ra = mem.consolidate(namespace="team-a").version
    rb = mem.consolidate(namespace="team-b").version
    held = mem.predictor_for("team-a")  # an agent holding team a's predictor
    assert held.registry.namespace == "team-a" and held.predict(SEARCH)[0].model_version == ra
    n_before, files_before = mem.store.count(), sorted(p.name for p in mem.registry.root.rglob("*"))
    preview = mem.forget(namespace="team-a", dry_run=True)  # what it would do, nothing changed
    assert mem.store.count() == n_before and sorted(p.name for p in mem.registry.root.rglob("*")) == files_before
    assert mem.registry.deletions() == [] and held.refresh() is False
    entry = mem.forget(namespace="team-a")
    assert preview.pop("dry_run") is True
    assert {k: v for k, v in preview.items() if k != "ids"} == {k: v for k, v in entry.items() if k not in ("ids", "time")}
    assert sorted(preview["ids"]) == sorted(entry["ids"])
    assert entry["retired"] == ["team-a"] and "team-a/" + ra in entry["stale_versions"]
    reg_a = mem.registry.scoped("team-a")
    assert reg_a.current_version() is None and reg_a.list_versions() == [] and reg_a.stale_versions() == {}
    assert mem.registry.scoped("team-b").current_version() == rb  # untouched
    assert held.refresh() and held.registry.namespace is None  # falls back to the top-level model
    assert held.predict(SEARCH)[0].model_version == top and mem.try_predictor("team-a") is held
    with pytest.raises(ConsolidationError, match="only 0 rewarded memories in namespace 'team-a'"):
        mem.consolidate(namespace="team-a")
    # team a comes back: its first model gets a new number, not the deleted one's
    mem.add_many(_episodes("team-a", 0.9))
    assert mem.consolidate(namespace="team-a").version == "v000002"
    assert held.registry.namespace == "team-a"  # (consolidate refreshed the facade's predictors)

    # the whole store forgotten: nothing is left to train the top-level model either
    preview = mem.forget(where={"group": {"$ne": ""}}, dry_run=True)
    everything = mem.forget(where={"group": {"$ne": ""}})
    assert [preview[k] for k in ("n_deleted", "stale_versions", "deleted_versions", "retired")] == [
        everything[k] for k in ("n_deleted", "stale_versions", "deleted_versions", "retired")]
    assert len(everything["deleted_versions"]) >= 3  # (each retired registry's current version at least)
    assert everything["retired"] == ["(top level)", "team-a", "team-b"] and mem.registry.current_version() is None
    assert mem.try_predictor() is None and top_held.retired is not None
    with pytest.raises(NoModelError, match="was retired"):
        top_held.predict(SEARCH)
    mem.add_many(_episodes("team-b", 0.1))
    from langchain_memory_distill import ValueAwareRetriever

    docs = ValueAwareRetriever(store=mem.store, predictor=top_held, namespace="team-b", k=2).invoke(SEARCH)
    assert len(docs) == 2 and all(d.metadata.get("predicted_mean") is None for d in docs)  # stored rewards rank
    assert mem.consolidate().promoted and top_held.retired is None
    assert top_held.predict(SEARCH)[0].model_version == mem.registry.current_version()
