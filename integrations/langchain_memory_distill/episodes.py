"""Turn an agent run's messages into one episode text (input, tool calls, results, answer)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

__all__ = ["episode_from_messages", "episode_metadata", "input_group", "message_text", "response_model_name"]


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
