"""The real openai client against a local OpenAI-compatible server on 127.0.0.1."""

import logging

import numpy as np
import pytest
from openai_server import FakeOpenAI

from memory_distill import (
    CachedEmbedder,
    EmbeddingError,
    HashingEmbedder,
    MemoryStore,
    OpenAIEmbedder,
    StoreConfig,
)

KEY = "sk-test-SECRET-1234567890"


@pytest.fixture
def server():
    s = FakeOpenAI(dim=64)
    yield s
    s.close()


def make(server, **kw):
    return OpenAIEmbedder("text-embedding-3-small", api_key=KEY, base_url=server.base_url, dim=64, **kw)


def test_embeds_and_matches_server_vectors(server):
    e = make(server)
    v = e.embed(["hello world", "the agent searched"])
    np.testing.assert_allclose(v, HashingEmbedder(dim=64).embed(["hello world", "the agent searched"]), atol=1e-6)
    assert server.requests[0]["model"] == "text-embedding-3-small" and server.requests[0]["dimensions"] == 64
    assert server.auth_headers[0] == f"Bearer {KEY}"


def test_batches_under_the_input_limit(server):
    e = make(server)
    texts = [f"text number {i}" for i in range(2500)]
    v = e.embed(texts)
    assert sorted(len(r["input"]) for r in server.requests) == [452, 2048]  # sent concurrently
    assert v.shape == (2500, 64)
    np.testing.assert_allclose(v[2049], HashingEmbedder(dim=64).embed([texts[2049]])[0], atol=1e-6)


def test_batches_under_the_token_budget(server):
    e = make(server, max_tokens_per_request=1000)
    texts = ["word " * 300] * 5  # ~500 estimated tokens each
    e.embed(texts)
    assert all(len(r["input"]) <= 2 for r in server.requests) and sum(len(r["input"]) for r in server.requests) == 5


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retries_transient_errors(server, status):
    server.fail_first, server.fail_status = 2, status
    v = make(server, max_retries=3).embed(["retry me"])
    assert v.shape == (1, 64) and len(server.requests) == 3


def test_gives_up_after_retries_without_leaking_the_key(server, caplog):
    server.fail_first, server.fail_status = 100, 500
    e = make(server, max_retries=1)
    with caplog.at_level(logging.DEBUG), pytest.raises(EmbeddingError, match="HTTP 500 after retries") as ei:
        e.embed(["x"])
    assert len(server.requests) == 2
    assert KEY not in str(ei.value) and KEY not in repr(e) and KEY not in caplog.text


def test_client_errors_are_not_retried(server):
    server.fail_first, server.fail_status = 100, 400
    with pytest.raises(EmbeddingError, match=r"HTTP 400 \(model="):  # not "after retries": none were made
        make(server, max_retries=3).embed(["x"])
    assert len(server.requests) == 1


@pytest.mark.parametrize("status,hint", [
    (401, "the server refused the API key: check OPENAI_API_KEY"),
    (403, "the API key may not use 'text-embedding-3-small'"),
    (404, "no model 'text-embedding-3-small' (or no embeddings endpoint) at http://127.0.0.1:"),
])
def test_a_refused_request_says_what_to_check(server, status, hint):
    server.fail_first, server.fail_status = 100, status
    with pytest.raises(EmbeddingError, match=f"HTTP {status} ") as info:
        make(server, max_retries=3).embed(["x"])
    assert hint in str(info.value) and "after retries" not in str(info.value) and KEY not in str(info.value)


def test_timeout(server):
    server.delay_s = 1.0
    with pytest.raises(EmbeddingError, match="timed out"):
        make(server, timeout_s=0.2, max_retries=0).embed(["slow"])


def test_an_unreachable_server_is_named_with_the_offline_way_out():
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    emb = OpenAIEmbedder(api_key="sk-test", base_url=f"http://127.0.0.1:{port}/v1", dim=8, max_retries=0)
    with pytest.raises(EmbeddingError, match=rf"could not reach the embeddings server at http://127.0.0.1:{port}/v1/ "
                                             r"after retries \(APIConnectionError\).*--embedder hashing"):
        emb.embed(["hello"])


@pytest.mark.parametrize(("mode", "match"), [("short", "1 items for 2 inputs"), ("wrong_dim", "ragged"),
                                              ("garbage", "malformed")])
def test_bad_responses(server, mode, match):
    server.mode = mode
    with pytest.raises(EmbeddingError, match=match):
        make(server, max_retries=0).embed(["a", "b"])


def test_out_of_order_response_is_reordered(server):
    server.mode = "shuffled"
    v = make(server).embed(["first text", "second text", "third"])
    np.testing.assert_allclose(v, HashingEmbedder(dim=64).embed(["first text", "second text", "third"]), atol=1e-6)


def test_a_url_without_its_scheme_or_an_empty_model_fails_at_once(monkeypatch):
    """base_url="localhost:8000" was taken, then every request failed after its retries with "Connection error";
    model="" failed at the first request."""
    for url in ("localhost:8000/v1", "127.0.0.1:8000", "http//localhost"):
        with pytest.raises(ValueError, match=f"base_url must be an http:// or https:// URL.*got '{url}'$"):
            OpenAIEmbedder(api_key="sk-test", base_url=url)
    monkeypatch.setenv("OPENAI_BASE_URL", "localhost:9")
    with pytest.raises(ValueError, match=r"got 'localhost:9' \(from OPENAI_BASE_URL\)"):
        OpenAIEmbedder(api_key="sk-test")
    for url in ("https://example.invalid/v1", "HTTP://127.0.0.1:9/v1"):
        assert OpenAIEmbedder(api_key="sk-test", base_url=url).model == "text-embedding-3-small"
    with pytest.raises(ValueError, match="model must be an embedding model's name"):
        OpenAIEmbedder(" ", api_key="sk-test", base_url="http://127.0.0.1:9/v1")


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(EmbeddingError, match="set OPENAI_API_KEY"):
        OpenAIEmbedder()


def test_store_over_openai_embedder(server, tmp_path):
    st = MemoryStore(make(server), StoreConfig(path=tmp_path / "c"))
    st.add_many([{"text": "the agent used the calculator", "reward": 0.8}, {"text": "banana", "reward": 0.1}])
    assert st.search("calculator agent", k=1)[0].memory.reward == 0.8
    assert st.stats()["embedder"] == "openai:text-embedding-3-small:64"


def test_api_error_during_add_leaves_store_untouched(server, tmp_path):
    st = MemoryStore(make(server, max_retries=0), StoreConfig(path=tmp_path / "c"))
    server.fail_first, server.fail_status = 100, 500
    with pytest.raises(EmbeddingError):
        st.add_many(["a", "b", "c"])
    assert st.count() == 0


def test_long_texts_are_embedded_in_pieces_that_fit(server):
    head = " ".join(["the agent searched the web for the population of Oslo"] * 3)  # ~160 chars
    tail = " ".join(["then it computed the tax rate with the calculator tool"] * 3)
    text = head + "\n\n" + tail + "\n\n" + "x" * 250  # 3 paragraphs, the last one a 250-char "word"
    chunk, trunc = make(server, max_input_chars=200), make(server, max_input_chars=200, long_texts="truncate")
    assert trunc.name.endswith(":truncate") and not chunk.name.endswith(":truncate")

    short = ["the agent gave up"]
    np.testing.assert_allclose(chunk.embed(short), trunc.embed(short), atol=1e-6)  # fits: one input, unchanged
    server.requests.clear()
    v = chunk.embed([text, "short one"])[0]
    inputs = [t for r in server.requests for t in r["input"]]
    # head, tail, the blob cut at 200 characters, "short one": every input fits, nothing is dropped
    assert inputs == [head, tail, "x" * 200, "x" * 50, "short one"]
    # the text's vector: the pieces' vectors averaged by length (what the server returns for each), re-normalised
    h = HashingEmbedder(dim=64)
    want = sum(len(p) * h.embed([p])[0] for p in inputs[:4])
    np.testing.assert_allclose(v, want / np.linalg.norm(want), atol=1e-5)
    server.requests.clear()
    w = trunc.embed([text])[0]
    assert [t for r in server.requests for t in r["input"]] == [text[:200]]
    ref = h.embed([tail])[0]
    assert v @ ref > w @ ref + 0.2  # chunked reads the tail; truncated never saw it


def test_cache_entries_from_before_whole_text_reading_are_not_served(server, tmp_path):
    chunk = make(server)

    class WrittenByAnOlderVersion:  # same name, vectors made the old way (first max_input_chars only)
        name, dim = chunk.name, 64

        def embed(self, texts):
            return np.full((len(texts), 64), 0.125, np.float32)

    path = tmp_path / "cache.sqlite"
    CachedEmbedder(WrittenByAnOlderVersion(), path).embed(["the agent searched"])
    cached = CachedEmbedder(chunk, path)
    v = cached.embed(["the agent searched"])
    assert cached.misses == 1 and cached.hits == 0
    np.testing.assert_allclose(v, HashingEmbedder(dim=64).embed(["the agent searched"]), atol=1e-6)
    assert CachedEmbedder(make(server, long_texts="truncate"), path).embed(["x y"]).shape == (1, 64)


def test_several_requests_are_in_flight_at_once_and_results_keep_their_order(server):
    server.delay_s = 0.2
    texts = [f"episode {i}: the agent searched and cited sources" for i in range(16)]
    v = make(server, batch_size=2, max_concurrency=4).embed(texts)
    assert len(server.requests) == 8 and server.max_in_flight == 4
    np.testing.assert_allclose(v, HashingEmbedder(dim=64).embed(texts), atol=1e-6)
    server.requests.clear()
    server.max_in_flight = 0
    make(server, batch_size=2, max_concurrency=1).embed(texts[:6])
    assert len(server.requests) == 3 and server.max_in_flight == 1
    with pytest.raises(ValueError, match="max_concurrency must be in 1..32"):
        make(server, max_concurrency=0)


def test_one_failed_request_among_concurrent_ones_fails_the_call_and_writes_nothing(server, tmp_path):
    st = MemoryStore(make(server, batch_size=2, max_concurrency=4, max_retries=0), StoreConfig(path=tmp_path / "c"))
    server.fail_first, server.fail_status = 1, 400  # one of the concurrent requests is refused
    with pytest.raises(EmbeddingError, match="HTTP 400"):
        st.add_many([f"episode {i}" for i in range(10)])
    assert st.count() == 0
