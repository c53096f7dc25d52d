"""A LangGraph ``BaseStore`` on a :class:`~memory_distill.MemoryStore`: long-term memory whose rewards train the student.

``create_agent(model, tools, store=MemoryDistillStore(mem.store))`` (or ``graph.compile(store=...)``) gives
tools and nodes the standard LangGraph store API (``put`` / ``get`` / ``search`` / ``delete`` /
``list_namespaces``, sync and async) on Chroma. An item is one memory:

* its LangGraph namespace ``("users", "alice")`` becomes the memory namespace ``"lg:users.alice"``
  (labels cannot contain ``.``), so ``consolidate(namespace="lg:users.alice")`` trains one user's model;
* the value is kept whole (JSON in the metadata); the embedded text is ``value["text"]`` when it is a
  string, else the value as JSON, or the ``fields`` paths given (LangGraph's path syntax);
* ``value["reward"]`` (a number in the store's range; ``reward_key``) is the memory's reward, so items
  an agent stores with an outcome feed consolidation; ``value["group"]`` and other top-level scalar
  fields become metadata (``group`` for best-of-n, ``JobConfig.metadata_features`` for the rest).

``search(prefix, query=...)`` ranks by cosine similarity; with a ``predictor`` (or a function returning
one, e.g. ``lambda: mem.try_predictor()``) and ``value_weight`` > 0 it ranks by
``(1 - value_weight) * similarity + value_weight * predicted value`` (scaled to [0, 1]) and the
item's ``score`` is that. ``filter`` follows LangGraph's semantics (exact match, nested dicts,
``$eq $ne $gt $gte $lt $lte``; a comparison with a missing field does not match); a filtered query
scores every item under the prefix that passes the filter, exactly. Equalities with a string on a
top-level field are pre-selected in Chroma (20k items: 3.1 s -> 64 ms), every candidate still checked here. Items put with ``index=False`` are not ranked: like
LangGraph's ``InMemoryStore``, a query search that finds fewer items than ``limit`` fills the rest with
them, unscored (``score=None``). Searches without a query return items newest-updated first.
``list_namespaces`` reads every item's metadata (O(items)).

TTLs work as in LangGraph's other stores: ``put(..., ttl=minutes)`` (or ``TTLConfig.default_ttl``) sets
an expiry, reads refresh it (``refresh_ttl``; ``TTLConfig.refresh_on_read``, default on),
``sweep_ttl()`` deletes expired items and ``start_ttl_sweeper()`` / ``stop_ttl_sweeper()`` run that in a
background thread every ``sweep_interval_minutes``. Expired items not yet swept are still returned
unless ``TTLConfig.omit_expired`` is set. An item without a TTL never expires. A model trained on an item
that is later deleted or swept away is marked stale by the next consolidation, as ``forget`` would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    TTLConfig,
    get_text_at_path,
)

from memory_distill.errors import InvalidMemoryError, nearest_name
from memory_distill.store import MemoryStore, coerce_memory
from memory_distill.types import Memory, is_int, is_real

from .episodes import check_store
from .retriever import PredictorLike, check_value_options, resolve_predictor, value_blend

__all__ = ["MemoryDistillStore"]

log = logging.getLogger(__name__)

ITEM = "lg_item"
KEY = "lg_key"
NS = "lg_ns"
DEPTH = "lg_depth"
VALUE = "lg_value"
UPDATED = "lg_updated_at"
INDEXED = "lg_indexed"
TTL = "lg_ttl_minutes"
EXPIRES = "lg_expires_at"
_RESERVED = ("lg_", "_md_")


def _json_default(v: Any) -> Any:
    """How a value JSON has no form for is stored: a numpy number as the number (np.float32(0.5) came back as the
    str "0.5"), anything else (a datetime, a UUID) as its str."""
    return v.item() if isinstance(v, np.generic) else str(v)


def _check_put(op: PutOp) -> None:
    """A put's value and ``index``, as LangGraph documents them (each failed later with a bare error)."""
    if not isinstance(op.value, Mapping):
        raise InvalidMemoryError(f"value must be a dict (e.g. {{'text': ...}}), got {type(op.value).__name__}")
    if bad := [k for k in op.value if not isinstance(k, str)]:
        raise InvalidMemoryError(f"value's keys must be str (LangGraph stores JSON objects), got {bad[0]!r}")
    index = op.index
    if not (index is None or index is False or isinstance(index, str)
            or (isinstance(index, list | tuple) and all(isinstance(p, str) for p in index))):
        raise InvalidMemoryError(f"index must be False, None or the field paths to embed (e.g. ['text']), got "
                                 f"{index!r}")


def _level(i: int) -> str:
    return f"lg_ns_{i}"


def _ts(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def _apply(value: Any, op: str, target: Any) -> bool:
    try:
        if op == "$eq":
            return bool(value == target)
        if op == "$ne":
            return bool(value != target)
        if op == "$gt":
            return bool(value > target)
        if op == "$gte":
            return bool(value >= target)
        if op == "$lt":
            return bool(value < target)
        if op == "$lte":
            return bool(value <= target)
    except TypeError:
        return False
    raise ValueError(f"filter operator {op!r} is not supported: use $eq, $ne, $gt, $gte, $lt or $lte")


def _matches(value: Any, flt: Any) -> bool:
    """LangGraph's filter semantics: exact match, nested dicts, comparison operators."""
    if isinstance(flt, dict):
        if any(k.startswith("$") for k in flt):
            return all(_apply(value, k, v) for k, v in flt.items())
        return isinstance(value, dict) and all(_matches(value.get(k), v) for k, v in flt.items())
    return bool(value == flt)


def _does_match(cond: MatchCondition, ns: tuple[str, ...]) -> bool:
    path = tuple(cond.path)
    if len(ns) < len(path):
        return False
    pairs = zip(ns, path, strict=False) if cond.match_type == "prefix" else zip(reversed(ns), reversed(path), strict=False)
    return all(p == "*" or a == p for a, p in pairs)


def _expired(meta: Any, now: float) -> bool:
    """Whether an item carrying a TTL has passed its expiry time (items without one never expire)."""
    return TTL in meta and float(meta.get(EXPIRES, math.inf)) <= now


_TTL_KEYS = ("default_ttl", "refresh_on_read", "sweep_interval_minutes", "omit_expired")


def _check_ttl_config(cfg: Any) -> Any:
    """LangGraph's ``TTLConfig`` (a dict), checked when the store is built: a misspelt key was ignored, a
    ``default_ttl`` of 0 or less failed every later put."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise TypeError(f"ttl_config must be a TTLConfig dict (e.g. {{'default_ttl': 60}}), got {type(cfg).__name__}")
    for key in cfg:
        if key not in _TTL_KEYS:
            near = nearest_name(str(key), _TTL_KEYS)
            raise ValueError(f"unknown ttl_config key {key!r}" + (f": did you mean {near!r}?" if near else
                                                                  f"; the keys are {', '.join(_TTL_KEYS)}"))
    for key in ("default_ttl", "sweep_interval_minutes"):
        v = cfg.get(key)
        if v is not None and (not is_real(v) or not 0 < v < math.inf):
            raise ValueError(f"ttl_config[{key!r}] must be a positive number of minutes or None, got {v!r}")
    return cfg


def _check_page(limit: Any, offset: Any) -> None:
    """limit and offset are counts: a negative one sliced from the end (limit=-1: all items but the last)."""
    for name, v in (("limit", limit), ("offset", offset)):
        if not is_int(v) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")


class MemoryDistillStore(BaseStore):
    """LangGraph's long-term memory store interface, backed by a memory_distill :class:`MemoryStore`."""

    supports_ttl = True

    def __init__(self, store: MemoryStore, *, predictor: PredictorLike = None,
                 value_weight: float = 0.0, fields: list[str] | str | None = None, reward_key: str = "reward",
                 ttl_config: TTLConfig | None = None) -> None:
        self.predictor, self.value_weight, self.reward_key = check_value_options(
            "MemoryDistillStore", predictor, value_weight, reward_key)
        self.ttl_config = _check_ttl_config(ttl_config)
        self._sweeper: concurrent.futures.Future[None] | None = None
        self._stop_sweeper = threading.Event()
        self.store = check_store(store, "MemoryDistillStore")
        self.fields = [fields] if isinstance(fields, str) else fields  # one path, not its letters
        if self.fields is not None and (not isinstance(self.fields, list | tuple)
                                        or not all(isinstance(f, str) and f for f in self.fields)):
            raise ValueError(f"fields must be field paths to embed (str, e.g. 'text' or 'memory.content'), got "
                             f"{fields!r}")

    @classmethod
    def from_memory(cls, mem: Any, *, value_weight: float = 0.3, **kw: Any) -> MemoryDistillStore:
        """A store on ``mem`` (a :class:`~memory_distill.MemoryDistill`) whose query searches weigh in the
        top-level student's predicted value once one is published (similarity alone until then)."""
        return cls(mem.store, predictor=mem.try_predictor, value_weight=value_weight, **kw)

    # ------------------------------------------------------------------ mapping

    @staticmethod
    def memory_namespace(namespace: tuple[str, ...]) -> str:
        """The memory namespace an item of this LangGraph namespace is stored in (``"lg:a.b"``)."""
        name = "lg:" + ".".join(namespace)
        return name if len(name) <= 256 else "lg:" + hashlib.sha256(name.encode()).hexdigest()

    @staticmethod
    def memory_id(namespace: tuple[str, ...], key: str) -> str:
        return "lg-" + hashlib.sha256(json.dumps([list(namespace), key]).encode()).hexdigest()[:40]

    def _text(self, value: Mapping[str, Any], index: list[str] | None) -> str:
        paths = ([index] if isinstance(index, str) else index) if index else self.fields
        if paths:
            parts = [t for p in paths for t in get_text_at_path(value, p) if t]
            if parts:
                return "\n".join(parts)
        if isinstance(value.get("text"), str) and value["text"].strip():
            return str(value["text"])
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=_json_default)

    def _memory(self, op: PutOp) -> Memory:
        value = dict(op.value or {})
        reward = value.get(self.reward_key)
        if reward is not None and not is_real(reward):  # (numpy numbers too)
            raise InvalidMemoryError(f"value[{self.reward_key!r}] must be a number (the item's reward) or absent, "
                                     f"got {reward!r}: store it under another key or pass reward_key=")
        if reward is not None and math.isfinite(reward):  # (a NaN or inf gets the memory's own error)
            self.store._check_reward(float(reward), f"value[{self.reward_key!r}]")
        now = time.time()
        meta: dict[str, Any] = {k: v for k, v in value.items()
                                if isinstance(v, (str, int, float, bool)) and k not in ("text", self.reward_key)
                                and (not isinstance(v, float) or math.isfinite(v))
                                and not k.startswith(_RESERVED) and (not isinstance(v, str) or v)}
        meta.update({ITEM: True, KEY: op.key, NS: json.dumps(list(op.namespace)), DEPTH: len(op.namespace),
                     VALUE: json.dumps(value, ensure_ascii=False, default=_json_default), UPDATED: now,
                     INDEXED: op.index is not False})
        meta.update({_level(i): label for i, label in enumerate(op.namespace)})
        if op.ttl is not None:
            if not is_real(op.ttl) or not 0 < op.ttl < math.inf:
                raise InvalidMemoryError(f"ttl must be a positive number of minutes or None, got {op.ttl!r}")
            meta.update({TTL: float(op.ttl), EXPIRES: now + 60.0 * float(op.ttl)})
        return coerce_memory({"id": self.memory_id(op.namespace, op.key), "text": self._text(value, op.index or None),
                              "reward": reward, "metadata": meta, "namespace": self.memory_namespace(op.namespace),
                              "created_at": now,  # an existing item keeps its own (add_many keep_created)
                              "rewarded_at": now if reward is not None else None})

    @staticmethod
    def _item(m: Memory, cls: type[Item] = Item, score: float | None = None) -> Any:
        md = m.metadata
        kw: dict[str, Any] = {"value": json.loads(str(md[VALUE])), "key": str(md[KEY]),
                              "namespace": tuple(json.loads(str(md[NS]))), "created_at": _ts(m.created_at),
                              "updated_at": _ts(float(md.get(UPDATED, m.created_at)))}  # type: ignore[arg-type]
        return SearchItem(**kw, score=score) if cls is SearchItem else Item(**kw)

    @staticmethod
    def _prefix_where(prefix: tuple[str, ...]) -> dict[str, Any]:
        where: dict[str, Any] = {ITEM: True}
        where.update({_level(i): label for i, label in enumerate(prefix)})
        return where

    # ------------------------------------------------------------------ ops

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        out: list[Result] = []
        for op in ops:
            ns = op.namespace_prefix if isinstance(op, SearchOp) else getattr(op, "namespace", ())
            if isinstance(ns, str):  # a str is a sequence: each letter would become a level ("u", "s", ...)
                raise InvalidNamespaceError(f"a namespace is a tuple of labels, e.g. ({ns!r},), got the str {ns!r}")
            if isinstance(op, GetOp | PutOp) and not isinstance(op.key, str):  # (5 was stored under "5" but found
                # only as 5, and listed as "5")
                raise InvalidMemoryError(f"an item's key must be a str, got {type(op.key).__name__} {op.key!r}: "
                                         f"use str(key)")
            if isinstance(op, PutOp) and op.value is not None:
                _check_put(op)
            if isinstance(op, GetOp):
                got = self._live(self.store.get_many([self.memory_id(op.namespace, op.key)]))
                if got and op.refresh_ttl:
                    self._refresh(got)
                out.append(self._item(got[0]) if got else None)
            elif isinstance(op, PutOp):
                self._put(op)
                out.append(None)
            elif isinstance(op, SearchOp):
                out.append(self._search(op))
            elif isinstance(op, ListNamespacesOp):
                out.append(self._list_namespaces(op))
            else:
                raise ValueError(f"unsupported store operation {type(op).__name__}")
        return out

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        return await asyncio.to_thread(self.batch, list(ops))

    def _put(self, op: PutOp) -> None:
        mid = self.memory_id(op.namespace, op.key)
        if op.value is None:
            self.store.delete([mid])
            return
        self.store.add_many([self._memory(op)], upsert=True, keep_created=True)  # an update keeps created_at

    def _pushdown(self, flt: dict[str, Any] | None) -> dict[str, Any]:
        """The part of a LangGraph filter Chroma can pre-select on: equality with a non-empty string, a finite
        number or a bool on a top-level field (kept as metadata by ``put``). LangGraph's ``==`` holds
        ``True == 1 == 1.0`` where Chroma tells a bool from a number, so a 0/1 or a bool is asked both ways.
        Every candidate is still checked with LangGraph's own semantics; this only narrows what is read (a field
        named like a store field is left alone)."""
        out: dict[str, Any] = {}
        either: list[dict[str, Any]] = []
        for k, v in (flt or {}).items():
            if isinstance(v, dict) and set(v) == {"$eq"}:
                v = v["$eq"]
            if k in ("text", "reward", "namespace", "created_at", self.reward_key) or k.startswith(_RESERVED) \
                    or k.startswith("$"):
                continue
            if isinstance(v, str) and v:
                out[k] = v
            elif isinstance(v, bool):
                either.append({"$or": [{k: v}, {k: int(v)}]})
            elif isinstance(v, int | float) and math.isfinite(v) and abs(v) < 2**63:
                either.append({"$or": [{k: v}, {k: bool(v)}]} if v in (0, 1) else {k: v})
        if either:
            out["$and"] = either
        return out

    def _search(self, op: SearchOp) -> list[SearchItem]:
        _check_page(op.limit, op.offset)
        if op.filter is not None and not isinstance(op.filter, Mapping):  # (an AttributeError on .items)
            raise ValueError(f"filter must be a dict of field conditions, e.g. {{'type': 'preference'}}, got "
                             f"{type(op.filter).__name__} {op.filter!r:.60}")
        where = {**self._prefix_where(op.namespace_prefix), **self._pushdown(op.filter)}
        end = op.offset + op.limit
        if not op.query:  # None or "": a listing, as LangGraph's own stores read a falsy query
            mems = self._live([m for page, _ in self.store.iter_memories(namespace=None, where=where) for m in page
                               if self._passes(m, op.filter)])
            mems.sort(key=lambda m: -float(m.metadata.get(UPDATED, m.created_at)))  # type: ignore[arg-type]
            return self._found(op, [(m, None) for m in mems[op.offset : end]])
        if end < 1:  # limit=0 (or an offset and limit that add up to nothing): nothing, as LangGraph's own stores
            return []
        pred = resolve_predictor(self.predictor) if self.value_weight > 0 else None
        if op.filter:  # exact: every item under the prefix that passes the filter is scored
            mems, vecs, unranked = [], [], []
            for page, X in self.store.iter_memories(namespace=None, where=where, with_embeddings=True):
                for m, v in zip(page, np.asarray(X), strict=True):
                    if self._passes(m, op.filter) and self._live([m]):
                        if m.metadata.get(INDEXED) is True:
                            mems.append(m)
                            vecs.append(v)
                        else:
                            unranked.append(m)
            if not mems:
                return self._found(op, [], unranked)
            q = self.store.embedder.embed([op.query])[0]
            V = np.stack(vecs)
            sim = (V @ q) / np.maximum(np.linalg.norm(V, axis=1) * np.linalg.norm(q), 1e-12)
        else:
            pool = end if pred is None else max(4 * end, 20)  # value re-ranks a wider pool
            hits, unranked = self._nearest(op.query, pool, where, vectors=pred is not None)
            hits = [h for h in hits if self._live([h.memory])]
            unranked = self._live(unranked)
            if not hits:
                return self._found(op, [], unranked)
            mems = [h.memory for h in hits]
            V = np.stack([np.asarray(h.embedding) for h in hits]) if pred is not None else np.empty((0, 0))
            sim = np.array([h.similarity for h in hits])
        score = sim
        if pred is not None:
            score = value_blend(pred, sim, V, mems, self.value_weight)
        order = np.argsort(-score, kind="stable")[op.offset : end]
        return self._found(op, [(mems[i], float(score[i])) for i in order], unranked)

    def _found(self, op: SearchOp, ranked: list[tuple[Memory, float | None]],
               unranked: list[Memory] | None = None) -> list[SearchItem]:
        """The search result: ``ranked`` items, then (a query search short of ``limit``, as LangGraph's
        ``InMemoryStore`` does) the ``unranked`` items put with ``index=False`` under the prefix, newest first,
        without a score; the TTLs of what is returned are refreshed."""
        if unranked and len(ranked) < op.limit:
            rest = [m for m in unranked if self._passes(m, op.filter)]
            rest.sort(key=lambda m: -float(m.metadata.get(UPDATED, m.created_at)))  # type: ignore[arg-type]
            ranked = ranked + [(m, None) for m in rest[: op.limit - len(ranked)]]
        if op.refresh_ttl:
            self._refresh([m for m, _ in ranked])
        return [self._item(m, SearchItem, score) for m, score in ranked]

    def _nearest(self, query: str, k: int, where: dict[str, Any], *, vectors: bool) -> tuple[list[Any], list[Memory]]:
        """The k nearest indexed items passing ``where`` (the prefix) and, when fewer than k of them are live,
        every ``index=False`` item under the prefix (they fill a short result, as in LangGraph's stores).
        ``MemoryStore.search`` checks the prefix on unfiltered candidates first, as Chroma's filter reads every
        row."""
        found = self.store.search(query, k, namespace=None, where={**where, INDEXED: True}, include_embeddings=vectors)
        if len(self._live([h.memory for h in found])) >= k:
            return found, []
        return found, [m for page, _ in self.store.iter_memories(namespace=None, where={**where, INDEXED: False})
                       for m in page]

    @staticmethod
    def _value(m: Memory) -> dict[str, Any]:
        return dict(json.loads(str(m.metadata[VALUE])))

    def _passes(self, m: Memory, flt: dict[str, Any] | None) -> bool:
        return not flt or all(_matches(self._value(m).get(k), v) for k, v in flt.items())

    # ------------------------------------------------------------------ TTL

    def _live(self, mems: list[Memory]) -> list[Memory]:
        """``mems`` without expired items when ``TTLConfig.omit_expired`` is set (else all of them)."""
        if not (self.ttl_config or {}).get("omit_expired", False):
            return mems
        now = time.time()
        return [m for m in mems if not _expired(m.metadata, now)]

    def _refresh(self, mems: list[Memory]) -> None:
        """Restart the TTL clock of the items that have one (a read counts as an access)."""
        now = time.time()
        updates = {m.id: {EXPIRES: now + 60.0 * float(m.metadata[TTL])}  # type: ignore[arg-type]
                   for m in mems if TTL in m.metadata}
        if updates:
            self.store.update_metadata(updates)

    def sweep_ttl(self) -> int:
        """Delete every expired item now; returns how many were deleted."""
        # TTL too: a read's refresh racing a put without a TTL can leave an expiry on an item that has none
        gone = self.store.delete(where={ITEM: True, EXPIRES: {"$lte": time.time()}, TTL: {"$gt": 0}})
        if gone:
            log.info("TTL sweep deleted %d expired item(s)", len(gone))
        return len(gone)

    def start_ttl_sweeper(self, sweep_interval_minutes: float | None = None) -> concurrent.futures.Future[None]:
        """Run :meth:`sweep_ttl` in a background thread every ``sweep_interval_minutes`` (default:
        ``TTLConfig.sweep_interval_minutes``, else 5) until :meth:`stop_ttl_sweeper`. A sweep that fails
        (e.g. the Chroma server is away) is logged and retried at the next interval."""
        if self._sweeper is not None and not self._sweeper.done():
            return self._sweeper
        minutes = sweep_interval_minutes or (self.ttl_config or {}).get("sweep_interval_minutes") or 5
        if not minutes > 0:
            raise ValueError(f"sweep_interval_minutes must be positive, got {minutes!r}")
        self._stop_sweeper.clear()
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def loop() -> None:
            try:
                while not self._stop_sweeper.wait(60.0 * float(minutes)):
                    try:
                        self.sweep_ttl()
                    except Exception:
                        log.exception("TTL sweep failed; retrying in %s minute(s)", minutes)
            finally:
                done.set_result(None)

        threading.Thread(target=loop, name="memory-distill-ttl-sweeper", daemon=True).start()
        self._sweeper = done
        return done

    def stop_ttl_sweeper(self, timeout: float | None = None) -> bool:
        """Stop the background sweeper; ``True`` once it has stopped (or none was running)."""
        if self._sweeper is None:
            return True
        self._stop_sweeper.set()
        try:
            self._sweeper.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return False
        self._sweeper = None
        return True

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        # the items' metadata only (no texts, no Memory objects), each distinct path decoded once
        _check_page(op.limit, op.offset)
        omit, now = (self.ttl_config or {}).get("omit_expired", False), time.time()
        paths: set[str] = set()
        for metas in self.store._metadata_pages(where={ITEM: True}):
            paths.update(str(m[NS]) for m in metas if not (omit and _expired(m, now)))
        seen = {tuple(json.loads(p)) for p in paths}
        spaces = [ns for ns in seen if all(_does_match(c, ns) for c in (op.match_conditions or ()))]
        if op.max_depth is not None:
            spaces = list({ns[: op.max_depth] for ns in spaces})
        return sorted(spaces)[op.offset : op.offset + op.limit]
