from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from memory_distill import (
    ArtifactError,
    HashingEmbedder,
    MemoryDistill,
    ModelDistillation,
    StoreConfig,
)
from memory_distill.demo_data import synthetic_episodes

GOOD = "Task: book a table for 4 people in Oslo. The agent searched the web, cross-checked two sources and cited them in the answer."
BAD = "Task: book a table for 4 people in Oslo. The agent guessed the answer and did not check it."


def test_seed_compatible_model_distillation(tmp_path):
    md = ModelDistillation(temperature=4.0, alpha=0.7, beta=0.3, learning_rate=1e-3, embedder=HashingEmbedder(dim=256))
    with pytest.raises(ArtifactError, match="distill_from_memories"):
        md.get_student_prediction("x")
    hist = md.distill_from_memories(synthetic_episodes(700, seed=8), num_epochs=15, batch_size=64)
    assert hist["distill_val_kl"][-1] < hist["distill_val_kl"][0]
    assert hist["evaluation"]["student"]["spearman"] > 0.8
    good, bad = md.get_student_prediction([GOOD, BAD])
    assert good.mean > bad.mean + 0.4
    cmp = md.compare_teacher_student([GOOD, BAD])
    assert cmp["compression_ratio"] > 3.7
    assert 0 <= cmp["similarity"]["prediction_match"] <= 1 and cmp["similarity"]["kl_divergence"] >= 0
    paths = md.save_models(tmp_path / "m" / "run1")
    assert paths["teacher"].endswith("run1_teacher.pth") and paths["student"].endswith("run1_student.pth")
    md2 = ModelDistillation(embedder=HashingEmbedder(dim=256))
    md2.load_models(tmp_path / "m" / "run1")
    np.testing.assert_allclose(md2.get_student_prediction(GOOD).probs, good.probs, atol=1e-6)
    with pytest.raises(ArtifactError, match="saved with embedder"):
        ModelDistillation(embedder=HashingEmbedder(dim=64)).load_models(tmp_path / "m" / "run1")



def test_model_distillation_checks_its_arguments():
    """num_epochs=0 trained nothing and reported an evaluation of untrained models, batch_size=1 or 1.5 got past
    the config's bounds (model_copy does not validate); a 3-tuple reward_range used its first two; the embedder's
    name was taken for an embedder and failed later; get_student_prediction(None) failed as "not iterable"."""
    md = ModelDistillation(embedder=HashingEmbedder(dim=64))
    mems = [(f"task {i} {'careful good' if i % 2 else 'sloppy bad'}", float(i % 2)) for i in range(40)]
    for kw, field in (({"num_epochs": 0}, "epochs"), ({"batch_size": 1}, "batch_size"),
                      ({"batch_size": 1.5}, "batch_size")):
        with pytest.raises(ValidationError, match=f"teacher.{field}"):
            md.distill_from_memories(mems, **kw)
    assert md.student is None
    with pytest.raises(ValueError, match=r"reward_range is \(low, high\), got \(0, 1, 2\)"):
        ModelDistillation(reward_range=(0, 1, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got the str 'hashing'"):
        ModelDistillation(embedder="hashing")  # type: ignore[arg-type]
    md.distill_from_memories(mems, num_epochs=2, batch_size=16)
    with pytest.raises(TypeError, match="query takes a list of texts, got NoneType"):
        md.get_student_prediction(None)  # type: ignore[arg-type]


def test_tuples_and_pending_rewards_accepted():
    md = ModelDistillation(embedder=HashingEmbedder(dim=64))
    mems = [(e["text"], e["reward"]) for e in synthetic_episodes(200, seed=9)]
    hist = md.distill_from_memories(mems, num_epochs=3)
    assert hist["n_train"] > 0
    from memory_distill import InvalidMemoryError

    with pytest.raises(InvalidMemoryError, match=r"memories\[1\]: a tuple is \(text, reward\), got 1 items"):
        md.distill_from_memories([mems[0], (mems[1][0],)])  # not "tuple index out of range"
    with pytest.raises(TypeError, match="takes a list of memories, got one str"):
        md.distill_from_memories(mems[0][0])  # type: ignore[arg-type]


def test_memory_distill_facade(tmp_path):
    mem = MemoryDistill.open(tmp_path, embedder=HashingEmbedder(dim=128))
    ids = mem.add_many(synthetic_episodes(500, seed=10))
    late = mem.record(GOOD)
    mem.set_reward(late, 0.95)
    from conftest import fast_job

    rep = mem.consolidate(fast_job())
    assert rep.promoted
    g, b = mem.predict([GOOD, BAD])
    assert g.mean > b.mean
    assert mem.search("cited sources", k=1)[0].memory.reward is not None
    assert mem.forget([ids[0]])["n_deleted"] == 1
    assert MemoryDistill.open(tmp_path, embedder=HashingEmbedder(dim=128)).store.count() == 500
    assert mem.store.config == StoreConfig()
    # configs as dicts of their fields (they used to fail with "'dict' object has no attribute ...")
    rep = mem.consolidate({**fast_job().model_dump(), "seed": 5})
    assert rep.version == "v000002"
    with pytest.raises(ValidationError, match="sead\n.*did you mean 'seed'"):
        mem.consolidate({"sead": 5})
    with pytest.raises(TypeError, match="config must be a JobConfig or a dict of its fields, got int"):
        mem.consolidate(5)  # type: ignore[arg-type]
    other = MemoryDistill.open(tmp_path / "other", embedder=HashingEmbedder(dim=128), store={"mode": "ephemeral"},
                               settings={"job": {"min_rewarded": 2}})
    assert other.store.config.mode == "ephemeral" and other.job.min_rewarded == 2


def test_async_facade_keeps_the_event_loop_free(tmp_path):
    import asyncio
    import time

    from conftest import fast_job

    mem = MemoryDistill.open(tmp_path, embedder=HashingEmbedder(dim=128))

    async def app():  # an async agent server: record, reward, consolidate in the background, predict, recall
        ids = await mem.aadd_many(synthetic_episodes(400, seed=11))
        late = await mem.arecord(GOOD, namespace="default")
        assert (await mem.aset_reward(late, 0.95)).reward == 0.95
        ticks = 0

        async def heartbeat():  # would stall if consolidation ran on the event loop
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        hb = asyncio.create_task(heartbeat())
        t0 = time.perf_counter()
        rep = await mem.aconsolidate(fast_job())
        elapsed = time.perf_counter() - t0
        hb.cancel()
        g, b = await mem.apredict([GOOD, BAD])
        hits = await mem.asearch("cited sources", k=2)
        return ids, rep, elapsed, ticks, g, b, hits

    ids, rep, elapsed, ticks, g, b, hits = asyncio.run(app())
    assert rep.promoted and g.mean > b.mean and len(hits) == 2 and len(ids) == 400
    assert ticks >= 0.2 * elapsed / 0.01  # the loop kept running during training


def test_record_takes_when_an_episode_happened_and_names_a_wrong_metadata(tmp_path):
    from memory_distill import InvalidMemoryError, MemoryDistill

    mem = MemoryDistill.open(tmp_path / "home")
    mid = mem.record("booked the table after checking two sites", 0.8, created_at="2026-11-28T09:30:00Z")
    assert mem.store.get(mid).created_at == 1795858200.0  # an episode recorded after the fact keeps its own time
    # not "dictionary update sequence element #0 has length 1; 2 is required"
    with pytest.raises(InvalidMemoryError, match="metadata must be a dict of scalar values, got str"):
        mem.record("x", metadata="planner")  # type: ignore[arg-type]


def test_open_names_a_wrong_home_or_embedder(tmp_path, monkeypatch):
    """open('') made a store in the working directory itself (Path('') is '.'), as did MEMORY_DISTILL_HOME='';
    open(3) failed inside pathlib; the embedder's class (not an instance) failed as "int() argument must be ...
    not 'property'"; a kind's name as the embedder said only "str is not an embedder"."""
    from memory_distill import Settings

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="home is empty"):
        MemoryDistill.open("")
    with pytest.raises(TypeError, match="home must be a directory path .* got int 3"):
        MemoryDistill.open(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="home is empty"):
        Settings(home=" ")
    monkeypatch.setenv("MEMORY_DISTILL_HOME", "")
    assert Settings().home == Path(".memory_distill")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match=r"embedder must be an instance: pass HashingEmbedder\(...\), not the class"):
        MemoryDistill.open(tmp_path / "h", embedder=HashingEmbedder)
    with pytest.raises(TypeError, match=r"make_embedder\(\{'kind': 'hashing'\}\) \(MemoryDistill.open takes "
                                        r"settings=\{'embedder': \{'kind': 'hashing'\}\}\)"):
        MemoryDistill.open(tmp_path / "h", embedder="hashing")


def test_model_distillation_saves_whole_and_a_failed_load_or_run_keeps_its_models(tmp_path, monkeypatch):
    """save_models wrote the teacher, the student and the manifest in place one after the other: a failure between
    them left a new teacher beside an old student. A load of a truncated file failed with torch's own error
    after the teacher was already replaced; a failed run left new reward bins beside the old models."""
    md = ModelDistillation(embedder=HashingEmbedder(dim=64))
    mems = [(f"task {i} {'careful good' if i % 2 else 'sloppy bad'}", float(i % 2)) for i in range(40)]
    md.distill_from_memories(mems, num_epochs=2, batch_size=16)
    prefix = tmp_path / "m" / "run"
    md.save_models(prefix)
    before = {p.name: p.read_bytes() for p in prefix.parent.iterdir()}
    other = ModelDistillation(embedder=HashingEmbedder(dim=64), seed=1)
    other.distill_from_memories([(t, 2 * r) for t, r in mems], num_epochs=2, batch_size=16)
    real_save = torch.save
    calls = []

    def failing_save(obj, path):  # the disk fills up at the student
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        other.save_models(prefix)
    monkeypatch.setattr(torch, "save", real_save)
    assert {p.name: p.read_bytes() for p in prefix.parent.iterdir()} == before  # no temporary file left either

    loaded = ModelDistillation(embedder=HashingEmbedder(dim=64))
    loaded.load_models(prefix)
    want = loaded.get_student_prediction("careful good").mean
    (prefix.parent / "run_student.pth").write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="cannot be loaded .*save them again"):
        loaded.load_models(prefix)
    assert loaded.get_student_prediction("careful good").mean == want and loaded.bins == md.bins

    bins = md.bins
    monkeypatch.setattr("memory_distill.consolidation.train_pair", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        md.distill_from_memories([(t, 3 * r) for t, r in mems], num_epochs=2, batch_size=16)
    assert md.bins == bins
