"""The same loop with a real OpenAI model and OpenAI embeddings (needs OPENAI_API_KEY).

Without a key it says so and exits cleanly. Needs ``pip install langchain-openai``.
Run: ``OPENAI_API_KEY=sk-... python demos/openai_agent.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def main() -> int:
    if not os.environ.get("OPENAI_API_KEY"):
        print("OPENAI_API_KEY is not set: this demo needs it (try demos/offline_agent.py instead).")
        return 0
    try:
        from langchain.agents import create_agent
        from langchain_openai import ChatOpenAI
    except ImportError:
        print("this demo needs langchain-openai: pip install langchain-openai")
        return 0
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langchain_memory_distill import AnswerGrader, MemoryDistillMiddleware

    from memory_distill import MemoryDistill
    from memory_distill.config import EmbedderConfig, Settings

    @tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        allowed = set("0123456789+-*/(). ")
        if not set(expression) <= allowed:
            return "error: only arithmetic is allowed"
        return str(eval(expression))  # noqa: S307 - restricted to arithmetic characters

    questions = [("What is 17 * 23 + 4?", "395"), ("What is (120 - 45) / 5?", "15"), ("What is 2**10?", "1024")]
    mem = MemoryDistill.open(settings=Settings(home=Path(tempfile.mkdtemp()), embedder=EmbedderConfig(kind="openai")))
    grader = AnswerGrader("token_f1", threshold=0.5)
    refs = dict(questions)
    mw = MemoryDistillMiddleware(mem.store, reward_fn=lambda q, a, m: grader(a, refs.get(q, "")))
    agent = create_agent(ChatOpenAI(model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini")), [calculator], middleware=[mw])
    for q, _ in questions * 8:
        out = agent.invoke({"messages": [HumanMessage(q)]})
        print(f"{q} -> {out['messages'][-1].content[:60]}")
    print(mem.store.stats())
    rep = mem.consolidate()
    print(f"consolidated {rep.version}: student Spearman {rep.evaluation.student.spearman:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
