"""A health check of a home: the store, every model registry and the embedding cache (``memory-distill check``).

A worker runs for months; this answers "is it all right?" in one pass, each problem with its fix:

* store: it opens with the configured embedder (else :class:`~memory_distill.errors.EmbedderMismatchError` before
  this runs), how many memories and rewards; rows whose reserved metadata a raw Chroma write or an old version
  left unreadable (consolidation cannot learn from them); rewards outside the configured range.
* metadata features: a served model that reads metadata (``JobConfig.metadata_features``) reads a missing or
  never-seen value as unknown; when most memories recorded since it was published do so, its predictions have
  quietly lost that input (agents stopped recording the key, or moved to new tools).
* each registry (the top-level one and each namespace's): the served model loads and its checksums hold, it reads
  the store's embedder, it is not stale; every other version's files match their checksums (a rollback target
  that would fail); the last run did not fail; no half-written or half-deleted version directories are left.
* the embedding cache: sqlite's ``quick_check``.

Only reads (the cache check opens its file read-only). Errors stop serving or training; warnings need a look.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import MemoryDistillError
from .features import FeatureSpec
from .types import check_unix_time, is_real

if TYPE_CHECKING:
    from .artifacts import ArtifactRegistry
    from .store import MemoryStore

Level = Literal["ok", "warning", "error"]


@dataclass(frozen=True)
class Finding:
    """One result of :func:`check`: ``level``, what it is about (``subject``) and what was found (with the fix)."""

    level: Level
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.level:<7} {self.subject}: {self.message}"


def check(store: MemoryStore, registry: ArtifactRegistry, *, cache_path: str | Path | None = None) -> list[Finding]:
    """Check the store, the top-level registry and every namespace's, and the embedding cache at ``cache_path``
    (skipped when ``None`` or absent). Returns the findings, errors first."""
    watches: list[_Watch] = []
    out = _check_registry(registry, store, "models", watches)
    for ns, reg in sorted(registry.namespaces().items()):
        out += _check_registry(reg, store, f"models[{ns}]", watches)
    out = _check_store(store, watches) + out
    if cache_path is not None and Path(cache_path).is_file():
        out.append(_check_cache(Path(cache_path)))
    order = {"error": 0, "warning": 1, "ok": 2}
    return sorted(out, key=lambda f: order[f.level])  # (stable: each group keeps the order above)


@dataclass
class _Watch:
    """A served model that reads metadata features: how the memories recorded since it was published fill them."""

    subject: str
    namespace: str | None  # None: the top-level model, which reads every namespace
    published_at: float
    spec: FeatureSpec
    rows: int = 0
    unknown: dict[str, int] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """The metadata keys the model reads (a key with fewer than two training values has no columns)."""
        return [k for k, vals in self.spec.metadata if k in self.spec.numeric or vals]

    def see(self, meta: Mapping[str, Any]) -> None:
        self.rows += 1
        for k in self.keys:
            if self.spec.reads_as_unknown(k, meta.get(k)):
                self.unknown[k] = self.unknown.get(k, 0) + 1

    def findings(self) -> list[Finding]:
        out = []
        for k in self.keys:
            n = self.unknown.get(k, 0)
            if self.rows >= MIN_ROWS_SEEN and n / self.rows > UNKNOWN_SHARE:
                out.append(Finding("warning", self.subject, f"reads metadata {k!r}, but {n} of the {self.rows} memories "
                                                            "recorded since it was published lack it or hold a value "
                                                            "it never saw in training, which it reads as unknown (the "
                                                            f"training mean): record {k!r} again as before, or "
                                                            "consolidate so that it learns the new values (or "
                                                            f"drop {k!r} from JobConfig.metadata_features)"))
        return out


MIN_ROWS_SEEN = 20
"""Memories recorded since a model's publication before :func:`check` judges how they fill its metadata features."""
UNKNOWN_SHARE = 0.5
"""Share of those memories that read a metadata feature as unknown past which :func:`check` warns."""


def _check_store(store: MemoryStore, watches: list[_Watch]) -> list[Finding]:
    from .store import CREATED, HAS_REWARD, NS, REWARD

    everywhere = [w for w in watches if w.namespace is None]
    by_ns: dict[str, list[_Watch]] = {}
    for w in watches:
        if w.namespace is not None:
            by_ns.setdefault(w.namespace, []).append(w)

    total = rewarded = 0
    namespaces: set[str] = set()
    bad_reward: list[str] = []
    out_of_range: list[str] = []
    lo, hi = store.config.reward_min, store.config.reward_max
    bad_rows = 0
    unexportable: list[str] = []  # rows older versions wrote that import_jsonl now refuses
    for page in store._id_metadata_pages():
        for mid, m in zip(page["ids"], page["metadatas"] or [None] * len(page["ids"]), strict=True):
            total += 1
            m = m or {}
            ns = str(m.get(NS, "default"))
            namespaces.add(ns)
            created = m.get(CREATED)
            if isinstance(created, int | float):
                for w in (*everywhere, *by_ns.get(ns, ())):
                    if created > w.published_at:
                        w.see(m)
            if NS not in m or CREATED not in m:
                bad_rows += 1
            elif not ns.strip() or not _unix_seconds(created):
                unexportable.append(mid)
            if m.get(HAS_REWARD):
                r = float(m[REWARD]) if is_real(m.get(REWARD)) else math.nan
                if not math.isfinite(r):
                    bad_reward.append(mid)
                else:
                    rewarded += 1
                    if not lo <= r <= hi:
                        out_of_range.append(mid)
    out = [Finding("ok", "store", f"{total} memories, {rewarded} rewarded, in {len(namespaces)} namespace(s); "
                                  f"embedder {store.embedder.name} (dim {store.embedder.dim})")]
    if bad_reward:
        out.append(Finding("error", "store", f"{len(bad_reward)} memories are marked rewarded without a finite reward "
                                             f"(e.g. {bad_reward[:3]}; written around the library): set their "
                                             "rewards again with set_rewards, or delete them"))
    if out_of_range:
        out.append(Finding("warning", "store", f"{len(out_of_range)} rewards lie outside the configured range [{lo:g}, "
                                               f"{hi:g}] (e.g. {out_of_range[:3]}; the range changed since they were "
                                               "stored?): set StoreConfig.reward_min / reward_max to cover them, or "
                                               "correct them with set_rewards"))
    if bad_rows:
        out.append(Finding("warning", "store", f"{bad_rows} memories lack the namespace or creation time the library "
                                               "writes (rows added with raw chromadb): re-add them through "
                                               "MemoryStore.add_many(upsert=True)"))
    if unexportable:
        out.append(Finding("warning", "store", f"{len(unexportable)} memories have a blank namespace or a creation time "
                                               f"that is not Unix seconds (e.g. {unexportable[:3]}; written before "
                                               "those were checked, or around the library): they read, but an "
                                               "export holding them fails to import; re-add them with a namespace "
                                               "and created_at in seconds (delete, then add_many)"))
    for w in watches:
        out += w.findings()
    return out


def _unix_seconds(v: Any) -> bool:
    """``v`` is a creation time an import takes (:func:`~memory_distill.types.check_unix_time`)."""
    try:
        check_unix_time(float(v), "created_at")
    except (TypeError, ValueError):
        return False
    return True


def _check_registry(reg: ArtifactRegistry, store: MemoryStore, subject: str, watches: list[_Watch]) -> list[Finding]:
    out: list[Finding] = []
    if not reg.root.is_dir():
        return [Finding("warning", subject, "no model published yet: run `memory-distill consolidate`")]
    try:
        cur = reg.current_version()
    except MemoryDistillError as e:
        cur = None
        out.append(Finding("error", subject, f"CURRENT is unreadable ({e}): `memory-distill promote VERSION` "
                                             "rewrites it"))
    versions = reg.list_versions()
    if cur is None and not out:  # (after a retire, e.g. forget emptied the namespace, until the next run)
        fix = ("run `memory-distill consolidate`" if not versions else
               f"{len(versions)} version(s) exist: the next consolidation publishes one, or `memory-distill promote "
               "VERSION`")
        out.append(Finding("warning", subject, f"no model is current, so none serves: {fix}"))
    stale = reg.stale_versions()
    for v in versions:
        try:
            loaded = reg.load(v, with_teacher=True)
        except MemoryDistillError as e:
            if v == cur:
                out.append(Finding("error", f"{subject} {v}", f"the served model cannot be loaded ({e}): "
                                                            "`memory-distill rollback`, or consolidate"))
            else:
                out.append(Finding("warning", f"{subject} {v}", f"cannot be loaded ({e}): it cannot be rolled back "
                                                              "to or promoted; retention deletes it in time"))
            continue
        if v != cur:
            continue
        emb = loaded.manifest.get("embedder") or {}
        if emb.get("name") != store.embedder.name or emb.get("dim") != store.embedder.dim:
            out.append(Finding("error", f"{subject} {v}", f"serves, but reads embedder {emb.get('name')!r} (dim "
                                                        f"{emb.get('dim')}) and the store holds "
                                                        f"{store.embedder.name!r} vectors: predictions refuse it "
                                                        "until a consolidation trains on the store's embedder"))
        elif v in stale:
            out.append(Finding("warning", f"{subject} {v}", f"serves, but is stale ({stale[v]}): it holds forgotten "
                                                          "memories until the next consolidation replaces it"))
        else:
            age = time.time() - float(loaded.manifest.get("created_at") or time.time())
            out.append(Finding("ok", f"{subject} {v}", f"serves; published {_ago(age)} ago; checksums hold"))
        try:
            spec = FeatureSpec.from_manifest(loaded.manifest, loaded.student.n_features)
        except ValueError as e:
            out.append(Finding("error", f"{subject} {v}", f"serves, but its manifest does not describe its inputs ({e}): "
                                                        "predictions fail; `memory-distill rollback`, or consolidate"))
            continue
        trained_on = (loaded.manifest.get("data") or {}).get("namespace") or reg.namespace  # (None: every one)
        watch = _Watch(f"{subject} {v}", trained_on, float(loaded.manifest.get("created_at") or 0), spec)
        if watch.keys:
            watches.append(watch)
    last = reg.last_run(("promoted", "rejected", "skipped", "failed"))
    if last is not None and last.get("outcome") == "failed":
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last.get("started_at", 0))))
        out.append(Finding("warning", subject, f"the last run ({when}) failed: {last.get('error') or last.get('reason')}"))
    leftovers = [p.name for p in reg.root.iterdir() if p.is_dir() and p.name.startswith((".staging-", ".pruned-"))]
    if leftovers:
        out.append(Finding("warning", subject, f"{len(leftovers)} partial version director(y/ies) left by an "
                                               f"interrupted run ({', '.join(sorted(leftovers)[:3])}): the next run "
                                               "removes them; nothing reads them"))
    return out


def _check_cache(path: Path) -> Finding:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            res = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
            n = db.execute("SELECT COUNT(*) FROM emb").fetchone()[0]
    except sqlite3.Error as e:
        return Finding("error", "embedding cache", f"{path} cannot be read ({e}): delete it (it only saves work; "
                                                   "vectors are embedded again as needed)")
    if res != ["ok"]:
        return Finding("error", "embedding cache", f"{path} is damaged ({'; '.join(map(str, res[:3]))}): delete it "
                                                   "(it only saves work)")
    return Finding("ok", "embedding cache", f"{n} vectors; sqlite quick_check ok")


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def summary(findings: list[Finding]) -> dict[str, Any]:
    """Counts by level, for a script's exit status."""
    return {lvl: sum(1 for f in findings if f.level == lvl) for lvl in ("error", "warning", "ok")}
