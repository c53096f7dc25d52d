"""langchain-tests standard suites for the retriever, the vector store and the embeddings adapter."""

import tempfile
from collections.abc import Iterator

import pytest
from langchain_memory_distill import (
    MemoryDistillEmbeddings,
    MemoryDistillVectorStore,
    ValueAwareRetriever,
)
from langchain_tests.integration_tests import (
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)
from langchain_tests.unit_tests import EmbeddingsUnitTests

from memory_distill import HashingEmbedder, LangChainEmbedder, MemoryStore, StoreConfig
from memory_distill.demo_data import synthetic_episodes

_STORE = None


def _store() -> MemoryStore:
    global _STORE
    if _STORE is None:
        _STORE = MemoryStore(HashingEmbedder(dim=128), StoreConfig(path=tempfile.mkdtemp() + "/c"))
        _STORE.add_many(synthetic_episodes(50, seed=11))
    return _STORE


class TestValueAwareRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[ValueAwareRetriever]:
        return ValueAwareRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"store": _store(), "k": 4}

    @property
    def retriever_query_example(self) -> str:
        return "the agent searched the web"


class TestEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[MemoryDistillEmbeddings]:
        return MemoryDistillEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"kind": "hashing", "dim": 64}


class TestEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[MemoryDistillEmbeddings]:
        return MemoryDistillEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"kind": "hashing", "dim": 64}


class TestVectorStoreStandard(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self, tmp_path) -> Iterator[MemoryDistillVectorStore]:  # type: ignore[override]
        """An empty store per test, embedding with the suite's deterministic fake embeddings."""
        store = MemoryStore(LangChainEmbedder(self.get_embeddings()), StoreConfig(path=tmp_path / "c"))
        yield MemoryDistillVectorStore(store)
