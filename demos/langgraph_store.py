"""LangGraph long-term memory on memory_distill, offline: a tool stores outcomes, the student learns what pays off.

    python demos/langgraph_store.py

1. an agent (fake chat model, real ``create_agent``) saves each attempt of a task through ``runtime.store`` with
   the reward it earned: LangGraph's store API, on Chroma;
2. ``consolidate`` trains the teacher and distils the student on those items (they are memories);
3. the same store, asked about "Task 7", ranks by similarity alone, then by similarity and the
   student's predicted value.
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

from langchain.agents import create_agent
from langchain.tools import ToolRuntime
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langchain_memory_distill import MemoryDistillStore

from memory_distill import DistillConfig, JobConfig, MemoryDistill, TeacherConfig

APPROACHES = {"read the docs and ran the tests": 0.9, "copied a snippet without running it": 0.2}


@tool
def save_attempt(task: int, approach: str, runtime: ToolRuntime) -> str:
    """Save how a task was attempted and how it went."""
    reward = APPROACHES[approach]
    assert runtime.store is not None  # create_agent(..., store=...) provides it
    runtime.store.put(("team", "coding"), f"task{task}-{approach[:4]}",
                      {"text": f"Task {task}: the agent {approach}.", "reward": reward, "group": f"task-{task}"})
    return f"saved (reward {reward})"


class Scripted(BaseChatModel):
    """Calls save_attempt once per run with the task and approach in the user message, then answers."""

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        if any(getattr(m, "type", "") == "tool" for m in messages):
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content="Saved."))])
        task, approach = str(messages[-1].content).split("|")
        call = {"name": "save_attempt", "args": {"task": int(task), "approach": approach}, "id": f"c{task}",
                "type": "tool_call"}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="", tool_calls=[call]))])

    def bind_tools(self, tools: Any, **kwargs: Any) -> Scripted:
        return self


def main() -> int:
    mem = MemoryDistill.open(tempfile.mkdtemp(prefix="md-langgraph-demo-"))
    store = MemoryDistillStore.from_memory(mem, value_weight=0.5)  # the student weighs in once published
    agent = create_agent(Scripted(), [save_attempt], store=store)
    for task in range(60):
        for approach in APPROACHES:
            agent.invoke({"messages": [HumanMessage(f"{task}|{approach}")]})
    print(f"1. the agent saved {len(store.search(('team',), limit=1000))} attempts through LangGraph's store API")

    query = "Task 7"
    before = store.search(("team",), query=query, limit=4)  # no model yet: similarity only
    job = JobConfig(teacher=TeacherConfig(hidden=(128, 64), epochs=20), distill=DistillConfig(hidden=(32,), epochs=20))
    rep = mem.consolidate(job)
    print(f"2. consolidated the items -> {rep.version} ({'promoted' if rep.promoted else 'rejected'}), "
          f"held-out Spearman {rep.evaluation.student.spearman:.2f}")
    after = store.search(("team",), query=query, limit=4)
    for name, hits in (("similarity only", before), ("similarity + predicted value", after)):
        print(f"3. '{query}', {name}:")
        for h in hits:
            print(f"   score {h.score:.2f}  reward {h.value['reward']}  {h.value['text']}")
    good = after[0].value["reward"] > before[0].value["reward"]  # the attempt that paid off now comes first
    print("OK" if good else "UNEXPECTED: the student did not move what paid off to the top")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
