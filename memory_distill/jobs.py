"""Consolidation ("sleep"): the recipe, and safe periodic execution.

:func:`run_consolidation` reads memories from the store, turns rewards into bin targets,
trains the teacher, distils the student, evaluates both on a held-out slice of the most recent
rewarded memories, gates the new student against the published one on that same slice, and
publishes a version (promoted or kept as a rejected candidate). It holds the registry's
single-writer lock for the whole run; readers keep serving the published student meanwhile.

:class:`ConsolidationExecutor` runs it in a background thread (submit -> future);
:class:`ConsolidationWorker` runs it periodically when N new rewards arrived or T elapsed;
:class:`NamespaceWorkers` keeps one per namespace (a model per team or user).
:func:`forget` deletes memories and marks models trained on them stale; each consolidation also marks stale the
models trained on memories deleted any other way.
:func:`drift_report` compares predicted and realised rewards on memories newer than the model.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import ArtifactRegistry
from .config import JobConfig, as_config, seconds
from .curriculum import Curriculum
from .distill import DistillReport
from .errors import (
    ArtifactError,
    ConsolidationError,
    JobLockedError,
    MemoryDistillError,
    NoModelError,
    NotEnoughDataError,
    StoreError,
    UnchangedDataError,
    nearest_name,
)
from .evaluate import (
    EvalReport,
    HistogramMix,
    ModelMetrics,
    compare_teacher_student,
    model_metrics,
    predict_probs,
    should_promote,
)
from .features import METADATA_MIN_COUNT, TEXT_FEATURES, FeatureSpec
from .models import model_inputs, resolve_device
from .ranking import RankingFit, within_group_spearman
from .rewards import RewardBins
from .store import MemoryStore, TrainingData
from .teacher import TeacherReport
from .training import Split, seeded_training, split_by_group_and_time, train_pair
from .types import RESERVED_PREFIX, check_flag, is_int, is_real

__all__ = [
    "ConsolidationExecutor",
    "ConsolidationReport",
    "ConsolidationWorker",
    "DriftReport",
    "Split",
    "data_fingerprint",
    "drift_report",
    "forget",
    "run_consolidation",
    "split_by_group_and_time",
]

log = logging.getLogger(__name__)


@dataclass
class ConsolidationReport:
    """What one consolidation did."""

    version: str
    promoted: bool
    reason: str
    n_rows: int
    n_rewarded: int
    n_train: int
    n_val: int
    n_holdout: int
    n_transfer: int
    skipped_rows: int
    warm_started: bool
    incumbent_version: str | None
    incumbent_metrics: ModelMetrics | None
    evaluation: EvalReport
    teacher: TeacherReport
    distill: DistillReport
    bins: dict[str, Any]
    seconds: float
    device: str
    threads: int = 0
    """CPU threads torch trained with (:attr:`JobConfig.threads`, else torch's default)."""
    ranking: RankingFit | None = None
    """The within-group ranking head for best-of-n (attached or why not; :mod:`memory_distill.ranking`)."""
    histogram_mix: HistogramMix | None = None
    """The served distribution's share of the training rewards' histogram (:attr:`JobConfig.histogram_mix`)."""
    features: FeatureSpec | None = None
    """The feature columns the models read next to the embedding (text statistics, metadata values)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: ``read`` (the published model and the store's rows), ``train`` (teacher and student;
    their own reports split it), ``evaluate`` (held-out metrics, gate, ranking check), ``publish``."""
    fingerprint: str = ""
    """What the run learned from (:func:`data_fingerprint`): the memories and the job's settings."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["evaluation"] = self.evaluation.to_dict()
        return d


def _clean_rows(data: TrainingData) -> tuple[np.ndarray, int]:
    """Rows with finite, non-zero embeddings; the rest are skipped and counted."""
    X = data.embeddings
    ok = np.empty(X.shape[0], bool)
    for s in range(0, X.shape[0], 65536):  # in chunks: no temporary the size of the embedding matrix
        c = X[s : s + 65536]
        ok[s : s + 65536] = np.isfinite(c).all(axis=1) & (np.abs(c).sum(axis=1) > 0)
    r = data.rewards
    ok &= np.isnan(r) | np.isfinite(r)
    return np.flatnonzero(ok), int((~ok).sum())


def _same_embedder(manifest: dict[str, Any], store: MemoryStore) -> bool:
    emb = manifest.get("embedder", {})
    return bool(emb.get("name") == store.embedder.name and int(emb.get("dim", -1)) == store.embedder.dim)


def _compatible(manifest: dict[str, Any], store: MemoryStore, cfg: JobConfig, spec: FeatureSpec) -> bool:
    if not _same_embedder(manifest, store):
        return False
    b = manifest.get("bins", {})
    if b.get("n_bins") != cfg.bins.n_bins:
        return False
    if cfg.bins.low is not None and b.get("low") != cfg.bins.low:
        return False
    if cfg.bins.high is not None and b.get("high") != cfg.bins.high:
        return False
    t, s = manifest.get("teacher", {}).get("arch", {}), manifest.get("student", {}).get("arch", {})
    try:  # same feature columns in the same order (a new metadata value means training from scratch)
        same_features = FeatureSpec.from_manifest(manifest, int(s.get("n_features", 0))) == spec
    except ValueError:  # the manifest disagrees with the student's width
        same_features = False
    return (list(t.get("hidden", [])) == list(cfg.teacher.hidden) and list(s.get("hidden", [])) == list(cfg.distill.hidden)
            and bool(t.get("batchnorm")) == cfg.teacher.batchnorm and same_features
            and int(t.get("n_features", 0)) == spec.width)


FINGERPRINT_EXCLUDES = {"threads", "keep_versions", "device"}
"""Job settings that do not change what a run learns, left out of its data fingerprint."""


def data_fingerprint(data: TrainingData, cfg: JobConfig) -> str:
    """What a run learns from: every row's id, reward, creation time, group, text statistics, asked-for
    metadata and vector (a 4-number random projection of it: a changed vector changes it), and the job's
    settings (those in :data:`FINGERPRINT_EXCLUDES` aside) and library version. Two runs with the same
    fingerprint train the same model (runs are seeded)."""
    from . import __version__

    h = hashlib.blake2b(digest_size=16)
    settings = cfg.model_dump(mode="json", exclude=FINGERPRINT_EXCLUDES)
    h.update(json.dumps([__version__, settings], sort_keys=True).encode())
    h.update("\0".join(data.ids).encode())
    h.update("\0".join(map(str, data.groups)).encode())
    h.update(np.ascontiguousarray(data.rewards, np.float32).tobytes())
    h.update(np.ascontiguousarray(data.created_at, np.float64).tobytes())
    if data.features is not None:
        h.update(np.ascontiguousarray(data.features, np.float32).tobytes())
    h.update(json.dumps(data.metadata, sort_keys=True, default=str).encode())
    if len(data):  # float32 throughout: no float64 copy of the embedding matrix
        proj = np.random.default_rng(0).standard_normal((data.embeddings.shape[1], 4)).astype(np.float32)
        h.update(np.ascontiguousarray(np.asarray(data.embeddings, np.float32) @ proj).tobytes())
    return h.hexdigest()


def _warn_absent_features(store: MemoryStore, cfg: JobConfig, data: TrainingData, train: np.ndarray) -> None:
    """Warn about each of ``JobConfig.metadata_features`` that no training memory carries (a typo, or a key not
    recorded yet): it adds no feature. Names the nearest key the memories do have (from one page of them)."""
    absent = [k for k in cfg.metadata_features if all(data.metadata[k][i] is None for i in train)]
    if not absent:
        return
    keys: set[str] = set()
    for metas in store._metadata_pages(where=store._where(cfg.namespace, None)):
        keys.update(k for m in metas for k in (m or {}) if not k.startswith(RESERVED_PREFIX))
        break
    where = f" in namespace {cfg.namespace!r}" if cfg.namespace is not None else ""
    for k in absent:
        near = nearest_name(k, sorted(keys))
        hint = (f"did you mean {near!r}?" if near else
                f"their metadata keys include {', '.join(map(repr, sorted(keys)[:10]))}" if keys else
                "they have no metadata")
        log.warning("JobConfig.metadata_features: no training memory%s has the metadata key %r, so it adds no "
                    "feature (%s)", where, k, hint)


def _warn_constant_features(spec: FeatureSpec, data: TrainingData, train: np.ndarray) -> None:
    """Warn about each metadata feature the training memories carry but that got no column: one value throughout
    (``agent="a"`` on every memory), or values each seen too rarely to learn from. It adds nothing to the model."""
    for key, vals in spec.metadata:
        if vals or key in spec.numeric:
            continue
        seen = Counter(str(v) for v in (data.metadata[key][i] for i in train) if v is not None)
        if not seen:
            continue  # absent: _warn_absent_features said so
        what = (f"every training memory that has it says {next(iter(seen))!r}; it helps once memories differ in it"
                if len(seen) == 1 else
                f"none of its {len(seen)} values is on {METADATA_MIN_COUNT}+ training memories (an id?); a value "
                f"helps once {METADATA_MIN_COUNT}+ memories share it")
        log.warning("JobConfig.metadata_features: %r adds no feature: %s", key, what)


def _check_parts(store: Any, registry: Any, who: str) -> tuple[MemoryStore, ArtifactRegistry]:
    """The store and the registry a job works on (a registry may be given as its directory); a wrong one is a
    ``TypeError`` naming the fix here, not an ``AttributeError`` at the first use (a worker's first poll)."""
    if not isinstance(store, MemoryStore):
        hint = (": pass mem.store and mem.registry (or use the MemoryDistill object's own method)"
                if hasattr(store, "store") and hasattr(store, "registry") else "")
        raise TypeError(f"{who} needs a MemoryStore, got {type(store).__name__}{hint}")
    if isinstance(registry, str | os.PathLike):
        registry = ArtifactRegistry(Path(registry))
    if not isinstance(registry, ArtifactRegistry):
        raise TypeError(f"{who} needs an ArtifactRegistry (or its directory), got {type(registry).__name__}")
    return store, registry


def _pointer_moved(registry: ArtifactRegistry, gated_against: str | None) -> str | None:
    """Why a run must not promote because CURRENT changed while it trained (a promote, rollback or retire in
    another process or thread), or ``None``. That change was someone's decision about what serves; this run was
    gated against the model that served before it, so promoting would silently undo it."""
    try:
        now = registry.current_version()
    except ArtifactError:  # an unreadable pointer is nobody's choice: the promotion repairs it, as before
        return None
    if now == gated_against:
        return None
    return (f"CURRENT changed while it trained ({gated_against or 'nothing'} -> {now or 'nothing'}: a promote, "
            "rollback or retire elsewhere): not promoted, so that change stands; the next run is gated against "
            "it (promote this version by hand to serve it now)")


def run_consolidation(
    store: MemoryStore,
    registry: ArtifactRegistry,
    config: JobConfig | Mapping[str, Any] | None = None,
    *,
    curriculum: Curriculum | None = None,
    lock_timeout: float = 0,
    progress: bool = False,
    skip_unchanged: bool = False,
) -> ConsolidationReport:
    """One full consolidation; see the module docstring. Raises ConsolidationError (nothing published).

    With ``config.namespace`` set, the run trains on that namespace only and publishes into
    ``registry.scoped(namespace)``: it is gated against that namespace's model, never another's.

    ``skip_unchanged``: when the memories and the job's settings are exactly what the registry's last run saw
    (:func:`data_fingerprint`) and the current model is not stale, train nothing and raise
    :class:`UnchangedDataError` after reading the store; the history records a ``skipped`` run. The worker
    does this, so a time trigger on an idle store does not publish copies of the same model, nor overturn a
    ``rollback`` or ``promote`` an operator made since with a model of the same data.
    """
    store, registry = _check_parts(store, registry, "run_consolidation")
    cfg = as_config(config, JobConfig, "config")
    skip_unchanged = check_flag(skip_unchanged, "skip_unchanged", "train nothing when nothing changed")
    progress = check_flag(progress, "progress", "show progress bars")
    top, registry = registry, registry.scoped(cfg.namespace)  # forget() logs deletions in the top-level registry
    first = not registry.exists()
    lk = registry.acquire(lock_timeout)
    started = time.time()
    prev_threads = torch.get_num_threads()
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        report = _consolidate(store, registry, cfg, curriculum, progress, skip_unchanged, top)
    except JobLockedError:
        raise
    except UnchangedDataError as e:
        registry.append_history({"started_at": started, "seconds": time.time() - started, "outcome": "skipped",
                                 "version": e.version, "fingerprint": e.fingerprint, "reason": str(e),
                                 "n_rewarded": e.n_rewarded})
        lk.release()
        raise
    except BaseException as e:
        # a namespace's failed first run (a typo, too few rewards) leaves no registry behind
        if not (first and registry._discard_unused()):
            registry.append_history({"started_at": started, "seconds": time.time() - started, "outcome": "failed",
                                     "error": f"{type(e).__name__}: {e}"})
        lk.release()
        if isinstance(e, MemoryDistillError) and not isinstance(e, ConsolidationError):
            raise ConsolidationError(f"consolidation failed, nothing was published: {e}") from e
        raise
    finally:
        if cfg.threads is not None:
            torch.set_num_threads(prev_threads)
    registry.append_history({
        "started_at": started, "seconds": report.seconds, "outcome": "promoted" if report.promoted else "rejected",
        "version": report.version, "reason": report.reason, "n_rows": report.n_rows, "n_rewarded": report.n_rewarded,
        "skipped_rows": report.skipped_rows, "warm_started": report.warm_started,
        "incumbent": report.incumbent_version, "student": report.evaluation.student.to_dict(),
        "teacher": report.evaluation.teacher.to_dict(), "kl": report.evaluation.kl_divergence,
        "curriculum": report.distill.curriculum, "device": report.device, "threads": report.threads,
        "histogram_mix": report.histogram_mix.weight if report.histogram_mix is not None else None,
        "phases": report.phases, "fingerprint": report.fingerprint,
    })
    try:
        dropped = registry.drop_stale()  # the stale model this run replaced, or this run's own if it lost memories
        if dropped:
            report.extra["deleted_stale_versions"] = dropped
        if cfg.keep_versions is not None:
            pruned = registry.prune(cfg.keep_versions)
            if pruned:
                report.extra["pruned_versions"] = pruned
    except OSError as e:  # the run is published: a failed clean-up is only worth a warning
        log.warning("could not prune old versions in %s: %s", registry.root, e)
    finally:
        lk.release()
    return report


def _last_fingerprint(registry: ArtifactRegistry) -> str | None:
    """What the registry's last run (promoted, rejected or skipped) learned from."""
    last = registry.last_run()
    return last.get("fingerprint") if last is not None else None


def _consolidate(store: MemoryStore, registry: ArtifactRegistry, cfg: JobConfig, curriculum: Curriculum | None,
                 progress: bool, skip_unchanged: bool, top: ArtifactRegistry) -> ConsolidationReport:
    t0 = time.perf_counter()
    started = time.time()
    device = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    # incumbent: the published model, if any
    incumbent = None
    inc_spec = FeatureSpec()
    inc_version = registry.current_version()
    stale = registry.stale_versions()
    replace_reason = None  # why the incumbent must be replaced without being scored
    if inc_version is not None:
        try:
            incumbent = registry.load(inc_version, with_teacher=True, map_location=device)
            inc_spec = FeatureSpec.from_manifest(incumbent.manifest, incumbent.student.n_features)
        except (MemoryDistillError, ValueError) as e:
            log.warning("published model %s cannot be loaded (%s); training from scratch", inc_version, e)
            incumbent = None
    if incumbent is not None and not _same_embedder(incumbent.manifest, store):
        # the store was re-embedded since (MemoryStore.reembed): the incumbent reads other vectors,
        # so it can neither be scored on these nor serve them
        replace_reason = (f"the published model reads {incumbent.manifest.get('embedder', {}).get('name')!r} vectors "
                          f"but the store now holds {store.embedder.name!r} ones: it cannot serve them")
        incumbent, inc_spec = None, FeatureSpec()

    keys = (*cfg.metadata_features, *(k for k in inc_spec.keys if k not in cfg.metadata_features))
    data = store.load_training_data(namespace=cfg.namespace, metadata_keys=keys)
    n_gone = 0
    inc_train: set[str] = set()  # what the published model learned from (for the stale check and a fair gate)
    if incumbent is not None and inc_version is not None and inc_version not in stale:
        # memories deleted without forget() (a vector store or LangGraph store delete, an expired TTL,
        # another process, raw chromadb): the published model was trained on them, so it is as stale
        # as forget() would have made it
        inc_train = set(registry.train_ids(inc_version))
        gone = inc_train.difference(data.ids)
        if gone:
            n_gone = len(gone)
            hit = registry.mark_stale(gone, f"{n_gone} training memories were deleted outside forget()")
            log.warning("the published model %s was trained on %d memories no longer in the store; marked stale: %s",
                        inc_version, n_gone, hit)
            stale = registry.stale_versions()
    fingerprint = data_fingerprint(data, cfg)
    if (skip_unchanged and incumbent is not None and inc_version is not None and inc_version not in stale
            and replace_reason is None and _last_fingerprint(registry) == fingerprint):
        raise UnchangedDataError(
            f"nothing new since the last run: the {len(data)} memories and the job's settings are what it saw; "
            f"{inc_version} keeps serving (run without skip_unchanged to train anyway)",
            version=inc_version, fingerprint=fingerprint, n_rewarded=int(data.rewarded.sum()))
    keep, skipped = _clean_rows(data)
    if skipped:
        log.warning("skipping %d rows with non-finite or empty embeddings", skipped)
        data = data.subset(keep)
    n_rewarded = int(data.rewarded.sum())
    if n_rewarded < cfg.min_rewarded:
        where = ""
        if cfg.namespace is not None:
            where = f" in namespace {cfg.namespace!r}"
            if len(data) == 0:
                known = sorted(store.stats()["namespaces"])
                where += f" (the store's namespaces: {', '.join(map(repr, known[:10])) or 'none'})"
        raise NotEnoughDataError(
            f"only {n_rewarded} rewarded memories{where} (need JobConfig.min_rewarded={cfg.min_rewarded}): "
            "record more rewards with set_reward() or lower min_rewarded (`--min-rewarded N` on the command line, "
            "MEMORY_DISTILL_JOB__MIN_REWARDED in the environment)"
        )
    rewards = data.rewards[data.rewarded]
    if float(rewards.max()) == float(rewards.min()):  # a model is still published: it predicts that value well
        log.warning("every rewarded memory%s has the reward %g: the models can only learn that value and rank nothing; "
                    "record rewards that tell better episodes from worse ones",
                    f" in namespace {cfg.namespace!r}" if cfg.namespace is not None else "", float(rewards[0]))
    split = split_by_group_and_time(data, cfg.gate.holdout_fraction, 0.15, rng)
    if not len(split.holdout):  # the split holds out whole groups, and never the last one
        group = data.groups[int(split.train[0])]
        where = f" in namespace {cfg.namespace!r}" if cfg.namespace is not None else ""
        raise NotEnoughDataError(
            f"all {n_rewarded} rewarded memories{where} share one group ({group!r}, from the 'group' metadata key): "
            "a run evaluates and gates its model on groups it did not train on, so it needs two or more; record "
            "episodes of other tasks, or leave 'group' out of the metadata (each memory is then its own group)")
    if len(split.train) < 2:
        raise NotEnoughDataError(
            f"only {len(split.train)} training row{'s' if len(split.train) != 1 else ''} of {n_rewarded} rewarded "
            f"memories, after {len(split.holdout)} held out for evaluation and {len(split.val)} for validation: a run "
            "trains on at least 2; record more rewarded memories")
    # the model's feature columns: text statistics, then one per metadata value seen in the training
    # rows (a value only in held-out or unrewarded rows would get a column no weight was fit for)
    raw_text = data.features  # the store always returns text statistics (NaN rows where unknown)
    assert raw_text is not None
    spec = FeatureSpec.fit(text=cfg.text_features,
                           columns={k: [data.metadata[k][i] for i in split.train] for k in cfg.metadata_features})
    data.features = spec.build(len(data), text_features=raw_text, metadata=data.metadata)
    _warn_absent_features(store, cfg, data, split.train)
    _warn_constant_features(spec, data, split.train)

    inc_stale = inc_version in stale
    warm = bool(cfg.warm_start and incumbent is not None and not inc_stale and _compatible(incumbent.manifest, store, cfg, spec))

    bins = incumbent.bins if warm and incumbent else RewardBins.fit(data.rewards[data.rewarded], cfg.bins)

    init = (incumbent.teacher, incumbent.student) if warm and incumbent is not None and incumbent.teacher is not None else None
    t_read = time.perf_counter()
    threads = torch.get_num_threads()
    # seeded right before training (and serialised with other runs in this process): the weights a run starts
    # from must depend only on the seed, not on what else drew from torch's RNG before or meanwhile
    with seeded_training(cfg.seed, device):
        trained = train_pair(data, split, bins, cfg, device=device, generator=gen, curriculum=curriculum,
                             init=init, progress=progress)
    teacher, student, t_report, d_report = trained.teacher, trained.student, trained.teacher_report, trained.distill_report
    X_all = trained.X
    t_train = time.perf_counter()

    def rows(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(idx).to(X_all.device)

    # evaluate + gate on the held-out recent slice (fall back to validation rows when tiny)
    eval_idx = split.holdout if len(split.holdout) else split.val
    ev_x = X_all[rows(eval_idx)].cpu()
    s_probs = predict_probs(student.cpu(), ev_x)  # once: the report, the gate and the ranking check read them
    evaluation = compare_teacher_student(teacher.cpu(), student, ev_x, data.rewards[eval_idx], bins,
                                         student_probs=s_probs, train_rewards=data.rewards[split.train])
    inc_metrics = None
    if incumbent is not None:
        if inc_spec == spec:
            inc_x = ev_x
        else:  # the incumbent reads other feature columns: build them as it was trained
            inc_f = inc_spec.build(len(eval_idx), text_features=raw_text[eval_idx],
                                   metadata={k: [data.metadata[k][i] for i in eval_idx] for k in inc_spec.keys})
            inc_x = model_inputs(data.embeddings[eval_idx], inc_f)[:]  # type: ignore[index]
        inc_probs = predict_probs(incumbent.student.cpu(), inc_x)
        inc_metrics = model_metrics(inc_probs, data.rewards[eval_idx], incumbent.bins)
    gate_cand, gate_inc, gate_note, gate_rows = evaluation.student, inc_metrics, "", None
    if incumbent is not None and inc_metrics is not None and inc_train and not replace_reason and not inc_stale:
        # a held-out group the published model trained on (a question asked again: its new answers made it one of
        # the most recent) flatters it, as the candidate never saw it: compare on the groups neither trained on
        seen = np.zeros(int(split.groups.max()) + 1, bool)
        seen[split.groups[np.fromiter((i for i, mid in enumerate(data.ids) if mid in inc_train), np.int64)]] = True
        fair = ~seen[split.groups[eval_idx]]
        if not fair.all():
            gate_rows = {"compared": int(fair.sum()), "left_out": int((~fair).sum())}
            if fair.sum() >= cfg.gate.min_holdout:
                gate_cand = model_metrics(s_probs[fair], data.rewards[eval_idx][fair], bins)
                gate_inc = model_metrics(inc_probs[fair], data.rewards[eval_idx][fair], incumbent.bins)
                gate_note = (f", on the {int(fair.sum())} held-out memories in groups the published model never "
                             f"trained on ({int((~fair).sum())} in groups it did are left out)")
            else:
                gate_rows["compared"] = len(eval_idx)
                gate_note = (f"; the published model trained on groups holding {int((~fair).sum())} of the "
                             f"{len(eval_idx)} held-out memories, which flatters it: too few others to compare on")
    promote, reason = ((True, replace_reason) if replace_reason else
                       should_promote(gate_cand, gate_inc, cfg.gate, incumbent_stale=inc_stale))
    reason += gate_note
    if trained.ranking is not None and student.has_ranking and len(split.holdout):
        # how the head and the expected reward rank the held-out groups (reported, not gated); eval_idx is the
        # held-out slice here
        mean = s_probs @ bins.centers
        with torch.no_grad():
            adv = student.advantage(ev_x, torch.from_numpy(mean)).numpy()
        g, r = split.groups[split.holdout], data.rewards[split.holdout]
        trained.ranking.holdout_within_spearman = within_group_spearman(adv, r, g)[0]
        trained.ranking.holdout_within_spearman_mean = within_group_spearman(mean, r, g)[0]

    t_eval = time.perf_counter()
    train_ids = [data.ids[i] for i in np.concatenate([split.train, split.val, split.transfer])]
    # forget() during the run marked stale the versions that existed then, not this one: never promote a model
    # trained on memories forgotten meanwhile (checked only when forget() ran since the run started)
    forgotten: set[str] = set()
    last_forget = top.last_deletion()
    if last_forget is not None and float(last_forget.get("time", 0)) >= started:
        forgotten = set(train_ids) - store.existing_ids(train_ids)
        if forgotten:
            promote, reason = False, (f"{len(forgotten)} of its training memories were forgotten while it trained: "
                                      "not promoted, marked stale")
    manifest = {
        "status": "promoted" if promote else "rejected",
        "reason": reason,
        "embedder": {"name": store.embedder.name, "dim": store.embedder.dim},
        "features": TEXT_FEATURES if spec.text else None,
        "feature_spec": spec.to_dict(),
        "ranking": asdict(trained.ranking) if trained.ranking is not None else None,
        "histogram_mix": trained.histogram_mix.to_dict() if trained.histogram_mix is not None else None,
        "bins": bins.to_dict(),
        "target": cfg.bins.target,
        "config": cfg.model_dump(mode="json"),
        "metrics": evaluation.to_dict(),
        "incumbent": {"version": inc_version, "metrics": inc_metrics.to_dict() if inc_metrics else None},
        "gate_rows": gate_rows,
        "data": {"n_rows": len(data), "n_rewarded": n_rewarded, "n_train": len(split.train),
                 "n_val": len(split.val), "n_holdout": len(split.holdout), "n_transfer": len(split.transfer),
                 "skipped_rows": skipped, "fingerprint": fingerprint,
                 "max_created_at": float(data.created_at.max()) if len(data) else None,
                 "namespace": cfg.namespace},
        "warm_started": warm,
        "teacher_report": asdict(t_report),
        "distill_report": asdict(d_report),
    }
    with registry.pointer_lock():  # a promote/rollback/retire elsewhere waits for this publish, or this one sees it
        if promote and (moved := _pointer_moved(registry, inc_version)) is not None:
            promote, reason = False, moved
            manifest.update(status="rejected", reason=reason)
        version = registry.publish(teacher, student, manifest, promote=promote, train_ids=train_ids)
    if forgotten:
        registry.mark_stale(forgotten, reason)
    t_end = time.perf_counter()
    return ConsolidationReport(
        version=version, promoted=promote, reason=reason, n_rows=len(data), n_rewarded=n_rewarded,
        n_train=len(split.train), n_val=len(split.val), n_holdout=len(split.holdout), n_transfer=len(split.transfer),
        skipped_rows=skipped, warm_started=warm, incumbent_version=inc_version, incumbent_metrics=inc_metrics,
        evaluation=evaluation, teacher=t_report, distill=d_report, bins=bins.to_dict(),
        seconds=t_end - t0, device=str(device), threads=threads, ranking=trained.ranking,
        histogram_mix=trained.histogram_mix, features=spec,
        phases={"read": t_read - t0, "train": t_train - t_read, "evaluate": t_eval - t_train, "publish": t_end - t_eval},
        fingerprint=fingerprint,
        extra={**({"deleted_training_memories": n_gone} if n_gone else {}),
               **({"gate_rows": gate_rows} if gate_rows else {})},
    )


# ---------------------------------------------------------------------------- forgetting


def forget(store: MemoryStore, registry: ArtifactRegistry, ids: list[str] | None = None, *,
           where: dict[str, Any] | None = None, namespace: str | None = None, older_than: float | str | None = None,
           reason: str = "", dry_run: bool = False) -> dict[str, Any]:
    """Delete memories and mark every model trained on any of them stale.

    Select by ``ids``, a metadata filter ``where``, a ``namespace`` and/or ``older_than`` (seconds, or a duration
    such as ``"90d"``: memories created longer ago than that; a retention policy). The stale versions are deleted
    at once, all but a current one, which serves until the next consolidation replaces it (and deletes it): their weights
    hold what was forgotten, so ``rollback`` never restores them (``entry["deleted_versions"]``). The next
    consolidation retrains from scratch without them (no warm start from a stale model) and replaces a stale
    published model even if the gate would otherwise refuse. A registry left with a stale model and no memories to train
    a new one (a user's namespace forgotten whole) is retired (:meth:`ArtifactRegistry.retire`): the namespace's
    predictors fall back to the top-level model, and the stale versions are deleted (``entry["retired"]``).

    ``dry_run``: change nothing and return what would happen (the same entry, with ``"dry_run": True``): which
    memories go, which versions become stale, which are deleted and which registries retired. Preview a
    retention policy or a ``where`` before it deletes anything.
    """
    store, registry = _check_parts(store, registry, "forget")
    if ids is None and where is None and namespace is None and older_than is None:
        raise StoreError("forget needs ids, where, namespace or older_than (CLI: --id, --where, --namespace, "
                         "--older-than): refusing to forget everything")
    dry_run = check_flag(dry_run, "dry_run", "change nothing, return what would happen")  # ("yes" deleted)
    if not isinstance(reason, str):
        raise TypeError(f"reason must be text (why they are forgotten, for the deletion log), got "
                        f"{type(reason).__name__} {reason!r}")
    if older_than is not None:
        try:  # seconds, or "90d" as on the command line
            older_than = seconds(older_than, "older_than", allow_zero=True)
        except (TypeError, ValueError) as e:
            raise StoreError(str(e)) from None
        if older_than == 0:  # every memory was created before now: a retention policy of nothing
            raise StoreError("older_than=0 selects every memory: refusing to forget everything; give a retention "
                             "period such as '90d', or a namespace to empty one")
        if where and "created_at" in where:
            raise StoreError("give older_than or a created_at clause in where, not both")
        where = {**(where or {}), "created_at": {"$lt": time.time() - float(older_than)}}
    deleted = store.delete(ids, where=where, namespace=namespace, dry_run=dry_run)
    if dry_run:
        return _forget_preview(store, registry, deleted, ids, where, namespace, reason)
    why = reason or f"{len(deleted)} training memories deleted"
    stale = registry.mark_stale(set(deleted), why)
    dropped = registry.drop_stale()  # their weights hold what was forgotten: only a current one serves on, until replaced
    regs = registry.namespaces()
    for ns, reg in regs.items():  # per-namespace models trained on them too
        stale += [f"{ns}/{v}" for v in reg.mark_stale(set(deleted), why)]
        dropped += [f"{ns}/{v}" for v in reg.drop_stale()]
    # a registry whose model trained on deleted memories and that has nothing left to train on (a user's namespace
    # forgotten whole, or the whole store) would serve that model for good: retire it
    scopes: list[tuple[str | None, ArtifactRegistry]] = [(None, registry), *regs.items()]
    stale_now = [(scope, reg) for scope, reg in scopes if (cur := reg.current_version()) is not None
                 and cur in reg.stale_versions()]
    # a filtered count reads every row: past a few namespaces (a retention policy touching many users), one pass
    counts = store.namespace_counts() if len(stale_now) > 2 else None
    retired: list[str] = []
    for scope, reg in stale_now:
        left = store.count(namespace=scope) if counts is None or scope is None else counts.get(scope, 0)
        if left == 0:
            gone = reg.retire(f"{why}; no memories left to train on")
            dropped += gone if scope is None else [f"{scope}/{v}" for v in gone]
            retired.append("(top level)" if scope is None else scope)
    entry = {"time": time.time(), "n_deleted": len(deleted), "ids": deleted[:1000], "where": where,
             "namespace": namespace, "stale_versions": stale, "deleted_versions": dropped, "retired": retired,
             "reason": reason}
    registry.log_deletion(entry)
    log.info("forgot %d memories; stale versions: %s", len(deleted), stale)
    return entry


def _forget_preview(store: MemoryStore, registry: ArtifactRegistry, deleted: list[str], ids: list[str] | None,
                    where: dict[str, Any] | None, namespace: str | None, reason: str) -> dict[str, Any]:
    """What :func:`forget` would do for these ``deleted`` ids, computed without changing anything."""
    gone = set(deleted)
    stale: list[str] = []
    doomed: list[str] = []
    retired: list[str] = []
    retired_current: list[str] = []  # (forget lists them after the stale versions it drops)
    for scope, reg in [(None, registry), *registry.namespaces().items()]:
        prefix = "" if scope is None else f"{scope}/"
        already, hit = reg.stale_versions(), reg.trained_on(gone)
        stale += [prefix + v for v in hit]
        cur = reg.current_version()
        doomed += [prefix + v for v in reg.list_versions() if (v in already or v in hit) and v != cur]
        if cur is None or not (cur in already or cur in hit):
            continue
        if scope is None:
            left = store.count() - len(gone)
        elif namespace not in (None, scope):
            left = store.count(namespace=scope)
        else:  # this request's rows in that namespace
            left = store.count(namespace=scope) - len(store.delete(ids, where=where, namespace=scope, dry_run=True))
        if left == 0:
            retired_current.append(prefix + cur)
            retired.append("(top level)" if scope is None else scope)
    return {"dry_run": True, "n_deleted": len(deleted), "ids": deleted[:1000], "where": where, "namespace": namespace,
            "stale_versions": stale, "deleted_versions": doomed + retired_current, "retired": retired,
            "reason": reason}


# ---------------------------------------------------------------------------- drift


@dataclass
class DriftReport:
    """Realised vs predicted reward on memories rewarded after the model was published."""

    version: str
    n: int
    mae: float | None
    bias: float | None
    """Mean (predicted - realised): > 0 means the model is optimistic."""
    calibration_error: float | None
    baseline_mae: float | None
    """The model's held-out MAE when it was published."""
    drift: float | None
    """mae - baseline_mae."""
    triggered: bool
    crps: float | None = None
    """CRPS of the predicted distributions on these rewards (``ModelMetrics.crps``)."""
    baseline_crps: float | None = None
    """The model's held-out CRPS when it was published (None for models published before CRPS was recorded)."""


def drift_report(store: MemoryStore, registry: ArtifactRegistry, *, threshold: float = 0.1, min_samples: int = 20,
                 namespace: str | None = None) -> DriftReport:
    """Compare the published student with rewards that arrived after it was published.

    With ``namespace``: that namespace's rows, scored by its own model when it has one
    (:meth:`ArtifactRegistry.serving`), else by the top-level one.
    """
    from .predictor import Predictor

    store, registry = _check_parts(store, registry, "drift_report")
    threshold = _mae_rise(threshold, "threshold")  # NaN never triggered
    if not is_int(min_samples) or min_samples < 1:
        raise ValueError(f"min_samples must be an int >= 1, got {min_samples!r}")
    pred = Predictor(registry.serving(namespace))
    published = float(pred.loaded.manifest.get("created_at", 0.0))
    published_metrics = pred.loaded.manifest.get("metrics", {}).get("student", {})
    baseline = published_metrics.get("mae")
    spec = pred.feature_spec
    X_parts: list[np.ndarray] = []
    f_parts: list[np.ndarray] = []
    r_parts: list[np.ndarray] = []
    where = {"_md_rewarded_at": {"$gt": published}}
    for page in store.iter_pages(namespace=namespace, where=where, rewarded_only=True, metadata_keys=spec.keys):
        X_parts.append(page.embeddings)
        F = spec.build(len(page.ids), text_features=page.features, metadata=page.metadata)
        if F is not None:
            f_parts.append(F)
        r_parts.append(page.rewards)
    if not X_parts:
        return DriftReport(pred.version, 0, None, None, None, baseline, None, False,
                           baseline_crps=published_metrics.get("crps"))
    X, r = np.concatenate(X_parts), np.concatenate(r_parts)
    batch = pred.predict_embeddings(X, features=np.concatenate(f_parts) if f_parts else None)
    m = model_metrics(batch.probs, r, pred.bins)
    mae = float(np.abs(batch.mean - r).mean())
    drift = mae - baseline if baseline is not None else None
    triggered = len(r) >= min_samples and drift is not None and drift > threshold
    return DriftReport(pred.version, int(len(r)), mae, float((batch.mean - r).mean()), m.calibration_error,
                       baseline, drift, bool(triggered), crps=m.crps, baseline_crps=published_metrics.get("crps"))


# ---------------------------------------------------------------------------- scheduling


def _mae_rise(v: Any, name: str) -> float:
    """A drift threshold: the rise in MAE over the published model's that counts as drift, finite and >= 0 (a NaN one
    never triggered, a negative one triggered on a model doing better)."""
    if not is_real(v) or not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a reward difference >= 0 (the MAE rise that counts as drift), got {v!r}")
    return float(v)


def _check_triggers(every_s: Any, min_new: Any, drift_threshold: Any,
                    on_run: Any) -> tuple[float | None, int | None, float | None]:
    """A worker's triggers, checked when it is built: a NaN ``every_s`` never fired, a negative one or ``min_new=0``
    ran at every poll (``every_s=0`` says so), a negative ``drift_threshold`` fired on a model doing better."""
    if every_s is None and min_new is None and drift_threshold is None:
        raise ValueError("give at least one trigger: every_s, min_new or drift_threshold")
    if every_s is not None:
        every_s = seconds(every_s, "every_s", allow_zero=True)  # 0: at every poll
    if min_new is not None and (not is_int(min_new) or min_new < 1):
        raise ValueError(f"min_new must be None or an int >= 1 (new rewarded memories that trigger a run), got "
                         f"{min_new!r}")
    if drift_threshold is not None:
        drift_threshold = _mae_rise(drift_threshold, "drift_threshold")
    if on_run is not None and not callable(on_run):
        raise TypeError(f"on_run must be a function (worker, report or error) -> None, got {type(on_run).__name__}")
    return every_s, min_new, drift_threshold


def _check_polling(poll_s: Any, max_runs: Any) -> float:
    """``run_forever``'s arguments: a negative ``poll_s`` span the CPU, a NaN one raised in the wait."""
    if max_runs is not None and (not is_int(max_runs) or max_runs < 1):
        raise ValueError(f"max_runs must be None (until stop()) or an int >= 1, got {max_runs!r}")
    return seconds(poll_s, "poll_s", allow_zero=True)


class ConsolidationWorker:
    """Runs consolidation when ``min_new`` new rewarded memories arrived or ``every_s`` elapsed, and at once when
    the published model became stale (``forget`` deleted memories it trained on).

    ``drift_threshold`` (optional) also triggers a run when the published model drifts. With
    ``skip_unchanged`` (the default) a due run that finds the memories and settings just as the last run saw them
    trains nothing (:func:`run_consolidation`'s ``skip_unchanged``; logged as ``skipped`` in the history, and the
    time trigger counts from it): an idle store gets no copies of the same model every ``every_s``.
    """

    KEEP_RUNS = 100
    """How many of the latest runs :attr:`runs` keeps (a worker polls for months)."""

    def __init__(self, store: MemoryStore, registry: ArtifactRegistry,
                 config: JobConfig | Mapping[str, Any] | None = None, *,
                 every_s: float | str | None = 600.0, min_new: int | None = 100, drift_threshold: float | None = None,
                 skip_unchanged: bool = True,
                 on_run: Callable[[ConsolidationWorker, ConsolidationReport | Exception], None] | None = None) -> None:
        store, registry = _check_parts(store, registry, "ConsolidationWorker")
        every_s, min_new, drift_threshold = _check_triggers(every_s, min_new, drift_threshold, on_run)
        self.skip_unchanged = check_flag(skip_unchanged, "skip_unchanged", "train nothing when nothing changed")
        self._stale_tried: set[str] = set()  # stale versions a run was started for
        self.on_run = on_run
        """Called with this worker and each due run's report, or the error of a run that was skipped (nothing
        new, too few rewards, another run holding the lock) or failed: a log line, a metric, an alert."""
        self.store, self.config = store, as_config(config, JobConfig, "config")
        self._top = registry  # (forget() logs deletions there)
        self.registry = registry.scoped(self.config.namespace)  # where this worker's runs publish
        self.every_s, self.min_new, self.drift_threshold = every_s, min_new, drift_threshold
        self._stop = threading.Event()
        self.runs: deque[ConsolidationReport | Exception] = deque(maxlen=self.KEEP_RUNS)
        """The latest runs (:attr:`KEEP_RUNS`): reports, and the errors of skipped ones (tracebacks dropped)."""

    def _last(self) -> tuple[float | None, int]:
        entry = self.registry.last_run()
        if entry is None:
            return None, 0
        return float(entry["started_at"]) + float(entry.get("seconds", 0)), int(entry.get("n_rewarded") or 0)

    def needs_count(self) -> bool:
        """Whether :meth:`due` would count the rewarded memories (before the first run, or for ``min_new``)."""
        return self.min_new is not None or self._last()[0] is None

    def due(self, *, rewarded: int | None = None) -> tuple[bool, str]:
        """Whether a run is due now, and why. Before the first run, not until there are enough rewarded
        memories for one (a fresh deployment does not log a failed run every poll). ``rewarded``: the
        namespace's rewarded count when the caller already has it (:class:`NamespaceWorkers` counts
        every namespace in one pass)."""
        last_time, last_rewarded = self._last()

        def count() -> int:  # a filtered count reads every row: only where a trigger needs it
            if rewarded is not None:
                return rewarded
            return self.store.count(namespace=self.config.namespace, rewarded_only=True)

        if last_time is None:
            n = count()
            if n < self.config.min_rewarded:
                return False, (f"only {n} rewarded memories (a run needs JobConfig.min_rewarded="
                               f"{self.config.min_rewarded})")
            return True, "no consolidation has run yet"
        cur = self.registry.current_version()
        if cur is not None and cur not in self._stale_tried and cur in self.registry.stale_versions():
            # forget() deleted memories it trained on: replace it now, not at the next time or count trigger
            # (once: if that run cannot replace it, say too few rewards are left, the other triggers take over)
            return True, f"the published model {cur} is stale (trained on deleted memories)"
        if self.every_s is not None and time.time() - last_time >= self.every_s:
            return True, f"{self.every_s:.0f}s elapsed since the last run"
        if self.min_new is not None:
            new = count() - last_rewarded
            if new >= self.min_new:
                return True, f"{new} new rewarded memories (>= {self.min_new})"
        if self.drift_threshold is not None:
            try:
                d = drift_report(self.store, self.registry, threshold=self.drift_threshold, namespace=self.config.namespace)
                if d.triggered:
                    return True, f"calibration drift {d.drift:.3f} > {self.drift_threshold}"
            except NoModelError:
                return True, "no published model"
        return False, "not due"

    def run_once(self, *, force: bool = False, rewarded: int | None = None) -> ConsolidationReport | None:
        force = check_flag(force, "force", "run now, whatever the triggers say")  # ("no" forced a run)
        due, why = (True, "forced") if force else self.due(rewarded=rewarded)
        if not due:
            return None
        log.info("consolidation due: %s", why)
        self.store.count()  # a store that is away (StoreError) is an outage for run_forever to wait out, not a failed run
        cur = self.registry.current_version()
        if cur is not None and cur in self.registry.stale_versions():
            self._stale_tried.add(cur)  # a run was started while it is stale: the stale trigger has had its turn
        try:
            rep = run_consolidation(self.store, self._top, self.config, lock_timeout=0,
                                    skip_unchanged=self.skip_unchanged and not force)
        except (JobLockedError, NotEnoughDataError, UnchangedDataError) as e:
            log.info("skipped: %s", e)
            self._record(e.with_traceback(None))  # a traceback would keep the run's frames (its data) alive
            return None
        except ConsolidationError as e:
            if not isinstance(e.__cause__, NotEnoughDataError):
                self._notify(e)
                raise
            log.info("skipped: %s", e)  # e.g. too few training rows once the recent ones are held out
            e.__cause__ = e.__cause__.with_traceback(None)
            self._record(e.with_traceback(None))
            return None
        self._record(rep)
        return rep

    def _record(self, result: ConsolidationReport | Exception) -> None:
        self.runs.append(result)
        self._notify(result)

    def _notify(self, result: ConsolidationReport | Exception) -> None:
        if self.on_run is not None:
            try:
                self.on_run(self, result)
            except Exception:  # a broken hook must not stop the worker
                log.exception("the worker's on_run hook raised")

    def run_forever(self, poll_s: float | str = 30.0, max_runs: int | None = None) -> None:
        """Poll triggers until ``stop()`` (or ``max_runs`` runs happened).

        A poll that fails (a failed run, a Chroma server that is away while the triggers are checked, a full disk)
        is logged and the worker polls again: a worker runs for months and outlives outages. The same error on
        consecutive polls is logged once, and its end is logged too.
        """
        poll_s = _check_polling(poll_s, max_runs)
        done = 0
        failing = _Failing()
        while not self._stop.is_set():
            try:
                if self.run_once() is not None:
                    done += 1
                failing.ok()
            except Exception as e:
                failing.failed(e)
            if max_runs is not None and done >= max_runs:
                return
            self._stop.wait(poll_s)

    def stop(self) -> None:
        self._stop.set()


class _Failing:
    """Logs a poll's error once while it repeats, and when polls work again."""

    def __init__(self, what: str = "worker") -> None:
        self.what, self.last = what, ""

    def failed(self, e: Exception) -> None:
        msg = f"{type(e).__name__}: {e}"
        if msg != self.last:
            # an error of ours explains itself; anything else is a bug or the system's (disk, memory): keep its trace
            log.error("%s: poll failed, retrying at the next poll: %s", self.what, msg,
                      exc_info=None if isinstance(e, MemoryDistillError) else e)
        self.last = msg

    def ok(self) -> None:
        if self.last:
            log.warning("%s: polls work again (after: %s)", self.what, self.last)
        self.last = ""


class NamespaceWorkers:
    """One :class:`ConsolidationWorker` per namespace of the store: each team's (user's, LangGraph namespace's)
    model is trained, gated and published on its own triggers (``registry.scoped(namespace)``).

    Namespaces are discovered from the store (a full metadata read) at most every ``discover_every_s``;
    one with fewer than ``JobConfig.min_rewarded`` rewarded memories is not consolidated until it has them.
    A poll that must count more than ``one_pass_above`` (64) namespaces counts them all in one pass over the
    metadata (500 namespaces at 50k rows: 3.4 s instead of 21.6 s). A poll that finds the store as the last one
    left it (the same total and rewarded counts, no ``forget`` since) reuses the last poll's counts: two cheap
    counts instead of a pass over every row, for a store of idle users. Counts are taken afresh at least every
    ``discover_every_s``.
    ``run_once()`` returns the reports of the runs it made, by namespace.
    """

    def __init__(self, store: MemoryStore, registry: ArtifactRegistry,
                 config: JobConfig | Mapping[str, Any] | None = None, *,
                 every_s: float | str | None = 600.0, min_new: int | None = 100, drift_threshold: float | None = None,
                 discover_every_s: float | str = 600.0, skip_unchanged: bool = True,
                 on_run: Callable[[ConsolidationWorker, ConsolidationReport | Exception], None] | None = None) -> None:
        store, registry = _check_parts(store, registry, "NamespaceWorkers")
        self.config = as_config(config, JobConfig, "config")
        if self.config.namespace is not None:
            raise ValueError(f"NamespaceWorkers runs every namespace: leave JobConfig.namespace unset "
                             f"(got {self.config.namespace!r}), or use ConsolidationWorker for one namespace")
        every_s, min_new, drift_threshold = _check_triggers(every_s, min_new, drift_threshold, on_run)
        discover_every_s = seconds(discover_every_s, "discover_every_s", allow_zero=True)
        self.store, self.registry = store, registry
        skip_unchanged = check_flag(skip_unchanged, "skip_unchanged", "train nothing when nothing changed")
        self.triggers: dict[str, Any] = {"every_s": every_s, "min_new": min_new, "drift_threshold": drift_threshold,
                                         "skip_unchanged": skip_unchanged, "on_run": on_run}
        self.discover_every_s = discover_every_s
        # Each filtered count scans every row; one pass over all the metadata costs about as much as 50-60
        # of them (50k rows: 3.0 s vs 0.06 s per count), so past this many namespaces a poll counts in one pass.
        self.one_pass_above = 64
        self.workers: dict[str, ConsolidationWorker] = {}
        self._discovered_at: float | None = None
        self._stop = threading.Event()
        # rewarded counts by namespace, valid while the store's signature (total, rewarded, last forget) holds
        self._counts: dict[str, int] = {}
        self._counts_all = False  # from a pass over every row: a namespace missing from it has none
        self._counts_key: tuple[Any, ...] | None = None
        self._counts_at = 0.0

    def discover(self, *, force: bool = False) -> list[str]:
        """The store's namespaces (re-read when ``discover_every_s`` passed or ``force``), each with its worker."""
        now = time.time()
        force = check_flag(force, "force", "re-read the namespaces now")
        if force or self._discovered_at is None or now - self._discovered_at >= self.discover_every_s:
            for ns in self.store.stats()["namespaces"]:
                if ns not in self.workers:
                    cfg = self.config.model_copy(update={"namespace": ns})
                    self.workers[ns] = ConsolidationWorker(self.store, self.registry, cfg, **self.triggers)
            self._discovered_at = now
        return sorted(self.workers)

    def run_once(self) -> dict[str, ConsolidationReport]:
        """Run every namespace whose triggers fire (one after the other); a failing namespace does not stop the rest."""
        done: dict[str, ConsolidationReport] = {}
        names = self.discover()
        counts = self._rewarded_counts({ns for ns in names if self.workers[ns].needs_count()})
        for ns in names:
            if self._stop.is_set():  # stopping: not another namespace's run
                break
            try:
                rep = self.workers[ns].run_once(rewarded=counts.get(ns))
            except MemoryDistillError as e:  # a failed run, or the store away while its triggers were checked
                log.error("namespace %r: %s", ns, e)
                continue
            if rep is not None:
                done[ns] = rep
        return done

    def _rewarded_counts(self, need: set[str]) -> dict[str, int]:
        """Rewarded memories of each namespace in ``need``: the last poll's counts while nothing was written since
        (the store's total and rewarded counts and its last ``forget`` as they were; a rewarded row deleted outside
        ``forget`` and a pending one added elsewhere in the same interval go unseen until the next write, or at most
        ``discover_every_s``), else counted again: in one pass over the metadata past ``one_pass_above``
        namespaces, one filtered count each below (each filtered count scans every row)."""
        if not need:
            return {}
        last = self.registry.last_deletion()
        key = (self.store.count(), self.store.count(rewarded_only=True), last.get("time") if last else None)
        now = time.time()
        if key != self._counts_key or now - self._counts_at >= self.discover_every_s:
            self._counts, self._counts_all, self._counts_key, self._counts_at = {}, False, key, now
        missing = set() if self._counts_all else need - self._counts.keys()
        if len(missing) > self.one_pass_above:
            self._counts, self._counts_all = self.store.namespace_counts(rewarded_only=True), True
        else:
            for ns in missing:
                self._counts[ns] = self.store.count(namespace=ns, rewarded_only=True)
        return {ns: self._counts.get(ns, 0) for ns in need}

    def run_forever(self, poll_s: float | str = 30.0, max_runs: int | None = None) -> None:
        """Poll until ``stop()`` (or ``max_runs`` runs happened, over all namespaces); a poll that fails (the store
        away) is logged and retried at the next poll, as in :meth:`ConsolidationWorker.run_forever`."""
        poll_s = _check_polling(poll_s, max_runs)
        n = 0
        failing = _Failing("namespace workers")
        while not self._stop.is_set():
            try:
                n += len(self.run_once())
                failing.ok()
            except Exception as e:
                failing.failed(e)
            if max_runs is not None and n >= max_runs:
                return
            self._stop.wait(poll_s)

    def stop(self) -> None:
        self._stop.set()


class ConsolidationExecutor:
    """In-process background consolidation for apps: ``submit() -> Future``; one run at a time.

    ``with ConsolidationExecutor(store, registry) as ex: fut = ex.submit(); fut.result()``
    """

    def __init__(self, store: MemoryStore, registry: ArtifactRegistry,
                 config: JobConfig | Mapping[str, Any] | None = None) -> None:
        store, registry = _check_parts(store, registry, "ConsolidationExecutor")
        self.store, self.registry, self.config = store, registry, as_config(config, JobConfig, "config")
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-distill")
        self._current: cf.Future[ConsolidationReport] | None = None  # the latest submitted
        self._pending: dict[tuple[str, bool], cf.Future[ConsolidationReport]] = {}  # by settings
        self._lock = threading.Lock()

    def submit(self, config: JobConfig | Mapping[str, Any] | None = None, *,
               skip_unchanged: bool = False) -> cf.Future[ConsolidationReport]:
        """Queue a run, or return the one already pending or running with the same settings; a run with other
        settings (another namespace, say) is queued behind it, never answered by it. ``skip_unchanged``: as in
        :func:`run_consolidation` (the future then raises :class:`UnchangedDataError` when nothing changed)."""
        cfg = as_config(config, JobConfig, "config") if config is not None else self.config
        skip_unchanged = check_flag(skip_unchanged, "skip_unchanged", "train nothing when nothing changed")
        key = (cfg.model_dump_json(), skip_unchanged)
        with self._lock:
            same = self._pending.get(key)
            if same is not None and not same.done():
                return same
            fut = self._pool.submit(run_consolidation, self.store, self.registry, cfg, lock_timeout=-1,
                                    skip_unchanged=skip_unchanged)
            self._pending = {k: f for k, f in self._pending.items() if not f.done()}
            self._pending[key] = fut
            self._current = fut
            return fut

    @property
    def running(self) -> bool:
        with self._lock:
            return any(not f.done() for f in self._pending.values())

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=check_flag(wait, "wait", "wait for the queued runs"))

    def __enter__(self) -> ConsolidationExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)
