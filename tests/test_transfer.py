"""Export to JSON Lines and import back: lossless round trips, vectors reused only when they fit, all or nothing."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from memory_distill import (
    HashingEmbedder,
    InvalidMemoryError,
    MemoryDistill,
    MemoryStore,
    StoreConfig,
    StoreError,
    export_jsonl,
    import_jsonl,
)
from memory_distill.cli import main


class CountingEmbedder(HashingEmbedder):
    """The real hashing embedder, counting the texts it embeds; ``fail_at`` makes that call raise."""

    def __init__(self, dim: int, fail_at: int | None = None) -> None:
        super().__init__(dim=dim)
        self.calls = 0
        self.texts = 0
        self.fail_at = fail_at

    def embed(self, texts):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("embedding service unavailable")
        self.texts += len(texts)
        return super().embed(texts)


def _filled(tmp_path, dim: int = 64) -> tuple[MemoryStore, list[str]]:  # type: ignore[no-untyped-def]
    store = MemoryStore(HashingEmbedder(dim=dim), StoreConfig(path=tmp_path / "src"))
    ids = store.add_many([{"text": f"episode {i}: the agent {'searched the web' if i % 2 else 'guessed'} — ünïcode",
                           "reward": None if i == 7 else i / 40,
                           "metadata": {"group": f"g{i % 5}", "tool": "search", "steps": i, "ok": i % 3 == 0},
                           "namespace": "team-a" if i < 30 else "team-b", "created_at": 1.7e9 + i}
                          for i in range(40)])
    store.set_reward(ids[3], 0.5, rewarded_at=1.8e9)
    return store, ids


def _rows(store: MemoryStore) -> dict[str, tuple]:
    out = {}
    for mems, _ in store.iter_memories(page_size=7):
        for m in mems:
            out[m.id] = (m.text, m.reward, m.metadata, m.namespace, m.created_at, m.rewarded_at)
    return out


def test_export_import_roundtrip_reuses_vectors_and_keeps_everything(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src, ids = _filled(tmp_path)
    path = tmp_path / "out" / "all.jsonl"
    seen: list[int] = []
    assert export_jsonl(src, path, embeddings=True, progress=seen.append) == 40
    assert seen[-1] == 40
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])["memory_distill_export"]
    assert header["embedder"] == "hashing-v1-64" and header["dim"] == 64 and len(lines) == 41

    emb = CountingEmbedder(64)
    dst = MemoryStore(emb, StoreConfig(path=tmp_path / "dst"))
    rep = import_jsonl(dst, path)
    assert (rep.reused_vectors, rep.embedded, rep.note) == (40, 0, "") and emb.calls == 0
    assert _rows(dst) == _rows(src)
    assert dst.get(ids[3]).rewarded_at == 1.8e9 and dst.get(ids[7]).reward is None
    # the source's vectors (Chroma may hand a row back a float32 ulp off, stored or not), so search ranks the same
    np.testing.assert_allclose(dst.get_embeddings(ids), src.get_embeddings(ids), rtol=1e-6, atol=1e-7)
    q = "the agent searched the web"
    assert [h.memory.id for h in dst.search(q, k=5)] == [h.memory.id for h in src.search(q, k=5)]


def test_vectors_from_another_embedder_are_not_reused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src, ids = _filled(tmp_path)
    path = tmp_path / "all.jsonl"
    export_jsonl(src, path, embeddings=True)
    emb = CountingEmbedder(32)
    dst = MemoryStore(emb, StoreConfig(path=tmp_path / "dst"))
    rep = import_jsonl(dst, path, batch_size=16)
    assert (rep.reused_vectors, rep.embedded, emb.calls) == (0, 40, 3)
    assert "'hashing-v1-64' (64-d)" in rep.note and "'hashing-v1-32' (32-d)" in rep.note
    texts = [m.text for m in dst.get_many(ids)]
    np.testing.assert_allclose(dst.get_embeddings(ids), HashingEmbedder(dim=32).embed(texts), atol=1e-6)

    # a file with vectors but no header naming their embedder: re-embedded, never trusted
    body = tmp_path / "body.jsonl"
    body.write_text("\n".join(path.read_text().splitlines()[1:3]) + "\n")
    emb2 = CountingEmbedder(64)
    rep = import_jsonl(MemoryStore(emb2, StoreConfig(path=tmp_path / "dst2")), body)
    assert rep.embedded == 2 and "no export header" in rep.note


def test_export_filters_and_streams(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src, _ = _filled(tmp_path)
    buf = io.StringIO()
    assert export_jsonl(src, buf, namespace="team-b") == 10
    rows = [json.loads(x) for x in buf.getvalue().splitlines()[1:]]
    assert {r["namespace"] for r in rows} == {"team-b"} and "embedding" not in rows[0]
    assert export_jsonl(src, io.StringIO(), where={"group": "g1"}) == 8
    assert export_jsonl(src, io.StringIO(), namespace="team-a", where={"reward": {"$gte": 0.5}}) == 11  # i = 20..29 and 3


def test_transfer_arguments_are_checked_before_anything_is_read_or_written(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """import_jsonl(upsert="no") replaced stored memories ("no" is truthy); None as the source failed as "not
    iterable"; an empty namespace was used or ignored; export_jsonl("-") wrote a file named "-" though
    import_jsonl("-") reads standard input."""
    src, _ = _filled(tmp_path)
    buf = io.StringIO()
    export_jsonl(src, buf, namespace="team-b")
    before = _rows(src)
    for kw, err, why in (({"upsert": "no"}, TypeError, "upsert must be True or False"),
                         ({"namespace": ""}, InvalidMemoryError, "namespace must be a non-empty str"),
                         ({"namespace": 3}, InvalidMemoryError, "namespace must be a non-empty str"),
                         ({"batch_size": 1.5}, InvalidMemoryError, "batch_size must be a whole number")):
        with pytest.raises(err, match=why):
            import_jsonl(src, io.StringIO(buf.getvalue()), **kw)
    with pytest.raises(TypeError, match="the import source must be a file path, '-'"):
        import_jsonl(src, None)  # type: ignore[arg-type]
    assert _rows(src) == before
    for kw, err, why in (({"embeddings": "yes"}, TypeError, "embeddings must be True or False"),
                         ({"namespace": " "}, StoreError, "namespace ' ' is empty")):
        with pytest.raises(err, match=why):
            export_jsonl(src, tmp_path / "out.jsonl", **kw)
    with pytest.raises(TypeError, match="export_jsonl writes to a file path"):
        export_jsonl(src, None)  # type: ignore[arg-type]
    assert not (tmp_path / "out.jsonl").exists()
    capsys.readouterr()
    assert export_jsonl(src, "-", namespace="team-b") == 10
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 11 and json.loads(out[1])["namespace"] == "team-b"


def test_failed_export_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    src, _ = _filled(tmp_path)
    path = tmp_path / "backup.jsonl"
    path.write_text("yesterday's backup\n")
    real = MemoryStore.iter_memories

    def broken(self, **kw):  # type: ignore[no-untyped-def]
        pages = real(self, **kw)
        yield next(pages)
        raise StoreError("connection lost")

    monkeypatch.setattr(MemoryStore, "iter_memories", broken)
    with pytest.raises(StoreError, match="connection lost"):
        export_jsonl(src, path)
    assert path.read_text() == "yesterday's backup\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".backup")] == []


def test_import_is_all_or_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src, ids = _filled(tmp_path)
    path = tmp_path / "all.jsonl"
    export_jsonl(src, path)

    # embedding fails on the third batch: nothing written
    emb = CountingEmbedder(64, fail_at=3)
    dst = MemoryStore(emb, StoreConfig(path=tmp_path / "dst"))
    with pytest.raises(RuntimeError, match="unavailable"):
        import_jsonl(dst, path, batch_size=10)
    assert dst.count() == 0

    # a bad line anywhere: nothing written, the error names the line
    lines = path.read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines, json.dumps({"text": "x", "reward": 2.0})]) + "\n", encoding="utf-8")
    dst = MemoryStore(HashingEmbedder(dim=64), StoreConfig(path=tmp_path / "dst"))
    with pytest.raises(InvalidMemoryError, match=rf"bad.jsonl:{len(lines) + 1}: reward 2.0 is outside"):
        import_jsonl(dst, bad)
    bad.write_text("\n".join([*lines, lines[5]]) + "\n", encoding="utf-8")
    with pytest.raises(InvalidMemoryError, match=r"already appears on line 6"):
        import_jsonl(dst, bad)
    bad.write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n", encoding="utf-8")
    with pytest.raises(InvalidMemoryError, match="header must be the first line"):
        import_jsonl(dst, bad)
    bad.write_text(json.dumps({"memory_distill_export": {"format_version": 99}}) + "\n" + lines[1] + "\n")
    with pytest.raises(InvalidMemoryError, match="format_version 99 is not supported"):
        import_jsonl(dst, bad)
    row = json.loads(lines[1]) | {"embedding": "not base64!"}
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(InvalidMemoryError, match="embedding is not base64"):
        import_jsonl(dst, bad)
    assert dst.count() == 0

    # ids already stored: refused (before any embedding) unless upsert
    dst.add_many([{"id": ids[4], "text": "an older version", "reward": 0.0}])
    emb = CountingEmbedder(64)
    dst = MemoryStore(emb, StoreConfig(path=tmp_path / "dst"))
    with pytest.raises(StoreError, match=r"already stored \(first on line 6.*--upsert"):
        import_jsonl(dst, path)
    assert dst.count() == 1 and emb.calls == 0
    rep = import_jsonl(dst, path, upsert=True)
    assert len(rep.ids) == 40 and dst.count() == 40 and dst.get(ids[4]).reward == src.get(ids[4]).reward


def test_import_reads_gzip_and_a_byte_order_mark_and_names_a_line_that_is_not_utf8(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import gzip

    src, _ = _filled(tmp_path)
    plain = tmp_path / "all.jsonl"
    export_jsonl(src, plain)
    packed = tmp_path / "all.jsonl.gz"  # what a dataset usually ships as (told by its bytes, not its name)
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    dst = MemoryStore(HashingEmbedder(dim=64), StoreConfig(path=tmp_path / "dst"))
    assert len(import_jsonl(dst, packed).ids) == 40 and _rows(dst) == _rows(src)
    bom = tmp_path / "excel.jsonl"  # saved "UTF-8 with BOM", CRLF line ends
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "caf\xc3\xa9", "reward": 0.5}\r\n{"text": "tea"}\r\n')
    rep = import_jsonl(dst, bom)
    assert [m.text for m in dst.get_many(rep.ids)] == ["café", "tea"]
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "tea"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidMemoryError, match=r"latin1.jsonl:2: not UTF-8 text .*save the file as UTF-8"):
        import_jsonl(dst, latin1)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(packed.read_bytes()[:200])
    with pytest.raises(InvalidMemoryError, match=r"cut.jsonl.gz: cannot read the file \(Compressed file ended"):
        import_jsonl(dst, truncated)
    assert dst.count() == 42
    import subprocess
    import sys

    env = {"MEMORY_DISTILL_HOME": str(tmp_path / "cli"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "memory_distill", "-q", "import", "-"], input=packed.read_bytes(),
                          capture_output=True, env=env, timeout=120)  # gzip on standard input too
    assert done.returncode == 0 and b"imported 40 memories" in done.stdout, done.stderr
    monkeypatch.setattr(sys, "stdin", io.StringIO('\ufeff{"text": "from a notebook"}\n'))  # a text stream, no .buffer
    assert len(import_jsonl(dst, "-").ids) == 1
    # open streams both ways, text or binary (export used to fail on a binary one; import took paths only)
    for stream in (io.BytesIO(), gzip.GzipFile(fileobj=io.BytesIO(), mode="wb")):
        assert export_jsonl(src, stream) == 40 and not stream.closed  # the caller's stream stays open
    raw = io.BytesIO()
    export_jsonl(src, raw)
    again = MemoryStore(HashingEmbedder(dim=64), StoreConfig(path=tmp_path / "again"))
    assert len(import_jsonl(again, io.BytesIO(raw.getvalue())).ids) == 40 and _rows(again) == _rows(src)
    with pytest.raises(InvalidMemoryError, match=r"^<stream>:1: reward 9.0 is outside"):
        import_jsonl(again, io.StringIO('{"text": "x", "reward": 9}\n'))


def test_a_misspelt_field_fails_the_import_and_other_unknown_keys_are_reported(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    store = MemoryStore(HashingEmbedder(dim=64), StoreConfig(path=tmp_path / "dst"))
    path = tmp_path / "in.jsonl"
    ok = [{"text": "a", "reward": 0.2, "score": 3}, {"text": "b", "tags": "x", "score": 1}]
    for typo, near in (({"text": "c", "rewrd": 0.5}, "reward"), ({"txt": "c"}, "text"),
                       ({"text": "c", "Reward": 0.5}, "reward"), ({"text": "c", "namespce": "x"}, "namespace")):
        path.write_text("\n".join(json.dumps(o) for o in [*ok, typo]) + "\n", encoding="utf-8")
        bad = next(k for k in typo if k not in ("text", "reward"))
        with pytest.raises(InvalidMemoryError, match=rf"in.jsonl:3: unknown field '{bad}': did you mean '{near}'\?.*"
                                                     "nothing was imported"):
            import_jsonl(store, path)
    assert store.count() == 0

    # keys that are not near misses of a missing field are not read, and the report and the log say which
    path.write_text("\n".join(json.dumps(o) for o in [*ok, {"text": "c", "reward": 0.1, "rewards": [1]}]) + "\n",
                    encoding="utf-8")
    with caplog.at_level("WARNING", logger="memory_distill.transfer"):
        rep = import_jsonl(store, path)
    assert len(rep.ids) == 3 and store.count() == 3
    assert rep.ignored == {"score": 2, "tags": 1, "rewards": 1}
    assert "'score' (2 lines), 'rewards' (1 line), 'tags' (1 line)" in caplog.text and "into metadata" in caplog.text
    assert [m.reward for m in store.get_many(rep.ids)] == [0.2, None, 0.1]


def test_cli_export_import_and_forget_older_than(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEMORY_DISTILL_EMBEDDER__DIM", "128")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    mem = MemoryDistill.open(a)
    now = time.time()
    mem.add_many([{"text": f"old episode {i}", "reward": 0.2, "created_at": now - 100 * 86400} for i in range(3)]
                 + [{"text": f"new episode {i}", "reward": 0.9, "created_at": now - 86400} for i in range(4)])
    del mem
    out = tmp_path / "a.jsonl"
    assert main(["-q", "--home", a, "export", str(out), "--embeddings"]) == 0
    assert "exported 7 memories" in capsys.readouterr().out
    assert main(["-q", "--home", b, "import", str(out)]) == 0
    assert "imported 7 memories into memories (7 with the file's vectors, 0 embedded" in capsys.readouterr().out
    assert main(["-q", "--home", b, "export", "-"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 8 and "memory_distill_export" in printed[0]
    assert main(["-q", "--home", b, "export", str(tmp_path / "none.jsonl"), "--namespace", "team_a"]) == 0
    printed = capsys.readouterr()  # exported nothing: says why, as search does
    assert "exported 0 memories" in printed.out
    assert printed.err.strip() == "namespace 'team_a' has no memories; the store's namespaces: 'default'"

    assert main(["-q", "--home", b, "forget", "--older-than", "30d", "--reason", "retention"]) == 0
    assert "deleted 3 memories" in capsys.readouterr().out
    left = MemoryDistill.open(b).store
    assert left.count() == 4 and all(m.text.startswith("new") for ms, _ in left.iter_memories() for m in ms)
    assert main(["-q", "--home", b, "forget", "--older-than", "1d", "--where", '{"created_at": {"$lt": 1}}']) == 2
    assert "not both" in capsys.readouterr().err
    mem_b = MemoryDistill.open(b)  # Python takes the command line's durations too (or seconds)
    assert mem_b.forget(older_than="2d", dry_run=True)["n_deleted"] == 0
    assert mem_b.forget(older_than="12h", dry_run=True)["n_deleted"] == 4
    assert mem_b.forget(older_than=12 * 3600, dry_run=True)["n_deleted"] == 4
    for bad in ("90 days", True, -1, float("nan")):
        with pytest.raises(StoreError, match="older_than"):
            mem_b.forget(older_than=bad)  # type: ignore[arg-type]
    for everything in (0, "0d"):  # every memory was created before now: it deleted them all
        with pytest.raises(StoreError, match="older_than=0 selects every memory: refusing to forget everything"):
            mem_b.forget(older_than=everything)
    assert mem_b.store.count() == 4
