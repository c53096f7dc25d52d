"""Offline agent demo: record -> consolidate -> recall/score, with a real LangChain agent.

A fake chat model (no API key, no network) plays an agent that sometimes looks facts up with a
tool and sometimes guesses. The middleware records each run with a reward from an answer
grader; consolidation distils a student; then the student scores new plans and the retriever
recalls what paid off. Run: ``python demos/offline_agent.py``.
"""

from __future__ import annotations

import random
import sys
import tempfile

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langchain_memory_distill import (
    AnswerGrader,
    MemoryDistillMiddleware,
    RewardScorer,
    ValueAwareRetriever,
    best_of_n,
)

from memory_distill import MemoryDistill
from memory_distill.config import DistillConfig, JobConfig, TeacherConfig

FACTS = {"Oslo": "709,000", "Lima": "10,000,000", "Porto": "232,000", "Hanoi": "8,000,000", "Nairobi": "4,400,000"}


@tool
def lookup_population(city: str) -> str:
    """Look up a city's population in the almanac."""
    return f"{city}: {FACTS[city]}"


class HabitAgentModel(BaseChatModel):
    """Looks the fact up (then answers correctly) or guesses (usually wrong), at random."""

    p_lookup: float = 0.5
    seed: int = 0
    _rng: random.Random | None = None

    @property
    def _llm_type(self) -> str:
        return "habit-agent"

    def bind_tools(self, tools, **kw):  # type: ignore[no-untyped-def]
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kw):  # type: ignore[no-untyped-def]
        if self._rng is None:
            self._rng = random.Random(self.seed)
        city = next(c for c in FACTS if c in messages[-1].content) if messages[-1].type == "human" else None
        if messages[-1].type == "tool":
            msg = AIMessage(content=f"The population is {messages[-1].content.split(': ')[1]}.")
        elif self._rng.random() < self.p_lookup:
            msg = AIMessage(content="", tool_calls=[{"name": "lookup_population", "args": {"city": city},
                                                     "id": f"c{self._rng.random()}", "type": "tool_call"}])
        else:
            msg = AIMessage(content=f"I believe the population is about {self._rng.choice(list(FACTS.values()))}.")
        return ChatResult(generations=[ChatGeneration(message=msg)])


def main(n_runs: int = 120) -> int:
    home = tempfile.mkdtemp(prefix="md-agent-demo-")
    mem = MemoryDistill.open(home)
    grader = AnswerGrader("token_f1", threshold=0.5)

    def reward(question: str, answer: str, messages: list) -> float:
        city = next(c for c in FACTS if c in question)
        return grader(answer, f"The population is {FACTS[city]}.")

    # from_memory: recall uses stored rewards now and the student as soon as one is published (no restart)
    mw = MemoryDistillMiddleware.from_memory(mem, reward_fn=reward, k=3, diversity=0.5)
    agent = create_agent(HabitAgentModel(seed=1), [lookup_population], middleware=[mw])
    cities = list(FACTS)
    for i in range(n_runs):
        agent.invoke({"messages": [HumanMessage(f"What is the population of {cities[i % len(cities)]}?")]})
    st = mem.store.stats()
    print(f"1. recorded {st['total']} agent episodes (mean reward {st['reward_mean']:.2f})")

    job = JobConfig(teacher=TeacherConfig(hidden=(256, 128), epochs=25), distill=DistillConfig(hidden=(64,), epochs=25))
    rep = mem.consolidate(job)
    print(f"2. consolidated -> {rep.version} ({'promoted' if rep.promoted else 'rejected'}): held-out Spearman "
          f"teacher {rep.evaluation.teacher.spearman:.2f}, student {rep.evaluation.student.spearman:.2f}")

    if rep.ranking is not None:  # questions repeat, so episodes share groups (one per question)
        print(f"   best-of-n ranking head: {'attached' if rep.ranking.attached else 'none'} ({rep.ranking.reason})")
    scorer = RewardScorer(mem.predictor)
    plans = [
        "User: What is the population of Oslo?\nAnswer: I believe the population is about 8,000,000.",
        'User: What is the population of Oslo?\nTool call: lookup_population({"city": "Oslo"})\n'
        "Tool result (lookup_population): Oslo: 709,000\nAnswer: The population is 709,000.",
    ]
    idx, _, preds = best_of_n(plans, scorer)
    print("3. student scores two candidate episodes:")
    for p, text in zip(preds, plans, strict=True):
        rank = "" if p.advantage is None else f", ranking score {p.advantage:+.2f}"
        print(f"   expected reward {p.mean:.2f}{rank}  <- {'looked it up' if 'Tool call' in text else 'guessed'}")
    print(f"   best of n: candidate {idx} ({'looked it up' if idx == 1 else 'guessed'})")

    retriever = ValueAwareRetriever.from_memory(mem, k=2)  # scores with the student published above
    docs = retriever.invoke("What is the population of Lima?")
    print("4. recall for a new question (likely to succeed):")
    for d in docs:
        print(f"   reward {d.metadata['reward']}, predicted {d.metadata['predicted_mean']:.2f}: "
              f"{d.page_content.splitlines()[1][:70]}")
    ok = idx == 1 and preds[1].mean > preds[0].mean
    print("OK" if ok else "UNEXPECTED: the student did not prefer looking things up")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
