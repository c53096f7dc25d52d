import os
import subprocess
import sys
from pathlib import Path

DEMOS = Path(__file__).resolve().parents[1] / "demos"


def test_offline_agent_demo_runs_and_learns():
    out = subprocess.run([sys.executable, str(DEMOS / "offline_agent.py")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "best of n: candidate 1 (looked it up)" in out.stdout and out.stdout.strip().endswith("OK")


def test_langgraph_store_demo_runs_and_learns():
    out = subprocess.run([sys.executable, str(DEMOS / "langgraph_store.py")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "saved 120 attempts" in out.stdout and out.stdout.strip().endswith("OK")


def test_vectorstore_demo_runs_and_learns():
    out = subprocess.run([sys.executable, str(DEMOS / "vectorstore_rag.py")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "indexed 120 runbooks" in out.stdout and "120 unchanged runbooks skipped, 120 rewards kept" in out.stdout
    assert out.stdout.strip().endswith("OK")


def test_openai_demo_without_key_exits_cleanly():
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    out = subprocess.run([sys.executable, str(DEMOS / "openai_agent.py")], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "OPENAI_API_KEY is not set" in out.stdout
