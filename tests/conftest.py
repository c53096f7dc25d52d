"""Shared fixtures: real Chroma in temp dirs, the offline hashing embedder, small fast configs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.pop("OPENAI_API_KEY", None)  # tests never reach the internet
os.environ.setdefault("MEMORY_DISTILL_HOME", "/nonexistent-should-not-be-used")

from memory_distill.artifacts import ArtifactRegistry  # noqa: E402
from memory_distill.config import DistillConfig, GateConfig, JobConfig, StoreConfig, TeacherConfig  # noqa: E402
from memory_distill.demo_data import synthetic_episodes  # noqa: E402
from memory_distill.embeddings import HashingEmbedder  # noqa: E402
from memory_distill.store import MemoryStore  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder(dim=256)


@pytest.fixture
def store(tmp_path: Path, embedder: HashingEmbedder) -> MemoryStore:
    return MemoryStore(embedder, StoreConfig(path=tmp_path / "chroma"))


@pytest.fixture
def registry(tmp_path: Path) -> ArtifactRegistry:
    return ArtifactRegistry(tmp_path / "artifacts")


def fast_job(**kw: object) -> JobConfig:
    """Small models and few epochs: seconds per consolidation on 2 cores."""
    base = dict(
        teacher=TeacherConfig(hidden=(128, 64), epochs=12, patience=4),
        distill=DistillConfig(hidden=(32,), epochs=12, patience=4),
        gate=GateConfig(min_holdout=10),
        min_rewarded=20,
    )
    base.update(kw)  # type: ignore[arg-type]
    return JobConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def episodes() -> list[dict]:
    return synthetic_episodes(600, seed=1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A store with synthetic episodes and one promoted model (shared, read-only for tests)."""
    from memory_distill.jobs import run_consolidation

    root = tmp_path_factory.mktemp("trained")
    emb = HashingEmbedder(dim=256)
    st = MemoryStore(emb, StoreConfig(path=root / "chroma"))
    st.add_many(synthetic_episodes(800, seed=2))
    reg = ArtifactRegistry(root / "artifacts")
    report = run_consolidation(st, reg, fast_job())
    return st, reg, report
