"""A callback handler that records episodes for agents you cannot rebuild with middleware.

``agent.invoke(inputs, config={"callbacks": [EpisodeRecorder(store)]})`` records one episode per
root run: the user input, the tool calls and their results or errors, and the final answer.
A root run that raises is recorded as a failed episode. While the store is unreachable, episodes
wait in :attr:`EpisodeRecorder.unsaved` and are written with the next one that gets through
(:class:`~langchain_memory_distill.episodes.EpisodeWriter`). ``namespace`` may be a function of the
run's metadata (``config["metadata"]``, e.g. ``lambda md: f"user-{md['user_id']}"``): one handler then
records each run in its own namespace.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from memory_distill.store import MemoryStore

from .episodes import (
    EpisodeWriter,
    Errors,
    check_callable_as,
    check_episode_settings,
    check_store,
    episode_from_messages,
    episode_metadata,
    message_text,
    record_episode,
    response_model_name,
)

__all__ = ["EpisodeRecorder"]


def _content_text(content: Any) -> str:
    """A message's content given as a tuple's or dict's: text parts joined, as for a ``HumanMessage`` (a multimodal
    list of parts would otherwise be recorded as its Python repr)."""
    if isinstance(content, str):
        return content
    try:
        return message_text(HumanMessage(content=content))
    except Exception:  # not message content at all
        return str(content)


def _input_text(inputs: Any) -> str:
    if isinstance(inputs, dict):
        msgs = inputs.get("messages")
        if msgs:
            for m in reversed(msgs):
                if isinstance(m, HumanMessage):
                    return message_text(m)
                if isinstance(m, tuple) and m[0] in ("user", "human"):
                    return _content_text(m[1])
                if isinstance(m, dict) and m.get("role") in ("user", "human"):
                    return _content_text(m.get("content", ""))
        for key in ("input", "question", "query"):
            if key in inputs:
                return str(inputs[key])
    return str(inputs)


class EpisodeRecorder(BaseCallbackHandler):
    """Records one episode per root run into ``store``: ``config={"callbacks": [EpisodeRecorder(store)]}``.

    ``namespace`` (or a function of the run's ``config["metadata"]``), ``reward_fn``, ``failure_reward``,
    ``metadata``, ``errors``, ``max_unsaved`` and ``background`` work as on
    :class:`~langchain_memory_distill.MemoryDistillMiddleware`; :meth:`feedback` gives a late reward and
    :attr:`episode_ids` lists what it recorded.
    """

    raise_error = False

    def __init__(self, store: MemoryStore, *, namespace: str | Callable[[dict[str, Any]], str] = "default",
                 reward_fn: Callable[[str, str, list[Any]], float | None] | None = None,
                 failure_reward: float | None = 0.0, metadata: dict[str, Any] | None = None,
                 errors: Errors = "warn", max_unsaved: int = 1000, background: bool = False) -> None:
        store = check_store(store, "EpisodeRecorder", has_from_memory=False)  # mem: its store
        self.store = store
        self.writer = EpisodeWriter(store, errors=errors, max_unsaved=max_unsaved, background=background)
        self.errors = errors
        # LangChain swallows (logs) a handler's exceptions unless it says otherwise: errors="raise" must reach the caller
        self.raise_error = errors == "raise"
        if not (isinstance(namespace, str) or callable(namespace)):
            raise TypeError(f"namespace must be a string or a function of the run's metadata, got "
                            f"{type(namespace).__name__}")
        if callable(namespace):
            check_callable_as(namespace, ({},), "namespace= must be a function of the run's metadata, "
                              "e.g. lambda md: f\"user-{md['user_id']}\"")
        self.namespace = namespace
        self.reward_fn = reward_fn
        self.metadata = check_episode_settings(store, metadata, namespace if isinstance(namespace, str) else "default",
                                               failure_reward, reward_fn)
        self.failure_reward = failure_reward
        self.episode_ids: list[str] = []
        """Ids of the episodes this recorded, oldest first (the last ``RECENT_IDS``, 10,000)."""
        self._runs: dict[UUID, dict[str, Any]] = {}
        self._parent: dict[UUID, UUID] = {}  # run -> its parent, for the runs under a recorded root run
        self._members: dict[UUID, list[UUID]] = {}  # recorded root run -> the runs registered under it
        self._lock = threading.Lock()

    def _root(self, run_id: UUID, parent_run_id: UUID | None) -> UUID | None:
        """The recorded root run ``run_id`` belongs to (registering it under its parent the first time)."""
        with self._lock:
            new = parent_run_id is not None and run_id not in self._parent
            if new:
                self._parent[run_id] = parent_run_id  # type: ignore[assignment]
            cur: UUID | None = run_id
            while cur is not None and cur not in self._runs:
                cur = self._parent.get(cur)
            if new:
                if cur is None:  # under no run this handler records: nothing to remember
                    del self._parent[run_id]
                else:
                    self._members.setdefault(cur, []).append(run_id)  # forgotten with the root run
            return cur

    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID,
                       parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        if parent_run_id is None:
            run_meta = dict(kwargs.get("metadata") or {})  # config["metadata"]; LangGraph adds thread_id and the like
            with self._lock:
                self._runs[run_id] = {"input": _input_text(inputs), "tools": [], "model": None,
                                      "thread_id": run_meta.get("thread_id"), "run_metadata": run_meta}
        else:
            self._root(run_id, parent_run_id)

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                            **kwargs: Any) -> None:
        self._root(run_id, parent_run_id)

    def on_llm_end(self, response: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        root = self._root(run_id, parent_run_id)
        if root is None:
            return
        name = response_model_name(getattr(response, "llm_output", None))
        for gens in getattr(response, "generations", None) or []:
            for g in gens:
                name = response_model_name(getattr(getattr(g, "message", None), "response_metadata", None)) or name
        if name:
            self._runs[root]["model"] = name

    def on_tool_start(self, serialized: dict[str, Any] | None, input_str: str, *, run_id: UUID,
                      parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        root = self._root(run_id, parent_run_id)
        if root is not None:
            name = (serialized or {}).get("name") or kwargs.get("name") or "tool"
            self._runs[root]["tools"].append({"run_id": run_id, "name": name, "input": input_str, "result": None, "error": None})

    def _tool(self, run_id: UUID) -> dict[str, Any] | None:
        root = self._root(run_id, None)
        if root is None:
            return None
        return next((t for t in self._runs[root]["tools"] if t["run_id"] == run_id), None)

    def on_tool_end(self, output: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        t = self._tool(run_id)
        if t is not None:
            t["result"] = str(getattr(output, "content", output))[:300]

    def on_tool_error(self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        t = self._tool(run_id)
        if t is not None:
            t["error"] = f"{type(error).__name__}: {error}"

    def _finish(self, run_id: UUID, outputs: Any, error: BaseException | None) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
            for member in self._members.pop(run_id, ()):  # every run under it, however deep
                self._parent.pop(member, None)
        if run is None:
            return
        msgs = outputs.get("messages") if isinstance(outputs, dict) else None
        if msgs and all(isinstance(m, BaseMessage) for m in msgs):
            ep = episode_from_messages(msgs)
            text, answer, n_err = ep["text"], ep["answer"], ep["tool_errors"]
            run["model"] = ep["model"] or run["model"]
        else:
            lines = [f"User: {run['input']}"]
            for t in run["tools"]:
                lines.append(f"Tool call: {t['name']}({t['input']})")
                lines.append(f"Tool error ({t['name']}): {t['error']}" if t["error"] else f"Tool result ({t['name']}): {t['result']}")
            answer = "" if error else (message_text(outputs) if isinstance(outputs, AIMessage) else
                                       str(outputs.get("output", outputs)) if isinstance(outputs, dict) else str(outputs))
            lines.append(f"Answer: {answer or '(none)'}")
            text, n_err = "\n".join(lines), sum(1 for t in run["tools"] if t["error"])
        failed = error is not None or n_err > 0 or any(t["error"] for t in run["tools"])
        if error is not None:
            text += f"\nRun failed: {type(error).__name__}: {error}"
        meta = episode_metadata(str(run["input"]), run["model"], self.metadata, thread_id=run.get("thread_id"),
                                source="langchain_callback",
                                tool_calls=len(run["tools"]), outcome="failed" if failed else "completed")
        grade = self.writer.grader(self.reward_fn if error is None else None, run["input"], answer, msgs or [],
                                   failed=failed, failure_reward=self.failure_reward)
        record_episode(self.writer, self.episode_ids, text, meta, self.namespace, run["run_metadata"], grade)

    @property
    def unsaved(self) -> OrderedDict[str, dict[str, Any]]:
        """Episodes not written yet, oldest first: those whose write failed (store unreachable) and, with
        ``background=True``, those queued for the writer thread; written by :meth:`flush`."""
        return self.writer.unsaved

    def flush(self) -> int:
        """Write the waiting episodes in one atomic batch; returns how many this call wrote (raises if the store
        is still away). With ``background=True`` it first waits for the episodes recorded before it."""
        return self.writer.flush()

    def close(self) -> None:
        """Write what is waiting (:meth:`flush`) and stop the background threads, if any."""
        self.writer.close()

    def feedback(self, episode_id: str, reward: float) -> None:
        """A late reward for a recorded episode (kept with it if it is still waiting to be written)."""
        self.writer.set_reward(episode_id, reward)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        if parent_run_id is None:
            self._finish(run_id, outputs, None)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        if parent_run_id is None:
            self._finish(run_id, None, error)
