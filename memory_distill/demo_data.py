"""Synthetic agent episodes for the offline demo and tests (no network, deterministic).

Each episode is a task, a strategy the agent followed and an outcome. The reward depends on
the strategy (some habits pay off, some do not) plus noise, so a reward model can learn
which actions pay off from the text alone.
"""

from __future__ import annotations

import numpy as np

__all__ = ["STRATEGIES", "synthetic_episodes"]

TASKS = [
    "find the population of {city} in 2020",
    "summarise the quarterly report of {company}",
    "book a table for {n} people in {city}",
    "convert {n} {unit} to metric units",
    "answer who founded {company}",
    "fix the failing unit test in the {module} module",
    "draft an email to {person} about the {company} contract",
    "compare flight prices from {city} to Lisbon",
]
FILL = {
    "city": ["Paris", "Osaka", "Lima", "Nairobi", "Oslo", "Austin", "Hanoi", "Porto"],
    "company": ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark"],
    "n": ["2", "4", "12", "30", "150"],
    "unit": ["miles", "pounds", "gallons", "feet"],
    "module": ["parser", "billing", "auth", "scheduler"],
    "person": ["Dana", "Lee", "Sam", "Priya"],
}
# (description, base reward)
STRATEGIES = [
    ("searched the web, cross-checked two sources and cited them in the answer", 0.9),
    ("called the calculator tool and verified the result before answering", 0.85),
    ("asked a clarifying question first, then completed the task step by step", 0.75),
    ("used the search tool once and answered from the first result", 0.55),
    ("answered from memory without using any tool", 0.3),
    ("guessed the answer and did not check it", 0.15),
    ("looped on the same tool call until the step limit and gave up", 0.05),
]


def synthetic_episodes(n: int = 2000, *, seed: int = 0, noise: float = 0.08, pending_fraction: float = 0.1,
                       start_time: float = 1.7e9) -> list[dict]:
    """``n`` episode dicts (text, reward or None, metadata with group/strategy, created_at)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        task_t = TASKS[rng.integers(len(TASKS))]
        task = task_t.format(**{k: v[rng.integers(len(v))] for k, v in FILL.items()})
        s = int(rng.integers(len(STRATEGIES)))
        desc, base = STRATEGIES[s]
        reward = float(np.clip(base + rng.normal(0, noise), 0.0, 1.0))
        answer = "final answer given" if base > 0.2 else "no usable answer"
        text = f"Task: {task}. The agent {desc}. Outcome: {answer}."
        pending = rng.random() < pending_fraction
        out.append({
            "id": f"ep-{seed}-{i:06d}",
            "text": text,
            "reward": None if pending else round(reward, 4),
            "metadata": {"group": f"task-{i // 4}", "strategy": s, "source": "synthetic"},
            "created_at": start_time + i * 60.0,
        })
    return out
