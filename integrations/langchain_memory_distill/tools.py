"""Tools an agent can call itself: recall past episodes, estimate an approach's payoff."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool

from memory_distill.predictor import Predictor

from .episodes import NamespaceFn, check_predictor, run_namespace
from .retriever import Mode, ValueAwareRetriever

__all__ = ["make_predict_tool", "make_recall_tool"]


def _fmt_doc(d) -> str:  # type: ignore[no-untyped-def]
    m = d.metadata
    parts = []
    if m.get("reward") is not None:
        parts.append(f"reward {m['reward']:.2f}")
    if m.get("predicted_mean") is not None:
        parts.append(f"predicted {m['predicted_mean']:.2f}±{m['predicted_std']:.2f}")
    return f"- [{', '.join(parts) or 'no reward yet'}] {d.page_content[:500]}"


def _tool_name(name: Any) -> str:
    """A tool name chat providers take (OpenAI and Anthropic: letters, digits, _ and -, at most 64): another one
    was built fine and refused by the provider at the agent's first model call."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ValueError(f"tool name {name!r} is not one chat models take: use 1-64 letters, digits, _ or -, e.g. "
                         "'recall_past_episodes'")
    return name


def make_recall_tool(retriever: ValueAwareRetriever, *, name: str = "recall_past_episodes",
                     namespace: str | NamespaceFn | None = None,
                     predictor_for: Callable[[str], Predictor | None] | None = None) -> BaseTool:
    """A tool returning the most relevant past episodes with their (predicted) rewards.

    ``namespace``: where to search (default: the retriever's); a function of the run's runtime
    (``runtime.context``) searches each run's own namespace, e.g. the calling user's. ``predictor_for``:
    the predictor serving a namespace (``mem.try_predictor``), so each namespace's episodes are scored by
    its own model.
    """
    name = _tool_name(name)
    if not isinstance(retriever, ValueAwareRetriever):
        raise TypeError("make_recall_tool needs a ValueAwareRetriever, e.g. ValueAwareRetriever.from_memory(mem), got "
                        f"{type(retriever).__name__}")
    description = ("Search your past episodes similar to `query`. mode='likely_success' favours what worked, "
                   "mode='cautionary' surfaces past failures to avoid, mode='similarity' ignores rewards.")

    def search(query: str, mode: Mode, ns: str | None) -> str:
        kw: dict[str, Any] = {}
        if ns is not None:
            kw["namespace"] = ns
            if predictor_for is not None:  # a provider: it hands back a refreshed predictor
                kw["predictor"] = functools.partial(predictor_for, ns)
        docs = retriever.invoke(query, mode=mode, **kw)
        return "\n".join(_fmt_doc(d) for d in docs) or "no relevant past episodes"

    if namespace is None or isinstance(namespace, str):
        def recall(query: str, mode: Mode = "likely_success") -> str:  # an enum in the tool's schema
            return search(query, mode, namespace)

        return StructuredTool.from_function(recall, name=name, description=description)

    from langchain.tools import ToolRuntime

    fn = namespace

    def recall_in_run(query: str, runtime: ToolRuntime, mode: Mode = "likely_success") -> str:
        return search(query, mode, run_namespace(fn, runtime))

    # the runtime is injected by the agent's tool node, never shown to the model
    recall_in_run.__annotations__ = {"query": str, "runtime": ToolRuntime[Any, Any], "mode": Mode, "return": str}
    return StructuredTool.from_function(recall_in_run, name=name, description=description)


def make_predict_tool(predictor: Predictor | None = None, *, name: str = "estimate_payoff",
                      metadata: Mapping[str, Any] | None = None, namespace: NamespaceFn | None = None,
                      predictor_for: Callable[[str], Predictor | None] | None = None) -> BaseTool:
    """A tool estimating how well a described plan/answer is likely to pay off.

    ``metadata``: what the calling agent's episodes are recorded with (e.g. ``{"agent": "planner-v2"}``),
    for a student trained with ``JobConfig.metadata_features``: the estimate is then for this agent.
    ``namespace`` (a function of the run's runtime) with ``predictor_for`` (``mem.try_predictor``): each run
    gets the estimate of the model serving its own namespace, e.g. the calling user's.
    """
    name = _tool_name(name)
    if predictor is not None:
        check_predictor(predictor, "make_predict_tool")
    if (predictor is None) == (namespace is None or predictor_for is None):
        raise ValueError("give a predictor, or namespace= (a function of the run's runtime) and predictor_for=")
    meta = dict(metadata) if metadata else None
    description = "Estimate the reward a described plan or answer is likely to earn, from past experience."

    def estimate_with(pred: Predictor | None, plan: str) -> str:  # pred: refreshed already
        if pred is None or pred.retired:  # (retired: forget deleted everything it learned from)
            return "no model has learned from past episodes here yet: no estimate"
        p = pred.predict_one(plan, meta)
        return (f"expected reward {p.mean:.2f} (std {p.std:.2f}, 10-90% range {p.quantiles[0.1]:.2f}-"
                f"{p.quantiles[0.9]:.2f}, model {p.model_version})")

    if predictor is not None:
        fixed = predictor

        def estimate(plan: str) -> str:
            fixed.refresh()
            return estimate_with(fixed, plan)

        return StructuredTool.from_function(estimate, name=name, description=description)

    from langchain.tools import ToolRuntime

    fn, lookup = namespace, predictor_for

    def estimate_in_run(plan: str, runtime: ToolRuntime) -> str:
        return estimate_with(lookup(run_namespace(fn, runtime)), plan)  # type: ignore[misc,arg-type]

    estimate_in_run.__annotations__ = {"plan": str, "runtime": ToolRuntime[Any, Any], "return": str}
    return StructuredTool.from_function(estimate_in_run, name=name, description=description)
