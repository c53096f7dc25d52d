"""Versioned model registry on disk.

Layout::

    <root>/
      versions/v000001/{teacher.pt, student.pt, train_ids.json, manifest.json}
      CURRENT            {"version": "v000001"}   (replaced atomically)
      promotions.jsonl   every change of CURRENT (promote / rollback)
      history.jsonl      consolidation job history (written by jobs)
      stale.json         versions trained on memories that were later deleted (only the current one is kept:
                         drop_stale() deletes the others)
      .lock              single-writer lock for consolidation
      .stale.lock        held while stale.json is rewritten (forget and a run may both do it)
      namespaces/<slug>/ the same layout for models trained on one namespace (``scoped(namespace)``),
                         with the namespace's name in ``NAMESPACE``

A version is written into a staging directory and renamed into ``versions/`` only when
complete, so a crash leaves either nothing or a whole version; ``CURRENT`` changes by
``os.replace``. Weights are plain ``state_dict`` files loaded with ``weights_only=True``; the
manifest (JSON) holds architecture, bins, embedder, metrics and SHA-256 checksums.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from ._faults import fault_point
from .errors import ArtifactError, JobLockedError, NoModelError
from .models import RewardMLP
from .rewards import RewardBins
from .types import is_int

__all__ = ["FORMAT_VERSION", "ArtifactRegistry", "LoadedModel"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, data: Any) -> None:
    _write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def _append_jsonl(path: Path, data: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(data, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line after a crash
            log.warning("skipping unreadable line in %s", path)
    return out


def _iter_jsonl_reversed(path: Path, block: int = 1 << 16) -> Iterator[dict[str, Any]]:
    """The entries of a JSON Lines file, last first, read from the end a block at a time (a worker's history
    grows by a line per run for months; its last run should not cost a read of all of it)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + tail).split(b"\n")
            tail = lines[0] if pos > 0 else b""  # may start mid-line: completed by the next block
            for line in reversed(lines[1:] if pos > 0 else lines):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:  # a torn last line after a crash
                        log.warning("skipping unreadable line in %s", path)


StrList = list[str]
Records = list[dict[str, Any]]


@dataclass
class LoadedModel:
    """A loaded version: the student (always), the teacher (if asked), bins and manifest."""

    version: str
    student: RewardMLP
    teacher: RewardMLP | None
    bins: RewardBins
    manifest: dict[str, Any]


def _slug(namespace: str) -> str:
    """A directory name for a namespace: readable, filesystem-safe, unique (a hash suffix)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", namespace).strip("._")[:48] or "ns"
    return f"{readable}-{hashlib.sha256(namespace.encode()).hexdigest()[:10]}"


_POINTER_HELD = threading.local()  # .roots: the registries whose pointer lock this thread holds


class ArtifactRegistry:
    """Publish, list, load, promote and roll back model versions under ``root``.

    Models trained on one namespace (``JobConfig.namespace``) live in their own registry,
    :meth:`scoped`, under ``root/namespaces/``: each namespace has its own versions, ``CURRENT``,
    gate and lock, so consolidating one team's memories never replaces another's model.
    """

    def __init__(self, root: str | Path, *, namespace: str | None = None) -> None:
        if not isinstance(root, str | os.PathLike) or not str(root):
            raise TypeError(f"root must be the models' directory (a path), got {root!r}")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():  # (it listed no versions, and failed at the first publish)
            raise ArtifactError(f"registry root {str(self.root)!r} is a file: give a directory (created if missing)")
        self.namespace = namespace
        """The namespace whose models this registry holds; ``None`` for the top-level registry."""

    def scoped(self, namespace: str | None) -> ArtifactRegistry:
        """The registry for models trained on ``namespace`` (``None``: this one)."""
        if namespace is not None and not isinstance(namespace, str):
            raise TypeError(f"namespace must be None (the top level) or a str, got {type(namespace).__name__}")
        if namespace is not None and not namespace.strip():
            # (no memory has such a namespace: a model for it, or a predictor of it, would be the top-level one)
            raise ValueError(f"namespace {namespace!r} is empty: give a namespace's name, or None for the top level")
        if namespace is None or namespace == self.namespace:
            return self
        if self.namespace is not None:
            raise ArtifactError(f"this registry already holds namespace {self.namespace!r}'s models; "
                                f"scope the top-level registry to {namespace!r} instead")
        return ArtifactRegistry(self.root / "namespaces" / _slug(namespace), namespace=namespace)

    def namespaces(self) -> dict[str, ArtifactRegistry]:
        """The per-namespace registries that exist, by namespace name."""
        base = self.root / "namespaces"
        out: dict[str, ArtifactRegistry] = {}
        if self.namespace is None and base.is_dir():
            for d in sorted(base.iterdir()):
                name_file = d / "NAMESPACE"
                if name_file.is_file():
                    name = name_file.read_text(encoding="utf-8")
                    out[name] = ArtifactRegistry(d, namespace=name)
        return out

    def serving(self, namespace: str | None) -> ArtifactRegistry:
        """Where ``namespace``'s predictions come from: its own registry once it has a model, else this one."""
        reg = self.scoped(namespace)
        return reg if reg is self or reg.current_version() is not None else self

    # ------------------------------------------------------------ paths

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def history_path(self) -> Path:
        return self.root / "history.jsonl"

    def _ensure(self) -> None:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        if self.namespace is not None and not (self.root / "NAMESPACE").exists():
            _write_text_atomic(self.root / "NAMESPACE", self.namespace)

    def exists(self) -> bool:
        """Whether anything was ever written here (a namespace's registry appears with its first run)."""
        return (self.root / ("NAMESPACE" if self.namespace is not None else "versions")).exists()

    def _discard_unused(self) -> bool:
        """Undo :meth:`_ensure` for a namespace's registry that never held a version (its first run failed),
        so the namespace is not listed as having models; whether it did. The lock file stays: another process
        may wait on it."""
        if self.namespace is None or self.list_versions():
            return False
        for name in ("NAMESPACE", ".lock.owner"):
            (self.root / name).unlink(missing_ok=True)
        try:
            self.versions_dir.rmdir()
        except OSError:
            pass
        return True

    def lock(self, timeout: float = -1) -> FileLock:
        """The single-writer lock (``timeout=0``: fail at once if held; -1: wait)."""
        self._ensure()
        return FileLock(str(self.root / ".lock"), timeout=timeout)

    def acquire(self, timeout: float = 0) -> FileLock:
        lk = self.lock(timeout)
        try:
            lk.acquire()
        except Timeout:
            holder = ""
            info = self.root / ".lock.owner"
            if info.exists():
                holder = f" (held by {info.read_text().strip()})"
            raise JobLockedError(
                f"another consolidation is running on {self.root}{holder}: try again when it finishes, or wait "
                "for it with lock_timeout=<seconds> (-1: as long as it takes; CLI: consolidate --wait)"
            ) from None
        (self.root / ".lock.owner").write_text(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        return lk

    # ------------------------------------------------------------ queries

    def list_versions(self) -> StrList:
        if not self.versions_dir.exists():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir() and p.name.startswith("v"))

    def _check_version(self, version: Any) -> str:
        """``version`` as a version name, else an error naming the form ('' or '..' would leave ``versions/``; None
        written to CURRENT would corrupt it)."""
        if not isinstance(version, str) or not re.fullmatch(r"v\d+", version):
            raise ArtifactError(f"no model version {version!r} in {self.root}: versions are named like v000001, see "
                                "`memory-distill models`")
        return version

    def manifest(self, version: str) -> dict[str, Any]:
        self._check_version(version)
        path = self.versions_dir / version / "manifest.json"
        if not path.exists():
            raise ArtifactError(f"no model version {version!r} in {self.root}: see `memory-distill models`")
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:  # deleted between the check and the read (another process replaced it)
            raise ArtifactError(f"model version {version!r} was deleted while it was being read") from None
        except json.JSONDecodeError as e:
            raise ArtifactError(f"manifest of {version} is corrupt ({e}): roll back or re-run consolidation") from None

    def list(self) -> Records:
        """Summaries of every version, oldest first, with ``current`` and ``stale`` flags (none ``current`` while
        ``CURRENT`` is corrupt: this listing is where to pick the version that ``promote`` repairs it with)."""
        try:
            cur = self.current_version()
        except ArtifactError:
            cur = None
        stale = self.stale_versions()
        out: Records = []
        for v in self.list_versions():
            try:
                m = self.manifest(v)
            except ArtifactError as e:
                out.append({"version": v, "status": "corrupt", "reason": str(e)})
                continue
            out.append({
                "version": v,
                "created_at": m.get("created_at"),
                "status": m.get("status"),
                "reason": m.get("reason"),
                "metrics": m.get("metrics", {}).get("student"),
                "current": v == cur,
                "stale": v in stale,
            })
        return out

    def current_version(self) -> str | None:
        path = self.root / "CURRENT"
        if not path.exists():
            return None
        try:
            version = json.loads(path.read_text())["version"]
            if not isinstance(version, str) or not re.fullmatch(r"v\d+", version):
                raise KeyError(version)
            return version
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ArtifactError(f"{path} is corrupt: run `memory-distill promote VERSION` to repair it") from None

    # ------------------------------------------------------------ write

    def cleanup_staging(self) -> int:
        """Remove staging directories left by a crashed publish (and versions a crashed prune set aside)."""
        n = 0
        if self.root.exists():
            for p in [*self.root.glob(".staging-*"), *self.root.glob(".pruned-*")]:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n

    def prune(self, keep: int) -> StrList:
        """Delete all but the ``keep`` newest versions, never the current one or the one :meth:`rollback` would
        restore; returns the versions deleted. Each is moved out of ``versions/`` in one rename before its files
        are removed, so readers see a version whole or not at all. Their lines stay in :meth:`history`."""
        if not is_int(keep):
            raise TypeError(f"keep must be a whole number of versions, got {keep!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the newest version is always kept), got {keep}")
        versions = self.list_versions()
        if len(versions) <= keep:
            return []
        with self.pointer_lock():  # (a promote of an old version elsewhere: not deleted under CURRENT)
            cur = self.current_version()
            protect = {*versions[-keep:], cur, self._rollback_target(cur)}
            pruned = self._remove_versions([v for v in versions if v not in protect])
        if pruned:
            log.info("pruned %d old versions (keeping the newest %d, the current and the rollback target): %s",
                     len(pruned), keep, ", ".join(pruned))
        return pruned

    def _remove_versions(self, versions: StrList) -> StrList:
        """Delete these versions (each moved out of ``versions/`` in one rename first) and their stale marks;
        returns those removed."""
        removed: StrList = []
        for v in versions:
            aside = self.root / f".pruned-{v}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.versions_dir / v, aside)
            except FileNotFoundError:  # another process (a forget beside a run) removed it first
                continue
            except OSError as e:
                log.warning("could not remove %s: %s", v, e)
                continue
            shutil.rmtree(aside, ignore_errors=True)
            removed.append(v)
        if removed:
            with self._stale_lock():
                stale = self.stale_versions()
                if any(v in stale for v in removed):
                    _write_json_atomic(self.root / "stale.json", {v: r for v, r in stale.items() if v not in removed})
        return removed

    def drop_stale(self) -> StrList:
        """Delete the stale versions (trained on memories deleted since) other than the current one, which serves
        until a run replaces it; returns those deleted. Their weights hold what was forgotten, so they are neither
        kept for :meth:`rollback` nor for retention: :func:`~memory_distill.jobs.forget` calls this, and so does
        every consolidation (which deletes the stale model it replaced)."""
        stale = self.stale_versions()
        if not stale:
            return []
        with self.pointer_lock():
            cur = self.current_version()
            removed = self._remove_versions([v for v in self.list_versions() if v in stale and v != cur])
        if removed:
            log.info("deleted %d stale versions (trained on forgotten memories): %s", len(removed), ", ".join(removed))
        return removed

    def retire(self, reason: str) -> StrList:
        """Stop serving from this registry: unset CURRENT (a namespace's predictors fall back to the top-level
        model, others stop predicting) and delete the stale versions, those trained on deleted memories.
        :func:`~memory_distill.jobs.forget` does this when it empties the store or a namespace. Returns the
        versions deleted; the next consolidation publishes afresh."""
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"retire needs a reason (text for promotions.jsonl and the log), got {reason!r}")
        with self.pointer_lock():
            cur = self.current_version()
            (self.root / "CURRENT").unlink(missing_ok=True)
            _append_jsonl(self.root / "promotions.jsonl", {"time": time.time(), "action": "retire", "version": None,
                                                           "previous": cur, "reason": reason})
        removed = self.drop_stale()  # (none is current now: every stale version goes)
        log.warning("retired the models of %s (%s): nothing serves from it until the next consolidation; "
                    "deleted %s", self.root, reason, ", ".join(removed) or "no version")
        return removed

    def _next_version(self) -> str:
        # the last published one counts too: after retire() deleted every version, numbers are not reused
        last = self.last_run(("promoted", "rejected"))
        named = [*self.list_versions(), *([str(last["version"])] if last and last.get("version") else [])]
        nums = [int(v[1:]) for v in named if v[1:].isdigit()]
        return f"v{(max(nums) + 1 if nums else 1):06d}"

    def publish(self, teacher: RewardMLP, student: RewardMLP, manifest: dict[str, Any], *,
                promote: bool, train_ids: StrList | None = None) -> str:
        """Write a complete version atomically; optionally make it CURRENT. Returns the version."""
        self._ensure()
        self.cleanup_staging()
        stage = self.root / f".staging-{uuid.uuid4().hex}"
        stage.mkdir()
        try:
            torch.save({k: v.detach().cpu() for k, v in teacher.state_dict().items()}, stage / "teacher.pt")
            torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, stage / "student.pt")
            (stage / "train_ids.json").write_text(json.dumps(train_ids or []))
            version = self._next_version()
            full = dict(manifest)
            full.update({
                "format_version": FORMAT_VERSION,
                "version": version,
                "created_at": time.time(),
                "teacher": {"arch": teacher.arch(), "params": sum(p.numel() for p in teacher.parameters())},
                "student": {"arch": student.arch(), "params": sum(p.numel() for p in student.parameters())},
                "checksums": {f: _sha256(stage / f) for f in ("teacher.pt", "student.pt", "train_ids.json")},
            })
            _write_json_atomic(stage / "manifest.json", full)
            fault_point("mid_publish")
            os.rename(stage, self.versions_dir / version)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if promote:
            fault_point("before_pointer")
            self._set_current(version, action="promote", reason=manifest.get("reason", ""))
        log.info("published %s (%s)", version, "promoted" if promote else "not promoted")
        return version

    def _set_current(self, version: str, *, action: str, reason: str = "") -> None:
        try:
            previous = self.current_version()
        except ArtifactError:  # a corrupt CURRENT is what promote repairs
            previous = None
        _write_json_atomic(self.root / "CURRENT", {"version": version})
        _append_jsonl(self.root / "promotions.jsonl", {"time": time.time(), "action": action, "version": version,
                                                       "previous": previous, "reason": reason})

    def promote(self, version: str, *, reason: str = "manual promote") -> None:
        """Make ``version`` CURRENT after checking it loads. A stale version it replaces is deleted
        (:meth:`drop_stale`)."""
        version = self._check_version(version)
        with self.pointer_lock():  # (a prune elsewhere cannot delete it between the check that it loads and CURRENT)
            self.load(version)  # (load(None) is the current version: promote(None) wrote null)
            self._set_current(version, action="promote", reason=reason)
        self.drop_stale()

    def rollback(self) -> str:
        """Make the previously promoted version CURRENT again; returns it."""
        with self.pointer_lock():  # (two rollbacks at once: each steps back from what the other left)
            cur = self.current_version()
            if cur is None:
                raise NoModelError("nothing to roll back: no model has been published")
            prev = self._rollback_target(cur)
            if prev is None:
                raise ArtifactError(f"no earlier promoted version to roll back to from {cur} (one trained on "
                                    "memories forgotten since is deleted, never restored)")
            self.load(prev)
            self._set_current(prev, action="rollback", reason=f"rollback from {cur}")
        self.drop_stale()  # rolling back from a stale model deletes it
        return prev

    def _rollback_target(self, cur: str | None) -> str | None:
        """The version :meth:`rollback` would restore: the promoted one before ``cur`` that still exists and is not
        stale (a model trained on forgotten memories is never restored)."""
        if cur is None:
            return None
        stale = self.stale_versions()
        seen_current = False
        for entry in _iter_jsonl_reversed(self.root / "promotions.jsonl"):  # (read from the end: every run asks)
            if entry.get("version") == cur and not seen_current:
                seen_current = True
                continue
            prev = entry.get("version")
            if seen_current and prev and prev != cur and prev not in stale and (self.versions_dir / prev).exists():
                return str(prev)
        return None

    # ------------------------------------------------------------ staleness

    def stale_versions(self) -> dict[str, str]:
        path = self.root / "stale.json"
        return json.loads(path.read_text()) if path.exists() else {}

    @contextmanager
    def pointer_lock(self, timeout: float = 120) -> Iterator[None]:
        """Held while CURRENT is read and changed: :meth:`promote`, :meth:`rollback`, :meth:`retire`, and a
        consolidation run from its check that CURRENT is still the model it gated against to its publish. An
        operator's rollback while a run trained was undone by that run's promotion; now the run sees it and
        does not promote. Held for moments (a publish writes two small models), so waiting is short."""
        key = str(self.root.resolve())
        held: set[str] = _POINTER_HELD.__dict__.setdefault("roots", set())
        if key in held or not self.root.is_dir():  # held by this thread already (a nested call: no self-deadlock);
            yield  # or nothing published here: nothing to change (and no directory made for a lock)
            return
        lk = FileLock(str(self.root / ".current.lock"), timeout=timeout)
        try:
            lk.acquire()
        except Timeout:
            raise ArtifactError(f"CURRENT of {self.root} stayed locked for {timeout:g} s by a publish, promote or "
                                "rollback in another process: try again (the lock in .current.lock goes with the "
                                "process that holds it, even one that died)") from None
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            lk.release()

    def _stale_lock(self) -> FileLock:
        """Held while ``stale.json`` is read and rewritten: ``forget`` (marking) and a run (deleting) may do so at
        once from two processes, and neither may lose the other's change."""
        self._ensure()
        return FileLock(str(self.root / ".stale.lock"), timeout=60)

    def trained_on(self, ids: set[str]) -> StrList:
        """The versions, not yet stale, whose training set holds any of ``ids``."""
        if not ids:
            return []
        stale = self.stale_versions()
        hit: StrList = []
        for v in self.list_versions():
            if v in stale:
                continue
            p = self.versions_dir / v / "train_ids.json"
            try:
                trained = set(json.loads(p.read_text())) if p.exists() else set()
            except json.JSONDecodeError:
                trained = set()
            if trained & ids:
                hit.append(v)
        return hit

    def mark_stale(self, deleted_ids: set[str], reason: str) -> StrList:
        """Mark every version whose training set contains a deleted id; returns those versions."""
        hit = self.trained_on(deleted_ids)
        if hit:
            with self._stale_lock():  # re-read: another process may have marked or deleted versions meanwhile
                stale = self.stale_versions()
                hit = [v for v in hit if v not in stale and (self.versions_dir / v).exists()]
                stale.update({v: reason for v in hit})
                _write_json_atomic(self.root / "stale.json", stale)
        return hit

    # ------------------------------------------------------------ load

    def load(self, version: str | None = None, *, with_teacher: bool = False,
             map_location: str | torch.device = "cpu") -> LoadedModel:
        """Load a version (default CURRENT), verifying format and checksums."""
        v = version if version is not None else self.current_version()
        if v is None:
            if self.namespace is not None:
                raise NoModelError(f"no model trained on namespace {self.namespace!r} yet ({self.root}): consolidate "
                                   f"first (mem.consolidate(namespace={self.namespace!r}), or `memory-distill "
                                   f"consolidate --namespace {self.namespace}`)")
            scoped = sorted(self.namespaces())
            hint = (f"; models trained on one namespace live in registry.scoped(namespace) (have: {scoped[:5]})"
                    if scoped else "")
            raise NoModelError(f"no model published in {self.root}: consolidate first (mem.consolidate(), or "
                               f"`memory-distill consolidate`){hint}")
        m = self.manifest(v)
        if m.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{v} has format {m.get('format_version')}, this library reads {FORMAT_VERSION}")
        d = self.versions_dir / v
        files = ["student.pt"] + (["teacher.pt"] if with_teacher else [])
        try:
            for f in files:
                if not (d / f).exists():
                    raise ArtifactError(f"{v}/{f} is missing: the artifact is incomplete; roll back or re-run "
                                        "consolidation")
                if _sha256(d / f) != m.get("checksums", {}).get(f):
                    raise ArtifactError(f"{v}/{f} fails its checksum (corrupt): roll back or re-run consolidation")
            student = RewardMLP.load(m["student"]["arch"],
                                     torch.load(d / "student.pt", map_location=map_location, weights_only=True))
            teacher = None
            if with_teacher:
                teacher = RewardMLP.load(m["teacher"]["arch"],
                                         torch.load(d / "teacher.pt", map_location=map_location, weights_only=True))
                teacher.eval()
        except FileNotFoundError:  # another process deleted it meanwhile (a stale version replaced, a prune)
            raise ArtifactError(f"{v} was deleted while it was being loaded: load the current version again") from None
        except (KeyError, RuntimeError, ValueError) as e:
            raise ArtifactError(f"{v} does not match its manifest ({e})") from None
        student.eval()
        return LoadedModel(v, student, teacher, RewardBins.from_dict(m["bins"]), m)

    def train_ids(self, version: str) -> StrList:
        p = self.versions_dir / self._check_version(version) / "train_ids.json"
        return json.loads(p.read_text()) if p.exists() else []

    def history(self, last: int | None = None) -> Records:
        """Every run, oldest first; ``last``: only the latest ``last`` (read from the end of the file)."""
        if last is None:
            return _read_jsonl(self.history_path)
        if not is_int(last) or last < 0:
            raise ValueError(f"last must be a whole number >= 0 of runs (or None for all), got {last!r}")
        return list(itertools.islice(_iter_jsonl_reversed(self.history_path), last))[::-1]

    def last_run(self, outcomes: tuple[str, ...] = ("promoted", "rejected", "skipped")) -> dict[str, Any] | None:
        """The newest :meth:`history` entry with one of ``outcomes``, read from the end of the file."""
        return next((e for e in _iter_jsonl_reversed(self.history_path) if e.get("outcome") in outcomes), None)

    def append_history(self, entry: dict[str, Any]) -> None:
        self._ensure()
        _append_jsonl(self.history_path, entry)

    def log_deletion(self, entry: dict[str, Any]) -> None:
        self._ensure()
        _append_jsonl(self.root / "deletions.jsonl", entry)

    def deletions(self) -> Records:
        return _read_jsonl(self.root / "deletions.jsonl")

    def last_deletion(self) -> dict[str, Any] | None:
        """The newest :meth:`deletions` entry (read from the end of the file)."""
        return next(_iter_jsonl_reversed(self.root / "deletions.jsonl"), None)
