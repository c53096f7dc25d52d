"""Middleware for ``langchain.agents.create_agent``: recall before, record after.

>>> agent = create_agent(model, tools, middleware=[MemoryDistillMiddleware(store, predictor)])

* ``before_agent``: recalls the ``k`` most relevant past episodes (value-aware retriever) for the
  user's message; ``wrap_model_call`` adds them to the system prompt of every model call.
* ``wrap_tool_call``: a tool exception becomes an error ``ToolMessage`` (so the run continues and
  is still recorded), or with ``handle_tool_errors=False`` the failed episode is recorded and the
  exception re-raised.
* ``after_agent``: records the episode (input, tool calls, answer) with its reward when
  ``reward_fn`` gives one, ``failure_reward`` when a tool failed, else pending for a later
  :meth:`feedback`. The id is returned in the state as ``memory_distill_episode_id``.

Memory never takes the agent down (``errors="warn"``, the default): when the store is unreachable
(a Chroma server restarting) the run goes on without recall, and its episode is kept in
:attr:`~MemoryDistillMiddleware.unsaved` and written with the next episode that gets through (or
:meth:`~MemoryDistillMiddleware.flush`); a ``reward_fn`` that raises leaves the episode pending.
``errors="raise"`` propagates every such error instead.

``background=True`` returns the run without waiting for the write or ``reward_fn``: a grader and a writer
thread (:class:`~langchain_memory_distill.episodes.EpisodeWriter`) do them; :meth:`flush` waits for both,
and what is queued is written when the process exits.

``namespace`` may be a function of the run's runtime (``lambda rt: f"user-{rt.context.user_id}"``): one agent
then records, recalls and scores each run in its own namespace (``predictor_for``, set by :meth:`from_memory`,
gives the model serving it).

Every hook has its async twin.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, NotRequired

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage

from memory_distill.predictor import Predictor
from memory_distill.store import MemoryStore
from memory_distill.types import check_flag

from .episodes import (
    EpisodeWriter,
    Errors,
    NamespaceFn,
    check_callable_as,
    check_episode_settings,
    check_store,
    current_thread_id,
    episode_from_messages,
    episode_metadata,
    message_text,
    record_episode,
    run_namespace,
)
from .retriever import PredictorLike, ValueAwareRetriever
from .tools import make_recall_tool

__all__ = ["MemoryDistillMiddleware", "MemoryDistillState"]

log = logging.getLogger(__name__)

RewardFn = Callable[[str, str, list[Any]], float | None]


class MemoryDistillState(AgentState):
    """The agent state the middleware adds: the recalled episodes (as put in the system prompt) and the id of the
    episode recorded for the run (for a later :meth:`MemoryDistillMiddleware.feedback`)."""

    memory_distill_recall: NotRequired[str]
    memory_distill_episode_id: NotRequired[str]


class MemoryDistillMiddleware(AgentMiddleware):
    """Episodic memory for ``create_agent``: recall past episodes before a run, record the run after it.

    ``store``: the :class:`~memory_distill.MemoryStore`; ``predictor``: the student that scores recalled episodes
    (a :class:`~memory_distill.Predictor`, a function returning the one to use now, or ``None`` for stored rewards;
    :meth:`from_memory` wires it to a :class:`~memory_distill.MemoryDistill`).

    * ``k``, ``diversity``, ``retriever``: what recall brings back (``retriever`` replaces the default
      :class:`ValueAwareRetriever` and brings its own predictor, k and diversity: giving those too is an error);
      ``recall=False`` / ``record=False`` turn either half off.
    * ``namespace``: where episodes live, or a function of the run's runtime (one agent, many users);
      ``predictor_for``: the predictor serving a namespace (``mem.try_predictor``).
    * ``reward_fn(question, answer, messages)``: grades each run (``None`` leaves it pending for :meth:`feedback`);
      ``failure_reward``: the reward of a run whose tool failed; ``handle_tool_errors``: turn tool exceptions
      into error messages so the run goes on.
    * ``metadata``: recorded with every episode (e.g. ``{"agent": "planner-v2"}``); ``expose_recall_tool``: also
      give the model a ``recall_past_episodes`` tool.
    * ``errors`` (``"warn"``: memory never takes the agent down; ``"raise"``), ``max_unsaved`` (episodes kept
      while the store is away), ``background`` (grade and write off the agent's path).
    """

    state_schema = MemoryDistillState

    def __init__(
        self,
        store: MemoryStore,
        predictor: PredictorLike = None,
        *,
        k: int = 3,
        namespace: str | NamespaceFn = "default",
        predictor_for: Callable[[str], Predictor | None] | None = None,
        diversity: float = 0.0,
        recall: bool = True,
        record: bool = True,
        reward_fn: RewardFn | None = None,
        failure_reward: float | None = 0.0,
        handle_tool_errors: bool = True,
        expose_recall_tool: bool = False,
        metadata: dict[str, Any] | None = None,
        retriever: ValueAwareRetriever | None = None,
        errors: Errors = "warn",
        max_unsaved: int = 1000,
        background: bool = False,
    ) -> None:
        super().__init__()
        store = check_store(store, "MemoryDistillMiddleware")
        if not (isinstance(namespace, str) or callable(namespace)):
            raise TypeError(f"namespace must be a string or a function of the run's runtime, got "
                            f"{type(namespace).__name__}")
        if callable(namespace):
            check_callable_as(namespace, (None,), "namespace= must be a function of the run's runtime, "
                              "e.g. lambda runtime: f\"user-{runtime.context.user_id}\"")
        fixed = namespace if isinstance(namespace, str) else "default"
        recall, record, handle_tool_errors, expose_recall_tool = (  # (recall="no" recalled)
            check_flag(recall, "recall", "put past episodes in the prompt"),
            check_flag(record, "record", "store each run as an episode"),
            check_flag(handle_tool_errors, "handle_tool_errors", "a failing tool's error goes to the model"),
            check_flag(expose_recall_tool, "expose_recall_tool", "give the model a recall tool"))
        if predictor_for is not None and not callable(predictor_for):
            raise TypeError(f"predictor_for must be a function namespace -> Predictor or None (e.g. "
                            f"mem.try_predictor), got {type(predictor_for).__name__}")
        if retriever is not None and not isinstance(retriever, ValueAwareRetriever):
            raise TypeError(f"retriever must be a ValueAwareRetriever, got {type(retriever).__name__}")
        if retriever is not None and (predictor is not None or k != 3 or diversity != 0.0):
            raise ValueError("pass retriever= or predictor= / k= / diversity=, not both: the retriever's own settings "
                             "are the ones used, so set them on it")
        self.store = store
        self.writer = EpisodeWriter(store, errors=errors, max_unsaved=max_unsaved, background=background)
        self.retriever = retriever or ValueAwareRetriever(store=store, predictor=predictor, k=k, namespace=fixed,
                                                          diversity=diversity)
        self.namespace = namespace
        self.predictor_for = predictor_for
        self.do_recall, self.do_record = recall, record
        self.reward_fn = reward_fn
        self.metadata = check_episode_settings(store, metadata, fixed, failure_reward, reward_fn)
        self.failure_reward = failure_reward
        self.handle_tool_errors = handle_tool_errors
        self.tools = ([make_recall_tool(self.retriever, namespace=None if isinstance(namespace, str) else namespace,
                                        predictor_for=predictor_for)] if expose_recall_tool else [])
        self.episode_ids: list[str] = []
        """Ids of the episodes this recorded, oldest first (the last ``RECENT_IDS``, 10,000)."""
        self.errors = errors

    @classmethod
    def from_memory(cls, mem: Any, *, namespace: str | NamespaceFn = "default", **kw: Any) -> MemoryDistillMiddleware:
        """Middleware on ``mem`` (a :class:`~memory_distill.MemoryDistill`) for one namespace, or for each run's
        own (``namespace`` a function of the run's runtime, e.g. ``lambda rt: f"user-{rt.context.user_id}"``).

        Recall scores with the model serving the run's namespace, picked up as it is published (stored
        rewards before the first consolidation); no restart needed when a model appears.
        """
        if isinstance(namespace, str):
            predictor = None if "retriever" in kw else (lambda: mem.try_predictor(namespace))  # (the retriever's own)
            return cls(mem.store, predictor, namespace=namespace, **kw)
        return cls(mem.store, None, namespace=namespace, predictor_for=mem.try_predictor, **kw)

    def _recall_kwargs(self, runtime: Any) -> dict[str, Any]:
        """The retriever's per-call arguments for this run: its namespace and the predictor serving it."""
        if isinstance(self.namespace, str):
            return {}
        ns = run_namespace(self.namespace, runtime)
        kw: dict[str, Any] = {"namespace": ns}
        if self.predictor_for is not None:  # a provider: it hands back a refreshed predictor (not refreshed twice)
            kw["predictor"] = functools.partial(self.predictor_for, ns)
        return kw

    # ------------------------------------------------------------------ recall

    def _recall_text(self, state: Any, runtime: Any = None) -> str | None:
        query = next((message_text(m) for m in reversed(state["messages"]) if isinstance(m, HumanMessage)), "")
        if not query.strip():  # (no count of the namespace first: a filtered count reads every row)
            return None
        k = self.retriever.k
        seen: set[str] = set()
        docs = []
        thread = current_thread_id()
        for d in self.retriever.invoke(query, k=2 * k, **self._recall_kwargs(runtime)):  # duplicates show once
            if thread is not None and d.metadata.get("thread_id") == thread:
                continue  # an earlier turn of this conversation: the model sees it in the messages already
            if d.page_content not in seen:
                seen.add(d.page_content)
                docs.append(d)
        docs = docs[:k]
        if not docs:
            return None
        lines = ["Relevant past episodes (reward / predicted reward), learn from what paid off:"]
        for d in docs:
            m = d.metadata
            r = "pending" if m.get("reward") is None else f"{m['reward']:.2f}"
            p = "" if m.get("predicted_mean") is None else f", predicted {m['predicted_mean']:.2f}±{m['predicted_std']:.2f}"
            lines.append(f"- [reward {r}{p}] {d.page_content[:600]}")
        return "\n".join(lines)

    def before_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if not self.do_recall:
            return None
        try:
            text = self._recall_text(state, runtime)
        except Exception as e:
            if self.errors == "raise":
                raise
            log.warning("memory_distill: recall skipped, the run goes on without it (%s: %s)", type(e).__name__, e)
            return None
        return {"memory_distill_recall": text} if text else None

    async def abefore_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.before_agent, state, runtime)

    def _with_recall(self, request: ModelRequest) -> ModelRequest:
        recall = str((request.state or {}).get("memory_distill_recall") or "")
        if not recall:
            return request
        base = message_text(request.system_message) if request.system_message is not None else ""
        return request.override(system_message=SystemMessage(content=(base + "\n\n" + recall).strip()))

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        return handler(self._with_recall(request))

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[ModelResponse]]) -> Any:
        return await handler(self._with_recall(request))

    # ------------------------------------------------------------------ tools

    def _tool_error(self, request: Any, e: Exception) -> ToolMessage:
        tc = request.tool_call
        if not self.handle_tool_errors:
            msgs = list((request.state or {}).get("messages", []))
            msgs.append(ToolMessage(content=f"{type(e).__name__}: {e}", tool_call_id=tc["id"], name=tc["name"], status="error"))
            self._record(msgs, failed=True, runtime=getattr(request, "runtime", None))
            raise e
        log.info("tool %s failed: %s", tc["name"], e)
        return ToolMessage(content=f"Tool error: {type(e).__name__}: {e}", tool_call_id=tc["id"], name=tc["name"],
                           status="error")

    def wrap_tool_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(request)
        except Exception as e:
            return self._tool_error(request, e)

    async def awrap_tool_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        try:
            return await handler(request)
        except Exception as e:
            return self._tool_error(request, e)

    # ------------------------------------------------------------------ record

    def _record(self, messages: list[Any], *, failed: bool = False, runtime: Any = None) -> str | None:
        ep = episode_from_messages(messages)
        if not ep["input"]:
            return None
        failed = failed or ep["tool_errors"] > 0
        meta = episode_metadata(ep["input"], ep["model"], self.metadata, thread_id=current_thread_id(),
                                source="langchain_agent",
                                tool_calls=ep["tool_calls"], tool_errors=ep["tool_errors"],
                                outcome="failed" if failed else "completed")
        grade = self.writer.grader(self.reward_fn, ep["input"], ep["answer"], messages, failed=failed,
                                   failure_reward=self.failure_reward)
        mid = record_episode(self.writer, self.episode_ids, ep["text"], meta, self.namespace, runtime, grade)
        return mid

    @property
    def unsaved(self) -> OrderedDict[str, dict[str, Any]]:
        """Episodes not written yet, oldest first, by id: those whose write failed (store unreachable) and, with
        ``background=True``, those queued for the writer thread; written by :meth:`flush`."""
        return self.writer.unsaved

    def flush(self) -> int:
        """Write the episodes waiting in :attr:`unsaved` in one atomic batch; returns how many this call wrote.

        With ``background=True`` it first waits for the episodes recorded before it (graded and written by the
        background threads). Raises the store's error when it is still unreachable (they stay waiting)."""
        return self.writer.flush()

    def close(self) -> None:
        """Write what is waiting (:meth:`flush`) and stop the background threads, if any."""
        self.writer.close()

    def after_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        if not self.do_record:
            return None
        mid = self._record(list(state["messages"]), runtime=runtime)
        return {"memory_distill_episode_id": mid} if mid else None

    async def aafter_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.after_agent, state, runtime)

    def feedback(self, episode_id: str, reward: float) -> None:
        """Record a reward that arrived after the run (user rating, test result, ...).

        An episode still waiting in :attr:`unsaved` gets the reward there and is written with it."""
        self.writer.set_reward(episode_id, reward)
