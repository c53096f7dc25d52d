"""The README's Python examples run as written (a renamed method or attribute fails here, not for a reader)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage
from lc_helpers import ScriptedChatModel

from memory_distill.demo_data import synthetic_episodes

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh working directory (the examples use ./.memory_distill), offline, with small, quick models."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEMORY_DISTILL_HOME", raising=False)
    monkeypatch.setenv("MEMORY_DISTILL_JOB__TEACHER__EPOCHS", "4")
    monkeypatch.setenv("MEMORY_DISTILL_JOB__DISTILL__EPOCHS", "4")
    return tmp_path


def test_the_readme_has_the_examples_this_file_runs():
    blocks = python_blocks()
    assert len(blocks) == 4
    assert "MemoryDistill.open()" in blocks[0] and "ModelDistillation" in blocks[1] and "create_agent" in blocks[2]
    assert "context_schema=Context" in blocks[3]


def test_use_it_from_python_runs_as_written(home):
    from memory_distill import MemoryDistill

    MemoryDistill.open().add_many(synthetic_episodes(400, seed=3))  # the episodes a running agent would have stored
    scope: dict = {}
    exec(compile(python_blocks()[0], "README.md: Use it from Python", "exec"), scope)
    mem, report, pred = scope["mem"], scope["report"], scope["pred"]
    assert (home / ".memory_distill").is_dir() and report.promoted
    assert pred.model_version == report.version and 0.0 <= pred.mean <= 1.0
    assert mem.store.get(scope["mid"]).reward == 0.9
    assert mem.store.count(namespace="team-a") == 1


def test_the_seed_compatible_facade_runs_as_written(home):
    memories = [(e["text"], e["reward"]) for e in synthetic_episodes(300, seed=4) if e["reward"] is not None]
    scope: dict = {"memories": memories}
    exec(compile(python_blocks()[1], "README.md: seed-compatible facade", "exec"), scope)
    assert (home / "models" / "run1_student.pth").exists() and (home / "models" / "run1_manifest.json").exists()


def test_attach_it_to_a_langchain_agent_runs_as_written(home):
    from langchain_memory_distill import AnswerGrader

    from memory_distill import MemoryDistill

    mem = MemoryDistill.open()
    scope: dict = {"mem": mem, "model": ScriptedChatModel(responses=[AIMessage(content="Oslo")]), "tools": [],
                   "grader": AnswerGrader("exact_match"), "reference": {"...": "Oslo"}}
    exec(compile(python_blocks()[2], "README.md: Attach it to a LangChain agent", "exec"), scope)
    mid = scope["out"]["memory_distill_episode_id"]
    assert mem.store.get(mid).reward == 0.8  # reward_fn graded it 1.0; the late feedback replaced it
    # "One agent, many users", in the same session
    exec(compile(python_blocks()[3], "README.md: One agent, many users", "exec"), scope)
    assert mem.store.count(namespace="user-alice") == 1 and mem.store.count() == 2


def cli_lines() -> list[str]:
    text = README.read_text()
    block = re.search(r"## Command line\n\n```\n(.*?)```", text, flags=re.S).group(1)
    return [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.startswith("memory-distill ")]


def _split_outside_brackets(text: str) -> list[str]:
    """``a | b [c | d]`` -> ``["a", "b [c | d]"]``."""
    out, depth, start, i = [], 0, 0, 0
    while i < len(text):
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0 and text.startswith(" | ", i):
            out.append(text[start:i])
            start = i = i + 3
            continue
        i += 1
    return [p.strip() for p in [*out, text[start:]]]


def test_every_command_line_in_the_readme_parses():
    """Each documented command, without and with its optional parts (each alternative of a group), and each
    alternative form (``forget --id ID | --where JSON``), is accepted by the parser."""
    import shlex

    from memory_distill.cli import build_parser

    fill = {"JSON": '{"tool": "search"}', "NS": "team-a", "ID": "ep-1", "VERSION": "v000001"}
    commands = []
    for line in cli_lines():
        first, *alts = _split_outside_brackets(line.removeprefix("memory-distill "))
        commands.append(first)
        commands += [f"{first.split()[0]} {a}" if a.startswith("--") else a for a in alts]
    parser = build_parser()
    checked = 0
    for cmd in commands:
        groups = re.findall(r"\[([^\]]*)\]", cmd)
        bare = re.sub(r"\s*\[[^\]]*\]", "", cmd)
        variants = [bare]
        for g in groups:  # each optional group on its own, each of its alternatives
            variants += [f"{bare} {alt.strip()}" for alt in g.split(" | ")]
        variants.append(" ".join([bare, *(g.split(" | ")[0] for g in groups)]))  # all together
        for v in variants:
            parser.parse_args([fill.get(a, a) for a in shlex.split(v)])  # argparse exits (fails) if it refuses
            checked += 1
    assert len(commands) >= 20 and checked > len(commands)
