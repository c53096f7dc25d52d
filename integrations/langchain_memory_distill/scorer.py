"""Score texts with the distilled student: a Runnable for best-of-n selection."""

from __future__ import annotations

import asyncio
import math
import string
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from langchain_core.documents import Document
from langchain_core.runnables import Runnable, RunnableConfig

from memory_distill.errors import nearest_name
from memory_distill.predictor import Predictor
from memory_distill.types import PredictionBatch, RewardPrediction, check_flag, is_real

from .episodes import check_predictor, episode_text

__all__ = ["RewardScorer", "best_of_n"]

Input = str | Document


def _text(x: Input, template: str) -> str:
    if isinstance(x, Document):
        x = x.page_content
    if not isinstance(x, str):
        hint = ": score several with .batch([...]) or best_of_n()" if isinstance(x, (list, tuple)) else ""
        raise TypeError(f"RewardScorer scores str or Document, got {type(x).__name__}{hint}")
    return template.format(text=x)


def _no_other_options(kwargs: dict[str, Any]) -> None:
    """The scorer's one per-call option is ``question=``; a misspelt one (``questoin=``) scored without it."""
    if kwargs:
        key = sorted(kwargs)[0]
        near = nearest_name(key, ["question"])
        raise TypeError(f"unknown RewardScorer option {key!r}" + (f": did you mean {near!r}?" if near else
                                                                  "; its one per-call option is question="))


def _a_list(inputs: Any) -> None:
    if isinstance(inputs, str | Document):  # a str is a sequence: its letters would be scored one by one
        raise TypeError(f"score_batch and batch take a list of inputs, got one {type(inputs).__name__}: pass "
                        "[input], or use invoke")


def _check_template(template: str) -> None:
    """``template`` must hold ``{text}`` (else every candidate is scored as the same text) and no other field
    (which would fail at the first score with a bare KeyError)."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a str holding {{text}}, got {type(template).__name__}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a format string ({e}): write literal braces as {{{{ }}}}") from e
    if "text" not in fields:
        raise ValueError(f"template {template!r} has no {{text}} field: every candidate would be scored as the same "
                         "text; put {text} where the candidate goes")
    other = sorted(fields - {"text"})
    if other:
        raise ValueError(f"template {template!r} has fields other than {{text}}: {other}; fill them in first "
                         "(template.replace('{task}', task)), or write literal braces as {{ }}")


class RewardScorer(Runnable[Input, RewardPrediction]):
    """``Runnable[str | Document, RewardPrediction]``; ``batch``/``abatch`` run one forward pass.

    A ``Document``'s metadata goes to the student too: with ``JobConfig.metadata_features``
    (e.g. ``("agent",)``) score ``Document(page_content=answer, metadata={"agent": name})``.

    ``template`` formats each input before embedding, e.g. ``"Task: {task}\\nAnswer: {text}"``
    with ``task`` bound via ``template.replace``; by default the text is scored as is.
    """

    def __init__(self, predictor: Predictor, *, template: str = "{text}", auto_refresh: bool = True) -> None:
        _check_template(template)
        self.predictor = check_predictor(predictor, "RewardScorer")
        self.template = template
        self.auto_refresh = check_flag(auto_refresh, "auto_refresh", "pick up a newly promoted student")

    def score_batch(self, inputs: Sequence[Input], *, question: str | None = None) -> PredictionBatch:
        """One forward pass over ``inputs``. ``question``: the prompt they answer, for a student trained on what
        the middleware or the callback handler recorded: each input is scored as the episode that run would
        record (:func:`~langchain_memory_distill.episodes.episode_text`), a ``Document``'s metadata kept."""
        _a_list(inputs)
        if question is not None and self.template != "{text}":
            raise ValueError("pass question= or a scorer template, not both: question= formats each candidate as "
                             "a recorded episode, the template would format it again")
        if self.auto_refresh:
            self.predictor.refresh()
        texts = [_text(x, self.template) if question is None else episode_text(question, _text(x, "{text}"))
                 for x in inputs]
        meta = [x.metadata if isinstance(x, Document) else None for x in inputs]
        return self.predictor.predict_batch(texts, metadata=meta if any(m for m in meta) else None)

    def invoke(self, input: Input, config: RunnableConfig | None = None, *, question: str | None = None,
               **kwargs: Any) -> RewardPrediction:
        """The prediction for one answer (``question=``: as :meth:`score_batch`)."""
        _no_other_options(kwargs)
        return self._call_with_config(lambda x: self.score_batch([x], question=question)[0], input, config)

    async def ainvoke(self, input: Input, config: RunnableConfig | None = None, *, question: str | None = None,
                      **kwargs: Any) -> RewardPrediction:
        _no_other_options(kwargs)
        return await asyncio.to_thread(self.invoke, input, config, question=question)

    def batch(self, inputs: list[Input], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, question: str | None = None, **kwargs: Any) -> list[RewardPrediction]:
        """One forward pass over ``inputs``, one callback run per input (as ``Runnable.batch``). With
        ``return_exceptions=True`` an input that cannot be scored (not a str or Document) comes back as its
        exception and the others are still scored."""
        _no_other_options(kwargs)
        _a_list(inputs)
        if not inputs:
            return []
        inputs = list(inputs)

        def score(xs: list[Input]) -> list[RewardPrediction | Exception]:
            if not return_exceptions:
                return list(self.score_batch(xs, question=question).to_list())
            bad: dict[int, Exception] = {}
            for i, x in enumerate(xs):
                try:
                    _text(x, self.template)
                except (TypeError, ValueError) as e:
                    bad[i] = e
            ok = [x for i, x in enumerate(xs) if i not in bad]
            preds = iter(self.score_batch(ok, question=question).to_list() if ok else [])
            return [bad[i] if i in bad else next(preds) for i in range(len(xs))]

        return self._batch_with_config(score, inputs, config, return_exceptions=return_exceptions)

    async def abatch(self, inputs: list[Input], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, question: str | None = None,
                     **kwargs: Any) -> list[RewardPrediction]:
        _no_other_options(kwargs)
        return await asyncio.to_thread(self.batch, inputs, config, return_exceptions=return_exceptions,
                                       question=question)


def best_of_n(candidates: Sequence[Input], scorer: RewardScorer, *,
              by: Literal["auto", "rank", "mean", "lcb", "prob_above"] = "auto", risk: float = 1.0,
              threshold: float = 0.5, question: str | None = None) -> tuple[int, Input, list[RewardPrediction]]:
    """Pick the best of several answers to the same prompt.

    ``by="auto"`` (default): the student's ranking head when it has one (fit on rewards within
    groups of answers to one prompt, see :mod:`memory_distill.ranking`), else the expected
    reward. ``"rank"``: the ranking head (an error without one); ``"mean"``: expected reward;
    ``"lcb"``: mean - risk * std (risk-averse); ``"prob_above"``: P(reward > threshold).

    ``question``: the prompt the candidates answer, for a student trained on episodes the middleware or
    the callback handler recorded: each candidate is scored as the episode that run would record
    (:func:`~langchain_memory_distill.episodes.episode_text`), a ``Document``'s metadata kept.
    Returns (index, candidate, predictions).
    """
    if isinstance(candidates, (str, Document)):  # a str is a Sequence: it would be scored character by character
        raise TypeError(f"best_of_n takes a list of candidates, got one {type(candidates).__name__}: pass "
                        "[candidate, ...] (or scorer.invoke(candidate) to score a single answer)")
    if not candidates:
        raise ValueError("best_of_n needs at least one candidate")
    batch = scorer.score_batch(list(candidates), question=question)
    if by == "auto":
        by = "rank" if batch.advantage is not None else "mean"
    if by == "rank":
        if batch.advantage is None:
            raise ValueError("by='rank' needs a student with a ranking head: consolidate memories that carry a "
                             "'group' metadata key (answers to the same prompt), or use by='mean'")
        key = batch.advantage
    elif by == "mean":
        key = batch.mean
    elif by == "lcb":
        if not is_real(risk) or not math.isfinite(risk):
            raise ValueError(f"risk must be a finite number (how many stds below the mean to rank by), got {risk!r}")
        key = batch.mean - risk * batch.std
    elif by == "prob_above":
        key = batch.prob_above(threshold)
    else:
        raise ValueError(f"by must be 'auto', 'rank', 'mean', 'lcb' or 'prob_above', got {by!r}")
    i = int(np.argmax(key))
    return i, candidates[i], batch.to_list()
