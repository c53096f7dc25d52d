import threading
import time

import numpy as np
import pytest

from memory_distill import (
    EmbedderMismatchError,
    HashingEmbedder,
    InvalidMemoryError,
    MemoryNotFoundError,
    MemoryStore,
    StoreConfig,
    StoreError,
)


def _fail_on_call(monkeypatch, st, method: str, n: int, message: str = "connection reset") -> None:  # type: ignore[no-untyped-def]
    """Make the store's collection ``method`` raise on its ``n``-th call (a server going away mid-batch)."""
    real, calls = getattr(st._col, method), {"n": 0}

    def flaky(**kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(message)
        return real(**kw)

    monkeypatch.setattr(st._col, method, flaky)


def test_add_get_search_roundtrip(store):
    ids = store.add_many([
        {"text": "searched wikipedia and cited the page", "reward": 0.9, "metadata": {"tool": "search"}},
        {"text": "gave up after three tries", "reward": 0.1, "metadata": {"tool": "none"}},
        "an episode whose reward has not arrived",
    ])
    assert len(ids) == 3
    m = store.get(ids[0])
    assert m.text.startswith("searched") and m.reward == 0.9 and m.metadata == {"tool": "search"}
    assert store.get(ids[2]).reward is None
    hits = store.search("cited the wikipedia page", k=2)
    assert hits[0].memory.id == ids[0]
    assert 0 < hits[0].similarity <= 1 and hits[0].similarity > hits[1].similarity
    qv = store.embedder.embed(["cited the wikipedia page"])
    assert store.search(qv, k=1)[0].memory.id == ids[0]  # a vector: one row, or flat
    with pytest.raises(StoreError, match=r"one query vector, got an array of shape \(2, 256\)"):
        store.search(np.vstack([qv, qv]), k=1)  # not "dim 512"
    with pytest.raises(StoreError, match="query vector contains NaN"):  # not the 2 "nearest" to NaN
        store.search(np.full(256, np.nan), k=2)
    assert store.search(qv.tolist(), k=np.int64(1))[0].memory.id == ids[0]  # a list, a numpy int (Chroma wants int)
    for wrong in (None, b"search", ["a", "b"], {"text": "a"}, 5, 2.5):  # None or 5 read as a "vector of dim 1"
        with pytest.raises(TypeError, match="query must be a str .* or one embedding vector of numbers"):
            store.search(wrong, k=2)
    for k in (1.5, True, "3"):  # 1.5 reached Chroma as "5.5 results"
        with pytest.raises(TypeError, match="k must be an int"):
            store.search("query", k=k)
    with pytest.raises(TypeError, match="fetch_k must be None .* or an int >= 1, got 0"):  # 0 fell back to 20
        store.search("query", k=2, diversity=0.5, fetch_k=0)


def test_collection_uses_cosine_space_and_records_embedder(store):
    assert store._col.configuration["hnsw"]["space"] == "cosine"
    assert store._col.metadata["md_embedder"] == store.embedder.name
    assert store._col.metadata["md_dim"] == 256


def test_namespace_isolation(store):
    store.add_many([{"text": "alpha secret plan", "reward": 1.0}], namespace="A")
    store.add_many([{"text": "alpha secret plan", "reward": 0.0}], namespace="B")
    a = store.search("alpha secret plan", k=10, namespace="A")
    b = store.search("alpha secret plan", k=10, namespace="B")
    assert [h.memory.namespace for h in a] == ["A"] and a[0].memory.reward == 1.0
    assert [h.memory.namespace for h in b] == ["B"]
    assert len(store.search("alpha secret plan", k=10, namespace=None)) == 2
    assert store.count(namespace="A") == 1


def test_metadata_filters_and_reward_filter(store):
    store.add_many([{"text": f"episode {i}", "reward": i / 10, "metadata": {"tool": "calc" if i % 2 else "web"}}
                    for i in range(10)])
    hits = store.search("episode", k=10, where={"tool": "calc"})
    assert len(hits) == 5 and all(h.memory.metadata["tool"] == "calc" for h in hits)
    hits = store.search("episode", k=10, where={"tool": "calc", "reward": {"$gte": 0.5}})
    assert sorted(h.memory.reward for h in hits) == [0.5, 0.7, 0.9]


def test_late_rewards(store):
    (mid,) = store.add_many(["pending episode"])
    assert store.count(rewarded_only=True) == 0
    m = store.set_reward(mid, 0.75)
    assert m.reward == 0.75 and m.rewarded_at is not None
    assert store.get(mid).reward == 0.75 and store.count(rewarded_only=True) == 1
    with pytest.raises(InvalidMemoryError, match=r"outside the configured range \[0.0, 1.0\]"):
        store.set_reward(mid, 3.0)
    with pytest.raises(MemoryNotFoundError, match="no memory with id 'nope'"):
        store.set_reward("nope", 0.5)
    assert store.get(mid).reward == 0.75
    assert store.set_reward(mid, 0.5, rewarded_at="2026-11-28T09:30:00Z").rewarded_at == 1795858200.0
    assert store.get(mid).rewarded_at == 1795858200.0


def test_reward_range_is_enforced_and_nothing_written(store):
    with pytest.raises(InvalidMemoryError, match=r"memories\[1\].*reward 7.0 is outside"):
        store.add_many([{"text": "ok", "reward": 0.5}, {"text": "bad", "reward": 7.0}])
    assert store.count() == 0
    # one memory (store.add, MemoryDistill.record, the CLI's add): the error names it, not "memories[0]"
    with pytest.raises(InvalidMemoryError, match=r"^memory: reward 7.0 is outside"):
        store.add({"text": "bad", "reward": 7.0})
    with pytest.raises(InvalidMemoryError, match=r"^memory is invalid: text"):
        store.add("")
    assert store.count() == 0


def test_duplicate_ids_are_refused_not_silently_dropped(store):
    store.add({"id": "x1", "text": "first", "reward": 0.2})
    with pytest.raises(StoreError, match="already exist.*upsert=True"):
        store.add_many([{"id": "x2", "text": "new"}, {"id": "x1", "text": "second"}])
    assert store.count() == 1 and store.get("x1").text == "first"
    with pytest.raises(InvalidMemoryError, match="duplicate ids in one batch"):
        store.add_many([{"id": "y", "text": "a"}, {"id": "y", "text": "b"}])
    store.add_many([{"id": "x1", "text": "second", "reward": 0.9}], upsert=True)
    assert store.get("x1").text == "second" and store.get("x1").reward == 0.9


def test_upsert_replaces_the_whole_row_not_a_merge(store):
    """Chroma merges metadata on upsert; a replaced memory must not keep the old row's reward or keys."""
    store.add({"id": "r", "text": "old", "reward": 0.9, "metadata": {"tool": "search", "stale": "yes"}})
    store.add_many([{"id": "r", "text": "new", "metadata": {"tool": "calc"}}], upsert=True)
    m = store.get("r")
    assert m.text == "new" and m.reward is None and m.rewarded_at is None
    assert m.metadata == {"tool": "calc"}
    assert store.count(rewarded_only=True) == 0
    assert [h.memory.id for h in store.search("new", k=5, where={"stale": "yes"})] == []
    assert [h.memory.id for h in store.search("new", k=5, where={"reward": {"$gte": 0.5}})] == []


def test_failed_chunked_write_is_rolled_back(tmp_path, embedder, monkeypatch):
    st = MemoryStore(embedder, StoreConfig(path=tmp_path / "c", write_batch_size=3))
    st.add_many([{"id": "keep", "text": "already here", "reward": 0.5}])
    _fail_on_call(monkeypatch, st, "add", 3)  # the third chunk fails (e.g. the server went away)
    with pytest.raises(StoreError, match="rolled back"):
        st.add_many([{"id": f"n{i}", "text": f"new {i}", "reward": 0.1} for i in range(8)])
    monkeypatch.undo()
    assert st.count() == 1 and st.get("keep").text == "already here"


def test_failed_chunked_upsert_restores_every_replaced_row(tmp_path, embedder, monkeypatch):
    st = MemoryStore(embedder, StoreConfig(path=tmp_path / "c", write_batch_size=2))
    st.add_many([{"id": f"m{i}", "text": f"old {i}", "reward": 0.5, "metadata": {"v": 1}} for i in range(5)])
    before, vecs = st.get_many([f"m{i}" for i in range(5)]), st.get_embeddings([f"m{i}" for i in range(5)])
    _fail_on_call(monkeypatch, st, "upsert", 3)
    with pytest.raises(StoreError, match="rolled back"):
        st.add_many([{"id": f"m{i}", "text": f"new {i}", "metadata": {"w": 2}} for i in range(6)], upsert=True)
    monkeypatch.undo()
    assert st.count() == 5 and st.get_many([f"m{i}" for i in range(5)]) == before
    assert np.array_equal(st.get_embeddings([f"m{i}" for i in range(5)]), vecs)


def test_failed_chunked_reward_write_is_rolled_back(tmp_path, embedder, monkeypatch):
    """set_rewards writes in chunks (Chroma refuses a batch past its maximum): a chunk that fails puts back the
    rewards the earlier chunks wrote, pending ones pending again."""
    st = MemoryStore(embedder, StoreConfig(path=tmp_path / "c", write_batch_size=2))
    ids = st.add_many([{"id": f"m{i}", "text": f"episode {i}", "reward": 0.5 if i == 0 else None} for i in range(5)])
    before = st.get_many(ids)
    _fail_on_call(monkeypatch, st, "update", 3)
    with pytest.raises(StoreError, match="set_rewards failed and was rolled back"):
        st.set_rewards({i: 0.9 for i in ids})
    monkeypatch.undo()
    assert st.get_many(ids) == before and st.count(rewarded_only=True) == 1


def test_id_lists_past_chromas_limits(tmp_path):
    """One Chroma call takes at most 5,461 rows to write and 32,766 ids to read (SQLite's variable limit): bigger
    id lists (forgetting a user's 40k memories by id, a late reward for every episode of a batch) are chunked."""
    st = MemoryStore(HashingEmbedder(dim=8), StoreConfig(path=tmp_path / "c"))
    n = 6_000
    X = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    ids = st.add_many([{"id": f"m{i}", "text": f"e{i}"} for i in range(n)], embeddings=X)
    assert len(st.set_rewards({i: 0.5 for i in ids})) == n and st.count(rewarded_only=True) == n
    assert len(st.update_metadata({i: {"batch": 1} for i in ids})) == n and st.get_embeddings(ids).shape == (n, 8)
    asked = [f"m{i}" for i in range(33_000)]  # (ids asked for, stored or not, are what SQLite counts)
    assert len(st.get_many(asked)) == n and st.existing_ids(asked) == set(ids)
    assert len(st.delete(asked[5:], dry_run=True)) == n - 5 and st.count() == n
    assert len(st.delete(asked[5:])) == n - 5 and st.count() == 5


def test_upsert_can_keep_the_stored_creation_time(store):
    store.add({"id": "a", "text": "first", "created_at": 1000.0})
    store.add_many([{"id": "a", "text": "edited", "created_at": 2000.0}], upsert=True, keep_created=True)
    assert store.get("a").created_at == 1000.0 and store.get("a").text == "edited"
    store.add_many([{"id": "a", "text": "replaced", "created_at": 3000.0}], upsert=True)
    assert store.get("a").created_at == 3000.0
    store.add_many([{"id": "new", "text": "fresh", "created_at": 4000.0}], upsert=True, keep_created=True)
    assert store.get("new").created_at == 4000.0


def test_large_batches_are_split_under_chromas_limit(tmp_path):
    emb = HashingEmbedder(dim=8)
    st = MemoryStore(emb, StoreConfig(path=tmp_path / "c"))
    n = 6000  # > 5461, Chroma's max batch
    vecs = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    ids = st.add_many([{"id": f"r{i}", "text": f"row {i}", "reward": (i % 10) / 10} for i in range(n)], embeddings=vecs)
    assert len(ids) == n and st.count() == n
    data = st.load_training_data(page_size=1000)
    assert data.embeddings.shape == (n, 8) and data.embeddings.dtype == np.float32
    order = np.argsort([int(i[1:]) for i in data.ids])
    np.testing.assert_allclose(data.embeddings[order], vecs, rtol=1e-6)
    pages = list(st.iter_pages(page_size=2500))
    assert [len(p.ids) for p in pages] == [2500, 2500, 1000]


def test_explicit_embeddings_are_checked(store):
    with pytest.raises(InvalidMemoryError, match=r"shape \(1, 3\), expected \(1, 256\)"):
        store.add_many(["x"], embeddings=np.zeros((1, 3)))
    with pytest.raises(InvalidMemoryError, match="NaN"):
        store.add_many(["x"], embeddings=np.full((1, 256), np.nan))
    assert store.count() == 0


def test_embedder_mismatch_is_refused(tmp_path):
    MemoryStore(HashingEmbedder(dim=64), StoreConfig(path=tmp_path / "c")).add("hello")
    with pytest.raises(EmbedderMismatchError, match=r"built with embedder 'hashing-v1-64' \(dim 64\).*'hashing-v1-128'"):
        MemoryStore(HashingEmbedder(dim=128), StoreConfig(path=tmp_path / "c"))
    # persists across reopen with the right embedder
    assert MemoryStore(HashingEmbedder(dim=64), StoreConfig(path=tmp_path / "c")).count() == 1


def test_delete_by_id_filter_and_namespace(store, registry):
    ids = store.add_many([{"text": f"e{i}", "reward": 0.5, "metadata": {"user": "u1" if i < 3 else "u2"}} for i in range(6)])
    store.add_many(["other ns"], namespace="tmp")
    assert store.delete([ids[0]]) == [ids[0]]
    assert sorted(store.delete(where={"user": "u1"})) == sorted(ids[1:3])
    assert len(store.delete(namespace="tmp")) == 1
    assert store.count() == 3
    with pytest.raises(StoreError, match="refusing to delete everything"):
        store.delete()
    # an empty filter (one built up from conditions that all turned out absent) selects every memory: it used to
    # get past that guard and delete them all, through forget too
    from memory_distill import forget as forget_

    for call in (lambda: store.delete(where={}), lambda: forget_(store, registry, where={}),
                 lambda: store.delete(where={}, dry_run=True)):
        with pytest.raises(StoreError, match=r"where=\{\} selects every memory: refusing to delete everything"):
            call()
    assert store.count() == 3 and len(store.delete(where={}, namespace="default", dry_run=True)) == 3
    from memory_distill import forget

    with pytest.raises(StoreError, match="^forget needs ids, where, namespace or older_than .*refusing to forget"):
        forget(store, registry)
    assert forget(store, registry, [])["n_deleted"] == 0 and store.count() == 3  # an empty selection forgets nothing
    # one bare id is not a list of ids (a str is a sequence: each character would be taken for an id)
    for call in (lambda: forget(store, registry, ids[3]), lambda: store.delete(ids[3]),
                 lambda: store.get_many(ids[3]), lambda: store.get_embeddings(ids[3]),
                 lambda: store.existing_ids(ids[3])):
        with pytest.raises(TypeError, match=f"ids must be a list of memory ids, got one str '{ids[3]}': pass \\['"):
            call()
    with pytest.raises(TypeError, match="get takes one memory id"):
        store.get([ids[3]])
    for one in ("a text", {"text": "a text"}):  # not 6 memories of one letter each, nor one of the key "text"
        with pytest.raises(TypeError, match=f"add_many takes a list of memories, got one {type(one).__name__}"):
            store.add_many(one)
    assert store.count() == 3 and store.get(ids[3]).text == "e3"
    with pytest.raises(TypeError, match=r"set_rewards takes a dict \{memory_id: reward\}, got list"):
        store.set_rewards([(ids[3], 0.1)])  # type: ignore[arg-type]
    with pytest.raises(InvalidMemoryError, match="rewarded_at .* is in milliseconds or finer"):
        store.set_reward(ids[3], 0.1, rewarded_at=time.time() * 1000)
    with pytest.raises(InvalidMemoryError, match="rewarded_at .* has no timezone"):
        store.set_reward(ids[3], 0.1, rewarded_at="2026-11-28T09:30:00")
    with pytest.raises(StoreError, match="namespace must be a str.*got tuple.*namespace=None"):
        store.search("e", namespace=("tmp", "default"))  # type: ignore[arg-type]
    assert store.get(ids[3]).reward == 0.5


def test_a_filter_chroma_refuses_is_a_clear_error_everywhere_and_deletes_nothing(store):
    store.add_many([{"text": f"e{i}", "reward": 0.5, "metadata": {"tool": "search"}} for i in range(4)])
    cases = {"got \\$regex": {"tool": {"$regex": "se.*"}}, "got None": {"tool": None},
             "int or a float for operator \\$gt": {"$or": [{"reward": {"$gt": "high"}}, {"tool": "x"}]},
             "exactly one operator": {"tool": {"$eq": "search", "$ne": "web"}}}
    for why, bad in cases.items():
        for call in (lambda w=bad: store.search("e", where=w), lambda w=bad: store.delete(where=w),
                     lambda w=bad: list(store.iter_memories(where=w))):
            with pytest.raises(StoreError, match=f"where=.* is not a filter Chroma accepts .*{why}.*one operator: \\$eq"):
                call()
    assert store.count() == 4
    # list operators Chroma takes, which never match a memory's single-valued metadata: an error, not silence
    for bad, fix in (({"tool": {"$contains": "sea"}}, "\\$eq or \\$in"),
                     ({"$and": [{"reward": 0.5}, {"tool": {"$not_contains": "x"}}]}, "\\$ne or \\$nin")):
        for call in (lambda w=bad: store.search("e", where=w), lambda w=bad: store.delete(where=w)):
            with pytest.raises(StoreError, match=f"where.*tool: \\$(not_)?contains tests a list's elements.*use {fix}"):
                call()
    assert store.count() == 4
    for bad_ns in ("", 3):
        with pytest.raises(InvalidMemoryError, match="namespace: namespace must be a non-empty string .a team, user"):
            store.add_many([{"text": "t", "namespace": bad_ns}])


def test_stats(store):
    store.add_many([{"text": "a", "reward": 0.2}, {"text": "b", "reward": 0.6}, "c"])
    store.add_many(["d"], namespace="other")
    st = store.stats()
    assert st["total"] == 4 and st["rewarded"] == 2 and st["pending"] == 2
    assert st["namespaces"] == {"default": 3, "other": 1}
    assert st["reward_mean"] == pytest.approx(0.4)


def test_ephemeral_stores_are_isolated(embedder):
    a, b = MemoryStore.ephemeral(embedder), MemoryStore.ephemeral(embedder)
    a.add("only in a")
    assert a.count() == 1 and b.count() == 0


def test_unreachable_server_gives_a_clear_error(embedder):
    from conftest import free_port

    port = free_port()
    with pytest.raises(StoreError, match=f"cannot reach the Chroma server at http://127.0.0.1:{port}.*chroma run"):
        MemoryStore(embedder, StoreConfig(mode="http", port=port))


def test_paged_read_stays_consistent_when_a_writer_deletes_between_the_two_halves(tmp_path, monkeypatch):
    """Pages are read as two halves (embeddings, metadata) in parallel; a concurrent delete between them
    must not pair one row's embedding with another row's reward."""
    emb = HashingEmbedder(dim=8)
    st = MemoryStore(emb, StoreConfig(path=tmp_path / "c"))
    vecs = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    st.add_many([{"id": f"r{i:02d}", "text": f"row {i}", "reward": i / 40} for i in range(40)], embeddings=vecs)
    real_get, state = st._col.get, {"deleted": False}
    metadata_read = threading.Event()

    def get_racing_a_writer(**kw):
        if kw.get("include") == ["metadatas"]:
            out = real_get(**kw)
            metadata_read.set()
            return out
        if kw.get("include") == ["embeddings"] and not state["deleted"]:
            metadata_read.wait(timeout=10)  # the metadata half of the first page is read ...
            state["deleted"] = True
            st._col.delete(ids=["r00"])  # ... then another process deletes a row before the embedding half
        return real_get(**kw)

    monkeypatch.setattr(st._col, "get", get_racing_a_writer)
    data = st.load_training_data(page_size=16)
    assert state["deleted"] and len(set(data.ids)) == len(data.ids)
    assert len(data.ids) == 39 and "r00" not in data.ids
    for rid, x, r in zip(data.ids, data.embeddings, data.rewards, strict=True):
        i = int(rid[1:])
        np.testing.assert_allclose(x, vecs[i], rtol=1e-6)
        assert r == pytest.approx(i / 40)


@pytest.mark.parametrize("n_a", [5, 150, 200])
def test_namespace_search_is_exact_whether_the_namespace_is_rare_or_dominant(tmp_path, n_a):
    """Search post-filters an oversampled unfiltered query by namespace (fast), and falls back to
    Chroma's filtered query when too few candidates qualify: both must give the true top-k of the namespace."""
    rng = np.random.default_rng(n_a)
    st = MemoryStore(HashingEmbedder(dim=16), StoreConfig(path=tmp_path / "c"))
    n = 300
    vecs = rng.normal(size=(n, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ns = ["a" if i < n_a else "b" for i in range(n)]
    rewards = [None if i % 3 == 0 else 0.5 for i in range(n)]
    st.add_many([{"id": f"r{i}", "text": f"row {i}", "namespace": ns[i], "reward": rewards[i]} for i in range(n)],
                embeddings=vecs)
    for q in rng.normal(size=(8, 16)).astype(np.float32):
        for name in ("a", "b"):  # alternating namespaces flips which candidate pool is tried first
            for rewarded_only in (False, True):
                ok = [i for i in range(n) if ns[i] == name and (not rewarded_only or rewards[i] is not None)]
                sims = vecs[ok] @ (q / np.linalg.norm(q))
                want = [f"r{ok[j]}" for j in np.argsort(-sims)[:3]]
                got = st.search(q, k=3, namespace=name, rewarded_only=rewarded_only)
                assert [h.memory.id for h in got] == want
                assert all(h.memory.namespace == name for h in got)


def test_search_asks_for_few_candidates_when_the_namespace_fills_the_store(tmp_path):
    """Reading candidates' metadata is most of a query: k + 4 are asked when that proved enough, 4k + 16 when
    the namespace is a small part of the store (learned from the previous search, per namespace)."""
    st = MemoryStore(HashingEmbedder(dim=16), StoreConfig(path=tmp_path / "c"))
    st.add_many([{"text": f"episode {i}", "namespace": "big" if i % 4 else "small"} for i in range(400)])
    asked = []
    real = st._col.query
    st._col.query = lambda **kw: asked.append(kw["n_results"]) or real(**kw)
    st.search("episode 7", k=5, namespace="big")
    st.search("episode 8", k=5, namespace="big")
    assert asked == [9, 9]
    asked.clear()
    st.search("episode 7", k=5, namespace="small")  # k + 4 fall short, then 4k + 16
    st.search("episode 8", k=5, namespace="small")  # straight to 4k + 16
    assert asked[:3] == [9, 36, 36]


def test_a_small_namespace_in_a_shared_store_goes_straight_to_the_exact_search(tmp_path):
    """A user's namespace of a few dozen rows among thousands: checking the namespace on unfiltered candidates
    finds too few, so the next POST_FILTER_RETRY searches skip that attempt (no unfiltered query at all) and
    search the namespace's rows exactly; then it is tried again, and kept once the namespace fills the store."""
    from memory_distill.store import POST_FILTER_RETRY

    rng = np.random.default_rng(5)
    st = MemoryStore(HashingEmbedder(dim=16), StoreConfig(path=tmp_path / "c"))
    n = 1000
    vecs = rng.normal(size=(n, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ns = [f"user-{i % 50}" for i in range(n)]
    st.add_many([{"id": f"r{i}", "text": f"row {i}", "namespace": ns[i]} for i in range(n)], embeddings=vecs)
    asked = []
    real = st._col.query
    st._col.query = lambda **kw: asked.append(kw["n_results"]) or real(**kw)
    queries = rng.normal(size=(POST_FILTER_RETRY + 2, 16)).astype(np.float32)
    for t, q in enumerate(queries):
        ok = [i for i in range(n) if ns[i] == "user-7"]
        want = [f"r{ok[j]}" for j in np.argsort(-(vecs[ok] @ (q / np.linalg.norm(q))))[:5]]
        before = len(asked)
        assert [h.memory.id for h in st.search(q, k=5, namespace="user-7")] == want
        tried = len(asked) > before
        assert tried == (t in (0, POST_FILTER_RETRY + 1)), t  # the first search, then once the window has passed
    # the namespace now fills the store: once tried again, checking candidates works and is kept
    st.delete([f"r{i}" for i in range(n) if ns[i] != "user-7"])
    for q in rng.normal(size=(POST_FILTER_RETRY + 3, 16)).astype(np.float32):
        st.search(q, k=5, namespace="user-7")
    asked.clear()
    for q in rng.normal(size=(3, 16)).astype(np.float32):
        assert len(st.search(q, k=5, namespace="user-7")) == 5
    assert len(asked) == 3


def test_a_graph_search_that_stops_short_is_searched_exactly(tmp_path):
    """hnswlib keeps deleted rows in the graph as marked nodes, and a search among them can end with few rows or
    none (nmslib/hnswlib#344): after a whole store was forgotten and new memories added, a retriever once found
    nothing in a namespace of 120 (CI). A short answer from a store holding more rows is searched exactly."""
    rng = np.random.default_rng(3)
    st = MemoryStore(HashingEmbedder(dim=16), StoreConfig(path=tmp_path / "c"))
    vecs = rng.normal(size=(60, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    st.add_many([{"id": f"r{i}", "text": f"row {i}", "namespace": "team-b"} for i in range(60)], embeddings=vecs)
    real = st._col.query

    def stops_short(**kw):  # what the graph search returned in CI: nothing
        return {f: [v[0][:0]] if f in ("ids", "documents", "metadatas", "distances", "embeddings") and v is not None
                else v for f, v in real(**kw).items()}

    st._col.query = stops_short
    for t, q in enumerate(rng.normal(size=(3, 16)).astype(np.float32)):
        want = [f"r{j}" for j in np.argsort(-(vecs @ (q / np.linalg.norm(q))))[:5]]
        assert [h.memory.id for h in st.search(q, k=5, namespace="team-b")] == want, t
        assert [h.memory.id for h in st.search(q, k=5, namespace=None)] == want, t


def test_search_diversity_skips_near_copies(store):
    copy = "the agent searched the web, cross-checked two sources and cited them"
    ids = store.add_many([{"text": f"{copy} ({i})", "reward": 0.9} for i in range(6)]
                         + [{"text": "the agent looked it up in the encyclopedia and cited the page", "reward": 0.8},
                            {"text": "the agent cited sources it found with the search tool", "reward": 0.7}])
    plain = store.search("searched the web and cited sources", k=3)
    assert all(h.memory.id in ids[:6] for h in plain)
    diverse = store.search("searched the web and cited sources", k=3, diversity=0.7)
    assert diverse[0].memory.id == plain[0].memory.id and sum(h.memory.id in ids[:6] for h in diverse) == 1
    assert len({h.memory.id for h in diverse}) == 3 and diverse[0].embedding is None
    assert store.search("searched the web", k=2, diversity=0.7, include_embeddings=True)[1].embedding is not None
    for bad in (float("nan"), "0.5"):  # ("0.5" failed inside a comparison)
        with pytest.raises(StoreError, match="diversity must be"):
            store.search("x", diversity=bad)
    with pytest.raises(TypeError, match="include_embeddings must be True or False"):
        store.search("x", include_embeddings="no")


def test_mmr_select_closed_form():
    from memory_distill.store import mmr_select

    X = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]])
    score = np.array([0.9, 0.89, 0.5])
    assert mmr_select(score, X, 2, 0.0) == [0, 1]  # plain top-k
    assert mmr_select(score, X, 2, 0.5) == [0, 2]  # 0.89 - 0.5*0.99 < 0.5 - 0.5*0
    assert mmr_select(score, X, 5, 0.5) == [0, 2, 1]  # k larger than the pool


def test_filtered_counts_and_deletes_page_through_ids(store, monkeypatch):
    import memory_distill.store as store_mod

    monkeypatch.setattr(store_mod, "ID_PAGE_SIZE", 7)
    store.config = store.config.model_copy(update={"read_page_size": 5})
    store.add_many([{"text": f"episode {i}", "reward": None if i % 4 == 0 else 0.5, "namespace": "a" if i % 3 else "b"}
                    for i in range(40)])
    assert store.count(namespace="a") == 26 and store.count(namespace="b") == 14
    assert store.count(namespace="a", rewarded_only=True) == sum(1 for i in range(40) if i % 3 and i % 4)
    assert len(store.delete(namespace="b")) == 14 and store.count(namespace="b") == 0 and store.count() == 26


def test_update_metadata_merges_removes_and_validates_first(store):
    a, b = store.add_many([{"text": "first", "reward": 0.4, "metadata": {"tool": "search", "n": 1}},
                           {"text": "second", "metadata": {"tool": "calc"}}])
    vec = store.get_embeddings([a])
    out = store.update_metadata({a: {"n": 2, "tool": None, "checked": True}, b: {"tier": "gold"}})
    assert [m.metadata for m in out] == [{"n": 2, "checked": True}, {"tool": "calc", "tier": "gold"}]
    assert store.get(a).metadata == {"n": 2, "checked": True} and store.get(a).reward == 0.4
    assert np.array_equal(store.get_embeddings([a]), vec)  # nothing re-embedded
    assert [h.memory.id for h in store.search("first", k=5, where={"checked": True})] == [a]
    # a bad value, a reserved key or a missing id: nothing is written
    for bad, err in (({a: {"n": [1]}, b: {"tier": "x"}}, InvalidMemoryError),
                     ({b: {"tier": "x"}, a: {"_md_reward": 1.0}}, InvalidMemoryError),
                     ({b: {"tier": "x"}, "nope": {"n": 1}}, MemoryNotFoundError)):
        with pytest.raises(err):
            store.update_metadata(bad)
        assert store.get(b).metadata == {"tool": "calc", "tier": "gold"} and store.get(a).reward == 0.4
    # the memory's own fields: a metadata key "reward" would leave the reward as it was, silently
    for bad, why in (({b: {"tier": "x"}, a: {"reward": 0.9}}, "'reward' is the memory's own field.*set_rewards"),
                     ({a: {"namespace": "team-b"}}, "'namespace' is the memory's own field"),
                     ({a: "gold"}, "expected a dict of metadata keys to set, got str 'gold'")):
        with pytest.raises(InvalidMemoryError, match=why):
            store.update_metadata(bad)  # type: ignore[dict-item]
        assert store.get(b).metadata == {"tool": "calc", "tier": "gold"} and store.get(a).reward == 0.4
    with pytest.raises(TypeError, match="update_metadata takes a dict"):
        store.update_metadata([a])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="update_metadata's ids\\[0\\] must be a memory id"):  # (Chroma's "Expected ID to be a str")
        store.update_metadata({1: {"n": 1}})  # type: ignore[dict-item]


def test_two_threads_adding_one_id_one_is_refused_not_silently_dropped(tmp_path, embedder):
    """Both passed the "does the id exist?" check before either wrote, and Chroma dropped the second row without
    an error (30 of 30 races before the fix): one caller believed a memory stored that was not."""
    a = MemoryStore(embedder, StoreConfig(path=tmp_path / "chroma"))
    b = MemoryStore(embedder, StoreConfig(path=tmp_path / "chroma"))  # another handle on it, as a second agent has
    for trial in range(10):
        barrier, outcome = threading.Barrier(2), {}

        def add(st, who, trial=trial, barrier=barrier, outcome=outcome):
            barrier.wait()
            try:
                st.add_many([{"id": f"x{trial}", "text": f"written by {who}"}])
                outcome[who] = "stored"
            except StoreError as e:
                outcome[who] = str(e)

        threads = [threading.Thread(target=add, args=(st, who)) for st, who in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcome.values(), key=len)[0] == "stored", outcome
        winner = next(w for w, v in outcome.items() if v == "stored")
        loser = "b" if winner == "a" else "a"
        assert "already exist" in outcome[loser] and a.get(f"x{trial}").text == f"written by {winner}"


def test_a_reward_does_not_put_back_metadata_changed_since_it_read_the_row(tmp_path, embedder, monkeypatch):
    """set_rewards read the row, then wrote the whole of it back with the reward: a metadata update that landed in
    between (another process grading the same episode) was undone."""
    store = MemoryStore(embedder, StoreConfig(path=tmp_path / "chroma"))
    other = MemoryStore(embedder, StoreConfig(path=tmp_path / "chroma"))
    mid = store.add({"text": "the agent searched", "metadata": {"tool": "search"}})
    read = store._stored

    def read_then_another_writer(ids):
        rows = read(ids)
        other.update_metadata({mid: {"tool": "calc", "grade": "ok"}})
        return rows

    monkeypatch.setattr(store, "_stored", read_then_another_writer)
    assert store.set_reward(mid, 0.7).reward == 0.7
    got = other.get(mid)
    assert got.metadata == {"tool": "calc", "grade": "ok"} and got.reward == 0.7


def test_an_empty_namespace_is_refused_where_it_selects(store):
    """No memory can be in namespace '' (Memory refuses it), so search/count/delete there answered nothing,
    silently; the retriever recalled nothing."""
    from langchain_memory_distill import ValueAwareRetriever

    store.add({"text": "kept", "reward": 0.5})
    for call in (lambda: store.search("kept", namespace=""), lambda: store.count(namespace=" "),
                 lambda: store.delete(namespace=""),
                 lambda: ValueAwareRetriever(store=store).invoke("kept", namespace="")):
        with pytest.raises(StoreError, match="namespace '.*' is empty: give a namespace's name, or None"):
            call()
    with pytest.raises(ValueError, match="namespace '' is empty"):
        ValueAwareRetriever(store=store, namespace="")
    assert store.count() == 1 and store.count(namespace="default") == 1


def test_numpy_numbers_are_taken_as_rewards_and_metadata(store):
    """A score from a numpy model (np.float32) was refused by set_reward though add took it; a pandas column's
    np.int64 or np.bool_ in metadata was refused, and update_metadata sent it to Chroma unconverted."""
    a = store.add({"text": "from a dataframe", "reward": np.float32(0.25),
                   "metadata": {"steps": np.int64(3), "ok": np.bool_(True), "score": np.float32(0.5),
                                "tool": np.str_("search")}})
    m = store.get(a)
    assert m.reward == 0.25 and m.metadata == {"steps": 3, "ok": True, "score": 0.5, "tool": "search"}
    assert {k: type(v) for k, v in m.metadata.items()} == {"steps": int, "ok": bool, "score": float, "tool": str}
    assert [h.memory.id for h in store.search("dataframe", k=3, where={"steps": 3, "ok": True})] == [a]
    assert store.set_reward(a, np.float32(0.75)).reward == 0.75 and store.get(a).reward == 0.75
    store.update_metadata({a: {"steps": np.int64(4)}})
    assert store.get(a).metadata["steps"] == 4 and type(store.get(a).metadata["steps"]) is int
    with pytest.raises(TypeError, match=r"memory_id must be one memory's id \(a str\), got list: for several, "
                                        r"set_rewards"):
        store.set_reward([a], 0.5)  # type: ignore[arg-type]  # ("unhashable type: 'list'")
    with pytest.raises(TypeError, match="set_rewards' ids\\[0\\] must be a memory id"):
        store.set_rewards({1: 0.5})  # type: ignore[dict-item]
    with pytest.raises(InvalidMemoryError, match="must be a finite number"):
        store.set_reward(a, np.float32("nan"))
    assert store.get(a).reward == 0.75


def test_failed_chunked_metadata_update_is_rolled_back(tmp_path, embedder, monkeypatch):
    st = MemoryStore(embedder, StoreConfig(path=tmp_path / "u", write_batch_size=2))
    ids = st.add_many([{"text": f"m{i}", "metadata": {"n": i}} for i in range(5)])
    _fail_on_call(monkeypatch, st, "update", 2, "server went away")
    with pytest.raises(StoreError, match="rolled back"):
        st.update_metadata({i: {"n": None, "seen": True} for i in ids})
    assert [m.metadata for m in st.get_many(ids)] == [{"n": i} for i in range(5)]


def test_a_narrow_filter_finds_every_match(tmp_path, embedder):
    """Chroma's filtered graph search can come back short when few rows pass the filter (2 of 120: seen in about
    one store in three); such small sets are searched exactly."""
    steps = ("clear the cache and retry the request", "restart the pod, then check the health endpoint")
    rows = [{"text": f"Service {s} high latency runbook: {step}.", "metadata": {"service": s}}
            for s in range(60) for step in steps]
    for trial in range(6):
        st = MemoryStore(embedder, StoreConfig(path=tmp_path / f"t{trial}"))
        st.add_many(rows)
        short = [s for s in range(60) if len(st.search("high latency runbook", k=2, where={"service": s})) < 2]
        assert short == [], f"store {trial}: services {short} came back short"
    # the exact path ranks like a brute-force search and returns vectors when asked
    hits = st.search("restart the pod", k=2, where={"service": 7}, include_embeddings=True)
    assert hits[0].memory.text.endswith("health endpoint.") and hits[0].similarity > hits[1].similarity
    assert np.allclose(hits[0].embedding, st.get_embeddings([hits[0].memory.id])[0])


def test_a_wide_filter_uses_the_index_and_still_returns_k(tmp_path, embedder):
    st = MemoryStore(embedder, StoreConfig(path=tmp_path / "wide"))
    st.add_many([{"text": f"episode {i} about {'search' if i % 2 else 'math'}", "metadata": {"odd": i % 2 == 1}}
                 for i in range(700)])
    hits = st.search("episode about search", k=10, where={"odd": True})
    assert len(hits) == 10 and all(h.memory.metadata["odd"] for h in hits)
    assert all(a.similarity >= b.similarity - 1e-6 for a, b in zip(hits, hits[1:], strict=False))


def test_upsert_within_namespace_refuses_to_move_a_memory(store):
    store.add({"id": "x", "text": "team a's", "reward": 0.3}, namespace="a")
    with pytest.raises(InvalidMemoryError, match="id 'x' belongs to a memory of namespace 'a', not 'b'"):
        store.add_many([{"id": "y", "text": "new"}, {"id": "x", "text": "team b's"}], namespace="b", upsert=True,
                       within_namespace=True)
    assert store.get("x").namespace == "a" and store.get("x").text == "team a's" and store.count() == 1
    store.add_many([{"id": "x", "text": "team a's, edited"}], namespace="a", upsert=True, within_namespace=True)
    assert store.get("x").text == "team a's, edited"
    store.add_many([{"id": "x", "text": "moved"}], namespace="b", upsert=True)  # a plain upsert replaces it
    assert store.get("x").namespace == "b"


@pytest.mark.parametrize("where,keep", [
    ({"tool": "search"}, lambda m, r: m["tool"] == "search"),
    ({"steps": {"$gte": 3}}, lambda m, r: m["steps"] >= 3),
    ({"$or": [{"tool": "calc"}, {"reward": {"$gte": 0.5}}]}, lambda m, r: m["tool"] == "calc" or (r is not None and r >= 0.5)),
    ({"steps": {"$in": [0, 5]}, "tool": {"$ne": "calc"}}, lambda m, r: m["steps"] in (0, 5) and m["tool"] != "calc"),
])
def test_search_with_a_where_filter_is_exact_and_skips_chromas_filter_when_it_can(tmp_path, where, keep):
    """A metadata filter is checked in Python on unfiltered candidates (Chroma's filter reads every row) and
    falls back to Chroma's filtered query when too few pass: the true top-k of the matching rows either way."""
    rng = np.random.default_rng(7)
    st = MemoryStore(HashingEmbedder(dim=16), StoreConfig(path=tmp_path / "c"))
    n = 300
    vecs = rng.normal(size=(n, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    metas = [{"tool": ["search", "calc", "browse"][i % 3], "steps": int(rng.integers(0, 6))} for i in range(n)]
    rewards = [None if i % 4 == 0 else float(rng.random()) for i in range(n)]
    st.add_many([{"id": f"r{i}", "text": f"row {i}", "metadata": metas[i], "reward": rewards[i]} for i in range(n)],
                embeddings=vecs)
    filtered = []
    real = st._col.query
    st._col.query = lambda **kw: filtered.append(kw.get("where") is not None) or real(**kw)
    for q in rng.normal(size=(6, 16)).astype(np.float32):
        ok = [i for i in range(n) if keep(metas[i], rewards[i])]
        sims = vecs[ok] @ (q / np.linalg.norm(q))
        want = [f"r{ok[j]}" for j in np.argsort(-sims)[:5]]
        assert [h.memory.id for h in st.search(q, k=5, where=where)] == want
    assert filtered and not any(filtered)  # every query ran unfiltered, checked in Python


def test_a_filter_known_to_be_wide_skips_the_size_probe_until_it_comes_back_short(tmp_path, embedder):
    """Finding out whether <= 256 rows pass costs a pass over every row: done once per filter, not per search."""
    st = MemoryStore(embedder, StoreConfig(path=tmp_path / "probe"))
    st.add_many([{"id": f"e{i}", "text": f"episode {i}", "metadata": {"tool": "x" if i < 400 else "y"}}
                 for i in range(4000)])
    probes = []
    real = st._col.get
    st._col.get = lambda **kw: probes.append(kw.get("limit")) or real(**kw)
    for q in ("episode 1", "episode 2", "episode 3"):  # 10% pass: too few among the top candidates
        assert len(st.search(q, k=5, where={"tool": "x"})) == 5
    assert probes.count(257) == 1
    st.delete([f"e{i}" for i in range(3, 400)])  # the filter is narrow now: 3 rows
    for q in ("episode 1", "episode 2", "episode 3"):
        assert sorted(h.memory.id for h in st.search(q, k=5, where={"tool": "x"})) == ["e0", "e1", "e2"]
    # the first search's filtered graph query came back short: probed again, then searched exactly (Chroma's
    # filtered graph search can miss one of 3 rows left among 3,600 deleted ones, so it is not the answer)
    assert probes.count(257) == 1 + 3


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="the open marker uses fcntl (POSIX)")
def test_a_second_process_on_an_embedded_directory_is_warned(tmp_path, caplog):
    """An embedded directory is for one process: a process that opens one another process holds is told (each
    searches its own in-memory copy of the index) and pointed at the server; one process opening it many times,
    or a process after the holder closed it, is not."""
    import gc
    import subprocess
    import sys

    path = tmp_path / "chroma"
    script = ("import logging, sys\nfrom memory_distill import HashingEmbedder, MemoryStore, StoreConfig\n"
              "st = MemoryStore(HashingEmbedder(dim=64), StoreConfig(), path=sys.argv[1])\n"
              "st.add_many([{'text': 'from the second process', 'reward': 0.5}])\n")

    def second() -> str:
        return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                              check=True).stderr

    first = MemoryStore(HashingEmbedder(dim=64), StoreConfig(), path=path)
    again = MemoryStore(HashingEmbedder(dim=64), StoreConfig(), path=path)  # the same process: fine
    first.add_many([{"text": "from the first process", "reward": 0.5}])
    assert first.search("from the first process", k=1)  # its copy of the index is loaded
    assert "also open in another process" not in caplog.text
    err = second()
    assert f"the embedded Chroma directory {path.resolve()} is also open in another process" in err
    assert f"chroma run --path {path.resolve()}" in err and 'StoreConfig(mode="http")' in err
    # what the warning says: the first process's searches miss the row the second one added, counts see it
    assert first.count() == 2 and [h.memory.text for h in first.search("from the second process", k=2)] == [
        "from the first process"]
    del first, again
    gc.collect()
    assert "also open in another process" not in second()  # released with the last store on it


def test_a_relative_path_means_the_directory_under_the_current_working_directory(tmp_path, monkeypatch):
    """Chroma keeps one client per path string in a process: a relative path opened again after a chdir must not
    reach the first directory's store (the default path, ./.memory_distill, is relative)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = MemoryStore(HashingEmbedder(dim=64), StoreConfig(path="mem/chroma"))
    first.add_many([{"text": "stored from a", "reward": 0.5}])
    monkeypatch.chdir(tmp_path / "b")
    second = MemoryStore(HashingEmbedder(dim=64), StoreConfig(path="mem/chroma"))
    assert second.count() == 0 and (tmp_path / "b" / "mem" / "chroma").is_dir()
    second.add_many([{"text": "stored from b", "reward": 0.5}])
    assert first.count() == 1 and second.count() == 1


def test_stores_opened_from_threads_at_once(tmp_path, caplog):
    """Several threads opening one directory at once: every store opens (Chroma's shared client cache breaks when
    two threads make a client for a path at once), and they are one process: one marker, no warning."""
    import threading

    from memory_distill import store as store_mod

    path = tmp_path / "chroma"
    stores: list[MemoryStore] = []
    start = threading.Barrier(6)

    def open_it() -> None:
        start.wait()
        stores.append(MemoryStore(HashingEmbedder(dim=64), StoreConfig(), path=path))

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stores) == 6 and "also open in another process" not in caplog.text
    assert store_mod._open_dirs[str(path.resolve())][1] == 6



def test_a_filter_memo_countdown_tolerates_another_thread_ending_it(tmp_path):
    """An agent server searches one store from many threads and the per-filter memos take no lock: when another
    thread ends a countdown between this thread's read and its update, the search still goes on (it was a
    KeyError). The interleaving is made deterministic: the memo loses the key right after it is read."""
    st = MemoryStore(HashingEmbedder(dim=16), StoreConfig(path=tmp_path / "c"))

    class Racing(dict):
        def get(self, key, default=None):
            value = super().get(key, default)
            self.pop(key, None)  # another thread's search ends the countdown meanwhile
            return value

    st._skip_post = Racing({"k": 1})
    assert st._post_filter_due("k") is False and "k" not in st._skip_post
    st._skip_post = Racing({"k": 5})
    assert st._post_filter_due("k") is False and st._skip_post["k"] == 4


def test_store_constructor_arguments_name_the_fix(tmp_path):
    """MemoryStore("./mem") failed as "'str' object has no attribute 'name'", and a dict config as "'dict' object has no
    attribute 'mode'"; a LangChain Embeddings is wrapped here as MemoryDistill.open wraps it."""
    from langchain_core.embeddings import DeterministicFakeEmbedding

    with pytest.raises(TypeError, match=r"takes the embedder first, got the path .*pass path= \(or StoreConfig"):
        MemoryStore(str(tmp_path / "mem"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dict is not an embedder: pass an object with name/dim/embed()"):
        MemoryStore({"path": str(tmp_path / "mem")})  # type: ignore[arg-type]
    st = MemoryStore(DeterministicFakeEmbedding(size=32), {"path": str(tmp_path / "mem")})  # type: ignore[arg-type]
    assert st.config.path == tmp_path / "mem" and st.embedder.dim == 32
    assert st.search(st.get(st.add("a fact worth keeping")).text, k=1)[0].memory.text == "a fact worth keeping"
    emb = HashingEmbedder(dim=32)
    with pytest.raises(TypeError, match="path must be the store's directory .* got int 3"):  # (pathlib's error)
        MemoryStore(emb, path=3)  # type: ignore[arg-type]
    for opener in (lambda c: MemoryStore(emb, client=c), lambda c: MemoryStore.reembed(emb, client=c)):
        with pytest.raises(TypeError, match="client must be a chromadb client .* got str"):  # (an AttributeError)
            opener("http://localhost:8000")
