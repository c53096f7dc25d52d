"""Turn an agent's answer into a reward by comparing it with a reference answer.

Methods: ``exact_match`` (normalised text equality), ``token_f1`` (SQuAD-style token overlap),
``bleu`` (sentence BLEU-4 with add-one smoothing and brevity penalty) and ``embedding``
(cosine similarity under an embedder). :class:`AnswerGrader` maps the score to a reward:
``1.0`` when it reaches ``threshold`` (default 0.8) else ``0.0``, or the score itself with
``continuous=True``.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .types import check_flag, is_real

__all__ = ["AnswerGrader", "bleu", "exact_match", "normalize_answer", "token_f1"]

Method = Literal["exact_match", "token_f1", "bleu", "embedding"]


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD normalisation)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the answer equals the reference after SQuAD-style normalisation (case, punctuation, articles), else 0.0."""
    return float(normalize_answer(answer) == normalize_answer(reference))


def token_f1(answer: str, reference: str) -> float:
    """Token-overlap F1 of the normalised answer and reference (SQuAD / HotpotQA style), in [0, 1]."""
    a, r = normalize_answer(answer).split(), normalize_answer(reference).split()
    if not a or not r:
        return float(a == r)
    common = Counter(a) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, rec = same / len(a), same / len(r)
    return 2 * p * rec / (p + rec)


def bleu(answer: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU with add-one smoothing on n-gram precisions (n > 1) and brevity penalty."""
    a, r = normalize_answer(answer).split(), normalize_answer(reference).split()
    if not a or not r:
        return float(a == r)
    logs = []
    for n in range(1, max_n + 1):
        ca = Counter(tuple(a[i : i + n]) for i in range(len(a) - n + 1))
        cr = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
        match = sum((ca & cr).values())
        total = max(sum(ca.values()), 0)
        if n == 1:
            if match == 0:
                return 0.0
            logs.append(math.log(match / total))
        else:
            logs.append(math.log((match + 1) / (total + 1)))
    bp = 1.0 if len(a) > len(r) else math.exp(1 - len(r) / len(a))
    return float(bp * math.exp(sum(logs) / max_n))


@dataclass
class AnswerGrader:
    """Callable ``grader(answer, reference) -> reward``."""

    method: Method = "token_f1"
    threshold: float = 0.8
    continuous: bool = False
    embedder: Any = None

    def __post_init__(self) -> None:
        self.continuous = check_flag(self.continuous, "continuous", "return the score, not 0/1 at the threshold")
        if self.embedder is not None:
            from .embeddings import as_embedder

            self.embedder = as_embedder(self.embedder)
        if self.method == "embedding" and self.embedder is None:
            raise ValueError("method='embedding' needs embedder= (e.g. HashingEmbedder() or OpenAIEmbedder())")
        if self.method not in ("exact_match", "token_f1", "bleu", "embedding"):
            raise ValueError(f"unknown method {self.method!r}: use exact_match, token_f1, bleu or embedding")
        t = self.threshold
        if not is_real(t) or not 0.0 <= t <= 1.0:  # (NaN too: always 0)
            raise ValueError(f"threshold must be a score in [0, 1] (the {self.method} score that counts as right), "
                             f"got {t!r}")

    def score(self, answer: str, reference: str | Sequence[str]) -> float:
        """The answer's score against the reference, in [0, 1]; against several references (any of them right),
        the best of its scores."""
        if not isinstance(answer, str):
            raise TypeError(f"answer must be a str, got {type(answer).__name__}")
        if not isinstance(reference, str):
            refs = list(reference) if isinstance(reference, Sequence) else []
            if not refs or not all(isinstance(r, str) for r in refs):
                raise TypeError(f"reference must be a str or a non-empty list of str (any of them right), got "
                                f"{type(reference).__name__} {reference!r:.80}")
            return max(self.score(answer, r) for r in refs)
        fn: Callable[[str, str], float]
        if self.method == "exact_match":
            fn = exact_match
        elif self.method == "token_f1":
            fn = token_f1
        elif self.method == "bleu":
            fn = bleu
        else:
            v = self.embedder.embed([answer, reference])
            return float(np.clip(v[0] @ v[1], 0.0, 1.0))
        return fn(answer, reference)

    def __call__(self, answer: str, reference: str | Sequence[str]) -> float:
        s = self.score(answer, reference)
        return s if self.continuous else float(s >= self.threshold)
