"""MemoryDistillVectorStore beyond langchain-tests' standard suite (test_langchain_standard.py): rewards,
the student's value, namespaces, LangChain's indexing API, MMR and clear errors."""

from __future__ import annotations

import asyncio

import pytest
from conftest import fast_job
from langchain_core.documents import Document
from langchain_core.indexing import InMemoryRecordManager, index
from langchain_memory_distill import (
    MemoryDistillEmbeddings,
    MemoryDistillStore,
    MemoryDistillVectorStore,
)

from memory_distill import ArtifactRegistry, InvalidMemoryError, MemoryDistill


def test_documents_are_memories_with_rewards_and_namespaces(store) -> None:  # type: ignore[no-untyped-def]
    vs = MemoryDistillVectorStore(store, namespace="docs")
    ids = vs.add_documents([Document("searched the web and cited two sources", metadata={"reward": 0.9, "tool": "search"}),
                            Document("guessed without checking", metadata={"tool": "none"})])
    m = store.get(ids[0])
    assert m.reward == 0.9 and m.namespace == "docs" and m.metadata == {"tool": "search"}
    assert store.get(ids[1]).reward is None
    assert vs.get_by_ids([ids[1], "missing", ids[0]]) == [
        Document(id=ids[1], page_content="guessed without checking", metadata={"tool": "none"}),
        Document(id=ids[0], page_content="searched the web and cited two sources",
                 metadata={"tool": "search", "reward": 0.9})]
    # a late reward shows up on the document
    store.set_reward(ids[1], 0.2)
    assert vs.similarity_search("guessed", k=1)[0].metadata == {"tool": "none", "reward": 0.2}
    # filters, scores, and another namespace's memories stay out of reach
    store.add({"text": "searched the web and cited two sources", "reward": 0.5}, namespace="other")
    assert [d.id for d in vs.similarity_search("searched the web", k=5, filter={"tool": "search"})] == [ids[0]]
    assert [d.id for d in vs.similarity_search("cited", k=5, filter={"reward": {"$gte": 0.5}})] == [ids[0]]
    scored = vs.similarity_search_with_relevance_scores("searched the web and cited two sources", k=2)
    assert scored[0][0].id == ids[0] and scored[0][1] == pytest.approx(1.0, abs=1e-5) and 0 <= scored[1][1] < 1
    other = store.search("cited", k=5, namespace="other")[0].memory.id
    assert vs.get_by_ids([other]) == []
    vs.delete([other])
    assert store.get(other).namespace == "other"  # not this store's to delete
    with pytest.raises(ValueError, match="delete\\(\\) needs ids"):
        vs.delete()
    # an id another namespace holds is refused, not taken over
    with pytest.raises(InvalidMemoryError, match=f"id '{other}' belongs to a memory of namespace 'other'"):
        vs.add_texts(["mine now", "new"], ids=[other, "fresh"])
    assert store.get(other).namespace == "other" and vs.get_by_ids(["fresh"]) == []


def test_a_none_metadata_value_means_no_value_as_in_chroma(store) -> None:  # type: ignore[no-untyped-def]
    """LangChain loaders emit ``{"page": None}``: the key is left out (Chroma's meaning of None), not refused; a
    ``reward`` of None is a pending reward."""
    vs = MemoryDistillVectorStore(store)
    ids = vs.add_documents([Document("loaded page", metadata={"source": "a.pdf", "page": None, "reward": None}),
                            Document("rated page", metadata={"source": "b.pdf", "page": 3, "reward": 0.5})])
    first = store.get(ids[0])
    assert first.metadata == {"source": "a.pdf"} and first.reward is None
    assert vs.get_by_ids(ids)[0].metadata == {"source": "a.pdf"}
    assert [d.page_content for d in vs.similarity_search("page", k=2, filter={"page": 3})] == ["rated page"]
    mid = store.add({"text": "an episode", "metadata": {"tool": "search", "retries": None}})
    assert store.get(mid).metadata == {"tool": "search"}


def test_bad_metadata_is_refused_and_nothing_written(store) -> None:  # type: ignore[no-untyped-def]
    vs = MemoryDistillVectorStore(store)
    with pytest.raises(InvalidMemoryError, match=r"memories\[1\].*metadata\['pages'\].*flatten it or json.dumps"):
        vs.add_texts(["fine", "nested"], [{"source": "a.md"}, {"pages": [1, 2]}])
    with pytest.raises(InvalidMemoryError, match="outside the configured range"):
        vs.add_texts(["fine", "too good"], [{}, {"reward": 5}])
    with pytest.raises(InvalidMemoryError, match="metadatas has 1 entries for 2 texts"):
        vs.add_texts(["a", "b"], [{}])
    # one str where a list goes: not stored letter by letter, nor 'q' taken as the id of one text
    with pytest.raises(TypeError, match="add_texts takes a list of texts, got one str"):
        vs.add_texts("abc")
    with pytest.raises(TypeError, match="ids must be a list of memory ids, got one str 'q'"):
        vs.add_texts(["x"], ids="q")
    with pytest.raises(TypeError, match="metadatas takes one dict \\(or None\\) per text, got one dict"):
        vs.add_texts(["x"], {"source": "a.md"})  # (KeyError: 0)
    with pytest.raises(TypeError, match=r"ids\[0\] must be a memory id \(a non-empty str\), got int 5"):
        vs.add_texts(["x"], ids=[5])
    assert store.count() == 0
    (kept,) = vs.add_texts(["kept"])
    for call in (vs.delete, vs.get_by_ids):
        with pytest.raises(TypeError, match="ids must be a list of memory ids"):
            call(kept)
    assert [d.page_content for d in vs.get_by_ids([kept])] == ["kept"]
    # the MemoryStore's names for what a vector store calls otherwise were silently ignored by the searches
    for search in (vs.similarity_search, vs.max_marginal_relevance_search, vs.similarity_search_with_score):
        with pytest.raises(ValueError, match="filter=, not where="):
            search("kept", where={"source": "a.md"})
        with pytest.raises(ValueError, match="serves namespace 'default': build one per namespace"):
            search("kept", namespace="team-b")
    store.delete([kept])
    for adapter in (MemoryDistillVectorStore, MemoryDistillStore):
        with pytest.raises(ValueError, match=r"value_weight must be in \[0, 1\], got 1.5"):
            adapter(store, value_weight=1.5)
        # taken, then failed at the first search (a version's name, a blank reward key)
        with pytest.raises(TypeError, match=f"{adapter.__name__}'s predictor= takes a Predictor .* got str 'v1'"):
            adapter(store, predictor="v1")
        with pytest.raises(ValueError, match="reward_key must be the metadata key"):
            adapter(store, reward_key="")
    with pytest.raises(ValueError, match="namespace must be a namespace's name"):
        MemoryDistillVectorStore(store, namespace=" ")
    (kept,) = vs.add_texts(["kept again"])
    for search in (vs.similarity_search, vs.max_marginal_relevance_search):  # (the error named where=)
        with pytest.raises(ValueError, match="filter must be a dict of metadata conditions"):
            search("kept", filter=[{"source": "a.md"}])
    for search in (vs.similarity_search_by_vector, vs.max_marginal_relevance_search_by_vector):
        with pytest.raises(TypeError, match="take an embedding .* got a str: search text with similarity_search"):
            search("kept")  # ("could not convert string to float")
    store.delete([kept])
    with pytest.raises(ValueError, match="fields must be field paths to embed"):
        MemoryDistillStore(store, fields=["text", 3])


def test_langchain_indexing_api_keeps_the_store_in_sync(store) -> None:  # type: ignore[no-untyped-def]
    """index() with a record manager: unchanged documents are skipped, changed ones replaced, removed ones deleted."""
    vs = MemoryDistillVectorStore(store)
    rm = InMemoryRecordManager("memory_distill/docs")
    rm.create_schema()
    docs = [Document(f"runbook step {i}: restart the worker", metadata={"source": f"s{i}.md"}) for i in range(4)]
    assert index(docs, rm, vs, cleanup="full", source_id_key="source", key_encoder="sha256") == \
        {"num_added": 4, "num_updated": 0, "num_skipped": 0, "num_deleted": 0}
    assert index(docs, rm, vs, cleanup="full", source_id_key="source", key_encoder="sha256")["num_skipped"] == 4
    docs[1] = Document("runbook step 1: drain the queue first", metadata={"source": "s1.md"})
    res = index(docs[:3], rm, vs, cleanup="full", source_id_key="source", key_encoder="sha256")
    assert (res["num_added"], res["num_deleted"], res["num_skipped"]) == (1, 2, 2)
    assert store.count() == 3
    assert vs.similarity_search("drain the queue", k=1)[0].page_content == "runbook step 1: drain the queue first"


def test_value_weighted_search_and_mmr_retriever(tmp_path, store) -> None:  # type: ignore[no-untyped-def]
    mem = MemoryDistill(store, ArtifactRegistry(tmp_path / "models"), fast_job())
    vs = MemoryDistillVectorStore.from_memory(mem, value_weight=0.5)
    texts, metas = [], []
    for i in range(150):
        good = i % 2 == 0
        texts.append(f"Task {i // 2}: the agent {'searched the web and cited sources' if good else 'guessed the answer'}")
        metas.append({"reward": 0.9 if good else 0.1, "group": f"task-{i // 2}"})
    vs.add_texts(texts, metas)
    plain = vs.similarity_search("Task 3", k=5)  # no model yet: similarity alone
    assert plain[0].metadata["reward"] == 0.1
    mem.consolidate()
    ranked = vs.similarity_search_with_score("Task 3", k=5)  # the student now weighs in
    assert ranked[0][0].metadata["reward"] == 0.9
    assert sum(d.metadata["reward"] == 0.9 for d, _ in ranked) > sum(d.metadata["reward"] == 0.9 for d in plain)
    assert all(0 <= s <= 1 for _, s in ranked)
    # MMR through a standard retriever: a near-copy gives way
    ops = MemoryDistillVectorStore(store, namespace="ops")
    ops.add_texts(["the deploy failed: disk full", "the deploy failed: disk full!", "the deploy succeeded after a retry"])
    q = "why the deploy failed: the disk was full"
    assert [d.page_content for d in ops.similarity_search(q, k=2)] == ["the deploy failed: disk full",
                                                                      "the deploy failed: disk full!"]
    mmr = ops.as_retriever(search_type="mmr", search_kwargs={"k": 2, "fetch_k": 10, "lambda_mult": 0.5})
    assert [d.page_content for d in mmr.invoke(q)] == ["the deploy failed: disk full",
                                                      "the deploy succeeded after a retry"]


def test_from_texts_and_async(embedder) -> None:  # type: ignore[no-untyped-def]
    vs = MemoryDistillVectorStore.from_texts(["alpha beta", "gamma delta"], MemoryDistillEmbeddings.from_embedder(embedder),
                                             metadatas=[{"reward": 1.0}, {}], ids=["a", "g"])
    assert vs.store.embedder is embedder and vs.store.get("a").reward == 1.0
    ours = MemoryDistillVectorStore.from_texts(["alpha beta"], embedder)  # type: ignore[arg-type]
    assert ours.store.embedder is embedder  # one of ours as it is (it failed: "has no embed_documents()")

    async def go() -> list[Document]:
        await vs.aadd_texts(["epsilon zeta"], ids=["e"])
        await vs.adelete(["g"])
        return await vs.asimilarity_search("epsilon zeta", k=5)

    assert [d.id for d in asyncio.run(go())] == ["e", "a"]


def test_filters_on_document_keys_named_like_memory_fields(store) -> None:  # type: ignore[no-untyped-def]
    """A document's own ``namespace`` / ``created_at`` / ``reward`` keys are filterable; ``reward_key`` is the reward."""
    vs = MemoryDistillVectorStore(store, reward_key="score")
    vs.add_documents([
        Document(page_content="alpha doc", metadata={"namespace": "web", "created_at": "2024", "score": 0.9}),
        Document(page_content="beta doc", metadata={"namespace": "pdf", "reward": "gold", "score": 0.1}),
    ])

    def texts(flt):  # type: ignore[no-untyped-def]
        return sorted(d.page_content for d in vs.similarity_search("doc", k=5, filter=flt))

    assert texts({"namespace": "web"}) == ["alpha doc"]  # the document's key, not the memory namespace
    assert texts({"created_at": "2024"}) == ["alpha doc"]
    assert texts({"reward": "gold"}) == ["beta doc"]
    assert texts({"score": {"$gte": 0.5}}) == ["alpha doc"]  # reward_key: the memory's reward
    assert texts({"$or": [{"namespace": "pdf"}, {"score": {"$gte": 0.5}}]}) == ["alpha doc", "beta doc"]
    assert [m.namespace for m in store.get_many([d.id for d in vs.similarity_search("doc", k=2)])] == ["default"] * 2
    # MemoryStore itself: "metadata.<key>" reaches a user key named like a memory field
    assert len(store.search("doc", k=5, where={"metadata.namespace": "web"})) == 1
    assert store.search("doc", k=5, where={"namespace": "web"}) == []


def test_a_delete_through_the_vector_store_makes_models_trained_on_it_stale(tmp_path, store) -> None:  # type: ignore[no-untyped-def]
    mem = MemoryDistill(store, ArtifactRegistry(tmp_path / "models"), fast_job(warm_start=True))
    vs = MemoryDistillVectorStore(store)
    ids = vs.add_texts([f"episode {i}: the agent {'checked' if i % 2 else 'guessed'} the answer" for i in range(80)],
                       metadatas=[{"reward": 0.9 if i % 2 else 0.1} for i in range(80)])
    first = mem.consolidate()
    trained = [i for i in ids if i in set(mem.registry.train_ids(first.version))]
    vs.delete(trained[:3])
    second = mem.consolidate()
    assert second.extra == {"deleted_training_memories": 3, "deleted_stale_versions": [first.version]}
    assert not second.warm_started and second.promoted  # the stale model was replaced and deleted
    assert mem.registry.list_versions() == [second.version] and mem.registry.stale_versions() == {}
