"""MemoryDistillStore: LangGraph's BaseStore on a MemoryStore, checked against LangGraph's own InMemoryStore."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from conftest import fast_job
from langchain.agents import create_agent
from langchain.tools import ToolRuntime
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_memory_distill import MemoryDistillStore
from langgraph.store.base import InvalidNamespaceError, PutOp
from langgraph.store.memory import InMemoryStore
from lc_helpers import ScriptedChatModel

from memory_distill import ArtifactRegistry, InvalidMemoryError, MemoryDistill

ITEMS = [
    (("users", "alice", "episodes"), "e1", {"text": "searched the web and cited two sources", "reward": 0.9,
                                            "tool": "search", "meta": {"lang": "en", "n": 3}}),
    (("users", "alice", "episodes"), "e2", {"text": "guessed without checking", "reward": 0.1, "tool": "none",
                                            "meta": {"lang": "fr", "n": 1}}),
    (("users", "alice", "prefs"), "p1", {"text": "prefers short answers", "tool": "none"}),
    (("users", "bob", "episodes"), "e1", {"text": "used the calculator and verified", "reward": 0.8, "tool": "calc",
                                          "meta": {"lang": "en", "n": 2}}),
    (("docs",), "d1", {"title": "no text field here", "score": 7}),
]


def _fill(store) -> None:  # type: ignore[no-untyped-def]
    for ns, key, value in ITEMS:
        store.put(ns, key, value)


@pytest.fixture
def both(store):  # type: ignore[no-untyped-def]
    ours, ref = MemoryDistillStore(store), InMemoryStore()
    _fill(ours)
    _fill(ref)
    return ours, ref


def _keys(items) -> list[tuple]:  # type: ignore[no-untyped-def]
    return sorted((i.namespace, i.key, str(i.value)) for i in items)


def test_get_put_delete_like_langgraph(both) -> None:  # type: ignore[no-untyped-def]
    ours, ref = both
    for ns, key, _ in ITEMS:
        a, b = ours.get(ns, key), ref.get(ns, key)
        assert (a.namespace, a.key, a.value) == (b.namespace, b.key, b.value)
    assert ours.get(("users", "carol"), "e1") is None and ref.get(("users", "carol"), "e1") is None
    first = ours.get(("users", "alice", "episodes"), "e1")
    ours.put(("users", "alice", "episodes"), "e1", {"text": "searched again", "reward": 0.7})
    again = ours.get(("users", "alice", "episodes"), "e1")
    assert again.value == {"text": "searched again", "reward": 0.7}
    assert again.created_at == first.created_at and again.updated_at >= first.updated_at
    ours.delete(("users", "alice", "episodes"), "e1")
    assert ours.get(("users", "alice", "episodes"), "e1") is None


@pytest.mark.parametrize("prefix,flt", [
    ((), None), (("users",), None), (("users", "alice"), None), (("users", "alice", "episodes"), None),
    (("users",), {"tool": "none"}), (("users", "alice", "episodes"), {"reward": {"$gte": 0.5}}), (("users",), {"meta": {"lang": "en"}}),
    (("docs",), {"score": {"$gt": 5}}), (("users",), {"reward": {"$ne": 0.1}, "tool": {"$eq": "search"}}), (("nope",), None),
])
def test_search_without_query_matches_langgraph(both, prefix, flt) -> None:  # type: ignore[no-untyped-def]
    ours, ref = both
    assert _keys(ours.search(prefix, filter=flt, limit=50)) == _keys(ref.search(prefix, filter=flt, limit=50))


def test_an_empty_query_lists_and_bad_arguments_are_named(both) -> None:  # type: ignore[no-untyped-def]
    """query="" raised "query is empty" where LangGraph's stores list the items; a list as the filter, an int as
    index= or a non-str key in a value failed with a bare AttributeError or TypeError."""
    ours, ref = both
    assert _keys(ours.search(("users",), query="", limit=50)) == _keys(ref.search(("users",), query="", limit=50))
    with pytest.raises(ValueError, match="filter must be a dict of field conditions"):
        ours.search(("users",), filter=["tool"])
    for kw, why in (({"index": 5}, "index must be False, None or the field paths"),
                    ({"index": ["text", 1]}, "index must be False, None or the field paths")):
        with pytest.raises(InvalidMemoryError, match=why):
            ours.put(("users",), "x", {"text": "t"}, **kw)
    with pytest.raises(InvalidMemoryError, match="value's keys must be str"):
        ours.put(("users",), "x", {1: "t"})
    assert ours.get(("users",), "x") is None


def test_limit_zero_finds_nothing_like_langgraph(both) -> None:  # type: ignore[no-untyped-def]
    ours, ref = both  # a query with limit=0 used to raise "k must be >= 1"
    for kw in ({"limit": 0}, {"query": "searched the web", "limit": 0},
               {"query": "searched the web", "limit": 0, "filter": {"tool": "search"}}):
        assert ours.search(("users",), **kw) == ref.search(("users",), **kw) == []
    # a negative count sliced from the end (limit=-1 gave every item but the last, as InMemoryStore still does)
    for kw in ({"limit": -1}, {"offset": -1}, {"query": "searched the web", "limit": -2}):
        with pytest.raises(ValueError, match=f"{next(iter(k for k in kw if k != 'query'))} must be an int >= 0"):
            ours.search(("users",), **kw)
    with pytest.raises(ValueError, match="limit must be an int >= 0, got -1"):
        ours.list_namespaces(limit=-1)


def test_a_comparison_on_a_missing_field_does_not_match(both) -> None:  # type: ignore[no-untyped-def]
    ours, _ = both  # (LangGraph's InMemoryStore raises TypeError here)
    assert _keys(ours.search((), filter={"score": {"$gt": 5}})) == [(("docs",), "d1", str(ITEMS[4][2]))]
    assert {i.key for i in ours.search(("users",), filter={"reward": {"$lt": 0.5}})} == {"e2"}


def test_list_namespaces_matches_langgraph(both) -> None:  # type: ignore[no-untyped-def]
    ours, ref = both
    for kw in ({}, {"prefix": ("users",)}, {"suffix": ("episodes",)}, {"prefix": ("users", "*", "episodes")},
               {"max_depth": 2}, {"prefix": ("users",), "max_depth": 2, "limit": 1, "offset": 1}):
        assert ours.list_namespaces(**kw) == ref.list_namespaces(**kw), kw


def test_semantic_search_rewards_and_consolidation(tmp_path, store) -> None:  # type: ignore[no-untyped-def]
    ours = MemoryDistillStore(store)
    _fill(ours)
    hits = ours.search(("users",), query="calculator verified", limit=2)
    assert hits[0].key == "e1" and hits[0].namespace == ("users", "bob", "episodes") and 0 < hits[0].score <= 1
    filtered = ours.search(("users",), query="calculator verified", filter={"tool": "search"})
    assert [h.key for h in filtered] == ["e1"] and filtered[0].namespace[1] == "alice"
    assert ours.search(("users", "alice"), query="web", limit=1, offset=1)[0].key in ("e2", "p1")
    # items are memories: their reward, group and scalar fields are what consolidation trains on
    m = store.get(MemoryDistillStore.memory_id(("users", "alice", "episodes"), "e1"))
    assert m.reward == 0.9 and m.namespace == "lg:users.alice.episodes" and m.metadata["tool"] == "search"
    assert m.text == "searched the web and cited two sources"
    assert store.get(MemoryDistillStore.memory_id(("users", "alice", "prefs"), "p1")).reward is None
    with pytest.raises(InvalidMemoryError, match="must be a number"):
        ours.put(("users",), "bad", {"text": "x", "reward": "high"})
    with pytest.raises(InvalidMemoryError, match=r"^value\['reward'\]: reward 7.0 is outside the configured range"):
        ours.put(("users",), "bad", {"text": "x", "reward": 7})
    with pytest.raises(InvalidMemoryError, match="value must be a dict"):
        ours.put(("users",), "bad", "just a text")  # type: ignore[arg-type]
    # a str namespace: LangGraph's InMemoryStore files it under ("u", "s", "e", "r", "s"); we refuse it
    for call in (lambda: ours.put("users", "bad", {"text": "x"}), lambda: ours.get("users", "bad"),  # type: ignore[arg-type]
                 lambda: ours.search("users")):  # type: ignore[arg-type]
        with pytest.raises(InvalidNamespaceError, match=r"tuple of labels, e\.g\. \('users',\), got the str 'users'"):
            call()
    assert ours.list_namespaces(prefix=("u",)) == []
    with pytest.raises(InvalidMemoryError, match="reward must be finite"):
        ours.put(("users",), "bad", {"text": "x", "reward": float("nan")})
    ours.put(("users",), "nan-field", {"text": "x", "loss": float("nan")})  # kept in the value, not as metadata
    assert str(ours.get(("users",), "nan-field").value["loss"]) == "nan"
    assert ours.get(("users",), "bad") is None


def test_value_weighted_search_prefers_what_paid_off(tmp_path, store) -> None:  # type: ignore[no-untyped-def]
    mem = MemoryDistill(store, ArtifactRegistry(tmp_path / "models"), fast_job())
    lg = MemoryDistillStore(store, predictor=mem.try_predictor, value_weight=0.5)
    for i in range(150):
        good = i % 2 == 0
        lg.put(("agent", "runs"), f"r{i}", {
            "text": f"Task {i // 2}: the agent {'searched the web and cited sources' if good else 'guessed the answer'}",
            "reward": 0.9 if good else 0.1, "group": f"task-{i // 2}"})
    plain = lg.search(("agent",), query="Task 3", limit=5)  # no model yet: by similarity alone
    assert plain[0].value["reward"] == 0.1
    mem.consolidate()
    ranked = lg.search(("agent",), query="Task 3", limit=5)  # the student now weighs in
    assert ranked[0].value["reward"] == 0.9
    assert sum(h.value["reward"] == 0.9 for h in ranked) > sum(h.value["reward"] == 0.9 for h in plain)


def test_async_api_and_an_agent_tool_using_the_store(store) -> None:  # type: ignore[no-untyped-def]
    lg = MemoryDistillStore(store)

    @tool
    def remember(fact: str, runtime: ToolRuntime) -> str:
        """Save a fact about the user."""
        runtime.store.put(("users", "u1", "facts"), f"f{len(fact)}", {"text": fact})
        return "saved"

    model = ScriptedChatModel(responses=[
        AIMessage(content="", tool_calls=[{"name": "remember", "args": {"fact": "likes tea"}, "id": "c1",
                                           "type": "tool_call"}]),
        AIMessage(content="Noted.")])
    agent = create_agent(model, [remember], store=lg)
    agent.invoke({"messages": [HumanMessage("remember that I like tea")]})
    assert lg.get(("users", "u1", "facts"), "f9").value == {"text": "likes tea"}

    async def go():  # type: ignore[no-untyped-def]
        await lg.aput(("users", "u1", "facts"), "f2", {"text": "lives in Oslo"})
        got = await lg.asearch(("users", "u1"), query="the user lives in", limit=1)
        return got, await lg.alist_namespaces(prefix=("users",))

    got, spaces = asyncio.run(go())
    assert got[0].key == "f2" and spaces == [("users", "u1", "facts")]


def test_semantic_search_finds_items_crowded_out_by_other_memories(store) -> None:  # type: ignore[no-untyped-def]
    """The oversampled unfiltered query holds only other memories: the filtered search must still find the items."""
    store.add_many([{"text": f"the agent booked a flight to Lisbon, attempt {i}", "reward": 0.5} for i in range(80)])
    lg = MemoryDistillStore(store)
    lg.put(("trips",), "t1", {"text": "booked a flight to Lisbon for the conference"})
    lg.put(("trips",), "t2", {"text": "cancelled the hotel"})
    lg.put(("trips",), "t3", {"text": "booked a flight to Lisbon, hidden from search"}, index=False)
    hits = lg.search(("trips",), query="the agent booked a flight to Lisbon", limit=2)
    assert [h.key for h in hits] == ["t1", "t2"]


def test_semantic_search_is_exact_under_a_dominant_and_a_rare_prefix(store, embedder) -> None:  # type: ignore[no-untyped-def]
    """A few candidates are asked first where the prefix fills the store (learned per prefix), more where it is
    rare: either way the results are the prefix's true nearest items."""
    lg = MemoryDistillStore(store)
    texts = {("big",): [f"episode {i}: the agent {w} the report" for i, w in
                        enumerate(["read", "skimmed", "summarised", "cited", "ignored", "rewrote"] * 20)],
             ("rare",): [f"note {i}: the agent {w} the memo" for i, w in enumerate(["read", "filed", "lost"] * 4)]}
    for prefix, ts in texts.items():
        lg.batch([PutOp(prefix, f"k{i}", {"text": t}) for i, t in enumerate(ts)])
    asked: list[int] = []
    real = store._col.query
    store._col.query = lambda **kw: asked.append(kw["n_results"]) or real(**kw)
    first = {prefix: [] for prefix in texts}  # per search: the first number of candidates asked, or None
    for query in ["the agent read the report", "the agent lost the memo", "cited", "filed the report"] * 2:
        qv = embedder.embed([query])[0]
        for prefix, ts in texts.items():
            sims = embedder.embed(ts) @ qv
            want = [f"k{j}" for j in np.argsort(-sims, kind="stable")[:3]]
            asked.clear()
            assert [h.key for h in lg.search(prefix, query=query, limit=3)] == want
            first[prefix].append(asked[0] if asked else None)
    assert first[("big",)].count(7) >= 6  # the dominant prefix: k + 4, unless the last search needed more
    assert first[("rare",)][1:] == [None] * 7  # the rare prefix: exact over its rows, no unfiltered query


def test_unindexed_items_fill_a_short_query_result_like_langgraph(store, embedder) -> None:  # type: ignore[no-untyped-def]
    ours = MemoryDistillStore(store)
    ref = InMemoryStore(index={"dims": embedder.dim, "fields": ["text"],
                               "embed": lambda texts: embedder.embed(texts).tolist()})
    for st in (ours, ref):
        _fill(st)
        st.put(("users", "alice", "episodes"), "raw", {"text": "a raw log nobody should rank"}, index=False)
    prefix, q = ("users", "alice"), "searched the web and cited sources"
    for limit in (2, 3, 10):
        a, b = ours.search(prefix, query=q, limit=limit), ref.search(prefix, query=q, limit=limit)
        assert [(i.key, i.score is None) for i in a] == [(i.key, i.score is None) for i in b]
        assert all(x.score == pytest.approx(y.score, abs=1e-5) for x, y in zip(a, b, strict=True) if x.score is not None)
    assert [i.key for i in ours.search(prefix, query=q, limit=10)] == ["e1", "e2", "p1", "raw"]


def _expires(store, lg, ns, key):  # type: ignore[no-untyped-def]
    return store.get(lg.memory_id(ns, key)).metadata.get("lg_expires_at")


def test_ttl_expiry_refresh_omit_and_sweep(store) -> None:  # type: ignore[no-untyped-def]
    lg = MemoryDistillStore(store, ttl_config={"omit_expired": True, "default_ttl": 60})
    ns = ("sessions",)
    lg.put(ns, "short", {"text": "a note that should vanish", "reward": 0.2}, ttl=0.001)  # 60 ms
    lg.put(ns, "default", {"text": "a note kept for an hour"})  # default_ttl
    lg.put(ns, "forever", {"text": "a note that never expires"}, ttl=None)
    lg.put(("gone",), "only", {"text": "the only note here"}, ttl=0.001)
    assert _expires(store, lg, ns, "forever") is None
    first = _expires(store, lg, ns, "default")
    assert abs(first - (time.time() + 3600)) < 60
    time.sleep(0.2)
    # expired, not swept: omitted from get, search (with and without query) and namespace listing
    assert lg.get(ns, "short") is None
    assert {i.key for i in lg.search(ns)} == {"default", "forever"}
    assert {i.key for i in lg.search(ns, query="a note that should vanish")} == {"default", "forever"}
    assert lg.list_namespaces() == [ns]
    # reads (those searches too) restart the clock of items with a TTL, unless refresh_ttl=False
    assert _expires(store, lg, ns, "default") > first
    first = _expires(store, lg, ns, "default")
    lg.get(ns, "default", refresh_ttl=False)
    assert _expires(store, lg, ns, "default") == first
    lg.get(ns, "default")
    assert _expires(store, lg, ns, "default") > first
    # the sweep deletes the expired rows themselves
    n = store.count()
    assert lg.sweep_ttl() == 2 and store.count() == n - 2 and lg.sweep_ttl() == 0
    # an expiry left on an item without a TTL (a refresh racing a put) never deletes or hides it
    lg.put(ns, "raced", {"text": "put again without a TTL"}, ttl=None)
    store.update_metadata({lg.memory_id(ns, "raced"): {"lg_expires_at": time.time() - 1}})
    assert lg.sweep_ttl() == 0 and lg.get(ns, "raced") is not None
    # a put without a TTL clears the old one; a bad TTL writes nothing
    lg.put(ns, "default", {"text": "kept after all"}, ttl=None)
    assert _expires(store, lg, ns, "default") is None
    with pytest.raises(InvalidMemoryError, match="ttl must be a positive number"):
        lg.put(ns, "bad", {"text": "x"}, ttl=-5)
    assert lg.get(ns, "bad") is None


def test_expired_items_stay_visible_until_swept_by_default(store) -> None:  # type: ignore[no-untyped-def]
    lg = MemoryDistillStore(store)
    lg.put(("s",), "k", {"text": "short lived"}, ttl=0.001)
    time.sleep(0.2)
    assert lg.get(("s",), "k") is not None  # LangGraph's default: omit_expired is off
    lg.put(("s",), "k", {"text": "short lived"}, ttl=0.001)
    lg.start_ttl_sweeper(sweep_interval_minutes=0.002)  # every 120 ms
    try:
        deadline = time.time() + 10
        while lg.get(("s",), "k", refresh_ttl=False) is not None and time.time() < deadline:
            time.sleep(0.05)
        assert lg.get(("s",), "k") is None
        assert lg.start_ttl_sweeper() is lg._sweeper  # one sweeper at a time
    finally:
        assert lg.stop_ttl_sweeper(timeout=5)
    assert lg._sweeper is None and lg.stop_ttl_sweeper()


def test_a_query_finds_indexed_items_crowded_out_by_unindexed_ones(store, embedder) -> None:  # type: ignore[no-untyped-def]
    ours = MemoryDistillStore(store)
    ref = InMemoryStore(index={"dims": embedder.dim, "fields": ["text"],
                               "embed": lambda texts: embedder.embed(texts).tolist()})
    for st in (ours, ref):
        for i in range(70):
            st.put(("logs",), f"raw{i}", {"text": f"booked a flight to Lisbon, raw log {i}"}, index=False)
        st.put(("logs",), "a", {"text": "a summary: the trip was cancelled"})
        st.put(("logs",), "b", {"text": "a summary: the hotel was moved"})
    a, b = (st.search(("logs",), query="booked a flight to Lisbon", limit=10) for st in (ours, ref))
    assert [i.key for i in a[:2]] == [i.key for i in b[:2]] and {i.key for i in a[:2]} == {"a", "b"}
    assert [i.score is None for i in a] == [i.score is None for i in b] == [False] * 2 + [True] * 8


def test_filters_pushed_to_chroma_keep_langgraph_semantics(store) -> None:  # type: ignore[no-untyped-def]
    """String equalities pre-select rows in Chroma (3.1 s -> 64 ms over 20k items); fields the store itself uses,
    empty strings and non-string values are still matched in Python, so results equal InMemoryStore's."""
    ours, ref = MemoryDistillStore(store), InMemoryStore()
    items = [("a", {"text": "one", "namespace": "prod", "created_at": "2024", "kind": "x", "n": 1}),
             ("b", {"text": "two", "namespace": "dev", "kind": "", "n": True}),
             ("c", {"text": "three", "kind": "x", "tags": {"kind": "y"}}),
             ("d", {"text": "four", "kind": "y", "reward": 0.5})]
    for st in (ours, ref):
        for key, value in items:
            st.put(("s",), key, value)
    for key, n in (("e", 1.0), ("f", 0), ("g", False), ("h", 2), ("i", 2.5), ("j", -1)):
        for st in (ours, ref):
            st.put(("s",), key, {"text": f"number {n!r}", "n": n})
    for flt in ({"kind": "x"}, {"kind": {"$eq": "x"}}, {"namespace": "prod"}, {"created_at": "2024"},
                {"kind": ""}, {"n": 1}, {"tags": {"kind": "y"}}, {"kind": "x", "n": {"$eq": 1}}, {"kind": "zzz"},
                {"n": True}, {"n": 1.0}, {"n": 0}, {"n": False}, {"n": 2}, {"n": 2.0}, {"n": 2.5}, {"n": -1},
                {"n": 3}, {"n": 0, "kind": "y"}):
        assert _keys(ours.search(("s",), filter=flt)) == _keys(ref.search(("s",), filter=flt)), flt
        assert {i.key for i in ours.search(("s",), query="one", filter=flt)} == \
            {i.key for i in ref.search(("s",), filter=flt)}, flt
    read = []
    real = store.iter_memories
    store.iter_memories = lambda **kw: (read.append(kw["where"]), real(**kw))[1]
    assert [k[1] for k in _keys(ours.search(("s",), filter={"n": 2}))] == ["h"]
    assert read[-1]["$and"] == [{"n": 2}]  # pre-selected in Chroma


def test_expired_items_swept_away_make_models_trained_on_them_stale(tmp_path, store) -> None:  # type: ignore[no-untyped-def]
    mem = MemoryDistill(store, ArtifactRegistry(tmp_path / "models"), fast_job(warm_start=True))
    lg = MemoryDistillStore(store)
    # the oldest items, so the split trains on them (it holds out the most recent)
    lg.put(("notes",), "short", {"text": "note short: the agent checked", "reward": 0.9}, ttl=0.001)  # 60 ms
    lg.put(("notes",), "shorter", {"text": "note shorter: the agent guessed", "reward": 0.1}, ttl=0.001)
    for i in range(60):
        lg.put(("notes",), f"k{i}", {"text": f"note {i}: the agent {'checked' if i % 2 else 'guessed'}",
                                     "reward": 0.9 if i % 2 else 0.1})
    first = mem.consolidate()
    gone = {lg.memory_id(("notes",), k) for k in ("short", "shorter")}
    assert gone <= set(mem.registry.train_ids(first.version))
    time.sleep(0.1)
    assert lg.sweep_ttl() == 2
    second = mem.consolidate()
    assert second.extra == {"deleted_training_memories": 2, "deleted_stale_versions": [first.version]}
    assert second.promoted and not second.warm_started and mem.registry.list_versions() == [second.version]


def test_one_field_path_given_as_a_str_is_that_path_not_its_letters(store) -> None:  # type: ignore[no-untyped-def]
    value = {"summary": "booked a flight to Lisbon", "text": "a long raw log of the booking"}
    MemoryDistillStore(store, fields="summary").put(("trips",), "a", value)
    MemoryDistillStore(store).put(("trips",), "b", value, index="summary")  # type: ignore[arg-type]
    MemoryDistillStore(store).put(("trips",), "c", value)  # no path: value["text"]
    texts = [store.get(MemoryDistillStore.memory_id(("trips",), k)).text for k in "abc"]
    assert texts == ["booked a flight to Lisbon", "booked a flight to Lisbon", "a long raw log of the booking"]


def test_ttl_config_and_writer_bounds_are_checked_when_built(store) -> None:  # type: ignore[no-untyped-def]
    """A misspelt TTLConfig key was ignored (items never expired); default_ttl=0 failed every later put."""
    from langchain_memory_distill import EpisodeWriter

    with pytest.raises(ValueError, match="unknown ttl_config key 'default_tll': did you mean 'default_ttl'"):
        MemoryDistillStore(store, ttl_config={"default_tll": 60})  # type: ignore[typeddict-unknown-key]
    for key in ("default_ttl", "sweep_interval_minutes"):
        with pytest.raises(ValueError, match=f"ttl_config\\['{key}'\\] must be a positive number of minutes"):
            MemoryDistillStore(store, ttl_config={key: 0})  # type: ignore[misc]
    assert MemoryDistillStore(store, ttl_config={"default_ttl": 1.5, "omit_expired": True}).ttl_config is not None
    with pytest.raises(ValueError, match="max_unsaved must be an int >= 1"):  # "5" failed as "'<' not supported"
        EpisodeWriter(store, max_unsaved="5")  # type: ignore[arg-type]


def test_numpy_values_keep_their_numbers_and_keys_are_str(store) -> None:  # type: ignore[no-untyped-def]
    """A numpy reward was refused ("must be a number") and a numpy value came back as a str ("0.5"); a raw
    batch PutOp with an int key stored an item its listing names by a str key that get() cannot find."""
    lg = MemoryDistillStore(store)
    lg.put(("users",), "tea", {"text": "likes tea", "reward": np.float32(0.5), "cups": np.int64(3)},
           ttl=np.float64(5.0))
    item = lg.get(("users",), "tea")
    assert item is not None and item.value == {"text": "likes tea", "reward": 0.5, "cups": 3}
    assert type(item.value["cups"]) is int and store.get_many([lg.memory_id(("users",), "tea")])[0].reward == 0.5
    with pytest.raises(InvalidMemoryError, match="an item's key must be a str, got int 5"):
        lg.batch([PutOp(("users",), 5, {"text": "x"})])  # type: ignore[arg-type]
    assert [i.key for i in lg.search(("users",))] == ["tea"]
