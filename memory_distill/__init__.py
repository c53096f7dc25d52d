"""memory_distill: episodic memory for agents with a distilled reward model.

Importing this package imports neither langchain nor openai, touches no network and writes
nothing; heavy pieces load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # config
    "BinsConfig": "config", "DistillConfig": "config", "EmbedderConfig": "config",
    "GateConfig": "config", "JobConfig": "config", "Settings": "config", "StoreConfig": "config",
    "TeacherConfig": "config",
    # types / errors
    "Memory": "types", "RewardPrediction": "types", "PredictionBatch": "types", "SearchHit": "types",
    "MemoryDistillError": "errors", "EmbedderMismatchError": "errors", "EmbeddingError": "errors",
    "InvalidMemoryError": "errors", "StoreError": "errors", "MemoryNotFoundError": "errors",
    "NotEnoughDataError": "errors", "ArtifactError": "errors", "NoModelError": "errors",
    "ConsolidationError": "errors", "JobLockedError": "errors", "DeviceError": "errors",
    "UnchangedDataError": "errors",
    # building blocks
    "Embedder": "embeddings", "HashingEmbedder": "embeddings", "OpenAIEmbedder": "embeddings",
    "LangChainEmbedder": "embeddings", "LocalEmbedder": "embeddings", "CachedEmbedder": "embeddings",
    "make_embedder": "embeddings",
    "MemoryStore": "store",
    "RewardBins": "rewards",
    "text_stats": "features", "FeatureSpec": "features",
    "RewardMLP": "models", "build_teacher": "models", "build_student": "models",
    "ArtifactRegistry": "artifacts",
    "Predictor": "predictor",
    "run_consolidation": "jobs", "ConsolidationReport": "jobs", "ConsolidationExecutor": "jobs",
    "ConsolidationWorker": "jobs", "NamespaceWorkers": "jobs", "forget": "jobs", "drift_report": "jobs",
    "ModelDistillation": "consolidation",
    "MemoryDistill": "facade",
    "export_jsonl": "transfer", "import_jsonl": "transfer", "ImportReport": "transfer",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'memory_distill' has no attribute {name!r}")
    value = getattr(import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .artifacts import ArtifactRegistry
    from .config import (
        BinsConfig,
        DistillConfig,
        EmbedderConfig,
        GateConfig,
        JobConfig,
        Settings,
        StoreConfig,
        TeacherConfig,
    )
    from .consolidation import ModelDistillation
    from .embeddings import (
        CachedEmbedder,
        Embedder,
        HashingEmbedder,
        LangChainEmbedder,
        LocalEmbedder,
        OpenAIEmbedder,
        make_embedder,
    )
    from .errors import (
        ArtifactError,
        ConsolidationError,
        DeviceError,
        EmbedderMismatchError,
        EmbeddingError,
        InvalidMemoryError,
        JobLockedError,
        MemoryDistillError,
        MemoryNotFoundError,
        NoModelError,
        NotEnoughDataError,
        StoreError,
        UnchangedDataError,
    )
    from .facade import MemoryDistill
    from .features import FeatureSpec, text_stats
    from .jobs import (
        ConsolidationExecutor,
        ConsolidationReport,
        ConsolidationWorker,
        NamespaceWorkers,
        drift_report,
        forget,
        run_consolidation,
    )
    from .models import RewardMLP, build_student, build_teacher
    from .predictor import Predictor
    from .rewards import RewardBins
    from .store import MemoryStore
    from .transfer import ImportReport, export_jsonl, import_jsonl
    from .types import Memory, PredictionBatch, RewardPrediction, SearchHit
