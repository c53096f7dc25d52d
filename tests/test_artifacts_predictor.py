import json
import shutil

import numpy as np
import pytest
import torch

from memory_distill import (
    ArtifactError,
    ArtifactRegistry,
    EmbedderMismatchError,
    HashingEmbedder,
    NoModelError,
    Predictor,
    RewardMLP,
)


def _publish(reg, seed, promote=True, dim=256):
    torch.manual_seed(seed)
    t, s = RewardMLP(dim, [16], 8, batchnorm=True), RewardMLP(dim, [8], 8)
    manifest = {"embedder": {"name": f"hashing-v1-{dim}", "dim": dim}, "bins": {"low": 0, "high": 1, "n_bins": 8},
                "reason": f"seed {seed}", "status": "promoted" if promote else "rejected"}
    return reg.publish(t, s, manifest, promote=promote, train_ids=[f"id{seed}"])


def test_publish_load_promote_rollback(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    with pytest.raises(NoModelError, match="memory-distill consolidate"):
        reg.load()
    v1 = _publish(reg, 1)
    v2 = _publish(reg, 2)
    v3 = _publish(reg, 3, promote=False)
    assert (v1, v2, v3) == ("v000001", "v000002", "v000003")
    assert reg.current_version() == v2
    assert [m["current"] for m in reg.list()] == [False, True, False]
    assert reg.rollback() == v1 and reg.current_version() == v1
    reg.promote(v3)
    assert reg.current_version() == v3
    assert reg.rollback() == v1
    loaded = reg.load(v2, with_teacher=True)
    assert loaded.teacher is not None and loaded.bins.n_bins == 8
    # weights are plain state_dicts: loadable with weights_only=True, no pickled classes
    sd = torch.load(tmp_path / "versions" / v2 / "student.pt", weights_only=True)
    assert set(sd) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}


def test_promote_and_rollback_wait_for_whoever_holds_current(tmp_path):
    """A run checks that CURRENT is still what it gated against and publishes under the pointer lock; a promote or
    rollback from another process or thread waits for it instead of landing in between, and a lock held too long
    is an error naming the lock file."""
    import threading
    import time

    reg = ArtifactRegistry(tmp_path)
    v1, v2 = _publish(reg, 1), _publish(reg, 2)
    other = ArtifactRegistry(tmp_path)
    with reg.pointer_lock():
        t = threading.Thread(target=other.promote, args=(v1,))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and reg.current_version() == v2  # waiting, not written
        errors: list = []

        def impatient():
            try:
                with other.pointer_lock(timeout=0.2):
                    pass
            except ArtifactError as e:
                errors.append(str(e))

        waiter = threading.Thread(target=impatient)
        waiter.start()
        waiter.join(timeout=30)
        assert len(errors) == 1 and "stayed locked for 0.2 s by a publish, promote or rollback" in errors[0]
        with other.pointer_lock(timeout=0.2):  # in the thread that holds it: nested, not a deadlock
            pass
    t.join(timeout=30)
    assert not t.is_alive() and reg.current_version() == v1
    with ArtifactRegistry(tmp_path / "none").pointer_lock():  # nothing published there: no directory made for it
        pass
    assert not (tmp_path / "none").exists()


def test_a_version_being_promoted_is_not_pruned_from_under_current(tmp_path, monkeypatch):
    """promote(old) checked that the version loads, then set CURRENT; a run's prune in another process could delete
    that version in between, leaving CURRENT naming a version that is gone (nothing served). The check, the
    pointer and prune's choice of what to keep now happen under one lock."""
    import threading

    reg = ArtifactRegistry(tmp_path)
    v1 = _publish(reg, 1)
    for seed in range(2, 6):
        _publish(reg, seed)  # v000005 is CURRENT; v000004 the rollback target
    other = ArtifactRegistry(tmp_path)
    pruned: list = []
    real_load = reg.load

    def load_while_a_run_prunes(version=None, **kw):
        out = real_load(version, **kw)
        t = threading.Thread(target=lambda: pruned.extend(other.prune(1)))
        t.start()
        t.join(timeout=0.5)  # before the fix the prune ran now, between the check and CURRENT
        return out

    monkeypatch.setattr(reg, "load", load_while_a_run_prunes)
    reg.promote(v1)
    monkeypatch.setattr(reg, "load", real_load)
    for _ in range(100):  # the prune goes once CURRENT is written
        if pruned:
            break
        threading.Event().wait(0.05)
    assert reg.current_version() == v1 and reg.load().version == v1  # what serves exists
    assert v1 not in pruned and pruned  # it kept the new CURRENT (and its rollback target), pruned the others


def test_registry_arguments_are_checked_before_anything_is_written(tmp_path):
    """promote(None) loaded the current version, then wrote {"version": null} to CURRENT: nothing served until a
    manual promote. prune(1.5) pruned, prune('2') and history(-1) failed inside the standard library."""
    reg = ArtifactRegistry(tmp_path)
    v1, v2 = _publish(reg, 1), _publish(reg, 2)
    for bad in (None, "", "../v000001", 2):
        with pytest.raises(ArtifactError, match="versions are named like v000001"):
            reg.promote(bad)
        with pytest.raises(ArtifactError, match="versions are named like v000001"):
            reg.train_ids(bad)
    assert reg.current_version() == v2 and reg.train_ids(v1) == ["id1"]
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match="keep must be a whole number"):
            reg.prune(bad)
    assert reg.list_versions() == [v1, v2] and reg.prune(np.int64(1)) == []  # v1 is the rollback target
    for bad in (-1, "3", 1.0):
        with pytest.raises(ValueError, match="last must be a whole number >= 0"):
            reg.history(bad)
    for bad in (None, " "):
        with pytest.raises(ValueError, match="retire needs a reason"):
            reg.retire(bad)
    assert reg.current_version() == v2


def test_corrupt_artifact_is_refused_and_previous_keeps_serving(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    _publish(reg, 1)
    pred = Predictor(reg, HashingEmbedder(dim=256))
    before = pred.predict(["hello"])[0].mean
    v2 = _publish(reg, 2)
    (tmp_path / "versions" / v2 / "student.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="fails its checksum"):
        reg.load(v2)
    assert pred.refresh() is False  # new version is corrupt: keep serving v1
    assert pred.version == "v000001" and pred.predict(["hello"])[0].mean == before
    with pytest.raises(ArtifactError):
        reg.promote(v2)


def test_predictor_picks_up_new_versions(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    _publish(reg, 1)
    pred = Predictor(reg, HashingEmbedder(dim=256))
    a = pred.predict(["hello"])[0]
    _publish(reg, 2)
    assert pred.refresh() is True and pred.version == "v000002"
    b = pred.predict(["hello"])[0]
    assert a.mean != b.mean and b.model_version == "v000002"


def test_predictors_of_one_version_share_its_weights(tmp_path):
    """A model per user: every namespace without its own model falls back to the top-level one, and the
    Predictors serving it share one loaded copy (not one per namespace); a version wiped and trained again under
    the same name is not mistaken for the old one; the copy goes when no Predictor serves it."""
    import gc

    from memory_distill import predictor as predictor_mod

    reg = ArtifactRegistry(tmp_path / "a")
    _publish(reg, 1)
    emb = HashingEmbedder(dim=256)
    preds = [Predictor(reg, emb, namespace=f"user-{i}") for i in range(5)]
    assert len({id(p.runner) for p in preds}) == 1 and preds[0].runner is Predictor(reg, emb).runner
    first = preds[0].predict(["hello"])[0].mean
    assert all(p.predict(["hello"])[0].mean == first for p in preds)
    _publish(reg, 2)  # a new version: refreshed predictors share that one too
    assert all(p.refresh() for p in preds) and len({id(p.runner) for p in preds}) == 1
    assert preds[0].version == "v000002" and preds[0].predict(["hello"])[0].mean != first

    shutil.rmtree(tmp_path / "a")  # wiped, and a different model published under the same version name
    reg = ArtifactRegistry(tmp_path / "a")
    _publish(reg, 3)
    again = Predictor(reg, emb)
    assert again.version == "v000001" and again.runner is not preds[0].runner
    assert again.predict(["hello"])[0].mean != first
    n = len(predictor_mod._SERVED)
    del preds, again
    gc.collect()
    assert len(predictor_mod._SERVED) < n


def test_predictor_refuses_other_embedder(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    _publish(reg, 1)
    with pytest.raises(EmbedderMismatchError, match="trained on embedder 'hashing-v1-256'"):
        Predictor(reg, HashingEmbedder(dim=128))


def test_numpy_fast_path_matches_torch(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    _publish(reg, 4)
    pred = Predictor(reg, HashingEmbedder(dim=256))
    X = np.random.default_rng(0).normal(size=(7, 256)).astype(np.float32)
    batch = pred.predict_embeddings(X)
    with torch.no_grad():
        ref = torch.softmax(pred.loaded.student(torch.from_numpy(X)), -1).numpy()
    np.testing.assert_allclose(batch.probs, ref, atol=1e-5)
    assert len(batch) == 7 and batch[3].probs.shape == (8,)
    np.testing.assert_allclose(batch.mean, ref @ pred.bins.centers, atol=1e-5)
    with pytest.raises(ValueError, match=r"embeddings must be \[n, 256\]"):
        pred.predict_embeddings(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"got \[0\]"):  # said [1, 0]: the shape after making it a row
        pred.predict(np.zeros(0))
    for bad in (None, 3, b"text", {"text": "a"}):  # None said "'NoneType' object is not iterable"
        with pytest.raises(TypeError, match="predict takes a text, a list of texts or an embedding matrix"):
            pred.predict(bad)
    X[2, 7] = np.nan  # a NaN prediction sorts anywhere (best-of-n, retrieval): refused, naming the row
    with pytest.raises(ValueError, match=r"embeddings hold NaN or inf in rows \[2\]: re-embed"):
        pred.predict_embeddings(X)


def test_staging_leftovers_are_cleaned_and_torn_manifest_reported(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    _publish(reg, 1)
    (tmp_path / ".staging-dead").mkdir()
    _publish(reg, 2)
    assert not list(tmp_path.glob(".staging-*"))
    (tmp_path / "versions" / "v000002" / "manifest.json").write_text("{torn")
    with pytest.raises(ArtifactError, match="manifest of v000002 is corrupt"):
        reg.load("v000002")
    assert [m["status"] for m in reg.list()] == ["promoted", "corrupt"]
    # a torn CURRENT: the error says `promote VERSION`, so the listing (to pick one) and promote itself still work
    (tmp_path / "CURRENT").write_text("garbage")
    with pytest.raises(ArtifactError, match="CURRENT is corrupt: run `memory-distill promote VERSION`"):
        reg.current_version()
    assert [(m["version"], m.get("current")) for m in reg.list()] == [("v000001", False), ("v000002", None)]
    for bad in ("", "..", "../versions/v000001"):  # '' used to load the current model and be written to CURRENT
        with pytest.raises(ArtifactError, match="versions are named like v000001"):
            reg.promote(bad)
    (tmp_path / "CURRENT").write_text('{"version": ""}')
    with pytest.raises(ArtifactError, match="CURRENT is corrupt"):
        reg.current_version()
    reg.promote("v000001")
    assert reg.current_version() == "v000001"
    assert json.loads((tmp_path / "promotions.jsonl").read_text().splitlines()[-1])["previous"] is None


def test_mark_stale_only_hits_versions_trained_on_deleted_ids(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    _publish(reg, 1)
    _publish(reg, 2)
    assert reg.mark_stale({"id2", "other"}, "gdpr") == ["v000002"]
    assert reg.stale_versions() == {"v000002": "gdpr"}
    assert json.loads((tmp_path / "versions" / "v000001" / "train_ids.json").read_text()) == ["id1"]
    shutil.rmtree(tmp_path / "versions" / "v000001")
    assert reg.list_versions() == ["v000002"]


def test_a_stale_mark_made_while_versions_are_deleted_is_not_lost(tmp_path, monkeypatch):
    """forget() (marking) and a run (deleting stale versions) rewrite stale.json from two processes: the mark made
    between the other's read and write must survive."""
    import threading

    import memory_distill.artifacts as art

    writer, marker = ArtifactRegistry(tmp_path), ArtifactRegistry(tmp_path)  # two processes' registries
    for seed in (1, 2, 3):
        _publish(writer, seed)
    writer.mark_stale({"id1"}, "first")
    real, in_write, go_on = art._write_json_atomic, threading.Event(), threading.Event()

    def slow_write(path, obj):  # type: ignore[no-untyped-def]
        if path.name == "stale.json" and threading.current_thread().name == "deleting":
            in_write.set()
            go_on.wait(10)  # the deleting run stalls between reading stale.json and writing it back
        real(path, obj)

    monkeypatch.setattr(art, "_write_json_atomic", slow_write)
    t = threading.Thread(target=writer.drop_stale, name="deleting")
    t.start()
    assert in_write.wait(10)
    marked: list[list[str]] = []
    m = threading.Thread(target=lambda: marked.append(marker.mark_stale({"id2"}, "second")))
    m.start()
    m.join(0.5)
    go_on.set()
    t.join(10)
    m.join(10)
    assert marked == [["v000002"]] and writer.list_versions() == ["v000002", "v000003"]
    assert writer.stale_versions() == {"v000002": "second"}


def test_a_version_deleted_while_it_loads(tmp_path, monkeypatch):
    """Another process replaces the current model and deletes it (a stale model promoted away from) while this one
    reads it: the registry says so with an ArtifactError (not a bare FileNotFoundError), a new predictor serves
    the version that replaced it, and one already serving keeps its model until the next refresh."""
    import memory_distill.artifacts as art

    reg, other = ArtifactRegistry(tmp_path), ArtifactRegistry(tmp_path)  # this process's and another's
    for seed in (1, 2, 3):
        _publish(reg, seed, promote=seed == 1)
    real = art._sha256

    def meanwhile(version, then):  # type: ignore[no-untyped-def]
        def sha(path):  # type: ignore[no-untyped-def]
            if version in str(path):
                then()
            return real(path)
        return sha

    def replace_v1() -> None:
        if "v000001" in other.list_versions():
            other.mark_stale({"id1"}, "erasure")
            other.promote("v000002")  # v1 goes: it is stale and no longer serves

    monkeypatch.setattr(art, "_sha256", meanwhile("v000001", replace_v1))
    held = Predictor(reg, HashingEmbedder(dim=256))
    assert held.version == "v000002" and reg.list_versions() == ["v000002", "v000003"]
    monkeypatch.setattr(art, "_sha256", meanwhile("v000003", lambda: (other.mark_stale({"id3"}, "e"), other.drop_stale())))
    with pytest.raises(ArtifactError, match="v000003 was deleted while it was being loaded"):
        reg.load("v000003")
    monkeypatch.setattr(art, "_sha256", real)
    newest = _publish(reg, 4, promote=False)
    other.mark_stale({"id2"}, "erasure")
    other.promote(newest)  # v2, which `held` serves, is deleted from disk
    assert held.predict(["hello"])[0].model_version == "v000002"  # (from memory)
    assert held.refresh() and held.version == newest and reg.list_versions() == [newest]


def test_rollback_never_restores_a_stale_version_and_drop_stale_keeps_the_current(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    for seed in (1, 2, 3):
        _publish(reg, seed)
    assert reg.mark_stale({"id1", "id3"}, "erasure") == ["v000001", "v000003"]
    assert reg._rollback_target("v000002") is None  # (v1 is stale, not yet deleted: never a target)
    assert reg.drop_stale() == ["v000001"] and reg.list_versions() == ["v000002", "v000003"]  # v3 serves on
    assert reg.stale_versions() == {"v000003": "erasure"} and reg.drop_stale() == []
    assert reg.rollback() == "v000002"  # from the stale v3 to the clean v2, and v3 goes
    assert reg.list_versions() == ["v000002"] and reg.stale_versions() == {}
    with pytest.raises(ArtifactError, match="no earlier promoted version to roll back to from v000002"):
        reg.rollback()
    _publish(reg, 4)
    reg.mark_stale({"id4"}, "erasure")
    reg.promote("v000002")  # promoting away from a stale current one deletes it too
    assert reg.list_versions() == ["v000002"] and reg.stale_versions() == {}


def test_the_last_run_is_read_from_the_end_of_the_history(tmp_path):
    """A worker's history gains a line per run for months; its last run is read backwards a block at a time, and
    agrees with reading the whole file (blank lines, a torn last line, lines longer than a block, non-ASCII text)."""
    import json
    import random

    from memory_distill.artifacts import _iter_jsonl_reversed, _read_jsonl

    rnd = random.Random(0)
    for trial in range(60):
        p = tmp_path / f"h{trial}.jsonl"
        rows = [{"i": i, "pad": "é-x" * rnd.randint(0, 120)} for i in range(rnd.randint(0, 40))]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if rnd.random() < 0.3:
            text += '{"torn": '
        if rnd.random() < 0.3:
            text = text.replace("\n", "\n\n", 3)
        p.write_text(text, encoding="utf-8")
        for block in (1, 7, 64, 1 << 16):
            assert list(_iter_jsonl_reversed(p, block)) == list(reversed(_read_jsonl(p))), (trial, block)
    reg = ArtifactRegistry(tmp_path / "reg")
    assert reg.last_run() is None
    for outcome in ("promoted", "failed", "skipped", "failed"):
        reg.append_history({"outcome": outcome, "n": outcome})
    assert reg.last_run() == {"outcome": "skipped", "n": "skipped"}
    assert reg.last_run(("promoted",)) == {"outcome": "promoted", "n": "promoted"}
    assert reg.history(last=2) == reg.history()[-2:] and reg.history(last=10) == reg.history()


def test_registry_root_must_be_a_directory(tmp_path):
    (tmp_path / "models").write_text("not a directory")
    with pytest.raises(ArtifactError, match="registry root .* is a file: give a directory"):
        ArtifactRegistry(tmp_path / "models")  # it listed no versions, then failed at the first publish
    with pytest.raises(TypeError, match="root must be the models' directory"):
        ArtifactRegistry(None)  # type: ignore[arg-type]
