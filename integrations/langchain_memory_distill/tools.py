"""Tools an agent can call itself: recall past episodes, estimate an approach's payoff."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool

from memory_distill.predictor import Predictor

from .retriever import ValueAwareRetriever

__all__ = ["make_predict_tool", "make_recall_tool"]


def _fmt_doc(d) -> str:  # type: ignore[no-untyped-def]
    m = d.metadata
    parts = []
    if m.get("reward") is not None:
        parts.append(f"reward {m['reward']:.2f}")
    if m.get("predicted_mean") is not None:
        parts.append(f"predicted {m['predicted_mean']:.2f}±{m['predicted_std']:.2f}")
    return f"- [{', '.join(parts) or 'no reward yet'}] {d.page_content[:500]}"


def make_recall_tool(retriever: ValueAwareRetriever, *, name: str = "recall_past_episodes") -> BaseTool:
    """A tool returning the most relevant past episodes with their (predicted) rewards."""

    def recall(query: str, mode: str = "likely_success") -> str:
        docs = retriever.invoke(query, mode=mode)
        return "\n".join(_fmt_doc(d) for d in docs) or "no relevant past episodes"

    return StructuredTool.from_function(
        recall, name=name,
        description=("Search your past episodes similar to `query`. mode='likely_success' favours what worked, "
                     "mode='cautionary' surfaces past failures to avoid."),
    )


def make_predict_tool(predictor: Predictor, *, name: str = "estimate_payoff",
                      metadata: Mapping[str, Any] | None = None) -> BaseTool:
    """A tool estimating how well a described plan/answer is likely to pay off.

    ``metadata``: what the calling agent's episodes are recorded with (e.g. ``{"agent": "planner-v2"}``),
    for a student trained with ``JobConfig.metadata_features``: the estimate is then for this agent.
    """
    meta = dict(metadata) if metadata else None

    def estimate(plan: str) -> str:
        predictor.refresh()
        p = predictor.predict_one(plan, meta)
        return (f"expected reward {p.mean:.2f} (std {p.std:.2f}, 10-90% range {p.quantiles[0.1]:.2f}-"
                f"{p.quantiles[0.9]:.2f}, model {p.model_version})")

    return StructuredTool.from_function(
        estimate, name=name,
        description="Estimate the reward a described plan or answer is likely to earn, from past experience.",
    )
