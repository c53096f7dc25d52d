"""Value-aware retrieval: similar past episodes, re-ranked by how well they are predicted to pay off.

Score of a candidate (all terms in [0, 1])::

    score = w_similarity * cosine_similarity
          + w_value      * value          # "likely_success"; (1 - value) in "cautionary" mode
          + w_recency    * exp(-age / recency_half_life_s)

``value`` is the student's predicted mean reward rescaled to [0, 1] over the model's reward
support; without a published model it is the stored reward (rescaled with the store's
range), and 0.5 when neither exists. Mode ``"similarity"`` ranks by similarity alone.

``diversity`` > 0 picks the k results greedily, maximal-marginal-relevance style: each next pick
maximises ``score - diversity * (its highest cosine similarity to an episode already picked)``,
so near-copies of one episode (an agent retrying the same task) do not fill the prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, field_validator

from memory_distill.errors import nearest_name
from memory_distill.predictor import Predictor
from memory_distill.store import MemoryStore, mmr_select
from memory_distill.types import is_int

from .episodes import check_predictor, check_store

__all__ = ["ValueAwareRetriever", "check_value_options", "check_value_weight", "predicted_value", "resolve_predictor",
           "value_blend"]

Mode = Literal["likely_success", "cautionary", "similarity"]


PredictorLike = Predictor | Callable[[], Predictor | None] | None
"""A predictor, a function returning the one to use now (``None`` while no model is published), or ``None``."""


def resolve_predictor(p: PredictorLike, *, refresh: bool = True) -> Predictor | None:
    """The predictor to score with now: ``p`` itself (refreshed), what a provider function returns, or ``None``
    (also when ``forget`` retired its model: stored rewards rank until a new one is published)."""
    if p is None or isinstance(p, Predictor):
        if p is not None and refresh:
            p.refresh()
        return None if p is None or p.retired else p
    return p()  # a provider returns a refreshed predictor, or None


def check_value_options(who: str, predictor: Any, value_weight: Any, reward_key: Any) -> tuple[PredictorLike, float, str]:
    """The vector store's and the LangGraph store's ``predictor=``, ``value_weight`` and ``reward_key``, checked
    when the adapter is built (each failed at the first search or put before)."""
    return check_predictor_like(predictor, who), check_value_weight(value_weight), check_reward_key(reward_key)


def check_predictor_like(p: Any, who: str) -> PredictorLike:
    """``p`` when it is what ``predictor=`` takes: ``None``, a Predictor, or a function returning one (or ``None``);
    anything else (a MemoryDistill, a version name) failed at the first search."""
    from memory_distill.facade import MemoryDistill

    if p is None or isinstance(p, Predictor) or (callable(p) and not isinstance(p, type)):
        return p  # type: ignore[no-any-return]
    if isinstance(p, MemoryDistill):
        check_predictor(p, who)  # (names the fix for a MemoryDistill)
    raise TypeError(f"{who}'s predictor= takes a Predictor (mem.predictor), a function returning one or None (e.g. "
                    f"mem.try_predictor), or None, got {type(p).__name__} {p!r:.60}")


def check_reward_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"reward_key must be the metadata key holding an item's reward (a non-empty str), got {key!r}")
    return key


def predicted_value(predictor: Predictor, X: np.ndarray,
                    memories: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The student's expected reward of stored memories scaled to [0, 1] over its support, with mean and std."""
    batch = predictor.predict_embeddings(X, texts=[m.text for m in memories], metadata=[m.metadata for m in memories])
    lo, hi = float(predictor.bins.low), float(predictor.bins.high)
    return np.clip((batch.mean - lo) / (hi - lo), 0, 1), batch.mean, batch.std


def check_value_weight(weight: float) -> float:
    """``weight`` when it is a valid ``value_weight`` (in [0, 1]); a clear error otherwise."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"value_weight must be in [0, 1], got {weight}")
    return weight


def value_blend(predictor: Predictor, similarity: np.ndarray, X: np.ndarray, memories: list[Any],
                weight: float) -> np.ndarray:
    """``(1 - weight) * similarity + weight * predicted value``: how the stores weigh in the student."""
    return (1 - weight) * np.asarray(similarity) + weight * predicted_value(predictor, X, memories)[0]


_CALL_OPTIONS = frozenset({"k", "mode", "where", "namespace", "diversity", "fetch_k", "predictor"})
"""What :meth:`ValueAwareRetriever.invoke` takes per call."""


class ValueAwareRetriever(BaseRetriever):
    """Retrieve past episodes from a :class:`MemoryStore`, re-ranked by predicted value.

    ``k``, ``mode``, ``where``, ``namespace``, ``diversity`` and ``predictor`` can be overridden per call:
    ``retriever.invoke("query", k=2, mode="cautionary", where={"tool": "search"})``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")  # a misspelt option is an error

    store: MemoryStore
    predictor: PredictorLike = None
    """The student scoring candidates; or a function returning the one to use now (``None`` while no model
    is published), e.g. ``lambda: mem.try_predictor("team-a")``; ``None``: stored rewards."""
    k: int = Field(default=4, ge=1)
    fetch_k: int = Field(default=20, ge=1)
    """Candidates fetched by similarity before re-ranking (at least ``k``)."""
    mode: Mode = "likely_success"
    namespace: str | None = "default"
    where: dict[str, Any] | None = None
    rewarded_only: bool = False
    w_similarity: float = Field(default=0.6, ge=0.0, allow_inf_nan=False)
    w_value: float = Field(default=0.3, ge=0.0, allow_inf_nan=False)
    w_recency: float = Field(default=0.1, ge=0.0, allow_inf_nan=False)
    recency_half_life_s: float = Field(default=7 * 24 * 3600.0, gt=0.0)
    auto_refresh: bool = True
    """Pick up a newly promoted student before each call."""
    diversity: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    """Penalty on a candidate's highest similarity to the results already picked (0: plain ranking;
    0.3-1: near-duplicates give way to different episodes). Can be set per call."""

    @field_validator("store", mode="before")
    @classmethod
    def _a_store(cls, v: Any) -> Any:
        return check_store(v, "ValueAwareRetriever")  # a MemoryDistill: the fix is from_memory

    @field_validator("namespace")
    @classmethod
    def _a_namespace(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():  # (it recalled nothing, silently)
            raise ValueError(f"namespace {v!r} is empty: give a namespace's name, or None to search every namespace")
        return v

    def model_post_init(self, context: Any, /) -> None:
        if self.w_similarity == self.w_value == self.w_recency == 0:  # every score 0: an arbitrary order
            raise ValueError("w_similarity, w_value and w_recency are all 0, so nothing ranks the candidates: give "
                             "at least one a weight > 0 (the defaults are 0.6, 0.3, 0.1)")
        if self.where:  # a filter Chroma would refuse fails here, not at the first recall
            self.store._where(None, self.where)

    @classmethod
    def from_memory(cls, mem: Any, *, namespace: str = "default", **kw: Any) -> ValueAwareRetriever:
        """A retriever on ``mem`` (a :class:`~memory_distill.MemoryDistill`) for one namespace, scoring with the
        model that serves it (:meth:`~memory_distill.MemoryDistill.try_predictor`): stored rewards until the
        first consolidation, the student afterwards, the namespace's own model once it has one."""
        return cls(store=mem.store, predictor=lambda: mem.try_predictor(namespace), namespace=namespace, **kw)

    def current_predictor(self) -> Predictor | None:
        """The predictor scoring candidates now (refreshed when ``auto_refresh``), or ``None``."""
        return resolve_predictor(self.predictor, refresh=self.auto_refresh)

    def _value(self, hits: list[Any], predictor: Predictor | None,
               X: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if predictor is not None and X is not None:
            return predicted_value(predictor, X, [h.memory for h in hits])
        lo, hi = self.store.config.reward_min, self.store.config.reward_max
        if not (math.isfinite(lo) and math.isfinite(hi)):  # an unbounded range (+-inf): scale over these candidates
            known = [h.memory.reward for h in hits if h.memory.reward is not None]
            if len(set(known)) < 2:  # nothing to tell them apart by (every score was NaN: inf / inf)
                return np.full(len(hits), 0.5), None, None
            lo, hi = min(known), max(known)
        v = np.array([0.5 if h.memory.reward is None else (h.memory.reward - lo) / (hi - lo) for h in hits])
        return np.clip(v, 0, 1), None, None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        unknown = sorted(set(kwargs) - _CALL_OPTIONS)
        if unknown:  # a misspelt option (namepsace=) would silently search with the retriever's own setting
            near = nearest_name(unknown[0], _CALL_OPTIONS)
            raise ValueError(f"unknown retriever option {unknown[0]!r}"
                             + (f": did you mean {near!r}?" if near else f"; the options are {sorted(_CALL_OPTIONS)}"))
        for key in ("k", "mode", "diversity", "fetch_k"):  # None: the retriever's own (namespace=None means all)
            if kwargs.get(key, 0) is None:
                del kwargs[key]
        k = kwargs.get("k", self.k)
        if not is_int(k):  # int(2.7) would quietly return 2
            raise TypeError(f"k must be an int (how many memories to return), got {type(k).__name__} {k!r}")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        mode: Mode = kwargs.get("mode", self.mode)
        if mode not in ("likely_success", "cautionary", "similarity"):
            raise ValueError(f"mode must be 'likely_success', 'cautionary' or 'similarity', got {mode!r}")
        where = kwargs.get("where", self.where)
        namespace = kwargs.get("namespace", self.namespace)
        diversity = float(kwargs.get("diversity", self.diversity))
        if not (diversity >= 0 and math.isfinite(diversity)):
            raise ValueError(f"diversity must be a number >= 0, got {diversity!r}")
        # re-ranking by value or diversity needs a candidate pool; plain similarity needs only k
        fetch = max(k, int(kwargs.get("fetch_k", self.fetch_k))) if mode != "similarity" or diversity > 0 else k
        # per call: a predictor (or provider) for this call's namespace, e.g. the middleware's for a run's user
        predictor = (resolve_predictor(kwargs["predictor"], refresh=self.auto_refresh) if "predictor" in kwargs
                     else self.current_predictor())
        hits = self.store.search(query, fetch, namespace=namespace, where=where,
                                 rewarded_only=kwargs.get("rewarded_only", self.rewarded_only),
                                 include_embeddings=predictor is not None or diversity > 0)
        if not hits:
            return []
        X = np.stack([np.asarray(h.embedding) for h in hits]) if hits[0].embedding is not None else None
        value, mean, std = self._value(hits, predictor, X)
        sim = np.array([h.similarity for h in hits])
        now = time.time()
        age = np.array([max(0.0, now - h.memory.created_at) for h in hits])
        recency = np.exp(-age * math.log(2) / self.recency_half_life_s)
        if mode == "similarity":
            score = sim
        else:
            v = value if mode == "likely_success" else 1.0 - value
            score = self.w_similarity * sim + self.w_value * v + self.w_recency * recency
        if diversity > 0 and X is not None:
            order = mmr_select(score, X, k, diversity)
        else:
            order = [int(i) for i in np.argsort(-score, kind="stable")[:k]]
        docs = []
        for i in order:
            m = hits[i].memory
            meta: dict[str, Any] = dict(m.metadata)
            meta.update({
                "id": m.id, "reward": m.reward, "namespace": m.namespace, "created_at": m.created_at,
                "similarity": float(sim[i]), "value": float(value[i]), "score": float(score[i]),
                "predicted_mean": None if mean is None else float(mean[i]),
                "predicted_std": None if std is None else float(std[i]),
                "model_version": predictor.version if predictor is not None else None,
            })
            docs.append(Document(page_content=m.text, metadata=meta, id=m.id))
        return docs

