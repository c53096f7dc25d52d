"""Re-embedding a collection with another embedder (hashing -> OpenAI once a key is set)."""

from __future__ import annotations

import json

import chromadb
import numpy as np
import pytest
from openai_server import FakeOpenAI

from memory_distill import (
    EmbedderMismatchError,
    EmbeddingError,
    HashingEmbedder,
    MemoryStore,
    OpenAIEmbedder,
    StoreConfig,
)
from memory_distill.cli import main

KEY = "sk-test-reembed"


@pytest.fixture
def server():  # type: ignore[no-untyped-def]
    s = FakeOpenAI(dim=48)
    yield s
    s.close()


def _openai(server: FakeOpenAI) -> OpenAIEmbedder:
    return OpenAIEmbedder("text-embedding-3-small", api_key=KEY, base_url=server.base_url, dim=48, max_retries=0)


def _filled(tmp_path) -> tuple[StoreConfig, list[str]]:  # type: ignore[no-untyped-def]
    cfg = StoreConfig(path=tmp_path / "chroma")
    store = MemoryStore(HashingEmbedder(dim=64), cfg)
    ids = store.add_many([{"text": f"episode {i}: the agent {'searched the web' if i % 2 else 'guessed'}",
                           "reward": None if i == 7 else i / 40, "metadata": {"group": f"g{i % 5}", "tool": "search"},
                           "namespace": "team-a" if i < 30 else "team-b", "created_at": 1.7e9 + i} for i in range(40)])
    return cfg, ids


def _collections(cfg: StoreConfig) -> list[str]:
    client = chromadb.PersistentClient(path=str(cfg.path),
                                       settings=chromadb.Settings(anonymized_telemetry=False, allow_reset=False))
    return sorted(getattr(c, "name", c) for c in client.list_collections())


def test_reembed_keeps_every_memory_and_swaps_the_vectors(tmp_path, server) -> None:  # type: ignore[no-untyped-def]
    cfg, ids = _filled(tmp_path)
    before = MemoryStore(HashingEmbedder(dim=64), cfg)
    old = {i: before.get(i) for i in ids}
    del before
    with pytest.raises(EmbedderMismatchError, match="memory-distill reembed"):
        MemoryStore(_openai(server), cfg)

    seen: list[tuple[int, int]] = []
    store = MemoryStore.reembed(_openai(server), cfg, page_size=16, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(16, 40), (32, 40), (40, 40)]
    assert store.embedder.name.startswith("openai:text-embedding-3-small") and store.count() == 40
    for i in ids:  # everything but the vector is as it was
        m = store.get(i)
        assert (m.text, m.reward, m.metadata, m.namespace, m.created_at) == (
            old[i].text, old[i].reward, old[i].metadata, old[i].namespace, old[i].created_at)
    assert store.count(namespace="team-b") == 10 and store.count(rewarded_only=True) == 39
    # the stored vectors are the new embedder's: they match what the server returns for the same texts
    data = store.load_training_data()
    row = data.ids.index(ids[3])
    np.testing.assert_allclose(data.embeddings[row], HashingEmbedder(dim=48).embed([old[ids[3]].text])[0], atol=1e-6)
    hit = store.search("episode 5: the agent searched the web", k=1, namespace="team-a")[0]
    assert hit.memory.id == ids[5]
    assert _collections(cfg) == [cfg.collection]  # no side or backup collection left
    with pytest.raises(EmbedderMismatchError):
        MemoryStore(HashingEmbedder(dim=64), cfg)  # the old embedder is refused now
    # already on this embedder: nothing to do, no request sent
    n = len(server.requests)
    assert MemoryStore.reembed(_openai(server), cfg).count() == 40 and len(server.requests) == n


def test_a_failed_reembed_leaves_the_collection_as_it_was(tmp_path, server) -> None:  # type: ignore[no-untyped-def]
    cfg, ids = _filled(tmp_path)

    def break_the_api(done: int, total: int) -> None:
        server.mode = "garbage"  # the next page's request gets a malformed response

    with pytest.raises(EmbeddingError):
        MemoryStore.reembed(_openai(server), cfg, page_size=16, progress=break_the_api)
    assert _collections(cfg) == [cfg.collection]
    store = MemoryStore(HashingEmbedder(dim=64), cfg)  # still the hashing collection, every row in it
    assert store.count() == 40 and store.get(ids[0]).text.startswith("episode 0")
    assert store.search("episode 5: the agent searched the web", k=1, namespace="team-a")[0].memory.id == ids[5]

    server.mode = "ok"  # the API is back: a second run completes, and can keep a backup
    MemoryStore.reembed(_openai(server), cfg, keep_backup=True)
    names = _collections(cfg)
    assert len(names) == 2 and names[0] == cfg.collection and names[1].startswith(f"{cfg.collection}-pre-reembed-")
    MemoryStore.reembed(_openai(server), cfg, keep_backup=True, force=True)  # a second backup (suffixed if in the same second)
    assert len(_collections(cfg)) == 3
    with pytest.raises(Exception, match="no collection"):
        MemoryStore.reembed(_openai(server), StoreConfig(path=tmp_path / "chroma", collection="nothing-here"))


def test_cli_reembed_then_retrain(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEMORY_DISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEMORY_DISTILL_EMBEDDER__DIM", "128")
    assert main(["-q", "demo", "--n", "300", "--epochs", "2"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("MEMORY_DISTILL_EMBEDDER__DIM", "256")  # a different embedder from now on
    assert main(["-q", "stats"]) == 2 and "reembed" in capsys.readouterr().err
    assert main(["-q", "reembed"]) == 0
    assert "300 memories in memories now embedded with hashing-v1-256" in capsys.readouterr().out
    assert main(["-q", "reembed"]) == 0  # said "now embedded with" although it did nothing
    assert "are already embedded with hashing-v1-256: nothing to do (--force" in capsys.readouterr().out
    assert main(["-q", "predict", "the agent searched"]) == 2  # the published model was trained on the old vectors
    assert "use that embedder, or consolidate to train a model on this one" in capsys.readouterr().err
    assert main(["-q", "consolidate", "--epochs", "2"]) == 0  # replaces it: the old model cannot score these vectors
    assert "cannot serve them" in capsys.readouterr().out
    assert main(["-q", "predict", "--json", "the agent searched"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)[0]["mean"] <= 1


def test_force_recomputes_vectors_of_the_same_embedder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    emb = HashingEmbedder(dim=32)
    cfg = StoreConfig(path=tmp_path / "chroma")
    texts = [f"the agent tried plan {i}" for i in range(12)]
    stale = np.random.default_rng(0).normal(size=(12, 32)).astype(np.float32)
    stale /= np.linalg.norm(stale, axis=1, keepdims=True)
    MemoryStore(emb, cfg).add_many([{"id": f"m{i}", "text": t, "reward": 0.5} for i, t in enumerate(texts)],
                                   embeddings=stale)  # vectors from elsewhere (an older embedder version)
    unchanged = MemoryStore.reembed(emb, cfg).load_training_data()
    assert np.abs(unchanged.embeddings - stale[[int(i[1:]) for i in unchanged.ids]]).max() < 1e-6
    with pytest.raises(ValueError, match="page_size must be a whole number >= 1"):
        MemoryStore.reembed(emb, cfg, force=True, page_size=0)
    data = MemoryStore.reembed(emb, {"path": cfg.path}, force=True, page_size=5).load_training_data()  # a dict too
    order = [int(i[1:]) for i in data.ids]
    np.testing.assert_allclose(data.embeddings, emb.embed([texts[i] for i in order]), atol=1e-6)


def test_facade_reembed_after_an_api_key_appears(tmp_path, server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from conftest import fast_job

    from memory_distill import MemoryDistill
    from memory_distill.demo_data import synthetic_episodes

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    mem = MemoryDistill.open(tmp_path / "home")  # offline: the hashing embedder
    assert mem.embedder.name.startswith("hashing")
    mem.add_many(synthetic_episodes(200, seed=0))
    assert mem.consolidate(fast_job()).promoted
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # later, a key: "auto" now means OpenAI
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("MEMORY_DISTILL_EMBEDDER__DIM", "48")
    with pytest.raises(EmbedderMismatchError, match="MemoryDistill.reembed"):
        MemoryDistill.open(tmp_path / "home")
    mem = MemoryDistill.reembed(tmp_path / "home")
    assert mem.embedder.name.startswith("openai:") and mem.store.count() == 200
    # adapters holding mem.try_predictor fall back to stored rewards until the next consolidation
    assert mem.try_predictor() is None
    rep = mem.consolidate(fast_job())
    assert rep.promoted and "cannot serve them" in rep.reason
    assert 0 <= mem.predict(["the agent searched the web"])[0].mean <= 1
    assert mem.try_predictor() is not None and mem.try_predictor().version == rep.version


def test_a_write_during_the_copy_is_detected_and_the_original_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A late reward set on an already copied row changes no count; the run must still refuse, keeping it."""
    cfg, ids = _filled(tmp_path)
    writer = MemoryStore(HashingEmbedder(dim=64), cfg)

    class WritingEmbedder(HashingEmbedder):
        calls = 0

        def embed(self, texts):  # type: ignore[no-untyped-def]
            WritingEmbedder.calls += 1
            if WritingEmbedder.calls == 2:  # another agent records a reward for a row of the first page
                writer.set_reward(ids[0], 0.77)
            return super().embed(texts)

    with pytest.raises(Exception, match="changed while it was re-embedded"):
        MemoryStore.reembed(WritingEmbedder(dim=32), cfg, page_size=16)
    assert _collections(cfg) == [cfg.collection]
    again = MemoryStore(HashingEmbedder(dim=64), cfg)  # the original, with the late reward
    assert again.get(ids[0]).reward == 0.77 and again.count() == 40
