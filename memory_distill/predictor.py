"""Inference: load the promoted student, embed, predict reward distributions.

On CPU the student's Linear layers run as a chain of float32 numpy matmuls (no autograd or
module dispatch), which keeps single-query latency in microseconds and batch throughput at
BLAS speed; on CUDA the torch module runs on the GPU.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .artifacts import ArtifactRegistry, LoadedModel
from .embeddings import Embedder
from .errors import ArtifactError, EmbedderMismatchError, NoModelError, nearest_name
from .features import N_TEXT_FEATURES, FeatureSpec, metadata_columns, text_stats
from .models import FEATURE_CLIP, RewardMLP, resolve_device
from .rewards import RewardBins, summarize_probs
from .types import PredictionBatch, RewardPrediction

__all__ = ["Predictor", "StudentRunner"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Served:
    """One published version loaded for one device, shared by the Predictors of a process that serve it."""

    loaded: LoadedModel
    spec: FeatureSpec
    runner: StudentRunner


_SERVED: weakref.WeakValueDictionary[tuple[Any, ...], _Served] = weakref.WeakValueDictionary()
"""Loaded versions by (version directory, device, checksums, creation time); gone when no Predictor serves them."""
_SERVED_LOCK = threading.Lock()


class StudentRunner:
    """Fast forward pass of a (BatchNorm-free, eval-mode) RewardMLP.

    On the CPU the first layer is split: the embedding goes through ``W_e`` and the standardised,
    clipped text features through ``W_f``, so there is no concatenation and an absent feature
    (embedding-only input) costs nothing.
    """

    def __init__(self, model: RewardMLP, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.in_dim, self.n_features = model.in_dim, model.n_features
        self._layers: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._feat: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (W_f, mean, std)
        if self.device.type == "cpu" and not model.batchnorm:
            self._layers = [
                (m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
                for m in model.net if isinstance(m, torch.nn.Linear)
            ]
            if self.n_features:
                w0, b0 = self._layers[0]
                self._layers[0] = (np.ascontiguousarray(w0[: self.in_dim]), b0)
                self._feat = (np.ascontiguousarray(w0[self.in_dim :]),
                              model.feat_mean.detach().numpy().astype(np.float32),
                              model.feat_std.detach().numpy().astype(np.float32))
        self._mix: tuple[np.float32, np.ndarray] | None = None  # (weight, weight * prior): the histogram mix
        if model.has_mix:
            mw = float(model.mix_w)
            self._mix = (np.float32(1.0 - mw), (mw * model.mix_prior.detach().cpu().numpy()).astype(np.float32))
        self.has_ranking = model.has_ranking
        self._rank: tuple[np.ndarray, np.ndarray, float, np.ndarray] | None = None  # (w_emb, w_feat, mean w, centers)
        if self.has_ranking:
            w = model.rank_w.detach().cpu().numpy().astype(np.float32)
            self._rank = (np.ascontiguousarray(w[: self.in_dim]), np.ascontiguousarray(w[self.in_dim :]),
                          float(model.rank_mean_w), model.rank_centers.detach().cpu().numpy().astype(np.float64))

    def _standardized_features(self, F: np.ndarray) -> np.ndarray:
        assert self._feat is not None
        _, mean, std = self._feat
        z = F - mean
        z /= std
        np.clip(z, -FEATURE_CLIP, FEATURE_CLIP, out=z)
        if np.isnan(z).any():
            z[np.isnan(z)] = 0.0  # unknown -> the training mean
        return z

    def _check(self, X: np.ndarray, features: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if features is not None and self.n_features:
            F = np.asarray(features, np.float32)
            if F.shape != (X.shape[0], self.n_features):
                raise ValueError(f"features must be [{X.shape[0]}, {self.n_features}], got {list(F.shape)}")
            return X, F
        return X, None

    def advantage(self, X: np.ndarray, features: np.ndarray | None = None, *, mean: np.ndarray | None = None) -> np.ndarray:
        """The ranking head's score per row (:meth:`RewardMLP.advantage`); compare rows of one group only.

        ``mean``: the expected reward of the same rows, when already computed (saves a forward pass).
        """
        if not self.has_ranking:
            raise ValueError("this student has no ranking head")
        X, F = self._check(X, features)
        if self._rank is not None and self._layers is not None:
            w_e, w_f, w_mean, centers = self._rank
            out = X @ w_e
            if F is not None and self._feat is not None:
                out += self._standardized_features(F) @ w_f
            if w_mean != 0.0:
                if mean is None:
                    mean = self._probs(X, F) @ centers
                out += np.float32(w_mean) * np.asarray(mean, np.float32)
            return out
        m = None if mean is None else torch.from_numpy(np.asarray(mean, np.float32)).to(self.device)
        with torch.inference_mode():
            return self.model.advantage(self._tensor(X, F), m).float().cpu().numpy()

    def probs(self, X: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """The served reward distributions [n, n_bins]: softmax of the logits, then the histogram mix if attached."""
        return self._probs(*self._check(X, features))

    def logits(self, X: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Logits for embeddings ``X`` [n, in_dim] and (optional) raw text features [n, k]: their softmax is
        :meth:`probs` (with a histogram mix, the log of the mixed distribution)."""
        X, F = self._check(X, features)
        if self._layers is None:
            return self._module_logits(X, F)
        if self._mix is None:
            return self._raw_logits(X, F)
        with np.errstate(divide="ignore"):
            return np.log(self._probs(X, F))

    def _probs(self, X: np.ndarray, F: np.ndarray | None) -> np.ndarray:
        if self._layers is None:
            return _softmax(self._module_logits(X, F))  # the module's logits are those of the mix already
        p = _softmax(self._raw_logits(X, F))
        if self._mix is not None:
            p *= self._mix[0]
            p += self._mix[1]
        return p

    def _tensor(self, X: np.ndarray, F: np.ndarray | None) -> torch.Tensor:
        return torch.from_numpy(X if F is None else np.concatenate([X, F], axis=1)).to(self.device)

    def _module_logits(self, X: np.ndarray, F: np.ndarray | None) -> np.ndarray:
        """The torch path (CUDA, or a module the CPU path does not cover)."""
        with torch.inference_mode():
            return self.model(self._tensor(X, F)).float().cpu().numpy()

    def _raw_logits(self, X: np.ndarray, F: np.ndarray | None) -> np.ndarray:
        """The CPU path's forward pass, before any histogram mix."""
        assert self._layers is not None
        h = X
        last = len(self._layers) - 1
        for i, (w, b) in enumerate(self._layers):
            h = h @ w
            if i == 0 and F is not None and self._feat is not None:
                h += self._standardized_features(F) @ self._feat[0]
            h += b
            if i < last:
                np.maximum(h, 0.0, out=h)
        return h


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class Predictor:
    """Predictions of the promoted student for texts or embeddings.

    ``refresh()`` picks up a newly promoted version; if it cannot be loaded, the version
    already in memory keeps serving. ``namespace``: serve that namespace's own model
    (``registry.scoped(namespace)``, from ``consolidate(namespace=...)``) once it has one, and the
    registry's top-level model until then; ``refresh()`` switches over when the first one appears.
    """

    def __init__(self, registry: ArtifactRegistry | str, embedder: Embedder | None = None, *,
                 version: str | None = None, device: str = "cpu", namespace: str | None = None) -> None:
        self._top = registry if isinstance(registry, ArtifactRegistry) else ArtifactRegistry(registry)
        self.namespace = namespace
        self.registry = self._top.serving(namespace) if version is None else self._top.scoped(namespace)
        self.embedder = embedder
        self.device = resolve_device(device)
        self._pinned = version
        self._lock = threading.Lock()
        try:
            served = self._load(self.registry, version)
        except NoModelError:
            if namespace is None or version is not None:
                raise
            raise NoModelError(f"no model serves namespace {namespace!r} yet: neither its own (`memory-distill "
                               f"consolidate --namespace {namespace}`) nor a top-level one (`memory-distill "
                               "consolidate`)") from None
        self._install(served)

    def _load(self, registry: ArtifactRegistry, version: str | None = None) -> _Served:
        """``version`` (default CURRENT) of ``registry``, loaded once per process and device: every Predictor
        serving it shares the weights (a model per user falls back to one top-level model, not one copy each).
        CURRENT read just before another process replaced it (and deleted the old version) is read again."""
        if version is not None:
            return self._load_version(registry, version)
        v = registry.current_version()
        if v is None:
            registry.load(None)  # raises NoModelError, saying what to run
        try:
            return self._load_version(registry, v)  # type: ignore[arg-type]
        except ArtifactError:
            now = registry.current_version()
            if now is None or now == v:
                raise
            return self._load_version(registry, now)

    def _load_version(self, registry: ArtifactRegistry, v: str) -> _Served:
        m = registry.manifest(v)
        key = (str((registry.versions_dir / v).resolve()), str(self.device),  # type: ignore[operator]
               json.dumps(m.get("checksums"), sort_keys=True), m.get("created_at"))
        with _SERVED_LOCK:
            served = _SERVED.get(key)
        if served is None:
            loaded = registry.load(v, map_location=self.device)
            try:
                spec = FeatureSpec.from_manifest(loaded.manifest, loaded.student.n_features)
            except ValueError as e:
                raise ArtifactError(f"model {loaded.version}: {e}") from e
            fresh = _Served(loaded, spec, StudentRunner(loaded.student, self.device))
            with _SERVED_LOCK:
                served = _SERVED.setdefault(key, fresh)
        return served

    def _install(self, served: _Served) -> None:
        loaded = served.loaded
        emb = loaded.manifest.get("embedder", {})
        if self.embedder is not None and (emb.get("name") != self.embedder.name or int(emb.get("dim", -1)) != self.embedder.dim):
            raise EmbedderMismatchError(
                f"model {loaded.version} was trained on embedder {emb.get('name')!r} (dim {emb.get('dim')}), "
                f"but {self.embedder.name!r} (dim {self.embedder.dim}) was given: use that embedder, or consolidate to "
                "train a model on this one (after `reembed`, the store holds its vectors)"
            )
        self._retired: str | None = None
        self._served = served  # keeps the shared weights alive while this Predictor serves them
        self.loaded = loaded
        self.spec = served.spec
        self._warned_metadata = False  # once per served version
        self._checked_keys: set[str] = set()  # given metadata keys already checked for a near miss of a feature key
        self.bins: RewardBins = loaded.bins
        self.runner = served.runner
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
            if self.namespace is not None and self.registry.namespace != self.namespace \
                    and (own := self._top.scoped(self.namespace)).current_version() is not None:
                self._serve(own)  # the namespace's first model: switch to it
                log.info("predictor now serves namespace %r's model %s", self.namespace, self.version)
                return True
            cur = self.registry.current_version()
            if cur is None:
                return self._lost_current()
            if cur == self.version and self._retired is None:
                return False
            self._serve(self.registry)  # (CURRENT again: it may move on, and its old version go, while this reads)
            log.info("predictor now serves %s", self.version)
            return True
        except (ArtifactError, EmbedderMismatchError) as e:
            log.warning("keeping %s: could not load the new version (%s)", self.version, e)
            return False

    def _serve(self, registry: ArtifactRegistry, version: str | None = None) -> None:
        """Serve ``version`` (default CURRENT) of ``registry`` from now on; read from disk outside the lock, so
        predictions go on meanwhile."""
        served = self._load(registry, version)
        with self._lock:
            self._install(served)
        self.registry = registry

    def _lost_current(self) -> bool:
        """The registry serves nothing any more (``forget`` retired it: its model trained on deleted memories and
        nothing is left to train on): a namespace falls back to the top-level model; otherwise predictions stop
        (:attr:`retired`) until a new model is published."""
        if self.namespace is not None and self.registry is not self._top and self._top.current_version() is not None:
            self._serve(self._top)
            log.warning("namespace %r's own model was retired; serving the top-level model %s", self.namespace,
                        self.version)
            return True
        if self._retired is None:
            self._retired = (f"model {self.version} was retired from {self.registry.root} (it trained on deleted "
                             "memories and none are left to train on): consolidate again once there are memories")
            log.warning("predictor: %s", self._retired)
        return False

    @property
    def retired(self) -> str | None:
        """Why this predictor no longer predicts (its model was retired), or ``None`` while it serves."""
        return self._retired

    # ------------------------------------------------------------ predict

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.embedder is None:
            raise ValueError("this Predictor has no embedder: pass embedder= or predict from embeddings")
        return self.embedder.embed(list(texts))

    @property
    def has_ranking(self) -> bool:
        """Whether the served student has a within-group ranking head (predictions then carry ``advantage``)."""
        return self.runner.has_ranking

    @property
    def feature_spec(self) -> FeatureSpec:
        """The feature columns the served student reads (text statistics, metadata categories)."""
        return self.spec

    @property
    def uses_text_features(self) -> bool:
        """Whether the served student also reads text features (:mod:`memory_distill.features`)."""
        return self.spec.text

    @property
    def metadata_features(self) -> list[str]:
        """Metadata keys the served student reads (``JobConfig.metadata_features``); pass them as ``metadata=``."""
        return self.spec.keys

    def _features(self, spec: FeatureSpec, n: int, features: np.ndarray | None, texts: Sequence[str] | None,
                  metadata: Sequence[Mapping[str, Any] | None] | None) -> np.ndarray | None:
        if metadata is not None:
            if isinstance(metadata, Mapping | str):
                raise TypeError(f"metadata takes one dict per row, got one {type(metadata).__name__}: wrap a single "
                                "dict as [dict]")
            metadata = list(metadata)
            if len(metadata) != n:
                raise ValueError(f"metadata has {len(metadata)} items for {n} rows: pass one dict (or None) per row")
            bad = next((i for i, m in enumerate(metadata) if m is not None and not isinstance(m, Mapping)), None)
            if bad is not None:
                raise TypeError(f"metadata[{bad}] must be a dict (or None), got {type(metadata[bad]).__name__}: pass "
                                "one dict per row, e.g. [{'agent': 'planner'}]")
        if texts is not None and len(texts) != n:
            raise ValueError(f"texts has {len(texts)} items for {n} embeddings: pass one text per row")
        if not spec.width:
            return None
        if features is not None:
            F = np.asarray(features, np.float32)
            if F.ndim == 2 and F.shape == (n, spec.width) and metadata is None:
                return F  # already the full feature matrix
            if not (spec.text and F.shape == (n, N_TEXT_FEATURES)):
                raise ValueError(f"features must be [{n}, {N_TEXT_FEATURES}] (text_stats of the texts) or the full "
                                 f"[{n}, {spec.width}] matrix ({', '.join(spec.columns)}), got {list(F.shape)}")
            tf: np.ndarray | None = F
        else:
            tf = text_stats(list(texts)) if texts is not None and spec.text else None
        if metadata is None and spec.metadata_width and not self._warned_metadata:
            self._warned_metadata = True
            log.warning("model %s reads metadata features %s but none were given: predicting with their training "
                        "mean (pass metadata=[{...}, ...] one dict per row)", self.version, spec.keys)
        if metadata is not None and spec.metadata_width:
            self._warn_near_misses(spec, metadata)
        cols = metadata_columns(metadata, spec.keys) if metadata is not None else None
        return spec.build(n, text_features=tf, metadata=cols)

    def _warn_near_misses(self, spec: FeatureSpec, metadata: Sequence[Mapping[str, Any] | None]) -> None:
        """Warn about a key of the first row's metadata that is a near miss of a feature key that row lacks (``tol``
        for ``tool``): such rows read as the training mean. Rows of a call share a schema, so one row is read (not
        the batch), and each key is looked up once per served version."""
        if len(self._checked_keys) > 1000:  # keys made up per call (ids?): stop checking
            return
        given = next((m for m in metadata if m), None)
        if given is None:
            return
        for k in given.keys() - set(spec.keys) - self._checked_keys:
            self._checked_keys.add(k)
            near = nearest_name(k, spec.keys, cutoff=0.8)
            if near is not None and near not in given:
                log.warning("model %s reads the metadata key %r, and the metadata given has %r instead: did you mean "
                            "%r? (rows without it are predicted with its training mean)", self.version, near, k, near)

    def predict_embeddings(self, X: np.ndarray, *, features: np.ndarray | None = None,
                           texts: Sequence[str] | None = None,
                           metadata: Sequence[Mapping[str, Any] | None] | None = None) -> PredictionBatch:
        """Vectorised: one forward pass for all rows of ``X`` [n, dim].

        A student trained with text features also wants them: pass the ``texts`` (or their
        ``features = text_stats(texts)``). A student trained with ``metadata_features`` wants each
        row's metadata (``metadata=[{"agent": "a"}, ...]``, one dict or ``None`` per row). Whatever
        is missing reads as the training mean, a neutral input: the prediction then rests on the
        rest. ``features`` may also be the full feature matrix (``feature_spec.width`` columns).
        """
        X = np.asarray(X, np.float32)
        shape = list(X.shape)  # (as given: a 1-D row is reshaped below)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.in_dim:
            raise ValueError(f"embeddings must be [n, {self.in_dim}] (or one row of {self.in_dim}), got {shape}")
        # the student would answer NaN for such rows, which sorts anywhere. A NaN or inf makes its row's sum
        # non-finite: one matrix-vector product (a quarter of np.isfinite's time), the exact check only then
        if not np.isfinite(X @ np.ones(X.shape[1], np.float32)).all() and not (finite := np.isfinite(X).all(1)).all():
            bad = np.flatnonzero(~finite)
            raise ValueError(f"embeddings hold NaN or inf in rows {bad[:5].tolist()}{' ...' if bad.size > 5 else ''}: "
                             "re-embed those texts")
        if self._retired is not None:
            raise NoModelError(self._retired)
        with self._lock:
            runner, centers, version, spec = self.runner, self._centers, self.version, self.spec
        features = self._features(spec, X.shape[0], features, texts, metadata)
        s = summarize_probs(runner.probs(X, features), centers)
        adv = runner.advantage(X, features, mean=s["mean"]) if runner.has_ranking else None
        return PredictionBatch(probs=s["probs"], mean=s["mean"], std=s["std"], entropy=s["entropy"],
                               quantiles=s["quantiles"], support=centers, model_version=version, advantage=adv)

    def predict_batch(self, texts: Sequence[str], *,
                      metadata: Sequence[Mapping[str, Any] | None] | None = None) -> PredictionBatch:
        """One batch for these texts; ``metadata``: one dict (or ``None``) per text, see :meth:`predict_embeddings`."""
        if isinstance(texts, str):
            raise TypeError("predict_batch takes a list of texts: wrap a single text as [text]")
        texts = list(texts)
        if isinstance(metadata, str):
            raise TypeError(f"metadata takes one dict per text, got the str {metadata!r}: pass e.g. [{{'agent': ...}}]")
        if metadata is not None and not isinstance(metadata, Mapping) and len(metadata) != len(texts):
            raise ValueError(f"metadata has {len(metadata)} items for {len(texts)} texts: pass one dict (or None) per text")
        return self.predict_embeddings(self._embed(texts), texts=texts, metadata=metadata)

    def predict(self, inputs: str | Sequence[str] | np.ndarray, *,
                metadata: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None) -> list[RewardPrediction]:
        """RewardPredictions for texts (or an embedding matrix).

        ``metadata``: one dict per input (a single dict with a single text), for a student trained
        with ``JobConfig.metadata_features``.
        """
        if isinstance(inputs, str):
            inputs = [inputs]
            if isinstance(metadata, Mapping):
                metadata = [metadata]
        if isinstance(inputs, np.ndarray):
            return self.predict_embeddings(inputs, metadata=metadata).to_list()  # type: ignore[arg-type]
        if isinstance(inputs, bytes | Mapping) or not isinstance(inputs, Iterable):
            raise TypeError(f"predict takes a text, a list of texts or an embedding matrix, got "
                            f"{type(inputs).__name__}")
        return self.predict_batch(list(inputs), metadata=metadata).to_list()  # type: ignore[arg-type]

    def predict_one(self, text: str, metadata: Mapping[str, Any] | None = None) -> RewardPrediction:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"predict_one takes one metadata dict, got {type(metadata).__name__}: for several texts "
                            "use predict(texts, metadata=[...])")
        return self.predict([text], metadata=None if metadata is None else [metadata])[0]
