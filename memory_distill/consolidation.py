"""Seed-compatible facade over the small modules: ``ModelDistillation``.

Keeps the original design's surface (``distill_from_memories``, ``get_student_prediction``,
``compare_teacher_student``, ``save_models``/``load_models``) while delegating to
:mod:`memory_distill.training`, :mod:`memory_distill.evaluate` and friends. Works on an
in-memory list of memories; use :func:`memory_distill.jobs.run_consolidation` for a store.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import BinsConfig, DistillConfig, JobConfig, TeacherConfig
from .embeddings import Embedder, HashingEmbedder, as_embedder
from .errors import ArtifactError, InvalidMemoryError, NotEnoughDataError
from .evaluate import compare_teacher_student
from .features import text_stats
from .models import RewardMLP, compression_ratio, resolve_device
from .predictor import _softmax
from .rewards import RewardBins, summarize_probs
from .store import TrainingData, coerce_memory
from .training import seeded_training, split_by_group_and_time, train_pair
from .types import Memory, PredictionBatch, RewardPrediction, text_list

__all__ = ["ModelDistillation"]


def _query_texts(query: Any) -> list[str]:
    """One text or a list of them as a list (``None`` failed as "'NoneType' object is not iterable")."""
    return [query] if isinstance(query, str) else text_list(query, "query")


class ModelDistillation:
    """Teacher -> student distillation on a list of memories.

    >>> md = ModelDistillation(temperature=4.0, alpha=0.7, beta=0.3, learning_rate=1e-3)
    >>> md.distill_from_memories(memories, num_epochs=10, batch_size=256)   # doctest: +SKIP
    >>> md.get_student_prediction("the agent searched and cited sources").mean  # doctest: +SKIP
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.7, beta: float = 0.3,
                 learning_rate: float = 1e-3, *, embedder: Embedder | None = None, n_bins: int = 64,
                 reward_range: tuple[float, float] | None = None, device: str = "auto", seed: int = 0,
                 curriculum: str = "uniform") -> None:
        self.embedder = as_embedder(embedder) if embedder is not None else HashingEmbedder()
        if reward_range is not None and (isinstance(reward_range, str) or len(reward_range) != 2):
            raise ValueError(f"reward_range is (low, high), got {reward_range!r}")
        self.config = JobConfig(
            bins=BinsConfig(n_bins=n_bins, low=reward_range[0] if reward_range else None,
                            high=reward_range[1] if reward_range else None),
            teacher=TeacherConfig(lr=learning_rate),
            distill=DistillConfig(temperature=temperature, alpha=alpha, beta=beta, lr=learning_rate,
                                  curriculum=curriculum),  # type: ignore[arg-type]
            seed=seed, device=device,  # type: ignore[arg-type]
        )
        self.device = resolve_device(device)
        self.teacher: RewardMLP | None = None
        self.student: RewardMLP | None = None
        self.bins: RewardBins | None = None
        self.history: dict[str, Any] = {}

    # ------------------------------------------------------------------ train

    def distill_from_memories(self, memories: Iterable[Memory | dict[str, Any] | tuple[str, float | None]],
                              num_epochs: int = 10, batch_size: int = 256) -> dict[str, Any]:
        """Train the teacher then distil the student; returns loss curves and held-out metrics."""
        if isinstance(memories, (str, Mapping, Memory)):  # iterating it would train on its letters (or keys)
            raise TypeError(f"distill_from_memories takes a list of memories, got one {type(memories).__name__}")
        mems = []
        for i, m in enumerate(memories):
            if isinstance(m, tuple):
                if len(m) != 2:
                    raise InvalidMemoryError(f"memories[{i}]: a tuple is (text, reward), got {len(m)} items")
                m = {"text": m[0], "reward": m[1]}
            mems.append(coerce_memory(m, index=i))
        rewards = np.array([np.nan if m.reward is None else m.reward for m in mems], np.float32)
        if int(np.isfinite(rewards).sum()) < 4:
            raise NotEnoughDataError("distill_from_memories needs at least 4 memories with a reward")
        X = self.embedder.embed([m.text for m in mems])
        groups = [str(m.metadata.get("group", m.id)) for m in mems]
        data = TrainingData([m.id for m in mems], X, rewards, np.array([m.created_at for m in mems]), groups,
                            text_stats([m.text for m in mems]))
        # validated (model_copy does not: num_epochs=0 trained nothing and evaluated untrained models)
        cfg = JobConfig.model_validate({**self.config.model_dump(), **{
            part: {**getattr(self.config, part).model_dump(), "epochs": num_epochs, "batch_size": batch_size}
            for part in ("teacher", "distill")}})
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        bins = RewardBins.fit(rewards[np.isfinite(rewards)], cfg.bins)
        split = split_by_group_and_time(data, 0.15, 0.15, rng)
        with seeded_training(cfg.seed, self.device):
            pair = train_pair(data, split, bins, cfg, device=self.device, generator=gen)
        # kept together only once training succeeded (new bins beside the old models read their bins wrong)
        self.teacher, self.student, self.bins = pair.teacher.cpu().eval(), pair.student.cpu().eval(), bins
        self.history = {
            "teacher_loss": pair.teacher_report.train_loss,
            "teacher_val_loss": pair.teacher_report.val_loss,
            "distill_loss": pair.distill_report.train_loss,
            "distill_val_kl": pair.distill_report.val_kl,
            "n_train": len(split.train), "n_val": len(split.val), "n_holdout": len(split.holdout),
        }
        if len(split.holdout):
            ev = compare_teacher_student(self.teacher, self.student, pair.X[torch.from_numpy(split.holdout)].cpu(),
                                         rewards[split.holdout], self.bins)
            self.history["evaluation"] = ev.to_dict()
        return self.history

    # ------------------------------------------------------------------ use

    def _need(self) -> tuple[RewardMLP, RewardMLP, RewardBins]:
        if self.teacher is None or self.student is None or self.bins is None:
            raise ArtifactError("no models yet: call distill_from_memories() or load_models() first")
        return self.teacher, self.student, self.bins

    def _inputs(self, texts: list[str]) -> np.ndarray:
        """Embeddings followed by text features: what the models read (one without features ignores them)."""
        return np.concatenate([self.embedder.embed(texts), text_stats(texts)], axis=1)

    def _batch(self, model: RewardMLP, X: np.ndarray, bins: RewardBins) -> PredictionBatch:
        with torch.inference_mode():
            probs = _softmax(model(torch.from_numpy(X)).numpy())
        s = summarize_probs(probs, bins.centers)
        return PredictionBatch(s["probs"], s["mean"], s["std"], s["entropy"], s["quantiles"], bins.centers)

    def get_student_prediction(self, query: str | Sequence[str]) -> RewardPrediction | list[RewardPrediction]:
        """The student's reward distribution for one text (or a list of texts)."""
        _, student, bins = self._need()
        texts = _query_texts(query)
        preds = self._batch(student, self._inputs(texts), bins).to_list()
        return preds[0] if isinstance(query, str) else preds

    def get_teacher_prediction(self, query: str | Sequence[str]) -> RewardPrediction | list[RewardPrediction]:
        teacher, _, bins = self._need()
        texts = _query_texts(query)
        preds = self._batch(teacher, self._inputs(texts), bins).to_list()
        return preds[0] if isinstance(query, str) else preds

    def compare_teacher_student(self, query: str | Sequence[str]) -> dict[str, Any]:
        """Teacher vs student on ``query``: compression_ratio, similarity.{prediction_match, kl_divergence}."""
        teacher, student, bins = self._need()
        texts = _query_texts(query)
        X = self._inputs(texts)
        t, s = self._batch(teacher, X, bins), self._batch(student, X, bins)
        pt, ps = np.clip(t.probs, 1e-12, None), np.clip(s.probs, 1e-12, None)
        kl = float((pt * (np.log(pt) - np.log(ps))).sum(1).mean())
        return {
            "compression_ratio": compression_ratio(teacher, student),
            "teacher": {"mean": t.mean.tolist(), "std": t.std.tolist()},
            "student": {"mean": s.mean.tolist(), "std": s.std.tolist()},
            "similarity": {
                "prediction_match": float((t.probs.argmax(1) == s.probs.argmax(1)).mean()),
                "kl_divergence": kl,
                "mean_abs_diff": float(np.abs(t.mean - s.mean).mean()),
            },
        }

    # ------------------------------------------------------------------ persistence

    def save_models(self, prefix: str | Path) -> dict[str, str]:
        """Write ``<prefix>_teacher.pth``, ``<prefix>_student.pth`` (state_dicts) and ``<prefix>_manifest.json``.

        Each file is written whole beside its place and renamed into it, the manifest last: a save that fails
        (a full disk) leaves the models saved before under that prefix as they were."""
        teacher, student, bins = self._need()
        prefix = str(prefix)
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        paths = {"teacher": f"{prefix}_teacher.pth", "student": f"{prefix}_student.pth",
                 "manifest": f"{prefix}_manifest.json"}
        tmp = {k: f"{p}.tmp-{uuid.uuid4().hex[:8]}" for k, p in paths.items()}
        manifest = {"format_version": 1, "created_at": time.time(), "bins": bins.to_dict(),
                    "teacher": teacher.arch(), "student": student.arch(),
                    "embedder": {"name": self.embedder.name, "dim": self.embedder.dim},
                    "config": self.config.model_dump(mode="json")}
        try:
            torch.save(teacher.state_dict(), tmp["teacher"])
            torch.save(student.state_dict(), tmp["student"])
            Path(tmp["manifest"]).write_text(json.dumps(manifest, indent=2))
            for k in ("teacher", "student", "manifest"):
                os.replace(tmp[k], paths[k])
        finally:
            for p in tmp.values():
                Path(p).unlink(missing_ok=True)
        return paths

    def load_models(self, prefix: str | Path) -> None:
        prefix = str(prefix)
        try:
            manifest = json.loads(Path(f"{prefix}_manifest.json").read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{prefix}_manifest.json not found: save_models({prefix!r}) writes it") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{prefix}_manifest.json cannot be read ({e}): save the models again") from None
        emb = manifest.get("embedder", {})
        if emb.get("name") != self.embedder.name or emb.get("dim") != self.embedder.dim:
            raise ArtifactError(f"models were saved with embedder {emb.get('name')!r}, this instance uses "
                                f"{self.embedder.name!r}: pass embedder= matching the saved one")
        try:  # all three read before any is kept: a failed load leaves the models this instance had
            teacher = RewardMLP.load(manifest["teacher"], torch.load(f"{prefix}_teacher.pth", weights_only=True))
            student = RewardMLP.load(manifest["student"], torch.load(f"{prefix}_student.pth", weights_only=True))
            bins = RewardBins.from_dict(manifest["bins"])
        except Exception as e:  # a missing or truncated file, weights of another shape, a manifest without a key
            raise ArtifactError(f"the models saved under {prefix!r} cannot be loaded ({type(e).__name__}: "
                                f"{str(e)[:200]}): save them again") from None
        self.teacher, self.student, self.bins = teacher.eval(), student.eval(), bins
