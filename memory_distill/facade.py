"""``MemoryDistill``: one object wiring settings -> embedder, store, registry, predictor.

>>> mem = MemoryDistill.open()                       # ./.memory_distill, offline by default
>>> mid = mem.record("Task: ... The agent ...", reward=None)
>>> mem.set_reward(mid, 0.8)                           # rewards may arrive later
>>> mem.consolidate()                                  # teacher -> student -> gate -> publish
>>> mem.predict("Task: ... The agent ...")[0].mean
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .artifacts import ArtifactRegistry
from .config import JobConfig, Settings, StoreConfig, as_config
from .embeddings import Embedder, as_embedder, make_embedder
from .errors import ArtifactError, EmbedderMismatchError, InvalidMemoryError, StoreError
from .jobs import ConsolidationReport, DriftReport, drift_report, forget, run_consolidation
from .predictor import Predictor
from .store import MemoryStore
from .types import Memory, PredictionBatch, RewardPrediction, SearchHit

if TYPE_CHECKING:
    from .health import Finding
    from .transfer import ImportReport

__all__ = ["MemoryDistill"]

log = logging.getLogger(__name__)


class MemoryDistill:
    """Store + registry + predictor for one home directory (or a Chroma server)."""

    MAX_PREDICTORS = 1024
    """Predictors kept, one per namespace asked for, least recently used dropped first (a later call makes it
    again; the weights of a version still served elsewhere in the process are shared, not reloaded)."""

    def __init__(self, store: MemoryStore, registry: ArtifactRegistry, job: JobConfig | None = None) -> None:
        self.store = store
        self.registry = registry
        self.job = job or JobConfig()
        self._predictors: OrderedDict[str | None, Predictor] = OrderedDict()  # by namespace, least recently used first
        self._predictors_lock = threading.Lock()  # agents' threads ask for predictors concurrently

    @classmethod
    def open(cls, home: str | Path | None = None, *, settings: Settings | Mapping[str, Any] | None = None,
             embedder: Embedder | Any | None = None,
             store: StoreConfig | Mapping[str, Any] | None = None) -> MemoryDistill:
        """Open (or create) everything under ``home`` (default ``$MEMORY_DISTILL_HOME`` or ``./.memory_distill``).
        ``settings`` and ``store`` take a config or a dict of its fields (``store={"mode": "ephemeral"}``)."""
        s, emb = cls._resolve(home, settings, embedder, store)
        st = MemoryStore(emb, s.store, path=s.store_path)
        return cls(st, ArtifactRegistry(s.artifacts_path), s.job)

    @classmethod
    def reembed(cls, home: str | Path | None = None, *, settings: Settings | None = None,
                embedder: Embedder | Any | None = None, store: StoreConfig | Mapping[str, Any] | None = None,
                keep_backup: bool = False, force: bool = False,
                progress: Callable[[int, int], None] | None = None) -> MemoryDistill:
        """Move every stored memory to this embedder (:meth:`MemoryStore.reembed`), then open as :meth:`open`.

        For when :meth:`open` refuses the store because the embedder changed (e.g. ``OPENAI_API_KEY``
        was set after the memories were recorded offline). The next :meth:`consolidate` replaces the
        published model, which reads the old vectors.
        """
        s, emb = cls._resolve(home, settings, embedder, store)
        st = MemoryStore.reembed(emb, s.store, path=s.store_path, keep_backup=keep_backup, force=force,
                                 progress=progress)
        return cls(st, ArtifactRegistry(s.artifacts_path), s.job)

    @staticmethod
    def _resolve(home: str | Path | None, settings: Settings | Mapping[str, Any] | None, embedder: Embedder | Any | None,
                 store: StoreConfig | Mapping[str, Any] | None) -> tuple[Settings, Embedder]:
        s = as_config(settings, Settings, "settings") if settings is not None else Settings()
        if home is not None:
            if not isinstance(home, str | os.PathLike):
                raise TypeError(f"home must be a directory path (str or Path), got {type(home).__name__} {home!r}")
            if not str(home).strip():  # ('' opened the working directory itself)
                raise ValueError("home is empty: give a directory path, or None for $MEMORY_DISTILL_HOME or "
                                 "./.memory_distill")
            s = s.model_copy(update={"home": Path(home)})
        if store is not None:
            s = s.model_copy(update={"store": as_config(store, StoreConfig, "store")})
        if s.home.exists() and not s.home.is_dir():
            raise StoreError(f"home {str(s.home)!r} is a file: memory_distill keeps its store, models and cache in a "
                             "directory (created if missing); give a directory path")
        emb = as_embedder(embedder) if embedder is not None else make_embedder(s.embedder, cache_path=s.cache_path)
        return s, emb

    @property
    def embedder(self) -> Embedder:
        return self.store.embedder

    # memories
    def record(self, text: str, reward: float | None = None, *, metadata: Mapping[str, Any] | None = None,
               namespace: str = "default", id: str | None = None, created_at: float | datetime | str | None = None) -> str:
        """Store one episode; returns its id. ``reward``: ``None`` while it is pending (:meth:`set_reward` later);
        ``created_at``: when it happened, for an episode recorded after the fact (Unix seconds, a ``datetime`` with
        a timezone, or ISO 8601 text with an offset; default now)."""
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidMemoryError(f"metadata must be a dict of scalar values, got {type(metadata).__name__}")
        data: dict[str, Any] = {"text": text, "reward": reward, "metadata": dict(metadata or {}), "namespace": namespace}
        if id is not None:
            data["id"] = id
        if created_at is not None:
            data["created_at"] = created_at
        return self.store.add(data)

    def add_many(self, memories: Sequence[Memory | Mapping[str, Any] | str], **kw: Any) -> list[str]:
        return self.store.add_many(memories, **kw)

    def set_reward(self, memory_id: str, reward: float) -> Memory:
        return self.store.set_reward(memory_id, reward)

    def search(self, query: str, k: int = 5, **kw: Any) -> list[SearchHit]:
        return self.store.search(query, k, **kw)

    def forget(self, ids: list[str] | None = None, **kw: Any) -> dict[str, Any]:
        return forget(self.store, self.registry, ids, **kw)

    def export_jsonl(self, path: str | Path | IO[Any], **kw: Any) -> int:
        """Write memories as JSON Lines (:func:`memory_distill.transfer.export_jsonl`); returns the count."""
        from .transfer import export_jsonl

        return export_jsonl(self.store, path, **kw)

    def import_jsonl(self, path: str | Path | IO[Any], **kw: Any) -> ImportReport:
        """Import a JSON Lines file all or nothing (:func:`memory_distill.transfer.import_jsonl`)."""
        from .transfer import import_jsonl

        return import_jsonl(self.store, path, **kw)

    # models
    def consolidate(self, config: JobConfig | Mapping[str, Any] | None = None, *, namespace: str | None = None,
                    **kw: Any) -> ConsolidationReport:
        """Train, gate and publish (:func:`run_consolidation`).

        ``namespace``: train on that namespace only; its models are published, gated and served
        separately (``registry.scoped(namespace)``, :meth:`predictor_for`).
        """
        cfg = as_config(config, JobConfig, "config") if config is not None else self.job
        if namespace is not None and config is not None and cfg.namespace not in (None, namespace):
            # (one of the two was silently dropped)
            raise ValueError(f"namespace={namespace!r} and the config's namespace {cfg.namespace!r} differ: give one")
        if namespace is not None:
            cfg = JobConfig.model_validate({**cfg.model_dump(), "namespace": namespace})  # (checked, unlike a copy)
        report = run_consolidation(self.store, self.registry, cfg, **kw)
        with self._predictors_lock:
            serving = list(self._predictors.values())
        for p in serving:
            p.refresh()
        return report

    @property
    def predictor(self) -> Predictor:
        """The predictor of what :meth:`consolidate` trains: the top-level model (every namespace), or with
        ``JobConfig.namespace`` set that namespace's model; reloaded when a new one is promoted."""
        return self.predictor_for(None)

    def predictor_for(self, namespace: str | None) -> Predictor:
        """The predictor serving ``namespace``: its own model once one was consolidated, else the top-level one.

        ``None``: the namespace this facade's ``JobConfig`` trains (the top-level model by default), so
        ``mem.predict`` serves what ``mem.consolidate`` publishes. Pass it to the LangChain adapters; their
        refresh switches to the namespace's model when it appears.
        """
        if namespace is None:
            namespace = self.job.namespace
        with self._predictors_lock:
            p = self._predictors.get(namespace)
            if p is not None:
                self._predictors.move_to_end(namespace)
        if p is None:
            p = Predictor(self.registry, self.embedder, namespace=namespace)  # (loads outside the lock)
            with self._predictors_lock:
                p = self._predictors.setdefault(namespace, p)
                while len(self._predictors) > self.MAX_PREDICTORS:  # a namespace per user: keep the recent ones
                    self._predictors.popitem(last=False)
        else:
            p.refresh()
        return p

    def try_predictor(self, namespace: str | None = None) -> Predictor | None:
        """:meth:`predictor_for`, or ``None`` while no usable model serves ``namespace``.

        ``None`` before the first consolidation, and when the published model cannot serve this
        store's embedder (after a re-embed, until the next consolidation; logged). Give
        ``mem.try_predictor`` (the method itself) to the LangChain adapters: they use stored rewards
        until a usable model is published, then the model, without a restart.
        """
        if namespace is None:
            namespace = self.job.namespace
        if namespace not in self._predictors and self.registry.serving(namespace).current_version() is None:
            return None
        try:
            p = self.predictor_for(namespace)
        except (ArtifactError, EmbedderMismatchError) as e:
            log.warning("no usable model for namespace %r, using stored rewards: %s", namespace, e)
            return None
        return None if p.retired else p  # its model was retired by forget: stored rewards until the next one

    def predict(self, texts: str | Sequence[str], *,
                metadata: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
                namespace: str | None = None) -> list[RewardPrediction]:
        """The student's predictions; ``metadata`` (one dict per text) when it reads metadata features;
        ``namespace``: by that namespace's model (:meth:`predictor_for`)."""
        return self.predictor_for(namespace).predict(texts, metadata=metadata)

    def predict_batch(self, texts: Sequence[str], *,
                      metadata: Sequence[Mapping[str, Any] | None] | None = None,
                      namespace: str | None = None) -> PredictionBatch:
        return self.predictor_for(namespace).predict_batch(texts, metadata=metadata)

    # async twins for asyncio apps (LangGraph servers, async agents): the same calls on a worker thread, so
    # Chroma I/O, embedding requests and training never block the event loop
    async def arecord(self, text: str, reward: float | None = None, **kw: Any) -> str:
        return await asyncio.to_thread(self.record, text, reward, **kw)

    async def aadd_many(self, memories: Sequence[Memory | Mapping[str, Any] | str], **kw: Any) -> list[str]:
        return await asyncio.to_thread(self.add_many, memories, **kw)

    async def aset_reward(self, memory_id: str, reward: float) -> Memory:
        return await asyncio.to_thread(self.set_reward, memory_id, reward)

    async def asearch(self, query: str, k: int = 5, **kw: Any) -> list[SearchHit]:
        return await asyncio.to_thread(self.search, query, k, **kw)

    async def apredict(self, texts: str | Sequence[str], **kw: Any) -> list[RewardPrediction]:
        return await asyncio.to_thread(self.predict, texts, **kw)

    async def aconsolidate(self, config: JobConfig | Mapping[str, Any] | None = None, **kw: Any) -> ConsolidationReport:
        """:meth:`consolidate` on a worker thread (seconds to minutes of training)."""
        return await asyncio.to_thread(self.consolidate, config, **kw)

    def check(self) -> list[Finding]:
        """Health of the store, every model registry and the embedding cache, errors first, each with its fix
        (:func:`memory_distill.health.check`; CLI ``memory-distill check``). Reads only."""
        from .health import check

        return check(self.store, self.registry, cache_path=getattr(self.store.embedder, "path", None))

    def drift(self, **kw: Any) -> DriftReport:
        return drift_report(self.store, self.registry, **kw)
