"""Inference: load the promoted student, embed, predict reward distributions.

On CPU the student's Linear layers run as a chain of float32 numpy matmuls (no autograd or
module dispatch), which keeps single-query latency in microseconds and batch throughput at
BLAS speed; on CUDA the torch module runs on the GPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
import torch

from .artifacts import ArtifactRegistry, LoadedModel
from .embeddings import Embedder
from .errors import ArtifactError, EmbedderMismatchError
from .models import RewardMLP, resolve_device
from .rewards import RewardBins, summarize_probs
from .types import PredictionBatch, RewardPrediction

__all__ = ["Predictor", "StudentRunner"]

log = logging.getLogger(__name__)


class StudentRunner:
    """Fast forward pass of a (BatchNorm-free, eval-mode) RewardMLP."""

    def __init__(self, model: RewardMLP, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._layers: list[tuple[np.ndarray, np.ndarray]] | None = None
        if self.device.type == "cpu" and not model.batchnorm:
            self._layers = [
                (m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
                for m in model.net if isinstance(m, torch.nn.Linear)
            ]

    def logits(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if self._layers is not None:
            h = X
            last = len(self._layers) - 1
            for i, (w, b) in enumerate(self._layers):
                h = h @ w
                h += b
                if i < last:
                    np.maximum(h, 0.0, out=h)
            return h
        with torch.inference_mode():
            return self.model(torch.from_numpy(X).to(self.device)).float().cpu().numpy()


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class Predictor:
    """Predictions of the promoted student for texts or embeddings.

    ``refresh()`` picks up a newly promoted version; if it cannot be loaded, the version
    already in memory keeps serving.
    """

    def __init__(self, registry: ArtifactRegistry | str, embedder: Embedder | None = None, *,
                 version: str | None = None, device: str = "cpu") -> None:
        self.registry = registry if isinstance(registry, ArtifactRegistry) else ArtifactRegistry(registry)
        self.embedder = embedder
        self.device = resolve_device(device)
        self._pinned = version
        self._lock = threading.Lock()
        self._install(self.registry.load(version, map_location=self.device))

    def _install(self, loaded: LoadedModel) -> None:
        emb = loaded.manifest.get("embedder", {})
        if self.embedder is not None and (emb.get("name") != self.embedder.name or int(emb.get("dim", -1)) != self.embedder.dim):
            raise EmbedderMismatchError(
                f"model {loaded.version} was trained on embedder {emb.get('name')!r} (dim {emb.get('dim')}), "
                f"but {self.embedder.name!r} (dim {self.embedder.dim}) was given: use the same embedder"
            )
        self.loaded = loaded
        self.bins: RewardBins = loaded.bins
        self.runner = StudentRunner(loaded.student, self.device)
        self._centers = self.bins.centers

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def in_dim(self) -> int:
        return self.loaded.student.in_dim

    def refresh(self) -> bool:
        """Load the registry's CURRENT version if it changed; True when a new version was installed."""
        if self._pinned is not None:
            return False
        try:
            cur = self.registry.current_version()
            if cur is None or cur == self.version:
                return False
            loaded = self.registry.load(cur, map_location=self.device)
            with self._lock:
                self._install(loaded)
            log.info("predictor now serves %s", cur)
            return True
        except (ArtifactError, EmbedderMismatchError) as e:
            log.warning("keeping %s: could not load the new version (%s)", self.version, e)
            return False

    # ------------------------------------------------------------ predict

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.embedder is None:
            raise ValueError("this Predictor has no embedder: pass embedder= or predict from embeddings")
        return self.embedder.embed(list(texts))

    def predict_embeddings(self, X: np.ndarray) -> PredictionBatch:
        """Vectorised: one forward pass for all rows of ``X`` [n, dim]."""
        X = np.asarray(X, np.float32)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.in_dim:
            raise ValueError(f"embeddings must be [n, {self.in_dim}], got {list(X.shape)}")
        with self._lock:
            runner, centers, version = self.runner, self._centers, self.version
        probs = _softmax(runner.logits(X))
        s = summarize_probs(probs, centers)
        return PredictionBatch(probs=s["probs"], mean=s["mean"], std=s["std"], entropy=s["entropy"],
                               quantiles=s["quantiles"], support=centers, model_version=version)

    def predict_batch(self, texts: Sequence[str]) -> PredictionBatch:
        if isinstance(texts, str):
            raise TypeError("predict_batch takes a list of texts: wrap a single text as [text]")
        return self.predict_embeddings(self._embed(texts))

    def predict(self, inputs: str | Sequence[str] | np.ndarray) -> list[RewardPrediction]:
        """RewardPredictions for texts (or an embedding matrix)."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, np.ndarray):
            return self.predict_embeddings(inputs).to_list()
        return self.predict_batch(list(inputs)).to_list()

    def predict_one(self, text: str) -> RewardPrediction:
        return self.predict([text])[0]
