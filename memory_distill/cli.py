"""``memory-distill`` command line (also ``python -m memory_distill``). The only module that prints."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from .config import (
    DEVICE_NAMES,
    DistillConfig,
    EmbedderConfig,
    JobConfig,
    Settings,
    StoreConfig,
    TeacherConfig,
    parse_duration,
)
from .errors import (
    ArtifactError,
    ConsolidationError,
    MemoryDistillError,
    NotEnoughDataError,
    UnchangedDataError,
)

log = logging.getLogger("memory_distill.cli")


# ---------------------------------------------------------------------------- helpers


NS_MODEL_HELP = "use that namespace's model (consolidate --namespace), else the top-level one"
NS_REGISTRY_HELP = "the models consolidated on that namespace (consolidate --namespace)"


def _duration(s: str) -> float:
    try:
        return parse_duration(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kv(items: Sequence[str] | None) -> dict[str, Any]:
    """``--metadata`` as ``key=value`` items (values parsed as JSON when possible) or JSON objects, merged in order."""
    out: dict[str, Any] = {}
    for it in items or []:
        if it.lstrip().startswith("{"):
            try:
                obj = json.loads(it)
            except json.JSONDecodeError as e:
                raise MemoryDistillError(f"--metadata {it!r} is not valid JSON ({e.msg}): use key=value or "
                                         """'{"key": "value"}'""") from None
            if not isinstance(obj, dict):
                raise MemoryDistillError(f"--metadata {it!r}: use key=value or a JSON object")
            out.update(obj)
            continue
        if "=" not in it:
            raise MemoryDistillError(f"--metadata {it!r}: use key=value or a JSON object like '{{\"tool\": \"git\"}}'")
        k, v = it.split("=", 1)
        if not k.strip():
            raise MemoryDistillError(f"--metadata {it!r}: the key is empty: use key=value")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _whole_number(text: str, minimum: int) -> int:
    """A whole-number argument, checked when the arguments are parsed (the error names the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


_CURRICULA = list(get_args(DistillConfig.model_fields["curriculum"].annotation))
"""The curricula by name, as DistillConfig takes them (the curriculum module itself would import torch)."""


def _home(text: str) -> str:
    if not text.strip():  # (--home "$DIR" with DIR unset quietly used the default home)
        raise argparse.ArgumentTypeError("empty: give a directory path, or leave --home out for $MEMORY_DISTILL_HOME "
                                         "or ./.memory_distill")
    return text


def _device(text: str) -> str:
    if not DEVICE_NAMES.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: give auto, cpu, cuda or cuda:N (the N-th GPU)")
    return text


def _namespace(text: str) -> str:
    """``--namespace``: a name (an empty one was read as "no namespace" by some commands, and searched by others)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a namespace's name is needed, not an empty string (or leave the option out)")
    return text


def _reward(text: str) -> float:
    """A reward or reward difference on the command line: a finite number (``nan`` compared False with everything)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _count(text: str) -> int:
    """A count argument (epochs, k, batch size, ...): a whole number >= 1."""
    return _whole_number(text, 1)


def _seed(text: str) -> int:
    """``--seed``: a whole number >= 0 (torch and numpy refuse a negative seed, in an error that names no flag)."""
    return _whole_number(text, 0)


def _json_filter(text: str) -> dict[str, Any]:
    """``--where``: a JSON object, checked when the arguments are parsed."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): give an object like '{{\"tool\": \"search\"}}' "
                                         "(double quotes inside single quotes in a shell)") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"tool\": \"search\"}}', got {text!r}")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    base = Settings()
    upd: dict[str, Any] = {}
    if args.home:
        upd["home"] = Path(args.home)
    store_upd = {k: v for k, v in {"mode": args.store, "host": args.host, "port": args.port, "ssl": args.ssl,
                                   "database": args.database, "collection": args.collection}.items() if v is not None}
    if store_upd:
        upd["store"] = StoreConfig(**{**base.store.model_dump(), **store_upd})
    emb_upd = {k: v for k, v in {"kind": args.embedder, "model": args.embedding_model,
                                 "base_url": args.base_url}.items() if v is not None}
    if emb_upd:
        upd["embedder"] = EmbedderConfig(**{**base.embedder.model_dump(), **emb_upd})
    return base.model_copy(update=upd)


def _open(args: argparse.Namespace) -> Any:
    from .facade import MemoryDistill

    return MemoryDistill.open(settings=_settings(args))


def _table(rows: list[Sequence[Any]], out: Any = None) -> None:
    out = out or sys.stdout
    if not rows:
        return
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip(), file=out)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _fmt(x: Any, nd: int = 3) -> str:
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _job_config(args: argparse.Namespace, base: JobConfig) -> JobConfig:
    upd: dict[str, Any] = {}
    t, d = {}, {}
    if getattr(args, "epochs", None):
        t["epochs"] = d["epochs"] = args.epochs
    if getattr(args, "teacher_epochs", None):
        t["epochs"] = args.teacher_epochs
    if getattr(args, "distill_epochs", None):
        d["epochs"] = args.distill_epochs
    if getattr(args, "curriculum", None):
        d["curriculum"] = args.curriculum
    if t:
        upd["teacher"] = TeacherConfig(**{**base.teacher.model_dump(), **t})
    if d:
        upd["distill"] = DistillConfig(**{**base.distill.model_dump(), **d})
    if getattr(args, "warm_start", False):
        upd["warm_start"] = True
    for k in ("seed", "device", "threads", "namespace", "metadata_features", "keep_versions", "min_rewarded"):
        if getattr(args, k, None) is not None:
            upd[k] = getattr(args, k)
    return JobConfig(**{**base.model_dump(), **{k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in upd.items()}})


def _print_report(rep: Any) -> None:
    ev = rep.evaluation
    print(f"\nversion {rep.version}: {'PROMOTED' if rep.promoted else 'REJECTED'} - {rep.reason}")
    print(f"rows {rep.n_rows} (rewarded {rep.n_rewarded}; train {rep.n_train}, val {rep.n_val}, "
          f"held-out {rep.n_holdout}, transfer {rep.n_transfer}, skipped {rep.skipped_rows}); "
          f"warm start: {rep.warm_started}; {rep.seconds:.1f}s on {rep.device}"
          f"{f' ({rep.threads} threads)' if rep.device == 'cpu' else ''} "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in rep.phases.items())})")
    if rep.extra.get("deleted_training_memories"):
        print(f"{rep.extra['deleted_training_memories']} memories the published model trained on were deleted "
              "outside forget(): it and every version trained on them are marked stale")
    rows: list[Sequence[Any]] = [("held-out metric", "teacher", "student")]
    for k in ("mae", "spearman", "crps", "nll", "calibration_error", "within_3_bins"):
        rows.append((k, _fmt(getattr(ev.teacher, k)), _fmt(getattr(ev.student, k))))
    rows.append(("params", f"{ev.teacher_params:,}", f"{ev.student_params:,}"))
    _table(rows)
    print(f"compression {ev.compression_ratio:.1f}x, prediction match {ev.prediction_match:.3f}, "
          f"KL(teacher||student) {ev.kl_divergence:.4f}, Spearman retention {ev.retention:.3f}, "
          f"student {ev.student_latency_ms * 1000:.0f} us/row")
    from .report import feature_lines

    for line in feature_lines(rep):
        print(line)
    if rep.extra.get("deleted_stale_versions"):
        print(f"deleted stale {', '.join(rep.extra['deleted_stale_versions'])} (trained on forgotten memories)")
    if rep.extra.get("pruned_versions"):
        pruned = rep.extra["pruned_versions"]
        print(f"removed {len(pruned)} old version{'s' if len(pruned) > 1 else ''} ({', '.join(pruned)}): "
              "--keep-versions keeps the newest, the current one and the rollback target")


# ---------------------------------------------------------------------------- commands


def _stdin_text() -> str:
    text = sys.stdin.read()
    if not text.strip():
        raise MemoryDistillError("standard input is empty: pipe the text in (echo '...' | memory-distill ... -)")
    return text.rstrip("\n")


def cmd_add(args: argparse.Namespace) -> int:
    if args.text == "-":
        args.text = _stdin_text()
    mem = _open(args)
    if args.upsert and args.id is None:
        raise MemoryDistillError("--upsert replaces the memory with the given --id: give --id")
    if args.upsert:
        memory = {"id": args.id, "text": args.text, "reward": args.reward, "metadata": _kv(args.metadata),
                  "namespace": args.namespace}
        (mid,) = mem.add_many([memory], upsert=True)
    else:
        mid = mem.record(args.text, args.reward, metadata=_kv(args.metadata), namespace=args.namespace, id=args.id)
    print(mid)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .transfer import import_jsonl

    mem = _open(args)
    bars: list[Any] = []  # shown only when something needs embedding

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc="embed", unit="mem", total=total, disable=args.quiet))
        bars[0].update(done - bars[0].n)

    try:
        rep = import_jsonl(mem.store, args.file, namespace=args.namespace, upsert=args.upsert,
                           batch_size=args.batch_size, progress=progress)
    finally:
        for b in bars:
            b.close()
    how = f"{rep.reused_vectors} with the file's vectors, {rep.embedded} embedded with {mem.embedder.name}"
    print(f"imported {len(rep.ids)} memories into {mem.store.collection_name} ({how})"
          + (f"; vectors not reused: {rep.note}" if rep.note else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .transfer import export_jsonl

    mem = _open(args)
    to_stdout = args.file == "-"
    with tqdm(desc="export", unit="mem", disable=args.quiet or to_stdout) as bar:
        n = export_jsonl(mem.store, sys.stdout if to_stdout else args.file, namespace=args.namespace, where=args.where,
                         embeddings=args.embeddings, progress=lambda done: bar.update(done - bar.n))
    if not to_stdout:
        print(f"exported {n} memories to {args.file}" + (" with their vectors" if args.embeddings else ""))
    if not n:
        print(_why_no_hits(mem, args.namespace, args.where), file=sys.stderr)
    return 0


def cmd_set_reward(args: argparse.Namespace) -> int:
    m = _open(args).set_reward(args.id, args.reward)
    print(f"{m.id}: reward {m.reward}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    mem = _open(args)
    hits = mem.search(args.query, args.k, namespace=args.namespace, where=args.where, diversity=args.diversity)
    if args.json:
        print(json.dumps([{"id": h.memory.id, "similarity": h.similarity, "reward": h.memory.reward,
                           "text": h.memory.text, "metadata": h.memory.metadata} for h in hits], indent=2))
        return 0
    rows: list[Sequence[Any]] = [("similarity", "reward", "id", "text")]
    for h in hits:
        rows.append((f"{h.similarity:.3f}", _fmt(h.memory.reward, 2), h.memory.id[:12], h.memory.text[:70]))
    _table(rows)
    if not hits:
        print(_why_no_hits(mem, args.namespace, args.where), file=sys.stderr)
    return 0


def _why_no_hits(mem: Any, namespace: str | None, where: Any) -> str:
    """A hint for an empty search: an empty store, a namespace that does not exist (and the ones that do), or a
    filter no memory passes."""
    counts = mem.store.namespace_counts()
    if not counts:
        return "no memories stored yet: add some with `memory-distill add` or `memory-distill import`"
    if namespace is not None and namespace not in counts:  # (no "did you mean": user-123 is near user-124)
        return (f"namespace {namespace!r} has no memories; the store's namespaces: "
                f"{', '.join(map(repr, sorted(counts)[:10]))}{' ...' if len(counts) > 10 else ''}")
    if where:
        return f"no memory passes --where {json.dumps(where)}"
    return "no matching memories"


def cmd_reembed(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .facade import MemoryDistill

    with tqdm(desc="re-embed", unit="mem", disable=args.quiet) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        mem = MemoryDistill.reembed(settings=_settings(args), keep_backup=args.keep_backup, force=args.force,
                                    progress=progress)
    n = mem.store.count()
    if bar.total is None and n:  # no page copied: the collection already used this embedder
        print(f"{n} memories in {mem.store.collection_name} are already embedded with {mem.embedder.name}: nothing "
              "to do (--force re-embeds them anyway, e.g. vectors from an older version of the same embedder)")
        return 0
    print(f"{n} memories in {mem.store.collection_name} now embedded with {mem.embedder.name}; "
          "run `memory-distill consolidate` to train models on the new vectors")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    mem = _open(args)
    st = mem.store.stats()
    st["model"] = mem.registry.current_version()
    if st["model"] is not None:  # how old the served model is, and what the last run did (is the worker alive?)
        published = mem.registry.manifest(st["model"]).get("created_at")
        st["model_age_s"] = round(time.time() - published, 1) if published else None
    last = mem.registry.last_run(("promoted", "rejected", "skipped", "failed"))
    st["last_run"] = None if last is None else {
        "outcome": last.get("outcome"), "version": last.get("version"),
        "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("started_at", 0))),
        "ago_s": round(time.time() - float(last.get("started_at", 0)), 1), "reason": last.get("reason") or last.get("error")}
    st["namespace_models"] = {ns: reg.current_version() for ns, reg in mem.registry.namespaces().items()}
    # what grows on disk: model versions (retention), the embedding cache (its bound), an embedded Chroma directory
    s = _settings(args)
    st["disk_mb"] = {"models": _mb(mem.registry.root),
                     "embedding_cache": _mb(*s.cache_path.parent.glob(s.cache_path.name + "*")),  # (+ -wal, -shm)
                     "chroma": _mb(s.store_path) if s.store.mode == "persistent" else None}
    print(json.dumps(st, indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .health import summary

    findings = _open(args).check()
    for f in findings:
        print(json.dumps({"level": f.level, "subject": f.subject, "message": f.message}) if args.json else str(f))
    counts = summary(findings)
    if not args.json:
        print(f"{counts['error']} error(s), {counts['warning']} warning(s)")
    return 1 if counts["error"] or (args.strict and counts["warning"]) else 0


def _mb(*paths: Path) -> float:
    """Megabytes under these files or directories (0 for what does not exist)."""
    total = 0
    for p in paths:
        files = [p] if p.is_file() else p.rglob("*") if p.is_dir() else []
        total += sum(f.stat().st_size for f in files if f.is_file())
    return round(total / 1e6, 1)


def _check_report_dir(out: str | None) -> None:
    """Create ``--report``'s directory before training: a path that cannot be written fails now, not after the run."""
    if out is None:
        return
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MemoryDistillError(f"--report {out!r}: cannot create that directory ({e.strerror or e}); nothing was "
                                 "trained") from None


def cmd_consolidate(args: argparse.Namespace) -> int:
    mem = _open(args)
    cfg = _job_config(args, mem.job)
    _check_report_dir(args.report)
    try:
        rep = mem.consolidate(cfg, progress=not args.quiet, lock_timeout=-1 if args.wait else 0,
                              skip_unchanged=args.skip_unchanged)
    except UnchangedDataError as e:
        print(f"skipped: {e}")
        return 0
    _print_report(rep)
    if args.report:
        _write_report(mem, rep, args.report, cfg.namespace)
    return 0


def _write_report(mem: Any, rep: Any, out: str, namespace: str | None = None) -> None:
    import numpy as np
    import torch

    from .features import FeatureSpec
    from .report import calibration_curve, write_consolidation_report
    from .training import model_inputs

    registry = mem.registry.scoped(namespace)
    loaded = registry.load(rep.version, with_teacher=True)
    spec = FeatureSpec.from_manifest(loaded.manifest, loaded.student.n_features)
    data = mem.store.load_training_data(namespace=namespace, rewarded_only=True, metadata_keys=spec.keys)
    # the plot is of held-out rows: the rewarded memories this version did not train on
    seen = set(registry.train_ids(rep.version))
    unseen = np.array([i for i, mid in enumerate(data.ids) if mid not in seen], dtype=np.int64)
    calib = {}
    if len(unseen):
        F = spec.build(len(data), text_features=data.features, metadata=data.metadata)
        X = model_inputs(data.embeddings[unseen], None if F is None else F[unseen])[:]
        with torch.no_grad():
            for name, model in (("teacher", loaded.teacher), ("student", loaded.student)):
                probs = torch.softmax(model(X), -1).numpy()
                calib[name] = calibration_curve(probs, np.asarray(data.rewards)[unseen], loaded.bins)
    paths = write_consolidation_report(rep, out, calibration=calib, calibration_rows=len(unseen))
    print(f"report: {paths['markdown']} (+ {', '.join(p.name for k, p in paths.items() if k != 'markdown')})")


def cmd_predict(args: argparse.Namespace) -> int:
    if args.texts == ["-"]:  # one text per line, blank lines skipped
        args.texts = [line for line in _stdin_text().splitlines() if line.strip()]
    elif "-" in args.texts:
        raise MemoryDistillError("- reads the texts from standard input: give it alone, not among other texts")
    mem = _open(args)
    meta = _kv(args.metadata)
    pred = mem.predictor_for(args.namespace)  # the namespace's model, else the top-level one
    preds = pred.predict(args.texts, metadata=[meta] * len(args.texts) if meta else None)
    if meta and not pred.metadata_features:  # (a model with features warns on a near miss of one itself)
        print(f"note: model {pred.version} reads no metadata, so -m changes nothing; consolidate with "
              f"--metadata-feature {next(iter(meta))} to train one that does", file=sys.stderr)
    if args.json:
        print(json.dumps([{"text": t, **p.to_dict(), "prob_above": {str(args.threshold): p.prob_above(args.threshold)}}
                          for t, p in zip(args.texts, preds, strict=True)], indent=2))
        return 0
    rows: list[Sequence[Any]] = [("expected", "std", "p10", "p90", f"P(>{args.threshold})", "text")]
    for t, p in zip(args.texts, preds, strict=True):
        rows.append((f"{p.mean:.3f}", f"{p.std:.3f}", f"{p.quantiles[0.1]:.2f}", f"{p.quantiles[0.9]:.2f}",
                     f"{p.prob_above(args.threshold):.2f}", t[:60]))
    _table(rows)
    served = pred.registry.namespace
    whose = (f", namespace {served!r}" if served is not None else
             f", top-level: namespace {args.namespace!r} has no model of its own" if args.namespace else "")
    print(f"(model {preds[0].model_version}{whose})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    reg = _open(args).registry.scoped(args.namespace)
    if args.json:
        print(json.dumps(reg.list(), indent=2))
        return 0
    if not reg.list_versions():
        where, flag = ((f" for namespace {args.namespace!r}", f" --namespace {args.namespace}")
                       if args.namespace is not None else ("", ""))
        print(f"no models{where} yet: `memory-distill consolidate{flag}` trains one")
        return 0
    try:
        reg.current_version()
    except ArtifactError as e:
        print(f"warning: {e}", file=sys.stderr)
    rows: list[Sequence[Any]] = [("version", "status", "current", "stale", "spearman", "mae", "reason")]
    for m in reg.list():
        met = m.get("metrics") or {}
        rows.append((m["version"], m.get("status"), "*" if m.get("current") else "", "stale" if m.get("stale") else "",
                     _fmt(met.get("spearman")), _fmt(met.get("mae")), (m.get("reason") or "")[:60]))
    _table(rows)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    _open(args).registry.scoped(args.namespace).promote(args.version)
    print(f"current model: {args.version}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    v = _open(args).registry.scoped(args.namespace).rollback()
    print(f"rolled back; current model: {v}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    reg = _open(args).registry.scoped(args.namespace)
    if args.json:
        print(json.dumps(reg.history(), indent=2))
        return 0
    runs = reg.history(last=args.last)
    if not runs:
        print("no consolidation has run yet" + (f" for namespace {args.namespace!r}" if args.namespace is not None else ""))
        return 0
    rows: list[Sequence[Any]] = [("started", "outcome", "version", "seconds", "rewarded", "spearman", "reason/error")]
    for h in runs:
        rows.append((time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started_at", 0))), h.get("outcome"),
                     h.get("version", "-"), f"{h.get('seconds', 0):.1f}", h.get("n_rewarded", "-"),
                     _fmt((h.get("student") or {}).get("spearman", "-")), (h.get("reason") or h.get("error") or "")[:60]))
    _table(rows)
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    mem = _open(args)
    if not (args.ids or args.where is not None or args.namespace or args.older_than is not None):
        raise MemoryDistillError("forget needs --id, --where, --namespace or --older-than")
    entry = mem.forget(args.ids or None, where=args.where, namespace=args.namespace, older_than=args.older_than,
                       reason=args.reason or "", dry_run=args.dry_run)
    if args.dry_run:
        print(f"dry run, nothing changed: would delete {entry['n_deleted']} memories; models that would become stale: "
              f"{entry['stale_versions'] or 'none'}"
              + (f"; would delete models: {', '.join(entry['deleted_versions'])}" if entry["deleted_versions"] else "")
              + (f"; would retire: {', '.join(entry['retired'])}" if entry["retired"] else ""))
        return 0
    print(f"deleted {entry['n_deleted']} memories; models marked stale: {entry['stale_versions'] or 'none'}"
          + (f"; deleted (trained on them): {', '.join(entry['deleted_versions'])}" if entry.get("deleted_versions")
             else "")
          + (f"; retired (nothing left to train on): {', '.join(entry['retired'])}" if entry.get("retired") else ""))
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    d = _open(args).drift(threshold=args.threshold, namespace=args.namespace)
    print(json.dumps(asdict(d), indent=2))
    if not d.n:
        print(f"note: no memory was rewarded after {d.version} was published, so there is no drift to measure yet",
              file=sys.stderr)
    elif d.n < 20:  # drift_report's min_samples
        print(f"note: only {d.n} memories were rewarded after {d.version} was published; drift triggers a run (worker "
              "--drift-threshold) from 20", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .jobs import ConsolidationWorker, NamespaceWorkers

    mem = _open(args)
    cfg = _job_config(args, mem.job)
    triggers = {"every_s": args.every, "min_new": args.min_new, "drift_threshold": args.drift_threshold,
                "skip_unchanged": not args.retrain_unchanged,
                # a model per user: one "nothing new" line per idle user per --every would drown the runs (-v shows them)
                "on_run": partial(_print_run, show_unchanged=not args.each_namespace or args.verbose > 0)}
    if args.each_namespace:
        if cfg.namespace is not None:
            raise MemoryDistillError("give --each-namespace or --namespace, not both")
        w: Any = NamespaceWorkers(mem.store, mem.registry, cfg, **triggers)
        scope = "each namespace: "
    else:
        w = ConsolidationWorker(mem.store, mem.registry, cfg, **triggers)
        scope = ""
    def on_term(signum: int, frame: Any) -> None:  # docker stop, systemd, Kubernetes: finish the run under way
        print("worker: SIGTERM, stopping after the run under way (if any)", flush=True)
        w.stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    print(f"worker: {scope}every {args.every}s or {args.min_new} new rewards; polling every {args.poll}s "
          "(Ctrl-C or SIGTERM stops it)", flush=True)
    if not args.each_namespace:  # a fresh store waits silently for enough rewards: say so once
        try:
            due, why = w.due()
        except Exception:  # a store that is away (a server still starting): run_forever waits it out
            due, why = True, ""
        if not due and why.startswith("only "):
            print(f"worker: waiting for rewards: {why}; --min-rewarded N lowers it", flush=True)
    try:
        w.run_forever(poll_s=args.poll, max_runs=args.max_runs)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _print_run(worker: Any, result: Any, *, show_unchanged: bool = True) -> None:
    """The worker's line per due run, as it happens (docker logs, journald): what was published, or why not."""
    ns = worker.config.namespace
    where = f"namespace {ns!r} " if ns is not None else ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(result, UnchangedDataError) and not show_unchanged:
        return
    if isinstance(result, Exception):
        what = "failed" if isinstance(result, ConsolidationError) and not isinstance(
            result.__cause__, NotEnoughDataError) else "skipped"
        print(f"{stamp} {where}{what}: {result}", flush=True)
        return
    ev = result.evaluation.student
    print(f"{stamp} {where}{result.version}: {'promoted' if result.promoted else 'rejected'} ({result.reason}); "
          f"{result.n_rewarded} rewarded, student spearman {_fmt(ev.spearman)}, {result.seconds:.1f}s", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo_data import synthetic_episodes

    t0 = time.perf_counter()
    _check_report_dir(args.report)
    mem = _open(args)
    print(f"memory_distill demo - home {mem.registry.root.parent}, embedder {mem.embedder.name}, store {mem.store.config.mode}")
    episodes = synthetic_episodes(args.n, seed=0 if args.seed is None else args.seed)
    mem.store.add_many(episodes, upsert=True)
    st = mem.store.stats()
    print(f"1. ingest: {st['total']} episodes stored ({st['rewarded']} rewarded, {st['pending']} awaiting a reward)")
    cfg = _job_config(args, mem.job)
    print("2. consolidate: teacher -> distilled student -> evaluate -> gate -> publish")
    rep = mem.consolidate(cfg, progress=not args.quiet)
    _print_report(rep)
    if args.report:
        _write_report(mem, rep, args.report, cfg.namespace)
    probes = [
        "Task: find the population of Oslo in 2020. The agent searched the web, cross-checked two sources and cited them in the answer.",
        "Task: convert 30 miles to metric units. The agent called the calculator tool and verified the result before answering.",
        "Task: answer who founded Hooli. The agent answered from memory without using any tool.",
        "Task: fix the failing unit test in the auth module. The agent guessed the answer and did not check it.",
    ]
    print("\n3. predict rewards of new episodes with the promoted student:")
    preds = mem.predict(probes)
    rows: list[Sequence[Any]] = [("expected", "p10-p90", "P(>0.5)", "episode")]
    for t, p in zip(probes, preds, strict=True):
        rows.append((f"{p.mean:.2f}", f"{p.quantiles[0.1]:.2f}-{p.quantiles[0.9]:.2f}", f"{p.prob_above(0.5):.2f}",
                     t.split("The agent ")[1][:70]))
    _table(rows)
    hits = mem.search("looked it up and cited sources", k=3, diversity=0.5)
    print("\n4. recall: memories most similar to 'looked it up and cited sources' (diversity 0.5: no near-copies):")
    for h in hits:
        print(f"   {h.similarity:.2f}  reward {_fmt(h.memory.reward, 2)}  {h.memory.text[:90]}")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s. Next: `memory-distill predict \"...\"`, `memory-distill models`.")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import run_curriculum_experiment

    try:
        res = run_curriculum_experiment(args.data, out_dir=args.out, seeds=args.seeds, max_records=args.max_records,
                                        epochs=args.epochs, curricula=args.curricula, progress=not args.quiet)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _table(res["table"])
    print(f"\nwrote {args.out}/results.json, {args.out}/curricula.png, {args.out}/report.md")
    if not args.no_router:
        from .experiments import run_router_experiment

        try:
            rr = run_router_experiment(args.data, seeds=args.seeds)
        except FileNotFoundError as e:
            print(f"error: {e} (--no-router skips the routing evaluation)", file=sys.stderr)
            return 2
        Path(args.out, "router.json").write_text(json.dumps(rr, indent=1))
        print(f"\nrouting FireAct ({rr['n_questions']} questions, cheap {rr['cheap']} vs strong {rr['strong']}, cost 1:10):")
        rows: list[Sequence[Any]] = [("cheap share", "quality", "quality kept", "cost saved")]
        for p in rr["curves"][0]["student"]:
            rows.append((f"{p['cheap_fraction']:.2f}", f"{p['quality']:.3f}", f"{p['quality_kept']:.2f}", f"{p['cost_saved']:.2f}"))
        _table(rows)
        print(f"quality-vs-cheap-share AUC: student {rr['quality_cost_auc_student']:.3f}, random {rr['quality_cost_auc_random']:.3f}")
    return 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memory-distill", description="Episodic memory with a distilled reward model.")
    p.add_argument("--home", type=_home, help="data directory (default $MEMORY_DISTILL_HOME or ./.memory_distill)")
    p.add_argument("--store", choices=["persistent", "ephemeral", "http"], help="Chroma mode")
    p.add_argument("--host", help="Chroma server host (http mode)")
    p.add_argument("--port", type=int, help="Chroma server port (http mode)")
    p.add_argument("--ssl", action="store_true", default=None, help="https to the Chroma server (http mode)")
    p.add_argument("--database", help="Chroma database on the server (http mode; credentials go in "
                   "MEMORY_DISTILL_STORE__HEADERS, never on the command line)")
    p.add_argument("--collection", help="Chroma collection name")
    p.add_argument("--embedder", choices=["auto", "hashing", "openai", "local"], help="embedder (auto: OpenAI if a key is set)")
    p.add_argument("--embedding-model", help="OpenAI model or local sentence-transformers name")
    p.add_argument("--base-url", help="OpenAI-compatible base URL")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (also when stderr is not a terminal)")
    sub = p.add_subparsers(dest="command", required=True)

    def job_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--epochs", type=_count, help="max epochs for teacher and student")
        sp.add_argument("--teacher-epochs", type=_count)
        sp.add_argument("--distill-epochs", type=_count)
        sp.add_argument("--curriculum", choices=_CURRICULA)
        sp.add_argument("--seed", type=_seed)
        sp.add_argument("--device", type=_device, metavar="{auto,cpu,cuda,cuda:N}")
        sp.add_argument("--threads", type=_count, help="CPU threads to train with (default: every core)")
        sp.add_argument("--keep-versions", type=_count, metavar="N",
                        help="keep the N newest model versions (default 20; the current one and the rollback "
                             "target are always kept)")
        sp.add_argument("--min-rewarded", type=_count, metavar="N",
                        help="rewarded memories a run needs (default 20; at least 2)")
        sp.add_argument("--metadata-feature", dest="metadata_features", action="append", metavar="KEY",
                        help="metadata key the models read as a category, e.g. agent (repeatable)")
        sp.add_argument("--warm-start", action="store_true",
                        help="start from the published models instead of from scratch (off by default: it ranked "
                             "worse on the real data, see BENCHMARKS.md)")

    sp = sub.add_parser("add", aliases=["record"], help="store one memory (alias: record, as MemoryDistill.record)")
    sp.add_argument("text", help="the episode's text; - reads it from standard input (all of it: one episode)")
    sp.add_argument("--reward", type=float)
    sp.add_argument("--metadata", "-m", nargs="*",
                    help="key=value items (values parsed as JSON when possible) or a JSON object")
    sp.add_argument("--namespace", type=_namespace, default="default")
    sp.add_argument("--id")
    sp.add_argument("--upsert", action="store_true", help="replace the memory with this --id if it exists")
    sp.set_defaults(func=cmd_add)

    sp = sub.add_parser("import", help="import a JSONL file (text, reward, metadata, namespace, id; an export); "
                        "all or nothing")
    sp.add_argument("file", help="path, or - for standard input")
    sp.add_argument("--namespace", type=_namespace, help="for lines that do not name one")
    sp.add_argument("--batch-size", type=_count, default=1000, help="texts per embedding call")
    sp.add_argument("--upsert", action="store_true", help="replace memories whose id exists")
    sp.set_defaults(func=cmd_import)

    sp = sub.add_parser("export", help="write memories as JSONL (a backup, or to move them to another store)")
    sp.add_argument("file", help="path (written whole or not at all), or - for standard output")
    sp.add_argument("--namespace", type=_namespace)
    sp.add_argument("--where", type=_json_filter, help="metadata filter as JSON, e.g. '{\"tool\": \"search\"}'")
    sp.add_argument("--embeddings", action="store_true",
                    help="include the vectors: importing into a store with the same embedder then embeds nothing")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("set-reward", help="record a (late) reward")
    sp.add_argument("id")
    sp.add_argument("reward", type=float)
    sp.set_defaults(func=cmd_set_reward)

    sp = sub.add_parser("search", help="similar memories")
    sp.add_argument("query")
    sp.add_argument("-k", type=_count, default=5)
    sp.add_argument("--namespace", type=_namespace, default="default")
    sp.add_argument("--where", type=_json_filter, help='JSON metadata filter, e.g. \'{"tool": "search"}\'')
    sp.add_argument("--diversity", type=float, default=0.0, help="> 0: skip near-copies of results (e.g. 0.5)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_search)

    sp = sub.add_parser("stats", help="store and model summary")
    sp.set_defaults(func=cmd_stats)

    sp = sub.add_parser("check", help="health of the store, the models and the embedding cache, each problem with "
                                      "its fix; exit status 1 when it finds an error (with --strict, a warning too)")
    sp.add_argument("--json", action="store_true", help="one object per finding: level, subject, message")
    sp.add_argument("--strict", action="store_true", help="a warning fails too (exit status 1)")
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("consolidate", help="train teacher, distil student, gate, publish")
    job_args(sp)
    sp.add_argument("--namespace", type=_namespace, help="train on one namespace; its models are gated, published and served apart")
    sp.add_argument("--report", help="directory for report.md/html + PNG plots")
    sp.add_argument("--wait", action="store_true", help="wait for a running consolidation instead of exiting")
    sp.add_argument("--skip-unchanged", action="store_true",
                    help="train nothing when the memories and settings are what the last run saw (for cron jobs)")
    sp.set_defaults(func=cmd_consolidate)

    sp = sub.add_parser("predict", help="predicted reward of texts")
    sp.add_argument("texts", nargs="+", help="texts to score; - reads one per line from standard input")
    sp.add_argument("--metadata", "-m", nargs="*",
                    help="key=value items or a JSON object, for every text (a model with metadata features reads them)")
    sp.add_argument("--threshold", type=_reward, default=0.5, help="report P(reward > threshold) (default 0.5)")
    sp.add_argument("--json", action="store_true", help="one object per text: the text, the prediction, prob_above")
    sp.add_argument("--namespace", type=_namespace, help=NS_MODEL_HELP)
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("models", help="list model versions")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--namespace", type=_namespace, help=NS_REGISTRY_HELP)
    sp.set_defaults(func=cmd_models)
    sp = sub.add_parser("promote", help="make a version current")
    sp.add_argument("version")
    sp.add_argument("--namespace", type=_namespace, help=NS_REGISTRY_HELP)
    sp.set_defaults(func=cmd_promote)
    sp = sub.add_parser("rollback", help="restore the previously promoted version")
    sp.add_argument("--namespace", type=_namespace, help=NS_REGISTRY_HELP)
    sp.set_defaults(func=cmd_rollback)

    sp = sub.add_parser("history", help="consolidation job history")
    sp.add_argument("--last", type=_count, default=20)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--namespace", type=_namespace, help=NS_REGISTRY_HELP)
    sp.set_defaults(func=cmd_history)

    sp = sub.add_parser("forget", help="delete memories; models trained on them are deleted "
                        "(a current one serves until the next consolidation replaces it)")
    sp.add_argument("--id", dest="ids", action="append")
    sp.add_argument("--where", type=_json_filter, help='JSON metadata filter, e.g. \'{"user": "u42"}\'')
    sp.add_argument("--namespace", type=_namespace)
    sp.add_argument("--older-than", type=_duration, help="memories created more than this long ago (e.g. 90d)")
    sp.add_argument("--reason")
    sp.add_argument("--dry-run", action="store_true",
                    help="change nothing: say which memories would go and which models would be stale, deleted, retired")
    sp.set_defaults(func=cmd_forget)

    sp = sub.add_parser("reembed", help="re-embed every memory with the configured embedder (e.g. after setting an API key)")
    sp.add_argument("--keep-backup", action="store_true", help="keep the old collection as <name>-pre-reembed-<time>")
    sp.add_argument("--force", action="store_true", help="re-embed even when the store already uses this embedder")
    sp.set_defaults(func=cmd_reembed)

    sp = sub.add_parser("drift", help="realised vs predicted reward since the model was published")
    sp.add_argument("--threshold", type=_reward, default=0.1)
    sp.add_argument("--namespace", type=_namespace, help="that namespace's rows, scored by the model serving it")
    sp.set_defaults(func=cmd_drift)

    sp = sub.add_parser("worker", help="periodic consolidation")
    job_args(sp)
    sp.add_argument("--namespace", type=_namespace)
    sp.add_argument("--every", type=_duration, default=600.0,
                    help="run at least this often (e.g. 10m); a store unchanged since the last run is skipped")
    sp.add_argument("--retrain-unchanged", action="store_true",
                    help="train on every trigger, even when the memories are what the last run saw")
    sp.add_argument("--min-new", type=_count, default=100, help="run when this many new rewards arrived")
    sp.add_argument("--drift-threshold", type=_reward)
    sp.add_argument("--poll", type=_duration, default=30.0, help="how often the triggers are checked")
    sp.add_argument("--max-runs", type=_count,
                    help="exit after this many runs that trained (skipped polls do not count); "
                         "for one run from cron use `consolidate --skip-unchanged`")
    sp.add_argument("--each-namespace", action="store_true",
                    help="one model per namespace, each consolidated on its own triggers")
    sp.set_defaults(func=cmd_worker)

    sp = sub.add_parser("demo", help="main job: ingest synthetic episodes, consolidate, predict (offline)")
    job_args(sp)
    sp.add_argument("--n", type=_count, default=3000, help="number of synthetic episodes")
    sp.add_argument("--report", help="directory for the consolidation report")
    sp.set_defaults(func=cmd_demo, namespace=None)

    sp = sub.add_parser("experiment", help="compare curricula on real data")
    sp.add_argument("--data", help="directory with *.jsonl.gz episode files (default: ../shared/data, found from the "
                    "project or the working directory)")
    sp.add_argument("--out", default="reports/experiment")
    sp.add_argument("--seeds", type=_seed, nargs="+", default=[0, 1])
    sp.add_argument("--epochs", type=_count, default=15)
    sp.add_argument("--max-records", type=_count, default=3000)
    sp.add_argument("--curricula", nargs="+", choices=_CURRICULA)
    sp.add_argument("--no-router", action="store_true", help="skip the FireAct routing evaluation")
    sp.set_defaults(func=cmd_experiment)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():  # cron, CI, docker logs: no progress bars redrawn line after line
        args.quiet = True
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MemoryDistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:  # a setting out of range (from the environment or a flag): one line per field
        for err in e.errors():
            field = ".".join(str(x) for x in err["loc"])
            names = [str(x) for x in err["loc"]]
            names = names[:next((i for i, x in enumerate(err["loc"]) if isinstance(x, int)), len(names))]  # not a list's index
            env = ("; set by MEMORY_DISTILL_" + "__".join(x.upper() for x in names) if e.title == "Settings" else "")
            got = "" if "headers" in err["loc"] else f"got {err.get('input')!r}"  # credentials are not echoed
            print(f"error: {e.title}.{field}: {err['msg']} ({got}{env})".replace("(; ", "("), file=sys.stderr)
        return 2
    except (ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        return 1


def _stdout_gone() -> bool:
    """True when standard output is a pipe whose reader went away (``memory-distill export - | head``): no
    traceback then, as for any Unix filter. Standard output is pointed at /dev/null so that the exit's flush does
    not fail again. (A Chroma server's closed socket reaches here as the HTTP client's own error, not this one.)"""
    try:
        if not stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
