"""Route questions between a cheap and a strong LangChain chat model by predicted reward."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, convert_to_messages
from langchain_core.runnables import Runnable, RunnableConfig

from memory_distill.errors import MemoryDistillError
from memory_distill.predictor import Predictor
from memory_distill.types import is_real

from .episodes import message_text

__all__ = ["RewardRouter", "RouterStats"]

log = logging.getLogger(__name__)


RECENT_PREDICTIONS = 10_000
"""How many of the latest predicted rewards :attr:`RouterStats.predicted` keeps (a router serves for months)."""


@dataclass
class RouterStats:
    """Routes so far: how many questions went to each model, and the latest predicted rewards of the cheap one."""

    cheap: int = 0
    strong: int = 0
    unpredicted: int = 0
    """Questions sent to the strong model because no prediction could be made (counted in ``strong`` too)."""
    predicted: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_PREDICTIONS))

    @property
    def cheap_fraction(self) -> float:
        n = self.cheap + self.strong
        return self.cheap / n if n else 0.0


class RewardRouter(Runnable[Any, AIMessage]):
    """``invoke(question)`` answers with ``cheap`` when the student predicts its reward >= ``threshold``.

    ``predictor`` is a student trained on the cheap model's episodes (question text -> reward).
    The answer's ``response_metadata["memory_distill_route"]`` says which model answered and why;
    :attr:`stats` counts the routes and ``cost_saved()`` estimates the saving.
    """

    def __init__(self, cheap: BaseChatModel, strong: BaseChatModel, predictor: Predictor, *, threshold: float = 0.5,
                 cost_cheap: float = 1.0, cost_strong: float = 10.0) -> None:
        for which, model in (("cheap", cheap), ("strong", strong)):  # (a model's name failed at the first question)
            if not isinstance(model, Runnable):
                hint = (f": build the model, e.g. init_chat_model({model!r})" if isinstance(model, str) else "")
                raise TypeError(f"{which} must be a chat model (a LangChain Runnable), got {type(model).__name__}"
                                + hint)
        if not isinstance(predictor, Predictor):
            raise TypeError(f"RewardRouter needs a Predictor (e.g. mem.predictor, once a consolidation has published a "
                            f"model trained on the cheap model's episodes), got {type(predictor).__name__}")
        if not is_real(threshold):  # numpy floats too
            raise TypeError(f"threshold must be a reward (a number), got {type(threshold).__name__} {threshold!r}")
        for name, cost in (("cost_cheap", cost_cheap), ("cost_strong", cost_strong)):  # cost_saved() divides by them
            if not is_real(cost) or not 0 < cost < math.inf:
                raise ValueError(f"{name} must be a price > 0 per question (only their ratio matters), got {cost!r}")
        lo, hi = float(predictor.bins.low), float(predictor.bins.high)
        if not lo <= threshold <= hi:
            raise ValueError(f"threshold {threshold} is outside the rewards the student predicts ([{lo}, {hi}]): "
                             "every question would go to one model; give a reward in that range")
        self.cheap, self.strong, self.predictor = cheap, strong, predictor
        self.threshold, self.cost_cheap, self.cost_strong = threshold, cost_cheap, cost_strong
        self.stats = RouterStats()
        self._lock = threading.Lock()
        self._last_error = ""

    @staticmethod
    def _question(input: Any) -> tuple[str, Any]:
        if isinstance(input, str):
            return input, input
        if isinstance(input, BaseMessage):
            return message_text(input), [input]
        if isinstance(input, list):  # messages, or what chat models also take: ("user", "...") or {"role": ...}
            try:
                msgs = convert_to_messages(input)
            except (ValueError, TypeError, NotImplementedError) as e:
                raise TypeError(f"RewardRouter takes a str, a message or a list of messages; this list is none ({e})") \
                    from None
            human = [m for m in msgs if isinstance(m, HumanMessage)]
            if not human:
                raise ValueError("RewardRouter routes on the last user message, and this list has none")
            return message_text(human[-1]), input
        raise TypeError(f"RewardRouter takes a str, a message or a list of messages, got {type(input).__name__}")

    def route(self, question: str) -> tuple[str, float | None]:
        """("cheap" | "strong", predicted reward of the cheap model). Without a prediction (the embedder failing,
        the model retired by ``forget``) the question goes to the strong model, with ``None``: routing never takes
        the agent down, and never trades quality for cost blind."""
        try:
            self.predictor.refresh()
            pred: float | None = float(self.predictor.predict_one(question).mean)
            self._last_error = ""  # predictions work (again): the next failure is logged
        except MemoryDistillError as e:
            msg = f"{type(e).__name__}: {e}"
            if msg != self._last_error:  # once per distinct error, not once per question
                log.warning("routing to the strong model: no prediction (%s)", msg)
            self._last_error, pred = msg, None
        choice = "cheap" if pred is not None and pred >= self.threshold else "strong"
        with self._lock:
            setattr(self.stats, choice, getattr(self.stats, choice) + 1)
            if pred is None:
                self.stats.unpredicted += 1
            else:
                self.stats.predicted.append(pred)
        return choice, pred

    def _annotate(self, msg: Any, choice: str, pred: float | None) -> AIMessage:
        if not isinstance(msg, AIMessage):
            msg = AIMessage(content=str(msg))
        msg.response_metadata = {**(msg.response_metadata or {}),
                                 "memory_distill_route": {"model": choice, "predicted_reward": pred,
                                                          "threshold": self.threshold}}
        return msg

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        question, payload = self._question(input)
        choice, pred = self.route(question)
        model = self.cheap if choice == "cheap" else self.strong
        return self._annotate(model.invoke(payload, config, **kwargs), choice, pred)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        question, payload = self._question(input)
        choice, pred = await asyncio.to_thread(self.route, question)
        model = self.cheap if choice == "cheap" else self.strong
        return self._annotate(await model.ainvoke(payload, config, **kwargs), choice, pred)

    def cost_saved(self) -> float:
        """1 - (cost so far) / (cost had every question gone to the strong model)."""
        n = self.stats.cheap + self.stats.strong
        if not n:
            return 0.0
        return 1 - (self.stats.cheap * self.cost_cheap + self.stats.strong * self.cost_strong) / (n * self.cost_strong)
