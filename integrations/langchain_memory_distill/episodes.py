"""Turn an agent run's messages into one episode text (input, tool calls, results, answer)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from memory_distill.store import MemoryStore

__all__ = ["EpisodeWriter", "episode_from_messages", "episode_metadata", "input_group", "message_text",
           "response_model_name"]

log = logging.getLogger(__name__)
Errors = Literal["warn", "raise"]


class EpisodeWriter:
    """Writes recorded episodes to the store, keeping them when it is unreachable.

    ``errors="warn"``: an episode whose write fails waits in :attr:`unsaved` (at most
    ``max_unsaved``, oldest dropped first) and is written, in one atomic batch with the others
    waiting, with the next episode that gets through or by :meth:`flush`. ``errors="raise"``:
    the store's error propagates (the episode still waits for a later flush).
    """

    def __init__(self, store: MemoryStore, *, errors: Errors = "warn", max_unsaved: int = 1000) -> None:
        if errors not in ("warn", "raise"):
            raise ValueError(f"errors must be 'warn' or 'raise', got {errors!r}")
        if max_unsaved < 1:
            raise ValueError(f"max_unsaved must be >= 1, got {max_unsaved}")
        self.store, self.errors, self.max_unsaved = store, errors, max_unsaved
        self.unsaved: OrderedDict[str, dict[str, Any]] = OrderedDict()
        """Episodes whose write failed, oldest first, by id."""
        self._lock = threading.Lock()

    def grade(self, reward_fn: Callable[[str, str, list[Any]], float | None] | None, question: str, answer: str,
              messages: list[Any]) -> float | None:
        """``reward_fn``'s reward for an episode, checked against the store's range. With ``errors="warn"`` a
        reward_fn that raises or returns a bad reward leaves the episode pending (``None``, logged)."""
        if reward_fn is None:
            return None
        try:
            reward = reward_fn(question, answer, messages)
            self.store._check_reward(reward, "reward_fn's reward")
            return reward
        except Exception as e:
            if self.errors == "raise":
                raise
            log.warning("memory_distill: reward_fn failed (%s: %s); the episode stays pending", type(e).__name__, e)
            return None

    def write(self, text: str, reward: float | None, metadata: dict[str, Any], namespace: str) -> str:
        """Store one episode (now, or once the store is back); returns its id."""
        mid = uuid.uuid4().hex
        now = time.time()
        memory: dict[str, Any] = {"id": mid, "text": text, "reward": reward, "metadata": metadata,
                                  "namespace": namespace, "created_at": now}
        if reward is not None:
            self.store._check_reward(reward, "reward")
            memory["rewarded_at"] = now
        with self._lock:
            self.unsaved[mid] = memory
            while len(self.unsaved) > self.max_unsaved:
                old, _ = self.unsaved.popitem(last=False)
                log.warning("memory_distill: dropped unsaved episode %s (more than max_unsaved=%d waiting)",
                            old, self.max_unsaved)
        self._try_flush(f"episode {mid} not written yet")
        return mid

    def flush(self) -> int:
        """Write every waiting episode in one atomic batch; returns how many. Raises if the store is still away."""
        with self._lock:
            batch = list(self.unsaved.values())
            if not batch:
                return 0
            self.store.add_many(batch, upsert=True)  # upsert: idempotent if an earlier try got through
            for m in batch:
                self.unsaved.pop(m["id"], None)
        return len(batch)

    def set_reward(self, episode_id: str, reward: float) -> None:
        """A late reward: on the waiting copy if the episode is not written yet, else in the store."""
        with self._lock:
            waiting = self.unsaved.get(episode_id)
            if waiting is not None:
                self.store._check_reward(reward, "reward")
                waiting.update(reward=reward, rewarded_at=time.time())
        if waiting is None:
            self.store.set_reward(episode_id, reward)
        else:
            self._try_flush(f"episode {episode_id} still waiting")

    def _try_flush(self, what: str) -> None:
        try:
            self.flush()
        except Exception as e:
            if self.errors == "raise":
                raise
            log.warning("memory_distill: %s, %d waiting (%s: %s); retried with the next episode or flush()",
                        what, len(self.unsaved), type(e).__name__, e)


def input_group(user_input: str) -> str:
    """The ``group`` recorded episodes get by default: one per user input (case and whitespace folded).

    Attempts at the same input (retries, best-of-n samples, several agents on one benchmark
    question) share it, so consolidation never splits them across train and held-out rows and can
    fit the best-of-n ranking head on them (:mod:`memory_distill.ranking`).
    """
    norm = " ".join(user_input.lower().split())
    return "input:" + hashlib.sha1(norm.encode("utf-8")).hexdigest()[:16]


def message_text(m: BaseMessage) -> str:
    c = m.content
    if isinstance(c, str):
        return c
    parts = []
    for block in c:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return " ".join(parts)


def episode_from_messages(messages: Sequence[BaseMessage], *, max_result_chars: int = 300) -> dict[str, Any]:
    """``{"text", "input", "answer", "tool_calls", "tool_errors", "model"}`` for the last user turn.

    ``model``: the chat model that answered, from the last AI message's ``response_metadata``
    (``model_name`` or ``model``, as the provider integrations set it), else ``None``.
    """
    start = 0
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], HumanMessage):
            start = i
            break
    turn = list(messages[start:])
    user = message_text(turn[0]) if turn and isinstance(turn[0], HumanMessage) else ""
    lines = [f"User: {user}"]
    answer = ""
    n_calls = n_errors = 0
    model: str | None = None
    for m in turn[1:]:
        if isinstance(m, AIMessage):
            model = response_model_name(m.response_metadata) or model
            for tc in m.tool_calls:
                n_calls += 1
                lines.append(f"Tool call: {tc['name']}({json.dumps(tc.get('args', {}), sort_keys=True, default=str)})")
            text = message_text(m)
            if text and not m.tool_calls:
                answer = text
        elif isinstance(m, ToolMessage):
            err = getattr(m, "status", "success") == "error"
            n_errors += err
            lines.append(f"Tool {'error' if err else 'result'} ({m.name}): {message_text(m)[:max_result_chars]}")
    lines.append(f"Answer: {answer}" if answer else "Answer: (none)")
    return {"text": "\n".join(lines), "input": user, "answer": answer, "tool_calls": n_calls, "tool_errors": n_errors,
            "model": model}


def episode_metadata(user_input: str, model: str | None, user: dict[str, Any], **recorded: Any) -> dict[str, Any]:
    """The metadata a recorded episode gets: ``group`` (:func:`input_group`) and ``model`` as defaults,
    the user's ``metadata=`` over them, then what the recorder itself observed (``source``, counts, outcome)."""
    return {"group": input_group(user_input), **({"model": model} if model else {}), **user, **recorded}


def response_model_name(meta: Any) -> str | None:
    """The model name a provider put in ``response_metadata`` / ``llm_output`` (``model_name`` or ``model``)."""
    if not isinstance(meta, dict):
        return None
    name = meta.get("model_name") or meta.get("model")
    return str(name) if name else None
