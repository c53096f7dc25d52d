import subprocess
import sys

import memory_distill

EXPECTED = {
    "ArtifactError", "ArtifactRegistry", "BinsConfig", "CachedEmbedder", "ConsolidationError", "FeatureSpec",
    "ConsolidationExecutor", "ConsolidationReport", "ConsolidationWorker", "DeviceError", "DistillConfig", "Embedder",
    "EmbedderConfig", "EmbedderMismatchError", "EmbeddingError", "GateConfig", "HashingEmbedder",
    "InvalidMemoryError", "JobConfig", "JobLockedError", "LangChainEmbedder", "LocalEmbedder", "Memory",
    "MemoryDistill", "MemoryDistillError", "MemoryNotFoundError", "MemoryStore", "ModelDistillation",
    "NoModelError", "NotEnoughDataError", "UnchangedDataError", "OpenAIEmbedder", "PredictionBatch", "Predictor", "RewardBins",
    "RewardMLP", "RewardPrediction", "SearchHit", "Settings", "StoreConfig", "StoreError", "TeacherConfig",
    "build_student", "build_teacher", "drift_report", "forget", "make_embedder", "run_consolidation", "text_stats",
    "ImportReport", "NamespaceWorkers", "export_jsonl", "import_jsonl", "__version__",
}


def test_all_is_pinned():
    assert set(memory_distill.__all__) == EXPECTED


def test_every_export_resolves():
    for name in memory_distill.__all__:
        assert getattr(memory_distill, name) is not None


def test_import_is_light_and_side_effect_free(tmp_path):
    code = (
        "import sys, os; import memory_distill; "
        "bad = [m for m in ('langchain_core', 'langchain', 'openai', 'chromadb', 'torch') if m in sys.modules]; "
        "assert not bad, bad; print(sorted(os.listdir('.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # wrote nothing


def test_unknown_attribute_is_a_clear_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        memory_distill.Nope  # noqa: B018
