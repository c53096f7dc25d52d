"""MemoryStore: episodic memories in Chroma. The only module that imports chromadb.

Facts this module is built around (measured on chromadb 1.x):

* the default space is L2, so the collection is created with cosine space explicitly;
* one write takes at most ``client.get_max_batch_size()`` (5461) rows, so writes are chunked;
* ``add`` with an existing id is silently ignored, so ids are checked first;
* texts without vectors make Chroma download a model, so vectors are always passed;
* a ``where`` takes one top-level key, so clauses are combined under ``$and``;
* making clients from several threads at once breaks Chroma's shared client cache, so opening a store is serialised;
* a PersistentClient is shared per path *string* within a process, so the path is made absolute first (a relative
  one opened again after a chdir would reach the first directory);
* a PersistentClient is not safe across processes: each keeps its own in-memory copy of the vector index, so
  its searches miss what another process adds once that copy is loaded; a store warns when another process has
  its directory open, and ``mode="http"`` (``chroma run``) is the way to share one.

Reserved metadata keys (``_md_*``) hold the namespace, reward, timestamps and the raw text counts
behind the models' text features (``_md_stats``), so consolidation pages through embeddings and
metadata only and never re-reads the texts.

Writes are atomic per call: everything is validated and embedded before the first row is
written, and a failure part-way through a chunked write removes (or restores) what was written.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import math
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

try:
    import fcntl  # the open marker's lock (POSIX)
except ImportError:  # pragma: no cover - Windows: no marker, no warning
    fcntl = None  # type: ignore[assignment]

from .config import StoreConfig, as_config
from .embeddings import Embedder, as_embedder
from .errors import (
    EmbedderMismatchError,
    InvalidMemoryError,
    MemoryNotFoundError,
    StoreError,
    nearest_name,
)
from .features import N_TEXT_FEATURES, decode_stats, encode_stats
from .types import (
    RESERVED_PREFIX,
    Memory,
    SearchHit,
    as_unix_time,
    check_flag,
    check_metadata,
    check_unix_time,
    is_int,
    is_real,
)

__all__ = ["MemoryStore", "TrainingData", "TrainingPage", "coerce_memory", "mmr_select"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

NS = RESERVED_PREFIX + "ns"
REWARD = RESERVED_PREFIX + "reward"
HAS_REWARD = RESERVED_PREFIX + "has_reward"
CREATED = RESERVED_PREFIX + "created"
REWARDED_AT = RESERVED_PREFIX + "rewarded_at"
STATS = RESERVED_PREFIX + "stats"
"""Raw text counts for the models' text features (:mod:`memory_distill.features`)."""
FORMAT_VERSION = 1
ID_PAGE_SIZE = 100_000
"""Rows per page when only ids are read (counts, deletes by filter): about 7 MB of ids."""
POST_FILTER_RETRY = 32
"""After a search whose filter too few of the nearest rows pass, this many searches with that filter go straight
to the filtered path instead of first checking the filter on an unfiltered result."""
EXACT_MAX_ROWS = 256
"""A filtered search over at most this many rows is exact (their vectors compared in numpy): Chroma's filtered
HNSW query can return fewer than k rows when few rows pass the filter (2 of 120 here, seen failing 1 run in
3), and for such small sets the exact path is also faster (50k rows: 25-30 ms vs 60-110 ms)."""


@dataclass
class TrainingPage:
    """One page of rows streamed out of the store."""

    ids: list[str]
    embeddings: np.ndarray  # float32 [n, dim]
    rewards: np.ndarray  # float32 [n], NaN where pending
    created_at: np.ndarray  # float64 [n]
    groups: list[str]
    features: np.ndarray  # float32 [n, N_TEXT_FEATURES], NaN rows where unknown
    metadata: dict[str, list[Any]] = field(default_factory=dict)  # {key: value or None per row}, keys asked for


@dataclass
class TrainingData:
    """All rows of a namespace (or the store) in one preallocated matrix.

    ``features`` (optional) are the model features of :mod:`memory_distill.features`, ``NaN``
    where a row has none; ``None`` trains on the embeddings alone. ``metadata`` holds the raw values
    of the metadata keys that were asked for (``{key: value or None per row}``).
    """

    ids: list[str]
    embeddings: np.ndarray
    rewards: np.ndarray
    created_at: np.ndarray
    groups: list[str]
    features: np.ndarray | None = None
    metadata: dict[str, list[Any]] = field(default_factory=dict)

    def subset(self, idx: np.ndarray) -> TrainingData:
        """These rows (a copy)."""
        return TrainingData([self.ids[i] for i in idx], self.embeddings[idx], self.rewards[idx], self.created_at[idx],
                            [self.groups[i] for i in idx], None if self.features is None else self.features[idx],
                            {k: [v[i] for i in idx] for k, v in self.metadata.items()})

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def rewarded(self) -> np.ndarray:
        return ~np.isnan(self.rewards)


def id_list(ids: Any, what: str = "ids", *, allow_none: bool = False) -> list[str]:
    """``ids`` as a list of non-empty str; one bare id is an error (a str is a sequence: each character would be
    taken for an id), and so is ``None`` or a non-str id (which Chroma refused as "Expected ID to be a str").
    ``allow_none``: ``None`` entries pass (a LangChain ``Document`` without an id gets a new one)."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{what} must be a list of memory ids, got one {type(ids).__name__} {ids!r}: pass [{ids!r}]")
    if isinstance(ids, Mapping) or not isinstance(ids, Iterable):
        raise TypeError(f"{what} must be a list of memory ids, got {type(ids).__name__} {ids!r:.80}")
    out = list(ids)
    for i, x in enumerate(out):
        if (not isinstance(x, str) or not x) and not (allow_none and x is None):
            raise TypeError(f"{what}[{i}] must be a memory id (a non-empty str), got {type(x).__name__} {x!r:.80}")
    return out


def coerce_memory(item: Any, *, namespace: str | None = None, index: int | None = None) -> Memory:
    """Turn a Memory, a dict or a bare string into a validated Memory (errors name the item)."""
    where = f"memories[{index}]" if index is not None else "memory"
    try:
        if isinstance(item, Memory):
            mem = item
        elif isinstance(item, str):
            mem = Memory(text=item, namespace=namespace or "default")
        elif isinstance(item, Mapping):
            data = dict(item)
            if namespace is not None and "namespace" not in data:
                data["namespace"] = namespace
            mem = Memory.model_validate(data)
        else:
            raise InvalidMemoryError(
                f"{where}: expected a Memory, dict or str, got {type(item).__name__}"
            )
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "memory"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                msg += " (every memory needs a text: the episode's content)" if loc == "text" else ""
            elif err["type"] in ("float_parsing", "float_type") and loc in ("created_at", "rewarded_at"):
                msg += " (a Unix time in seconds, e.g. time.time())"
            elif err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
                near = nearest_name(loc, Memory.model_fields)
                msg += (f": did you mean {near!r}?" if near else
                        f": put your own fields in metadata, e.g. metadata={{{loc!r}: ...}}")
            parts.append(f"{loc}: {msg}")
        raise InvalidMemoryError(f"{where} is invalid: " + "; ".join(parts)) from None
    return mem


class _ServerCollection:
    """A Chroma HTTP collection whose connection failures raise :class:`StoreError` naming the server.

    The HTTP client raises transport errors of its own (``httpx.ConnectError``, ...) when the server
    goes away after the store was opened; callers catch one library error instead.
    """

    def __init__(self, col: Any, where: str) -> None:
        self._col, self._where = col, where

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._col, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kw: Any) -> Any:
            try:
                return attr(*args, **kw)
            except Exception as e:
                if not _is_transport_error(e):
                    raise
                raise StoreError(f"the Chroma server at {self._where} is unreachable ({type(e).__name__}: {e}): "
                                 "check that it is running (`chroma run --host H --port P --path DIR`)") from e

        return call


_OPEN_LOCK = threading.Lock()
"""Opening a store (client, collection): two threads making a client for one path at once break Chroma's shared
client cache ("'RustBindingsAPI' object has no attribute 'bindings'", "Could not connect to tenant")."""

_WRITE_LOCKS: dict[str, threading.RLock] = {}  # Chroma collection id -> lock, shared by every store on it in a process
_WRITE_LOCKS_LOCK = threading.Lock()


def _write_lock(col: Any) -> threading.RLock:
    """The lock that makes a check-then-write (add_many's "does the id exist?" then ``add``) one step for every
    store open on that collection in this process: two threads adding one id both passed the check, and Chroma
    dropped the second row silently. Other processes are not covered (Chroma has no conditional insert)."""
    key = str(col.id)
    with _WRITE_LOCKS_LOCK:
        return _WRITE_LOCKS.setdefault(key, threading.RLock())


OPEN_MARKER = ".memory_distill_open"
"""File in an embedded Chroma directory that every process with the directory open holds a shared lock on."""
_open_dirs: dict[str, list[int]] = {}  # resolved directory -> [marker fd, stores open on it in this process]
_open_dirs_lock = threading.RLock()  # stores opened from several threads; re-entrant: a finalizer may run inside


def _hold_directory(path: Path, owner: object) -> None:
    """Hold a shared lock on ``path``'s open marker while ``owner`` lives, and warn when another process holds
    one too: an embedded Chroma directory is for one process (each keeps its own in-memory vector index, so
    its searches miss what other processes add once that is loaded). Best effort: a no-op without ``fcntl``
    (Windows) or where the filesystem has no ``flock``."""
    if fcntl is None:  # pragma: no cover - Windows
        return
    key = str(path.resolve())
    with _open_dirs_lock:
        _hold(path, key)
    weakref.finalize(owner, _release_directory, key)


def _hold(path: Path, key: str) -> None:  # with _open_dirs_lock held
    assert fcntl is not None
    held = _open_dirs.get(key)
    if held is None:
        try:
            fd = os.open(path / OPEN_MARKER, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only directory: nothing to learn
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: no other process has the directory open
            shared = False
            fcntl.flock(fd, fcntl.LOCK_SH)  # downgrade: the next process's probe sees this one
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # no flock on this filesystem (some network mounts)
                os.close(fd)
                return
            shared = True  # another process holds it
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits out another process's brief probe at most
            except OSError:  # pragma: no cover
                os.close(fd)
                return
        held = _open_dirs[key] = [fd, 0]
        if shared:
            log.warning(
                "the embedded Chroma directory %s is also open in another process. Each process searches its own "
                "in-memory copy of the vector index, so neither finds what the other adds once its copy is loaded "
                "(counts, reads and consolidation see everything). Fine for a one-off command (consolidate, stats, "
                "export); for agents and workers that run side by side, serve it with `chroma run --path %s` and "
                "use StoreConfig(mode=\"http\") (CLI --store http).", key, key)
    held[1] += 1


def _release_directory(key: str) -> None:
    with _open_dirs_lock:
        held = _open_dirs.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del _open_dirs[key]
            os.close(held[0])  # closing the descriptor drops the lock


def _server_url(cfg: StoreConfig) -> str:
    """The server's address as messages show it (``host`` may itself be a URL, as Chroma's client allows)."""
    if cfg.host.startswith(("http://", "https://")):
        return "https://" + cfg.host.split("://", 1)[1] if cfg.ssl else cfg.host
    return f"{'https' if cfg.ssl else 'http'}://{cfg.host}:{cfg.port}"


def _check_server(cfg: StoreConfig) -> None:
    """Reach the server's tenant/database once and turn each way of failing into an error that names the fix.

    Chroma's client reports a refused credential or a missing database as "Could not connect to tenant
    default_tenant. Are you sure it exists?"; this says which it is.
    """
    import httpx

    where = _server_url(cfg)
    url = where.rstrip("/") + "/api/v2"  # as chromadb's client builds it (a URL host keeps its own port)
    try:
        with httpx.Client(headers=cfg.headers, timeout=30.0) as c:
            r = c.get(f"{url}/tenants/{cfg.tenant}/databases/{cfg.database}")
    except httpx.HTTPError as e:
        raise StoreError(
            f"cannot reach the Chroma server at {where} ({type(e).__name__}): start one with "
            f"`chroma run --host {cfg.host} --port {cfg.port} --path DIR`, check StoreConfig.host/port/ssl, "
            "or use mode='persistent'"
        ) from None
    if r.status_code in (401, 403):
        raise StoreError(
            f"the Chroma server at {where} refused the request ({r.status_code} {r.reason_phrase}): give the "
            "credentials it expects in StoreConfig.headers, e.g. "
            "MEMORY_DISTILL_STORE__HEADERS='{\"Authorization\": \"Bearer <token>\"}'"
        )
    if r.status_code == 404:
        raise StoreError(
            f"database {cfg.database!r} of tenant {cfg.tenant!r} does not exist on the Chroma server at {where}: "
            "create it (chromadb.AdminClient(...).create_database) or leave StoreConfig.tenant/database at "
            "their defaults"
        )
    if r.status_code >= 400:
        raise StoreError(f"the Chroma server at {where} answered {r.status_code} {r.reason_phrase}: {r.text[:300]}")


def _is_transport_error(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    try:
        import httpx
    except ImportError:  # pragma: no cover - chromadb's HTTP client depends on it
        return False
    return isinstance(e, httpx.TransportError)


def mmr_select(score: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> list[int]:
    """Greedy maximal marginal relevance: the indices of ``k`` picks, in pick order.

    Each next pick maximises ``score[i] - diversity * max(cos(vectors[i], vectors[p]) for picks p)``;
    ``diversity=0`` is the plain top-k by ``score``.
    """
    X = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    score = np.asarray(score, np.float64)
    picked: list[int] = []
    closest = np.full(len(score), -np.inf)  # each candidate's highest similarity to a pick
    for _ in range(min(k, len(score))):
        gain = score - diversity * closest if picked else score.copy()
        gain[picked] = -np.inf
        i = int(np.argmax(gain))
        picked.append(i)
        closest = np.maximum(closest, X @ X[i])
    return picked


_FIELDS = {"reward": REWARD, "namespace": NS, "created_at": CREATED}
MEMORY_FIELDS = tuple(_FIELDS)
"""Names a ``where`` reads as the memory's own fields, not metadata keys (unless written ``"metadata.<key>"``)."""
USER_KEY = "metadata."
"""In a ``where``, ``"metadata.<key>"`` is the user metadata key even where it is named like a memory field
(``{"metadata.namespace": "web"}``: a document's own ``namespace`` key, not the memory's namespace)."""


def _where_clauses(where: Mapping[str, Any], path: str) -> list[dict[str, Any]]:
    """A user's ``where`` as Chroma clauses, one per field, at every level of ``$and`` / ``$or``: the memory
    fields ``reward``, ``namespace`` and ``created_at`` become the reserved keys they are stored under."""
    if not isinstance(where, Mapping):
        raise StoreError(f"{path}: expected a dict of field conditions, got {type(where).__name__}")
    out: list[dict[str, Any]] = []
    for key, value in where.items():
        if key in ("$and", "$or"):
            if not isinstance(value, list | tuple) or not value:
                raise StoreError(f"{path}.{key}: expected a non-empty list of conditions, got {value!r}")
            subs = []
            for i, sub in enumerate(value):
                parts = _where_clauses(sub, f"{path}.{key}[{i}]")
                subs.append(parts[0] if len(parts) == 1 else {"$and": parts})
            # Chroma wants two or more conditions under $and / $or
            out.append(subs[0] if len(subs) == 1 else {key: subs})
            continue
        if key.startswith("$"):
            raise StoreError(f"{path}: unsupported operator {key!r} here; use $and/$or or field names")
        if isinstance(value, Mapping) and (op := next((o for o in ("$contains", "$not_contains") if o in value), None)):
            # Chroma takes them for list metadata; a memory's metadata hold single values, so the answer is silently
            # empty (or everything)
            raise StoreError(f"{path}.{key}: {op} tests a list's elements, and memory metadata hold single values "
                             f"(no substring match): use {'$eq or $in' if op == '$contains' else '$ne or $nin'}")
        out.append({key.removeprefix(USER_KEY) if key.startswith(USER_KEY) else _FIELDS.get(key, key): value})
    return out


WHERE_HELP = ("each field takes a value (str, int, float, bool) or one operator: $eq, $ne, $gt/$gte/$lt/$lte "
              "(numbers), $in/$nin (a non-empty list of one type); combine conditions with $and / $or")


@functools.cache
def _chroma_validate_where() -> Callable[[Any], None] | None:
    try:
        from chromadb.api.types import validate_where
    except ImportError:  # pragma: no cover - another chromadb layout: Chroma still checks at query time
        return None
    return validate_where  # type: ignore[no-any-return]


def _check_where(translated: dict[str, Any], where: Mapping[str, Any]) -> None:
    """Chroma's own check of a filter, up front, as an error that names ``where`` and the fix (Chroma's says
    "in get." and leaves out what is allowed)."""
    validate_where = _chroma_validate_where()
    if validate_where is None:  # pragma: no cover
        return
    try:
        validate_where(translated)
    except ValueError as e:
        why = str(e).removesuffix(".").removesuffix(" in get").removesuffix(" in query")
        raise StoreError(f"where={dict(where)!r} is not a filter Chroma accepts ({why}): {WHERE_HELP}") from None


_MISSING = object()
Matcher = Callable[[Mapping[str, Any]], bool]


def _kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "num"
    return "str" if isinstance(v, str) else None


def _operand(stored: Any, arg: Any) -> Any:
    """The operand as Chroma compares it with a stored number: ints with ints (a float operand truncated
    toward zero, so ``{"n": {"$gte": 2.5}}`` matches a stored 2), floats with floats."""
    if isinstance(stored, int) and not isinstance(stored, bool) and isinstance(arg, float):
        return int(arg)
    return arg


def _same(a: Any, b: Any) -> bool:  # Chroma's equality: 1 == 1.0, True is not 1, "1" is not 1
    return a is not _MISSING and _kind(a) == _kind(b) and a == _operand(a, b)


def _page_size(page_size: Any, default: int) -> int:
    """``page_size`` checked (0 read the default, "10" failed inside Chroma); ``None``: ``default``."""
    if page_size is None:
        return default
    if not is_int(page_size) or page_size < 1:
        raise ValueError(f"page_size must be a whole number >= 1 (or None for the default, {default}), got "
                         f"{page_size!r}")
    return int(page_size)


def _check_open_args(path: Any, client: Any) -> None:
    """``path`` and ``client`` of a store being opened (pathlib's or an AttributeError at open before)."""
    if path is not None and (not isinstance(path, str | os.PathLike) or not str(path).strip()):
        raise TypeError(f"path must be the store's directory (a str or Path), got {type(path).__name__} {path!r}")
    if client is not None and not hasattr(client, "get_or_create_collection"):
        raise TypeError(f"client must be a chromadb client (chromadb.PersistentClient(...), HttpClient(...)), got "
                        f"{type(client).__name__}")


def query_vector(query: Any) -> np.ndarray:
    """A search query that is not text, as a float32 array; anything else is a TypeError naming ``query``."""
    wrong = query is None or isinstance(query, bytes | Mapping | bool) or is_real(query) or (  # (5: "dim 1")
        isinstance(query, Sequence) and any(isinstance(x, str | bytes) for x in query))
    if not wrong:
        try:
            return np.asarray(query, np.float32)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"query must be a str (the text to search for) or one embedding vector of numbers, "
                    f"got {type(query).__name__} {str(query)[:60]!r}")


def compile_where(flt: Mapping[str, Any]) -> Matcher | None:
    """A Python predicate on a row's metadata that agrees with Chroma's ``where`` (checked against Chroma
    in the tests), or ``None`` for a filter it does not cover (Chroma then evaluates it, and reports
    its errors). ``$ne`` / ``$nin`` match rows without the field, as in Chroma."""
    if not isinstance(flt, Mapping) or len(flt) != 1:
        return None
    ((key, cond),) = flt.items()
    if key in ("$and", "$or"):
        if not isinstance(cond, list | tuple) or len(cond) < 2:
            return None
        subs = [compile_where(c) for c in cond]
        if any(f is None for f in subs):
            return None
        fs: list[Matcher] = [f for f in subs if f is not None]
        return (lambda m: all(f(m) for f in fs)) if key == "$and" else (lambda m: any(f(m) for f in fs))
    if key.startswith("$"):
        return None
    if not isinstance(cond, Mapping):
        cond = {"$eq": cond}
    if len(cond) != 1:
        return None
    ((op, arg),) = cond.items()
    if op in ("$eq", "$ne"):
        if _kind(arg) is None:
            return None
        eq = op == "$eq"
        return lambda m: _same(m.get(key, _MISSING), arg) == eq
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if _kind(arg) != "num":
            return None
        cmp = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}[op]

        def compare(m: Mapping[str, Any]) -> bool:
            v = m.get(key, _MISSING)
            return _kind(v) == "num" and bool(cmp(v, _operand(v, arg)))

        return compare
    if op in ("$in", "$nin"):
        if not isinstance(arg, list | tuple) or not arg or len({type(a) for a in arg}) != 1 or _kind(arg[0]) is None:
            return None
        inside = op == "$in"
        return lambda m: any(_same(m.get(key, _MISSING), a) for a in arg) == inside
    return None


def _remember(memo: dict[str, _T], key: str, value: _T) -> None:
    """Store ``value`` in a per-filter memo, emptied past 10,000 filters (say a namespace per user)."""
    if len(memo) > 10_000:
        memo.clear()
    memo[key] = value


def _pages(col: Any, *, include: list[str], size: int, where: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """Chroma ``get`` results a page at a time, in the collection's order. Stops after a short page: asking
    for the next one would make Chroma evaluate a filter from the first row again."""
    offset = 0
    while True:
        page = col.get(where=where, limit=size, offset=offset, include=include)
        if not page["ids"]:
            return
        yield page
        if len(page["ids"]) < size:
            return
        offset += len(page["ids"])


def _digest_page(h: Any, page: Mapping[str, Any]) -> None:
    for i, d, m in zip(page["ids"], page["documents"], page["metadatas"] or [None] * len(page["ids"]), strict=True):
        h.update(json.dumps([i, d, m], sort_keys=True, default=str).encode())


def _digest(col: Any, page_size: int) -> str:
    """A digest of every row's id, text and metadata, read page by page in the collection's order."""
    h = hashlib.sha256()
    for page in _pages(col, include=["documents", "metadatas"], size=page_size):
        _digest_page(h, page)
    return h.hexdigest()


class MemoryStore:
    """Episodic memories with embeddings, rewards, metadata and namespaces, in Chroma."""

    def __init__(
        self,
        embedder: Embedder,
        config: StoreConfig | Mapping[str, Any] | None = None,
        *,
        path: str | Path | None = None,
        client: Any | None = None,
    ) -> None:
        if isinstance(embedder, str | Path):  # MemoryStore("./mem"): the first argument is the embedder
            raise TypeError(f"MemoryStore(embedder, config, path=...) takes the embedder first, got the path {embedder!r}: "
                            "pass path= (or StoreConfig(path=...)), or open everything with MemoryDistill.open(path)")
        embedder = as_embedder(embedder)  # a LangChain Embeddings is wrapped, as MemoryDistill.open does
        _check_open_args(path, client)
        self.config = cfg = as_config(config, StoreConfig, "config")
        self.embedder = embedder
        with _OPEN_LOCK:  # Chroma's client cache and collection creation are not safe from several threads at once
            self._client = client or self._make_client(cfg, path)
            if client is None and cfg.mode == "persistent":
                _hold_directory(self._persistent_path(cfg, path), self)
            self._max_batch = min(cfg.write_batch_size, self._client.get_max_batch_size())
            args = self._collection_args(embedder)  # (asks the embedder its dim: its errors are not the store's)
            try:
                self._col = self._client.get_or_create_collection(cfg.collection, **args)
            except Exception as e:  # chroma raises several types for an unreachable server
                raise StoreError(f"could not open collection {cfg.collection!r}: {e}") from e
        if cfg.mode == "http":
            self._col = _ServerCollection(self._col, _server_url(cfg))
        self._narrow_ok: dict[str, bool] = {}  # search, by filter: did k + 4 candidates suffice last time?
        self._wide: dict[str, bool] = {}  # search, by filter: known to pass more than EXACT_MAX_ROWS rows
        self._skip_post: dict[str, int] = {}  # search, by filter: searches left before post-filtering is tried again
        have = self._col.metadata or {}
        if not self._built_with(have, embedder):
            raise EmbedderMismatchError(
                f"collection {cfg.collection!r} was built with embedder {have.get('md_embedder')!r} "
                f"(dim {have.get('md_dim')}), but {embedder.name!r} (dim {embedder.dim}) was given: "
                "use the same embedder, a new collection name / store path, or re-embed the collection "
                "(MemoryDistill.reembed() / MemoryStore.reembed(embedder, config), CLI `memory-distill reembed`)"
            )

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _make_client(cfg: StoreConfig, path: str | Path | None) -> Any:
        import chromadb

        settings = chromadb.Settings(anonymized_telemetry=False, allow_reset=False)
        if cfg.mode == "ephemeral":
            # EphemeralClients in one process share state; a private temp dir isolates each store
            import shutil
            import tempfile

            tmp = tempfile.mkdtemp(prefix="memory_distill_")
            client = chromadb.PersistentClient(path=tmp, settings=settings)
            weakref.finalize(client, shutil.rmtree, tmp, True)
            return client
        if cfg.mode == "http":
            _check_server(cfg)
            try:
                return chromadb.HttpClient(host=cfg.host, port=cfg.port, ssl=cfg.ssl, headers=cfg.headers or None,
                                           tenant=cfg.tenant, database=cfg.database, settings=settings)
            except Exception as e:
                raise StoreError(f"could not connect to the Chroma server at {_server_url(cfg)}: "
                                 f"{type(e).__name__}: {e}") from None
        p = MemoryStore._persistent_path(cfg, path)
        p.mkdir(parents=True, exist_ok=True)
        # absolute: Chroma keeps one client per path string in a process, so a relative path opened again after a
        # chdir would reach the first directory's store
        return chromadb.PersistentClient(path=str(p.resolve()), settings=settings)

    @staticmethod
    def _persistent_path(cfg: StoreConfig, path: str | Path | None) -> Path:
        return Path(path or cfg.path or ".memory_distill/chroma")

    @staticmethod
    def _collection_args(embedder: Embedder) -> dict[str, Any]:
        """How a collection for ``embedder`` is created: cosine space, the embedder recorded, no Chroma embedding function."""
        return {"metadata": {"md_embedder": embedder.name, "md_dim": int(embedder.dim), "md_format": FORMAT_VERSION},
                "configuration": {"hnsw": {"space": "cosine"}}, "embedding_function": None}

    @staticmethod
    def _built_with(collection_metadata: Mapping[str, Any], embedder: Embedder) -> bool:
        return bool(collection_metadata.get("md_embedder") == embedder.name
                    and int(collection_metadata.get("md_dim", -1)) == embedder.dim)

    @classmethod
    def reembed(cls, embedder: Embedder, config: StoreConfig | Mapping[str, Any] | None = None, *, path: str | Path | None = None,
                client: Any | None = None, page_size: int = 1000, keep_backup: bool = False, force: bool = False,
                progress: Callable[[int, int], None] | None = None) -> MemoryStore:
        """Give every memory of the collection a vector from ``embedder``; return the store opened with it.

        For a change of embedder: the offline hashing default to OpenAI once a key is set, another
        model, ``LocalEmbedder(long_texts=...)``. Ids, texts, rewards, metadata, namespaces and
        timestamps are kept; only the vectors change. The new vectors go into a side collection;
        the original is swapped out only once every row is copied, so a failure (the embedding
        API down, a bad vector) leaves it exactly as it was. ``keep_backup`` keeps the original
        as ``<collection>-pre-reembed-<unix time>``; otherwise it is deleted after the swap.
        Nothing to do when the collection already uses ``embedder``, unless ``force`` (vectors
        written by an older version of the same embedder, or passed in by hand).

        Run it while nothing else writes to the collection: a row added, deleted or updated (a late
        reward) during the copy is detected by re-reading the original's ids, texts and metadata
        at the end, and the run is refused with the original kept. Models trained on the old vectors do not serve the new
        embedder (the Predictor refuses them): consolidate again. ``progress(done, total)`` is
        called after each page.
        """
        _check_open_args(path, client)
        page_size = _page_size(page_size, 1000)
        keep_backup = check_flag(keep_backup, "keep_backup", "keep the original collection")
        force = check_flag(force, "force", "re-embed a collection already built with this embedder")
        cfg = as_config(config, StoreConfig, "config")  # (a dict failed as "no attribute 'collection'")
        client = client or cls._make_client(cfg, path)
        try:
            old = client.get_collection(cfg.collection, embedding_function=None)
        except Exception:
            raise StoreError(f"no collection {cfg.collection!r} to re-embed") from None
        have = dict(old.metadata or {})
        if not force and cls._built_with(have, embedder):
            return cls(embedder, cfg, client=client)
        side = f"{cfg.collection}-reembed"
        names = {getattr(c, "name", c) for c in client.list_collections()}
        if side in names:
            client.delete_collection(side)  # left by a run that was killed
        new = client.create_collection(side, **cls._collection_args(embedder))
        batch = min(cfg.write_batch_size, client.get_max_batch_size())
        total, done = old.count(), 0
        copied = hashlib.sha256()  # what was copied, to detect writes made meanwhile
        try:
            for page in _pages(old, include=["documents", "metadatas"], size=page_size):
                ids = list(page["ids"])
                _digest_page(copied, page)
                docs = [d or "" for d in page["documents"]]
                vecs = np.asarray(embedder.embed(docs), np.float32)
                if vecs.shape != (len(ids), embedder.dim) or not np.isfinite(vecs).all():
                    raise StoreError(f"embedder {embedder.name!r} returned {list(vecs.shape)} vectors (or NaN/inf) "
                                     f"for {len(ids)} texts; the collection is unchanged")
                metas = list(page["metadatas"] or [None] * len(ids))
                for a in range(0, len(ids), batch):
                    new.add(ids=ids[a : a + batch], embeddings=vecs[a : a + batch], documents=docs[a : a + batch],
                            metadatas=metas[a : a + batch])
                done += len(ids)
                if progress is not None:
                    progress(done, total)
            if new.count() != old.count() or _digest(old, page_size) != copied.hexdigest():
                raise StoreError(f"{cfg.collection!r} changed while it was re-embedded (rows added, deleted or "
                                 "updated meanwhile): stop the writers and run it again; the collection is unchanged")
        except BaseException:
            client.delete_collection(side)
            raise
        stem = f"{cfg.collection}-pre-reembed-{int(time.time())}"
        backup, k = stem, 0
        while backup in names:  # two runs in one second, both keeping a backup
            k += 1
            backup = f"{stem}-{k}"
        try:
            old.modify(name=backup)
        except BaseException:
            client.delete_collection(side)
            raise
        try:
            new.modify(name=cfg.collection)
        except BaseException:
            old.modify(name=cfg.collection)
            client.delete_collection(side)
            raise
        if not keep_backup:
            client.delete_collection(backup)
        log.info("re-embedded %d memories of %r with %s (was %s)", done, cfg.collection, embedder.name,
                 have.get("md_embedder"))
        return cls(embedder, cfg, client=client)

    @classmethod
    def ephemeral(cls, embedder: Embedder, **overrides: Any) -> MemoryStore:
        """An in-memory store (tests, notebooks)."""
        return cls(embedder, StoreConfig(mode="ephemeral", **overrides))

    @property
    def collection_name(self) -> str:
        return self.config.collection

    # ------------------------------------------------------------------ encoding

    def _check_reward(self, reward: float | None, where: str) -> None:
        if reward is None:
            return
        lo, hi = self.config.reward_min, self.config.reward_max
        if not (lo <= reward <= hi):
            raise InvalidMemoryError(
                f"{where}: reward {reward} is outside the configured range [{lo}, {hi}]: "
                "rescale it or set StoreConfig.reward_min/reward_max"
            )

    @staticmethod
    def _to_meta(m: Memory) -> dict[str, Any]:
        meta: dict[str, Any] = dict(m.metadata)
        meta[NS] = m.namespace
        meta[CREATED] = float(m.created_at)
        meta[HAS_REWARD] = m.reward is not None
        meta[STATS] = encode_stats(m.text)
        if m.reward is not None:
            meta[REWARD] = float(m.reward)
            meta[REWARDED_AT] = float(m.rewarded_at or m.created_at)
        return meta

    @staticmethod
    def _from_row(id_: str, doc: str | None, meta: Mapping[str, Any]) -> Memory:
        user = {k: v for k, v in meta.items() if not k.startswith(RESERVED_PREFIX)}
        return Memory.model_construct(
            id=id_,
            text=doc or "",
            reward=meta.get(REWARD) if meta.get(HAS_REWARD) else None,
            metadata=user,
            namespace=meta.get(NS, "default"),
            created_at=meta.get(CREATED, 0.0),
            rewarded_at=meta.get(REWARDED_AT),
        )

    def _where(self, namespace: str | None, where: Mapping[str, Any] | None,
               rewarded_only: bool = False) -> dict[str, Any] | None:
        clauses: list[dict[str, Any]] = []
        rewarded_only = check_flag(rewarded_only, "rewarded_only", "only memories with a reward")  # ("no": fewer)
        if namespace is not None:
            if not isinstance(namespace, str):
                raise StoreError(f"namespace must be a str (one namespace's name), got {type(namespace).__name__} "
                                 f"{namespace!r}: to read several, pass namespace=None and filter with "
                                 "where={'namespace': {'$in': [...]}}")
            if not namespace.strip():  # no memory can be in one (Memory refuses it): the answer was silently empty
                raise StoreError(f"namespace {namespace!r} is empty: give a namespace's name, or None for every "
                                 "namespace")
            clauses.append({NS: namespace})
        if rewarded_only:
            clauses.append({HAS_REWARD: True})
        if where:
            user = _where_clauses(where, "where")
            _check_where(user[0] if len(user) == 1 else {"$and": user}, where)
            clauses.extend(user)
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    # ------------------------------------------------------------------ writes

    def add(self, memory: Memory | Mapping[str, Any] | str, *, embedding: np.ndarray | None = None,
            namespace: str | None = None) -> str:
        """Add one memory; returns its id."""
        mem = coerce_memory(memory, namespace=namespace)  # errors name "memory", not "memories[0]"
        self._check_reward(mem.reward, "memory")
        emb = None if embedding is None else np.asarray(embedding, np.float32).reshape(1, -1)
        return self.add_many([mem], embeddings=emb, namespace=namespace)[0]

    def add_many(
        self,
        memories: Iterable[Memory | Mapping[str, Any] | str],
        *,
        embeddings: np.ndarray | Sequence[Sequence[float]] | None = None,
        namespace: str | None = None,
        upsert: bool = False,
        keep_created: bool = False,
        within_namespace: bool = False,
    ) -> list[str]:
        """Validate, embed and write a batch atomically; returns the ids in input order.

        ``embeddings`` (n x dim) skips the embedder. With ``upsert=False`` an id that already
        exists is an error (Chroma would silently drop it); ``upsert=True`` replaces it, and with
        ``keep_created`` the replaced memory keeps its stored ``created_at`` (an update, not a new memory).
        ``within_namespace`` refuses to replace a memory of another namespace (ids are unique across the
        store, so an upsert would move it).
        """
        if isinstance(memories, (str, Mapping, Memory)):  # iterating it would store its characters (or keys)
            raise TypeError(f"add_many takes a list of memories, got one {type(memories).__name__}: pass [memory], "
                            "or use add()")
        upsert = check_flag(upsert, "upsert", "replace stored memories of the same ids")  # ("no" replaced them)
        keep_created = check_flag(keep_created, "keep_created", "a replaced memory keeps its created_at")
        within_namespace = check_flag(within_namespace, "within_namespace", "never replace another namespace's")
        mems = [coerce_memory(m, namespace=namespace, index=i) for i, m in enumerate(memories)]
        if not mems:
            return []
        for i, m in enumerate(mems):
            self._check_reward(m.reward, f"memories[{i}]")
        ids = [m.id for m in mems]
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dups = sorted({x for x in ids if x in seen or seen.add(x)})  # type: ignore[func-returns-value]
            raise InvalidMemoryError(f"duplicate ids in one batch: {dups[:5]}: give each memory a unique id")
        if embeddings is None:
            vecs = self.embedder.embed([m.text for m in mems])
        else:
            vecs = np.asarray(embeddings, dtype=np.float32)
            if vecs.shape != (len(mems), self.embedder.dim):
                raise InvalidMemoryError(
                    f"embeddings has shape {vecs.shape}, expected ({len(mems)}, {self.embedder.dim}) "
                    f"for embedder {self.embedder.name!r}"
                )
            if not np.isfinite(vecs).all():
                raise InvalidMemoryError("embeddings contain NaN or inf: re-embed those texts")
        with _write_lock(self._col):  # the existence check (or snapshot) and the write, as one step in this process
            snapshot: dict[str, Any] | None = None
            if upsert:  # one read: the rows being replaced, kept to roll back to (none for new ids)
                snapshot = self._snapshot(ids)
            else:
                existing = self.existing_ids(ids)
                if existing:
                    raise StoreError(
                        f"{len(existing)} id(s) already exist (e.g. {sorted(existing)[:3]}): "
                        "use new ids, or upsert=True to replace them (CLI: add --upsert, import --upsert)"
                    )
            metas = [self._to_meta(m) for m in mems]
            if snapshot and snapshot["ids"]:
                old = dict(zip(snapshot["ids"], snapshot["metadatas"], strict=True))
                moved = [(m.id, old[m.id].get(NS), m.namespace) for m in mems
                         if within_namespace and m.id in old and old[m.id].get(NS) != m.namespace]
                if moved:
                    mid, was, now = moved[0]
                    raise InvalidMemoryError(f"id {mid!r} belongs to a memory of namespace {was!r}, not {now!r} "
                                             f"({len(moved)} such id(s)): ids are unique across the store, so use other "
                                             "ids or write through that namespace; nothing was written")
                for mid, meta in zip(ids, metas, strict=True):
                    prev = old.get(mid)
                    if prev is None:
                        continue
                    if keep_created and CREATED in prev:
                        meta[CREATED] = prev[CREATED]
                    # Chroma merges metadata on upsert: clear the old row's keys the new one lacks
                    meta.update(dict.fromkeys(prev.keys() - meta.keys()))
            docs = [m.text for m in mems]
            write = self._col.upsert if upsert else self._col.add
            done = 0
            try:
                for s in range(0, len(mems), self._max_batch):
                    e = s + self._max_batch
                    write(ids=ids[s:e], embeddings=vecs[s:e], metadatas=metas[s:e], documents=docs[s:e])
                    done = e
            except Exception as exc:
                self._rollback(ids[:done], snapshot)
                raise StoreError(f"write failed after {min(done, len(ids))} of {len(ids)} rows and was rolled back: {exc}") from exc
        log.debug("stored %d memories", len(ids))
        return ids

    def _get_ids(self, ids: Sequence[str], include: list[Any], where: dict[str, Any] | None = None) -> dict[str, list[Any]]:
        """``collection.get(ids=...)`` in write-sized chunks: one call with more ids than SQLite takes variables
        (32,766) fails inside Chroma. Returns ``ids`` and each included field as lists."""
        ids = list(ids)
        out: dict[str, list[Any]] = {"ids": [], **{k: [] for k in include}}
        for s in range(0, len(ids), self._max_batch):
            got = self._col.get(ids=ids[s : s + self._max_batch], where=where, include=include)
            out["ids"].extend(got["ids"])
            for k in include:
                out[k].extend(got[k] if got[k] is not None else [])
        return out

    def _snapshot(self, ids: Sequence[str]) -> dict[str, Any]:
        """The stored rows among ``ids`` (whole: vectors, metadata, texts), read in write-sized chunks."""
        out = self._get_ids(ids, ["embeddings", "metadatas", "documents"])
        vecs = np.asarray(out["embeddings"], np.float32).reshape(len(out["ids"]), self.embedder.dim)
        return {"ids": out["ids"], "embeddings": vecs, "metadatas": out["metadatas"], "documents": out["documents"]}

    def _rollback(self, written: Sequence[str], snapshot: dict[str, Any] | None) -> None:
        try:
            if written:
                for s in range(0, len(written), self._max_batch):
                    self._col.delete(ids=list(written[s : s + self._max_batch]))
            if snapshot and snapshot["ids"]:
                for s in range(0, len(snapshot["ids"]), self._max_batch):
                    self._col.upsert(**{k: v[s : s + self._max_batch] for k, v in snapshot.items()})
        except Exception:  # pragma: no cover - best effort; the original error is raised
            log.exception("rollback failed; the store may hold part of the batch")

    def _stored(self, ids: list[str]) -> dict[str, tuple[str | None, Mapping[str, Any]]]:
        """Each id's stored (text, metadata); :class:`MemoryNotFoundError` naming the first missing id."""
        got = self._get_ids(ids, ["metadatas", "documents"])
        by_id = dict(zip(got["ids"], zip(got["documents"], got["metadatas"], strict=True), strict=True))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise MemoryNotFoundError(f"no memory with id {missing[0]!r} ({len(missing)} missing): check the id")
        return by_id

    def set_reward(self, memory_id: str, reward: float, *, rewarded_at: float | datetime | str | None = None) -> Memory:
        """Record a (late) reward for a stored memory; returns the updated memory. ``rewarded_at``: when it was earned
        (Unix seconds, a ``datetime`` with a timezone or ISO 8601 text with an offset; default now)."""
        if not isinstance(memory_id, str):  # (a list failed as "unhashable type")
            hint = ": for several, set_rewards({id: reward, ...})" if isinstance(memory_id, list | tuple) else ""
            raise TypeError(f"memory_id must be one memory's id (a str), got {type(memory_id).__name__}{hint}")
        return self.set_rewards({memory_id: reward}, rewarded_at=rewarded_at)[0]

    def set_rewards(self, rewards: Mapping[str, float], *,
                    rewarded_at: float | datetime | str | None = None) -> list[Memory]:
        """Record rewards for several memories at once (all validated before any is written)."""
        if not isinstance(rewards, Mapping):
            raise TypeError(f"set_rewards takes a dict {{memory_id: reward}}, got {type(rewards).__name__}: "
                            "e.g. dict(pairs)")
        ids = id_list(list(rewards), "set_rewards' ids")
        if not ids:
            return []
        if rewarded_at is not None:
            try:
                rewarded_at = check_unix_time(float(as_unix_time(rewarded_at, "rewarded_at")), "rewarded_at")
            except (TypeError, ValueError) as e:
                raise InvalidMemoryError(str(e)) from None
        with _write_lock(self._col):  # read, write and any rollback as one step in this process (a delete in between)
            by_id = self._stored(ids)
            now = time.time() if rewarded_at is None else rewarded_at
            metas, out = [], []
            for i in ids:
                r = rewards[i]
                if not is_real(r) or not math.isfinite(float(r)):  # (numpy numbers too: a model's np.float32 score)
                    raise InvalidMemoryError(f"reward for {i!r} must be a finite number, got {r!r}")
                self._check_reward(float(r), f"reward for {i!r}")
                doc, meta = by_id[i]
                # only the keys a reward changes are written (Chroma merges them in): writing the whole row read above
                # would put back what another writer changed in between (update_metadata's keys, lost)
                patch: dict[str, Any] = {REWARD: float(r), HAS_REWARD: True, REWARDED_AT: float(now)}
                if STATS not in meta:  # rows written before text features existed
                    patch[STATS] = encode_stats(doc or "")
                metas.append(patch)
                out.append(self._from_row(i, doc, {**meta, **patch}))
            try:
                self._update_chunked(ids, metas, lambda j: {k: by_id[ids[j]][1].get(k) for k in metas[j]})
            except Exception as exc:
                raise StoreError(f"set_rewards failed and was rolled back: {exc}") from exc
            return out

    def _update_chunked(self, ids: list[str], metas: list[dict[str, Any]],
                        undo: Callable[[int], dict[str, Any]]) -> None:
        """``collection.update`` of metadata in write-sized chunks (Chroma refuses a bigger batch); when a chunk
        fails, the earlier ones are put back (``undo(j)``: the keys row ``j`` changed, as they were; ``None``
        removes a key) and the error raised."""
        done = 0
        try:
            for s in range(0, len(ids), self._max_batch):
                self._col.update(ids=ids[s : s + self._max_batch], metadatas=metas[s : s + self._max_batch])
                done = min(s + self._max_batch, len(ids))
        except Exception:
            try:
                back = [undo(j) for j in range(done)]
                for s in range(0, done, self._max_batch):
                    self._col.update(ids=ids[s : min(s + self._max_batch, done)],
                                     metadatas=back[s : min(s + self._max_batch, done)])
            except Exception:  # pragma: no cover - best effort; the original error is raised
                log.exception("rollback of a metadata update failed; the store may hold part of it")
            raise

    def update_metadata(self, updates: Mapping[str, Mapping[str, Any]]) -> list[Memory]:
        """Merge metadata into stored memories without re-embedding them; returns the updated memories.

        ``updates`` maps a memory id to the keys to set; a ``None`` value removes that key. Every id and
        value is checked before anything is written (one write), and the reserved keys (reward,
        namespace, ...) cannot be set here: use :meth:`set_rewards` for rewards.
        """
        if not isinstance(updates, Mapping):
            raise TypeError(f"update_metadata takes a dict {{memory_id: {{key: value}}}}, got {type(updates).__name__}")
        ids = id_list(list(updates), "update_metadata's ids")
        if not ids:
            return []
        checked: dict[str, dict[str, Any]] = {}
        fixes = {"reward": "use set_reward / set_rewards({id: reward})",
                 "namespace": "a memory's namespace is set when it is added (add_many(..., upsert=True) re-adds it)"}
        for i in ids:
            if not isinstance(updates[i], Mapping):
                raise InvalidMemoryError(f"update_metadata[{i!r}]: expected a dict of metadata keys to set, got "
                                         f"{type(updates[i]).__name__} {updates[i]!r}")
            if field := next((k for k in fixes if k in updates[i]), None):  # a metadata key of that name is legal,
                # but here it is almost surely meant as the memory's own field, which this would silently not change
                raise InvalidMemoryError(f"update_metadata[{i!r}]: {field!r} is the memory's own field, not "
                                         f"metadata: {fixes[field]}")
            try:
                checked[i] = check_metadata(dict(updates[i]), allow_none=True)
            except (TypeError, ValueError) as e:
                raise InvalidMemoryError(f"update_metadata[{i!r}]: {e}") from e
        with _write_lock(self._col):  # read, write and any rollback as one step in this process
            by_id = self._stored(ids)
            patches, out = [], []
            for i in ids:
                doc, meta = by_id[i]
                patch = dict(checked[i])  # (numpy scalars made Python values)
                merged = {k: v for k, v in {**(meta or {}), **patch}.items() if v is not None}
                patches.append(patch)
                out.append(self._from_row(i, doc, merged))
            try:
                self._update_chunked(ids, patches, lambda j: {k: (by_id[ids[j]][1] or {}).get(k) for k in patches[j]})
            except Exception as exc:
                raise StoreError(f"update_metadata failed and was rolled back: {exc}") from exc
            return out

    def delete(self, ids: Sequence[str] | None = None, *, where: Mapping[str, Any] | None = None,
               namespace: str | None = None, dry_run: bool = False) -> list[str]:
        """Delete by ids, by metadata filter and/or by namespace; returns the deleted ids (with ``dry_run``, the ids
        that would be deleted, and nothing is). An embedder with a cache (``CachedEmbedder``) drops the deleted
        texts' vectors too."""
        if ids is None and where is None and namespace is None:
            raise StoreError("delete() needs ids, where or namespace: refusing to delete everything")
        dry_run = check_flag(dry_run, "dry_run", "change nothing, return the ids that would go")  # ("yes" deleted)
        if ids is None and namespace is None and where is not None and not where:  # (a filter built up empty)
            raise StoreError("where={} selects every memory: refusing to delete everything; give a condition, or a "
                             "namespace to empty one")
        flt = self._where(namespace, where)
        evict = None if dry_run else getattr(self.embedder, "evict", None)
        include: list[Any] = ["documents"] if callable(evict) else []
        if ids is not None:
            ids = id_list(ids)
            pages: Iterable[Any] = (self._get_ids(ids[s : s + self._max_batch], include, flt)
                                    for s in range(0, len(ids), self._max_batch))
        else:
            pages = _pages(self._col, where=flt, include=include, size=max(self.config.read_page_size, ID_PAGE_SIZE))
        got: list[str] = []
        for page in pages:
            got.extend(page["ids"])
            if callable(evict) and page["ids"]:
                try:  # (a page at a time: a whole namespace's texts are never held at once)
                    evict(page["documents"] or [])
                except Exception as e:  # the cache is not the store: a failure there must not stop the delete
                    log.warning("could not drop deleted memories' vectors from the embedding cache: %s", e)
        if dry_run:
            return got
        for s in range(0, len(got), self._max_batch):
            self._col.delete(ids=got[s : s + self._max_batch])
        log.info("deleted %d memories", len(got))
        return list(got)

    def _iter_ids(self, flt: dict[str, Any] | None) -> Iterator[list[str]]:
        # ids only, in big pages: Chroma re-evaluates a filter from the first row for every page (offset),
        # so small pages make a filtered count quadratic (1.3 s vs 0.18 s at 50k rows in one page)
        for page in _pages(self._col, where=flt, include=[], size=max(self.config.read_page_size, ID_PAGE_SIZE)):
            yield page["ids"]

    # ------------------------------------------------------------------ reads

    def get(self, memory_id: str) -> Memory:
        if not isinstance(memory_id, str):
            raise TypeError(f"get takes one memory id (a str), got {type(memory_id).__name__}: use get_many for several")
        got = self._col.get(ids=[memory_id], include=["metadatas", "documents"])
        if not got["ids"]:
            raise MemoryNotFoundError(f"no memory with id {memory_id!r}: check the id (or its namespace)")
        return self._from_row(got["ids"][0], got["documents"][0], got["metadatas"][0])

    def get_many(self, ids: Sequence[str]) -> list[Memory]:
        """Memories for the ids that exist, in the order asked."""
        ids = id_list(ids)
        got = self._get_ids(ids, ["metadatas", "documents"])
        rows = {i: self._from_row(i, d, m) for i, d, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}
        return [rows[i] for i in ids if i in rows]

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored (ids only, read in chunks: 0.5 s for 100k on 2 cores)."""
        return set(self._get_ids(id_list(ids), [])["ids"])

    def get_embeddings(self, ids: Sequence[str]) -> np.ndarray:
        ids = id_list(ids)
        got = self._get_ids(ids, ["embeddings"])
        pos = {i: k for k, i in enumerate(got["ids"])}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise MemoryNotFoundError(f"no memory with id {missing[0]!r}")
        arr = np.asarray(got["embeddings"], dtype=np.float32)
        return arr[[pos[i] for i in ids]]

    def search(
        self,
        query: str | np.ndarray,
        k: int = 5,
        *,
        namespace: str | None = "default",
        where: Mapping[str, Any] | None = None,
        rewarded_only: bool = False,
        include_embeddings: bool = False,
        diversity: float = 0.0,
        fetch_k: int | None = None,
    ) -> list[SearchHit]:
        """The k most similar memories (cosine) in ``namespace`` (``None``: all namespaces).

        ``where`` filters on metadata (``{"tool": "search"}``, ``{"reward": {"$gte": 0.5}}``).
        ``diversity`` > 0 picks the k among the ``fetch_k`` (default ``max(4k, 20)``) most similar
        by maximal marginal relevance (:func:`mmr_select`): near-copies of a result give way to
        other episodes.
        """
        if not is_int(k):
            raise TypeError(f"k must be an int (how many memories to return), got {type(k).__name__} {k!r}")
        k = int(k)  # numpy ints too: Chroma takes Python ints only
        if k < 1:
            raise StoreError(f"k must be >= 1, got {k}")
        if fetch_k is not None and (not is_int(fetch_k) or fetch_k < 1):
            raise TypeError(f"fetch_k must be None (max(4k, 20)) or an int >= 1, got {fetch_k!r}")
        fetch_k = None if fetch_k is None else int(fetch_k)
        if not isinstance(query, str):
            query = query_vector(query)
        include_embeddings = check_flag(include_embeddings, "include_embeddings", "return each hit's vector")
        if not is_real(diversity) or not (diversity >= 0 and math.isfinite(diversity)):  # ("x" failed in a compare)
            raise StoreError(f"diversity must be a number >= 0, got {diversity!r}")
        if diversity > 0:
            pool = self.search(query, max(k, fetch_k or max(4 * k, 20)), namespace=namespace, where=where,
                               rewarded_only=rewarded_only, include_embeddings=True)
            if len(pool) <= 1:
                return pool
            sim = np.array([h.similarity for h in pool])
            picked = [pool[i] for i in mmr_select(sim, np.stack([np.asarray(h.embedding) for h in pool]), k, diversity)]
            return picked if include_embeddings else [SearchHit(memory=h.memory, similarity=h.similarity)
                                                      for h in picked]
        if isinstance(query, str):
            if not query.strip():
                raise StoreError("query is empty: pass the text to search for")
            qv = self.embedder.embed([query])[0]
        else:
            raw = query
            if raw.ndim > 1 and raw.shape[0] != 1:
                raise StoreError(f"search takes one query vector, got an array of shape {raw.shape}: search each row")
            qv = raw.reshape(-1)
            if qv.shape[0] != self.embedder.dim:
                raise StoreError(f"query vector has dim {qv.shape[0]}, the store uses {self.embedder.dim}")
            if not np.isfinite(qv).all():
                raise StoreError("query vector contains NaN or inf: re-embed the query")
        include = ["metadatas", "documents", "distances"] + (["embeddings"] if include_embeddings else [])
        flt = self._where(namespace, where, rewarded_only)
        if flt is None:
            return self._filtered_search(qv, k, None, "", include, include_embeddings)
        key = json.dumps(flt, sort_keys=True, default=repr)  # what the memos below remember per filter
        match = compile_where(flt)
        if match is not None and self._post_filter_due(key):
            # Chroma evaluates a `where` filter over every row before searching (about 0.4 s per query at
            # 100k rows), so the filter (namespace, reward, metadata conditions) is checked in Python
            # (`compile_where`, which agrees with Chroma) on an unfiltered result instead. Exact whenever >= k
            # of the top candidates qualify (always, in a store with one namespace and no other filter);
            # otherwise fall through to Chroma's filtered query. Reading candidates' metadata is most of a
            # query's cost, so k + 4 are asked first when the last search with this filter shows that would
            # have been enough, else 4k + 16.
            for n in ((k + 4, 4 * k + 16) if self._narrow_ok.get(key, True) else (4 * k + 16,)):
                res = self._col.query(query_embeddings=[qv], n_results=n, include=include)
                got = len(res["ids"][0])
                if got < n:  # every row of the store came back, or the graph search stopped short
                    exact = self._exact_when_stopped_short(qv, k, flt, got, include_embeddings)
                    if exact is not None:
                        return exact
                keep = [j for j, m in enumerate(res["metadatas"][0]) if match(m or {})]
                _remember(self._narrow_ok, key, sum(1 for j in keep if j < k + 4) >= k or got < k + 4)
                if len(keep) >= k or got < n:
                    return self._hits(res, keep[:k], include_embeddings)
            # too few of the nearest rows pass (a small namespace in a shared store, a rare value): skip this
            # attempt for the next searches with this filter, then check again in case the rows have moved
            _remember(self._skip_post, key, POST_FILTER_RETRY)
        return self._filtered_search(qv, k, flt, key, include, include_embeddings)

    def _post_filter_due(self, key: str) -> bool:
        left = self._skip_post.get(key)
        if left is None:
            return True
        if left <= 1:
            self._skip_post.pop(key, None)  # (another thread may have just removed it)
        else:
            self._skip_post[key] = left - 1
        return False

    def _filtered_search(self, qv: np.ndarray, k: int, flt: dict[str, Any] | None, key: str, include: list[str],
                         include_embeddings: bool) -> list[SearchHit]:
        """The k rows passing ``flt`` most similar to ``qv``: exact when at most ``EXACT_MAX_ROWS`` rows pass
        (the common case of a small namespace or a narrow filter), else Chroma's filtered query, asked again
        for more candidates if it comes back short."""
        # which side of EXACT_MAX_ROWS a filter is on costs a filter pass over every row to find out: once a
        # filter is known to be wide it goes straight to Chroma's filtered query (until a query comes back short)
        wide = flt is None or self._wide.get(key, False)
        if not wide:
            exact = self._exact_search(qv, k, flt, include_embeddings)
            if exact is not None:
                return exact
            _remember(self._wide, key, True)
        res = self._col.query(query_embeddings=[qv], n_results=k, where=flt, include=include)
        if len(res["ids"][0]) < k:  # the graph search missed some, or fewer rows pass now
            self._wide.pop(key, None)
            if wide:  # the size probe was skipped: few rows may pass now, or the search stopped short
                exact = (self._exact_search(qv, k, flt, include_embeddings) if flt is not None else
                         self._exact_when_stopped_short(qv, k, None, len(res["ids"][0]), include_embeddings))
                if exact is not None:
                    return exact
                if flt is not None:  # (the probe found it wide still)
                    _remember(self._wide, key, True)
            res = self._col.query(query_embeddings=[qv], n_results=4 * k + 16, where=flt, include=include)
        return self._hits(res, list(range(min(k, len(res["ids"][0])))), include_embeddings)

    def _exact_when_stopped_short(self, qv: np.ndarray, k: int, flt: dict[str, Any] | None, returned: int,
                                  include_embeddings: bool) -> list[SearchHit] | None:
        """An unfiltered query returned fewer rows than it asked for. When the store holds more, the graph search
        stopped short: hnswlib keeps deleted rows in the graph as marked nodes, and a search whose entry point and
        its neighbours are all marked can end with few results or none (nmslib/hnswlib#344;
        chroma-core/chroma#7758), as after forgetting a whole store and adding new memories. Then the rows passing
        ``flt`` are searched exactly where few pass. None: the result was complete, or too many rows pass, or their
        vectors are not in this process's copy of the index (another process added them to the embedded
        directory)."""
        from chromadb.errors import InternalError

        if returned >= int(self._col.count()):
            return None
        try:
            return self._exact_search(qv, k, flt, include_embeddings)
        except InternalError:
            return None

    def _exact_search(self, qv: np.ndarray, k: int, flt: dict[str, Any] | None,
                      include_embeddings: bool) -> list[SearchHit] | None:
        """The k rows passing ``flt`` most similar to ``qv``, compared in numpy, when at most ``EXACT_MAX_ROWS``
        pass; None when more do."""
        # the vectors come with the filter pass (one call); texts and metadata are read for the k best only
        got = self._col.get(where=flt, limit=EXACT_MAX_ROWS + 1, include=["embeddings"])
        if len(got["ids"]) > EXACT_MAX_ROWS:
            return None
        if not got["ids"]:
            return []
        X = np.asarray(got["embeddings"], np.float32)
        sim = (X @ qv) / np.maximum(np.linalg.norm(X, axis=1) * np.linalg.norm(qv), 1e-12)
        order = np.argsort(-sim, kind="stable")[:k]
        best = [got["ids"][j] for j in order]
        found = {m.id: m for m in self.get_many(best)}  # a row deleted in between is left out
        return [SearchHit(memory=found[i], similarity=float(sim[j]), embedding=X[j].copy() if include_embeddings else None)
                for i, j in zip(best, order, strict=True) if i in found]

    def _hits(self, res: Any, rows: list[int], include_embeddings: bool) -> list[SearchHit]:
        embs = res.get("embeddings")
        hits = []
        for j in rows:
            emb = np.asarray(embs[0][j], np.float32) if include_embeddings and embs is not None else None
            hits.append(SearchHit(memory=self._from_row(res["ids"][0][j], res["documents"][0][j], res["metadatas"][0][j]),
                                  similarity=1.0 - float(res["distances"][0][j]), embedding=emb))
        return hits

    def count(self, *, namespace: str | None = None, rewarded_only: bool = False) -> int:
        flt = self._where(namespace, None, rewarded_only)
        if flt is None:
            return int(self._col.count())
        return sum(len(p) for p in self._iter_ids(flt))

    def iter_pages(
        self,
        *,
        namespace: str | None = None,
        where: Mapping[str, Any] | None = None,
        rewarded_only: bool = False,
        page_size: int | None = None,
        group_key: str = "group",
        metadata_keys: Sequence[str] = (),
    ) -> Iterator[TrainingPage]:
        """Stream rows (ids, embeddings, rewards with NaN for pending) page by page.

        ``metadata_keys``: also return these metadata values (``page.metadata``; ``None`` where absent).
        """
        size = _page_size(page_size, self.config.read_page_size)
        flt = self._where(namespace, where, rewarded_only)
        offset = 0
        # Chroma reads embeddings (vector segment) and metadata (SQLite) separately; fetching the two
        # halves of a page on two threads overlaps them (about 25% faster on 2 cores).
        pool = ThreadPoolExecutor(1, thread_name_prefix="memory-distill-read")
        try:
            while True:
                ids, embs, metas = self._read_page(pool, flt, size, offset)
                n = len(ids)
                if n == 0:
                    return
                rewards = np.array([m.get(REWARD, np.nan) if m.get(HAS_REWARD) else np.nan for m in metas], np.float32)
                created = np.array([m.get(CREATED, 0.0) for m in metas], np.float64)
                groups = [str(m[group_key]) if group_key in m else i for i, m in zip(ids, metas, strict=True)]
                feats = decode_stats([m.get(STATS) for m in metas])
                meta = {k: [m.get(k) for m in metas] for k in metadata_keys}
                yield TrainingPage(list(ids), np.asarray(embs, np.float32), rewards, created, groups, feats, meta)
                offset += n
                if n < size:
                    return
        finally:
            pool.shutdown(wait=False)

    def _read_page(self, pool: ThreadPoolExecutor, flt: dict[str, Any] | None, size: int,
                   offset: int) -> tuple[list[str], Any, list[Any]]:
        meta_f = pool.submit(self._col.get, where=flt, limit=size, offset=offset, include=["metadatas"])
        emb = self._col.get(where=flt, limit=size, offset=offset, include=["embeddings"])
        meta = meta_f.result()
        if list(emb["ids"]) == list(meta["ids"]):
            return list(emb["ids"]), emb["embeddings"], list(meta["metadatas"] or [])
        # rows were written or deleted between the two reads: read the page in one call
        got = self._col.get(where=flt, limit=size, offset=offset, include=["embeddings", "metadatas"])
        return list(got["ids"]), got["embeddings"], list(got["metadatas"] or [])

    def iter_memories(
        self,
        *,
        namespace: str | None = None,
        where: Mapping[str, Any] | None = None,
        page_size: int | None = None,
        with_embeddings: bool = False,
    ) -> Iterator[tuple[list[Memory], np.ndarray | None]]:
        """Stream whole memories page by page: ``(memories, embeddings or None)``.

        Texts, rewards, metadata, namespaces and timestamps as stored; ``with_embeddings=True`` also
        returns each page's float32 vectors (n x dim). Pages follow Chroma's order; rows written or
        deleted while iterating may be missed or repeated.
        """
        include = ["documents", "metadatas", "embeddings"] if with_embeddings else ["documents", "metadatas"]
        for got in _pages(self._col, where=self._where(namespace, where), include=include,
                          size=_page_size(page_size, self.config.read_page_size)):
            ids = list(got["ids"])
            mems = [self._from_row(i, d, m) for i, d, m in zip(ids, got["documents"], got["metadatas"], strict=True)]
            embs = np.asarray(got["embeddings"], np.float32).reshape(len(ids), -1) if with_embeddings else None
            yield mems, embs

    def load_training_data(self, *, namespace: str | None = None, rewarded_only: bool = False,
                           page_size: int | None = None, metadata_keys: Sequence[str] = ()) -> TrainingData:
        """All rows in one preallocated float32 matrix, filled page by page (one copy, not several).

        ``metadata_keys``: also collect these metadata values (``data.metadata``).
        """
        n = self.count(namespace=namespace, rewarded_only=rewarded_only)
        dim = self.embedder.dim
        X = np.empty((n, dim), np.float32)
        rewards = np.empty(n, np.float32)
        created = np.empty(n, np.float64)
        feats = np.empty((n, N_TEXT_FEATURES), np.float32)
        ids: list[str] = []
        groups: list[str] = []
        meta: dict[str, list[Any]] = {k: [] for k in metadata_keys}
        pos = 0
        for page in self.iter_pages(namespace=namespace, rewarded_only=rewarded_only, page_size=page_size,
                                    metadata_keys=metadata_keys):
            m = min(len(page.ids), n - pos)
            X[pos : pos + m] = page.embeddings[:m]
            rewards[pos : pos + m] = page.rewards[:m]
            created[pos : pos + m] = page.created_at[:m]
            feats[pos : pos + m] = page.features[:m]
            ids.extend(page.ids[:m])
            groups.extend(page.groups[:m])
            for k in metadata_keys:
                meta[k].extend(page.metadata[k][:m])
            pos += m
            if pos >= n:
                break
        if pos < n:  # rows deleted while reading
            X, rewards, created, feats = X[:pos], rewards[:pos], created[:pos], feats[:pos]
        return TrainingData(ids, X, rewards, created, groups, feats, meta)

    def _id_metadata_pages(self, where: Mapping[str, Any] | None = None) -> Iterator[Any]:
        """Chroma pages of every row's id and raw metadata (``page["ids"]``, ``page["metadatas"]``; reserved keys
        included); with ``where`` (a Chroma filter on stored keys) only the rows passing it, in big pages, as Chroma
        re-runs a filter for every page."""
        size = self.config.read_page_size if where is None else max(self.config.read_page_size, 20_000)
        return _pages(self._col, include=["metadatas"], size=size, where=where)

    def _metadata_pages(self, where: Mapping[str, Any] | None = None) -> Iterator[list[Mapping[str, Any]]]:
        """Every row's raw metadata, a page at a time (:meth:`_id_metadata_pages` without the ids)."""
        for page in self._id_metadata_pages(where):
            yield page["metadatas"]

    def namespace_counts(self, *, rewarded_only: bool = False) -> dict[str, int]:
        """Memories per namespace (rewarded ones only with ``rewarded_only``) in one pass over the metadata.

        Cheaper than one ``count(namespace=...)`` per namespace once there are more than a few: Chroma
        evaluates each filtered count over every row.
        """
        rewarded_only = check_flag(rewarded_only, "rewarded_only", "only memories with a reward")
        out: dict[str, int] = {}
        for metas in self._metadata_pages():
            for m in metas:
                if rewarded_only and not m.get(HAS_REWARD):
                    continue
                ns = str(m.get(NS, "default"))
                out[ns] = out.get(ns, 0) + 1
        return out

    def stats(self) -> dict[str, Any]:
        """Counts per namespace, rewarded vs pending, reward summary, embedder."""
        total = rewarded = 0
        per_ns: dict[str, int] = {}
        rs: list[float] = []
        for metas in self._metadata_pages():
            for m in metas:
                total += 1
                ns = str(m.get(NS, "default"))
                per_ns[ns] = per_ns.get(ns, 0) + 1
                if m.get(HAS_REWARD):
                    rewarded += 1
                    rs.append(float(m[REWARD]))
        arr = np.asarray(rs, np.float64)
        return {
            "collection": self.config.collection,
            "mode": self.config.mode,
            "embedder": self.embedder.name,
            "dim": self.embedder.dim,
            "total": total,
            "rewarded": rewarded,
            "pending": total - rewarded,
            "namespaces": per_ns,
            "reward_mean": float(arr.mean()) if arr.size else None,
            "reward_min": float(arr.min()) if arr.size else None,
            "reward_max": float(arr.max()) if arr.size else None,
        }
