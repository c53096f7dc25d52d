"""A LangChain ``VectorStore`` on a :class:`~memory_distill.MemoryStore`: documents in, memories out.

``MemoryDistillVectorStore(mem.store)`` plugs the episodic memory into anything that takes a LangChain
``VectorStore``: ``as_retriever(search_type="mmr")``, RAG chains, LangChain's indexing API
(``langchain_core.indexing.index`` with a record manager: ``add_documents`` with ids and ``delete``), and
the standard ``similarity_search*`` / ``max_marginal_relevance_search*`` / ``get_by_ids`` calls, sync and
async. It passes langchain-tests' ``VectorStoreIntegrationTests``.

* A document is one memory of ``namespace`` (``"default"``): ``page_content`` is the text, the metadata
  is its metadata (scalars, as Chroma keeps them), and ``metadata["reward"]`` (``reward_key``), when present,
  is its reward, so rewarded documents feed consolidation like any episode. A document's ``id`` (or the
  ``ids=`` given) is the memory id; adding an id again replaces that memory. Ids are unique across the
  store: an id held by another namespace's memory is refused, not taken over.
* ``similarity_search_with_score`` returns cosine similarity (higher is closer). With a ``predictor`` (or a
  function returning one, e.g. ``mem.try_predictor``) and ``value_weight`` > 0, results are re-ranked by
  ``(1 - value_weight) * similarity + value_weight * predicted value`` and that is the score.
* ``filter`` is a metadata filter (``{"source": "a.md"}``, ``{"reward": {"$gte": 0.5}}``, ``$and`` / ``$or``). Its
  keys are the documents' own metadata keys, even ones named like memory fields (``namespace``,
  ``created_at``); ``reward_key`` is the reward.
* ``delete(ids)`` removes those memories of the namespace (missing ids are ignored); ``delete()`` without
  ids refuses rather than emptying the namespace (use ``MemoryStore.delete(namespace=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from memory_distill.embeddings import LangChainEmbedder, as_embedder
from memory_distill.errors import InvalidMemoryError
from memory_distill.store import MEMORY_FIELDS, USER_KEY, MemoryStore, id_list, query_vector
from memory_distill.types import Memory, SearchHit

from .embeddings import MemoryDistillEmbeddings
from .episodes import check_store
from .retriever import PredictorLike, check_value_options, resolve_predictor, value_blend

__all__ = ["MemoryDistillVectorStore"]


def _vector(embedding: Any) -> np.ndarray:
    """The ``*_by_vector`` searches' embedding (a str here is text, which those searches do not embed)."""
    if isinstance(embedding, str):
        raise TypeError("the *_by_vector searches take an embedding (a list of floats), got a str: search text with "
                        "similarity_search / max_marginal_relevance_search")
    return query_vector(embedding)


class MemoryDistillVectorStore(VectorStore):
    """LangChain's ``VectorStore`` interface on a memory_distill :class:`MemoryStore` (one namespace)."""

    def __init__(self, store: MemoryStore, *, namespace: str = "default", predictor: PredictorLike = None,
                 value_weight: float = 0.0, reward_key: str = "reward") -> None:
        self.store = check_store(store, "MemoryDistillVectorStore")
        if not isinstance(namespace, str) or not namespace.strip():  # (every search answered nothing)
            raise ValueError(f"namespace must be a namespace's name (a non-empty str), got {namespace!r}")
        self.namespace = namespace
        self.predictor, self.value_weight, self.reward_key = check_value_options(
            "MemoryDistillVectorStore", predictor, value_weight, reward_key)

    @classmethod
    def from_memory(cls, mem: Any, *, namespace: str = "default", value_weight: float = 0.3,
                    **kw: Any) -> MemoryDistillVectorStore:
        """A vector store on ``mem`` (a :class:`~memory_distill.MemoryDistill`) whose searches weigh in the
        namespace's student once one is published (similarity alone until then)."""
        return cls(mem.store, namespace=namespace, value_weight=value_weight,
                   predictor=lambda: mem.try_predictor(namespace), **kw)

    @property
    def embeddings(self) -> Embeddings:
        e = self.store.embedder
        return e.embeddings if isinstance(e, LangChainEmbedder) else MemoryDistillEmbeddings.from_embedder(e)

    # ------------------------------------------------------------------ writes

    def add_texts(self, texts: Iterable[str], metadatas: list[dict[str, Any]] | None = None, *,
                  ids: list[str] | None = None, **kwargs: Any) -> list[str]:
        """Store the texts as memories of the namespace (one atomic batch); an id already stored is replaced."""
        if isinstance(texts, str):  # a str is iterable: each character would be stored as a text
            raise TypeError("add_texts takes a list of texts, got one str: pass [text]")
        texts = list(texts)
        if ids is not None:
            ids = id_list(ids, allow_none=True)
        if isinstance(metadatas, Mapping | str):  # (a dict failed as KeyError: 0)
            raise TypeError(f"metadatas takes one dict (or None) per text, got one {type(metadatas).__name__}: pass "
                            "[metadata, ...]")
        if metadatas is not None and len(metadatas) != len(texts):
            raise InvalidMemoryError(f"metadatas has {len(metadatas)} entries for {len(texts)} texts: give one each")
        if ids is not None and len(ids) != len(texts):
            raise InvalidMemoryError(f"ids has {len(ids)} entries for {len(texts)} texts: give one each")
        items = []
        for i, text in enumerate(texts):
            meta = dict((metadatas or [{}] * len(texts))[i] or {})
            reward = meta.pop(self.reward_key, None)
            item: dict[str, Any] = {"text": text, "reward": reward, "metadata": meta}
            if ids is not None and ids[i] is not None:
                item["id"] = ids[i]
            items.append(item)
        # without ids every memory is new: a plain add (Chroma's upsert costs about twice as much); with ids,
        # never take over another namespace's memory
        upsert = any("id" in it for it in items)
        return self.store.add_many(items, namespace=self.namespace, upsert=upsert, within_namespace=upsert)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        if ids is None:
            raise ValueError("delete() needs ids: to empty the namespace, call "
                             f"MemoryStore.delete(namespace={self.namespace!r})")
        if ids:
            self.store.delete(id_list(ids), namespace=self.namespace)
        return True

    # ------------------------------------------------------------------ reads

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [self._doc(m) for m in self.store.get_many(id_list(ids)) if m.namespace == self.namespace]

    def _doc(self, m: Memory) -> Document:
        meta: dict[str, Any] = dict(m.metadata)
        if m.reward is not None:
            meta[self.reward_key] = m.reward
        return Document(id=m.id, page_content=m.text, metadata=meta)

    def _filter(self, flt: Any) -> Any:
        """A document filter as a store ``where``: ``reward_key`` is the memory's reward, every other key the
        document's own metadata, even one named like a memory field (``namespace``, ``created_at``)."""
        if isinstance(flt, dict):
            out: dict[str, Any] = {}
            for k, v in flt.items():
                if k in ("$and", "$or"):
                    out[k] = [self._filter(c) for c in v] if isinstance(v, list | tuple) else v
                elif k == self.reward_key:
                    out["reward"] = v
                elif k in MEMORY_FIELDS:
                    out[USER_KEY + k] = v
                else:
                    out[k] = v
            return out
        return flt

    def _ranked(self, query: str | np.ndarray, k: int, flt: dict[str, Any] | None, *,
                diversity: float = 0.0, fetch_k: int | None = None, **kwargs: Any) -> list[tuple[Document, float]]:
        # LangChain passes its own options along (score_threshold); these two would be our names, silently unread
        if "where" in kwargs:
            raise ValueError("a vector store's metadata filter is filter=, not where= (the MemoryStore's name)")
        if "namespace" in kwargs:
            raise ValueError(f"this vector store serves namespace {self.namespace!r}: build one per namespace "
                             "(MemoryDistillVectorStore(store, namespace=...))")
        if flt is not None and not isinstance(flt, dict):  # (the store's error named where=, which is not ours)
            raise ValueError(f"filter must be a dict of metadata conditions, e.g. {{'source': 'a.md'}}, got "
                             f"{type(flt).__name__} {flt!r:.60}")
        flt = self._filter(flt) if flt else None
        pred = resolve_predictor(self.predictor) if self.value_weight > 0 else None
        if pred is None:
            hits = self.store.search(query, k, namespace=self.namespace, where=flt, diversity=diversity,
                                     fetch_k=fetch_k)
            return [(self._doc(h.memory), h.similarity) for h in hits]
        # the value re-ranks a wider pool of the most similar (or the MMR picks among them)
        pool: list[SearchHit] = self.store.search(query, max(4 * k, 20) if diversity == 0 else k,
                                                  namespace=self.namespace, where=flt, include_embeddings=True,
                                                  diversity=diversity, fetch_k=fetch_k)
        if not pool:
            return []
        score = value_blend(pred, np.array([h.similarity for h in pool]), np.stack([np.asarray(h.embedding) for h in pool]),
                            [h.memory for h in pool], self.value_weight)
        order = np.argsort(-score, kind="stable")[:k]
        return [(self._doc(pool[i].memory), float(score[i])) for i in order]

    def similarity_search_with_score(self, query: str, k: int = 4, filter: dict[str, Any] | None = None,
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        """The k closest documents with their cosine similarity (or value-weighted score)."""
        return self._ranked(query, k, filter, **kwargs)

    def similarity_search(self, query: str, k: int = 4, filter: dict[str, Any] | None = None,
                          **kwargs: Any) -> list[Document]:
        return [d for d, _ in self._ranked(query, k, filter, **kwargs)]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4,
                                    filter: dict[str, Any] | None = None, **kwargs: Any) -> list[Document]:
        return [d for d, _ in self._ranked(_vector(embedding), k, filter, **kwargs)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda score: min(1.0, max(0.0, score))  # cosine similarity, negatives as unrelated

    @staticmethod
    def _diversity(lambda_mult: float) -> float:
        # LangChain's MMR: lambda * sim - (1 - lambda) * max_sim; ours: sim - diversity * max_sim (same order)
        if not 0.0 <= lambda_mult <= 1.0:
            raise ValueError(f"lambda_mult must be in [0, 1], got {lambda_mult}")
        return (1.0 - lambda_mult) / max(lambda_mult, 1e-6)

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
                                      filter: dict[str, Any] | None = None, **kwargs: Any) -> list[Document]:
        return [d for d, _ in self._ranked(query, k, filter, diversity=self._diversity(lambda_mult),
                                           fetch_k=fetch_k, **kwargs)]

    def max_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4, fetch_k: int = 20,
                                                lambda_mult: float = 0.5, filter: dict[str, Any] | None = None,
                                                **kwargs: Any) -> list[Document]:
        return [d for d, _ in self._ranked(_vector(embedding), k, filter,
                                           diversity=self._diversity(lambda_mult), fetch_k=fetch_k, **kwargs)]

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict[str, Any]] | None = None, *,
                   ids: list[str] | None = None, store: MemoryStore | None = None, namespace: str = "default",
                   **kwargs: Any) -> MemoryDistillVectorStore:
        """A vector store holding ``texts``: in ``store``, or in a new ephemeral store embedding with ``embedding`` (a
        LangChain ``Embeddings`` or a memory_distill embedder)."""
        if store is None:
            # a LangChain Embeddings, or one of ours (HashingEmbedder(), OpenAIEmbedder(), ...) as it is
            inner = embedding.embedder if isinstance(embedding, MemoryDistillEmbeddings) else as_embedder(embedding)
            store = MemoryStore.ephemeral(inner)
        vs = cls(store, namespace=namespace, **kwargs)
        vs.add_texts(texts, metadatas, ids=ids)
        return vs
