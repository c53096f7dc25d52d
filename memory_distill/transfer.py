"""Export memories to JSON Lines and import them back: backups, moving a store, sharing episodes.

One JSON object per line. An export starts with a header line::

    {"memory_distill_export": {"format_version": 1, "embedder": "hashing-v1-512", "dim": 512,
                               "collection": "memories", "exported_at": 1764190000.0,
                               "embedding_encoding": "base64-float32-le"}}

followed by one memory per line: ``id``, ``text``, ``reward`` (``null`` while pending),
``metadata``, ``namespace``, ``created_at``, ``rewarded_at`` and, with ``embeddings=True``, its
vector (``embedding``: little-endian float32 bytes in base64, exact and about 4x smaller than a
list of decimals). A plain file of ``{"text": ..., "reward": ...}`` lines without a header imports
too (the CLI's ``import``).

Importing is all or nothing: every line is validated (JSON, fields, reward range, duplicate or
existing ids) and every missing vector computed before the first row is written, and the write
itself is one atomic :meth:`MemoryStore.add_many`. A file's vectors are reused only when its header
names the target store's embedder and width; otherwise the texts are embedded again, so vectors from
another model never mix with the store's.

Moving an embedded store to a Chroma server keeps the vectors (no embedding calls)::

    memory-distill export all.jsonl --embeddings
    memory-distill --store http --host 10.0.0.5 --port 8000 import all.jsonl
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import gzip
import io
import json
import logging
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import InvalidMemoryError, StoreError, nearest_name
from .store import MemoryStore, coerce_memory
from .types import Memory, check_flag, is_int

__all__ = ["ImportReport", "export_jsonl", "import_jsonl", "read_jsonl"]

HEADER_KEY = "memory_distill_export"
FORMAT_VERSION = 1
ENCODING = "base64-float32-le"
FIELDS = ("id", "text", "reward", "metadata", "namespace", "created_at", "rewarded_at")
_KNOWN = (*FIELDS, "embedding")

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1024)
def _nearest_field(key: str) -> str | None:
    return nearest_name(key, _KNOWN, cutoff=0.8)


def _misspelt(key: str, obj: Mapping[str, Any]) -> str | None:
    """The field ``key`` is most likely a typo of (``rewrd``, ``Reward``, ``txt`` -> reward, reward, text), when
    that field is absent from the line; ``None`` for a key that is simply not part of the format."""
    near = _nearest_field(key)
    return near if near is not None and near not in obj else None


def _encode(vec: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vec, "<f4").tobytes()).decode("ascii")


def _decode(value: Any, where: str) -> np.ndarray:
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise InvalidMemoryError(f"{where}: embedding is not base64 float32 data: re-export the file") from None
        if len(raw) % 4:
            raise InvalidMemoryError(f"{where}: embedding has {len(raw)} bytes, not whole float32 values")
        vec = np.frombuffer(raw, "<f4").astype(np.float32)
    elif isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        vec = np.asarray(value, np.float32)
    else:
        raise InvalidMemoryError(f"{where}: embedding must be a list of numbers or base64 float32, "
                                 f"got {type(value).__name__}")
    if not np.isfinite(vec).all():
        raise InvalidMemoryError(f"{where}: embedding contains NaN or inf: drop the field to embed the text again")
    return vec


def export_jsonl(store: MemoryStore, path: str | Path | IO[Any], *, namespace: str | None = None,
                 where: Mapping[str, Any] | None = None, embeddings: bool = False,
                 progress: Callable[[int], None] | None = None) -> int:
    """Write the store's memories (optionally one namespace / a ``where`` filter) as JSON Lines.

    ``path``: a file path, written to a temporary file next to it and renamed into place when
    complete (a failed export leaves no partial file), ``-`` for standard output, or an open stream, text or
    binary.
    ``embeddings=True`` also writes the vectors, so importing into a store with the same embedder
    costs no embedding calls. ``progress(rows_written)`` is called after each page. Returns the
    number of memories written.
    """
    if not isinstance(path, str | Path) and not hasattr(path, "write"):
        raise TypeError(f"export_jsonl writes to a file path, '-' (standard output) or an open stream, got "
                        f"{type(path).__name__}")
    check_flag(embeddings, "embeddings", "write the vectors too")
    if isinstance(path, str | Path) and str(path) == "-":  # (as import_jsonl reads "-" from standard input)
        return export_jsonl(store, sys.stdout, namespace=namespace, where=where, embeddings=embeddings,
                            progress=progress)
    if not isinstance(path, (str, Path)):
        binary = isinstance(path, (io.RawIOBase, io.BufferedIOBase)) or "b" in str(getattr(path, "mode", ""))
        if not binary:
            return _write(store, path, namespace, where, embeddings, progress)
        text = io.TextIOWrapper(path, encoding="utf-8", newline="\n", write_through=True)  # a binary stream
        try:
            return _write(store, text, namespace, where, embeddings, progress)
        finally:
            text.flush()
            text.detach()  # the caller's stream stays open
    target = Path(path)
    if not str(path).strip() or target.is_dir():
        raise StoreError(f"export path {str(path)!r} is {'a directory' if str(path).strip() else 'empty'}: give a file "
                         "path (or '-' for standard output)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the export's directory {str(target.parent)!r}: {e.strerror or e}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            n = _write(store, f, namespace, where, embeddings, progress)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def _write(store: MemoryStore, f: IO[str], namespace: str | None, where: Mapping[str, Any] | None,
           embeddings: bool, progress: Callable[[int], None] | None) -> int:
    header = {"format_version": FORMAT_VERSION, "embedder": store.embedder.name, "dim": store.embedder.dim,
              "collection": store.collection_name, "exported_at": time.time()}
    if embeddings:
        header["embedding_encoding"] = ENCODING
    f.write(json.dumps({HEADER_KEY: header}) + "\n")
    n = 0
    for mems, vecs in store.iter_memories(namespace=namespace, where=where, with_embeddings=embeddings):
        lines = []
        for j, m in enumerate(mems):
            row = m.model_dump(include=set(FIELDS))
            if vecs is not None:
                row["embedding"] = _encode(vecs[j])
            lines.append(json.dumps(row, ensure_ascii=False))
        f.write("\n".join(lines) + "\n")
        n += len(mems)
        if progress is not None:
            progress(n)
    return n


@dataclass
class ImportFile:
    """A validated JSON Lines file: memories, the vectors it carried, its export header (or ``None``)."""

    memories: list[Memory]
    vectors: list[np.ndarray | None]
    header: dict[str, Any] | None
    lines: list[int]  # line number of each memory, for error messages
    ignored: dict[str, int] = field(default_factory=dict)
    """Keys outside the format (not read), with the number of lines that had each."""


def source_name(path: str | Path | IO[Any]) -> str:
    """How errors name an import's source: its path, ``-`` for standard input, or an open stream's name."""
    return str(path) if isinstance(path, (str, Path)) else str(getattr(path, "name", "<stream>"))


def _lines(path: str | Path | IO[Any]) -> Iterator[tuple[int, str]]:
    """The source's lines, numbered from 1: UTF-8 with or without a byte-order mark, gzip-compressed or not (told by
    its first bytes, whatever its name). ``path``: a file path, ``-`` (standard input) or an open text or binary
    stream (read as it is: a text stream's own encoding applies)."""
    name = source_name(path)
    lineno = 0
    if not isinstance(path, str | Path) and not hasattr(path, "read"):  # (None failed as "not iterable")
        raise TypeError(f"the import source must be a file path, '-' (standard input) or an open stream, got "
                        f"{type(path).__name__}")
    try:
        if not isinstance(path, (str, Path)):
            src: Any = path
        elif str(path) == "-":
            src = getattr(sys.stdin, "buffer", sys.stdin)  # (a text stream put in its place has no buffer)
            peek = getattr(src, "peek", None)
            if peek is not None and peek(2)[:2] == b"\x1f\x8b":
                src = gzip.GzipFile(fileobj=src)
        else:
            src = open(path, "rb")
            if src.read(2) == b"\x1f\x8b":
                src.close()
                src = gzip.open(path, "rb")
            else:
                src.seek(0)
        with src if isinstance(path, (str, Path)) and str(path) != "-" else contextlib.nullcontext(src):
            for lineno, line in enumerate(src, 1):  # decoded line by line: an error names its own line
                if isinstance(line, bytes):
                    line = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
                yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line
    except (OSError, EOFError, zlib.error) as e:
        why = getattr(e, "strerror", None) or str(e)  # (gzip's errors have no strerror: a truncated file)
        raise InvalidMemoryError(f"{name}: cannot read the file ({why}); nothing was imported") from None
    except UnicodeDecodeError as e:
        raise InvalidMemoryError(f"{name}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line): save "
                                 "the file as UTF-8; nothing was imported") from None


def read_jsonl(path: str | Path | IO[Any], *, namespace: str | None = None) -> ImportFile:
    """Parse and validate a JSON Lines file (``-``: standard input; or an open stream) without touching any store.

    Each line: a JSON object with at least ``text``; ``id``, ``reward``, ``metadata``,
    ``namespace``, ``created_at``, ``rewarded_at`` and ``embedding`` are optional. Other keys are not read
    (counted in :attr:`ImportFile.ignored`), except a near miss of a missing field (``rewrd``, ``Reward``,
    ``txt``), which is an error: its value would be lost. ``namespace`` applies to lines that do not name one.
    Errors name ``path:line``.
    """
    if namespace is not None and (not isinstance(namespace, str) or not namespace.strip()):
        raise InvalidMemoryError(f"namespace must be a non-empty str (given to the lines that name none), got "
                                 f"{namespace!r}")
    mems: list[Memory] = []
    vecs: list[np.ndarray | None] = []
    linenos: list[int] = []
    header: dict[str, Any] | None = None
    seen: dict[str, int] = {}
    ignored: dict[str, int] = {}
    name = source_name(path)
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidMemoryError(f"{where}: not valid JSON ({e.msg}); nothing was imported") from None
        if not isinstance(obj, dict):
            raise InvalidMemoryError(f"{where}: expected a JSON object with a 'text' field; nothing was imported")
        if HEADER_KEY in obj:
            if mems or header is not None:
                raise InvalidMemoryError(f"{where}: an export header must be the first line (two files "
                                         "concatenated? import them one by one); nothing was imported")
            header = obj[HEADER_KEY] if isinstance(obj[HEADER_KEY], dict) else {}
            version = header.get("format_version")
            if version != FORMAT_VERSION:
                raise InvalidMemoryError(f"{where}: export format_version {version!r} is not supported (this "
                                         f"version reads {FORMAT_VERSION}): upgrade memory_distill")
            continue
        for k in obj:
            if k in _KNOWN:
                continue
            if near := _misspelt(k, obj):
                raise InvalidMemoryError(f"{where}: unknown field {k!r}: did you mean {near!r}? (rename it: fields "
                                         "outside the format are not read, so its value would be lost); nothing "
                                         "was imported")
            ignored[k] = ignored.get(k, 0) + 1
        try:
            mem = coerce_memory({k: v for k, v in obj.items() if k in FIELDS}, namespace=namespace)
            vec = _decode(obj["embedding"], "embedding") if obj.get("embedding") is not None else None
        except InvalidMemoryError as e:
            raise InvalidMemoryError(f"{where}: {e}; nothing was imported") from None
        if mem.id in seen:
            raise InvalidMemoryError(f"{where}: id {mem.id!r} already appears on line {seen[mem.id]}: "
                                     "give each memory a unique id; nothing was imported")
        seen[mem.id] = lineno
        mems.append(mem)
        vecs.append(vec)
        linenos.append(lineno)
    if ignored:
        log.warning("%s: fields outside the format were not read: %s (to keep them, move them into metadata)",
                    path, ignored_text(ignored))
    return ImportFile(mems, vecs, header, linenos, ignored)


def ignored_text(ignored: Mapping[str, int]) -> str:
    """``'score' (3 lines), 'tags' (1 line)``: the keys an import did not read, most frequent first."""
    top = sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))
    more = f", and {len(top) - 10} more" if len(top) > 10 else ""
    return ", ".join(f"{k!r} ({n} line{'s' * (n != 1)})" for k, n in top[:10]) + more


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_jsonl` wrote."""

    ids: list[str]
    reused_vectors: int
    """Rows written with the vector the file carried (no embedding call)."""
    embedded: int
    """Rows whose text was embedded by the store's embedder."""
    note: str
    """Why the file's vectors were not reused, when it carried some; empty otherwise."""
    ignored: dict[str, int] = field(default_factory=dict)
    """Keys outside the format that were not read (move them into ``metadata`` to keep them), with the number of
    lines that had each."""


def import_jsonl(store: MemoryStore, path: str | Path | IO[Any], *, namespace: str | None = None, upsert: bool = False,
                 batch_size: int = 256, progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Validate a JSON Lines file, embed what needs it, then write every memory in one atomic batch.

    Nothing is written when any line is invalid, a reward is outside the store's range, an id is
    repeated or (without ``upsert``) already stored, or embedding fails. Vectors in the file are
    reused when its header names this store's embedder and width. ``progress(done, total)`` is called
    after each embedding batch of ``batch_size`` texts. The file's memories and vectors are held in
    memory until the write (n x dim float32: 100k rows of 1536-d OpenAI vectors take 0.6 GB).
    """
    if not is_int(batch_size) or batch_size < 1:
        raise InvalidMemoryError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    check_flag(upsert, "upsert", "replace stored memories of the same ids")  # ("no" replaced them)
    data = read_jsonl(path, namespace=namespace)
    mems = data.memories
    name = source_name(path)
    for m, lineno in zip(mems, data.lines, strict=True):
        store._check_reward(m.reward, f"{name}:{lineno}")
    if not mems:
        return ImportReport([], 0, 0, "", data.ignored)
    if not upsert:
        existing = store.existing_ids([m.id for m in mems])
        if existing:
            first = next(lineno for m, lineno in zip(mems, data.lines, strict=True) if m.id in existing)
            raise StoreError(f"{name}: {len(existing)} id(s) are already stored (first on line {first}: "
                             f"{sorted(existing)[0]!r}): import with upsert (--upsert) to replace them, or drop "
                             "the ids to get new ones; nothing was imported")
    dim = store.embedder.dim
    has_vectors = any(v is not None for v in data.vectors)
    note = ""
    reuse = False
    if has_vectors:
        h = data.header or {}
        if data.header is None:
            note = "the file has no export header naming its embedder"
        elif h.get("embedder") != store.embedder.name or h.get("dim") != dim:
            note = f"the file's vectors come from {h.get('embedder')!r} ({h.get('dim')}-d), this store uses " \
                   f"{store.embedder.name!r} ({dim}-d)"
        else:
            reuse = True
            for v, lineno in zip(data.vectors, data.lines, strict=True):
                if v is not None and v.shape != (dim,):
                    raise InvalidMemoryError(f"{name}:{lineno}: embedding has {v.shape[0]} values, expected "
                                             f"{dim}; nothing was imported")
    X = np.empty((len(mems), dim), np.float32)
    todo = [i for i, v in enumerate(data.vectors) if not (reuse and v is not None)]
    for i, v in enumerate(data.vectors):
        if reuse and v is not None:
            X[i] = v
        data.vectors[i] = None  # each row lives once: in X (the file's copy is freed as it is moved)
    for s in range(0, len(todo), batch_size):
        part = todo[s : s + batch_size]
        X[part] = store.embedder.embed([mems[i].text for i in part])
        if progress is not None:
            progress(s + len(part), len(todo))
    ids = store.add_many(mems, embeddings=X, upsert=upsert)
    return ImportReport(ids, len(mems) - len(todo), len(todo), note, data.ignored)
