"""memory_distill embedders as LangChain ``Embeddings``."""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, PrivateAttr, SecretStr

from memory_distill.config import EmbedderConfig
from memory_distill.embeddings import Embedder, as_embedder, make_embedder

__all__ = ["MemoryDistillEmbeddings"]


class MemoryDistillEmbeddings(BaseModel, Embeddings):
    """LangChain ``Embeddings`` backed by a memory_distill embedder.

    ``MemoryDistillEmbeddings(kind="hashing", dim=512)`` is offline; ``kind="openai"`` uses
    ``text-embedding-3-small`` (or ``model``/``base_url``); ``kind="local"`` a sentence-transformers
    model. ``long_texts``: embed a text longer than the model reads in pieces (``"chunk"``) or cut it
    (``"truncate"``). ``MemoryDistillEmbeddings.from_embedder(e)`` wraps an existing embedder.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    kind: Literal["hashing", "openai", "local"] = "hashing"
    model: str = "text-embedding-3-small"
    dim: int | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    long_texts: Literal["chunk", "truncate"] = "chunk"
    _embedder: Embedder = PrivateAttr()

    def model_post_init(self, __context: Any) -> None:
        cfg = EmbedderConfig(kind=self.kind, model=self.model, dim=self.dim, base_url=self.base_url,
                             api_key=self.api_key, long_texts=self.long_texts, cache=False)
        self._embedder = make_embedder(cfg)

    @classmethod
    def from_embedder(cls, embedder: Embedder) -> MemoryDistillEmbeddings:
        """Wrap one of our embedders (or a LangChain ``Embeddings``); anything else is a ``TypeError`` here."""
        embedder = as_embedder(embedder)  # (a str was taken, and failed at the first embed_documents)
        obj = cls()
        obj._embedder = embedder
        return obj

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if isinstance(texts, str):  # list("abc") would embed each letter
            raise TypeError("embed_documents takes a list of texts, got a single str: wrap it as [text], or use "
                            "embed_query")
        return self._embedder.embed(list(texts)).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self._embedder.embed([text])[0].tolist()
