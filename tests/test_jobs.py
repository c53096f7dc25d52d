"""Consolidation jobs: gate, warm start, single writer, history, forgetting, drift, crash safety."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import fast_job

from memory_distill import (
    ArtifactRegistry,
    ConsolidationError,
    ConsolidationExecutor,
    ConsolidationWorker,
    JobLockedError,
    MemoryStore,
    Predictor,
    drift_report,
    forget,
    run_consolidation,
)
from memory_distill.config import GateConfig
from memory_distill.demo_data import synthetic_episodes


def test_not_enough_data_fails_cleanly(store, registry):
    store.add_many([{"text": f"e{i}", "reward": 0.5} for i in range(5)])
    with pytest.raises(ConsolidationError, match="only 5 rewarded memories.*min_rewarded"):
        run_consolidation(store, registry, fast_job())
    assert registry.current_version() is None and registry.list_versions() == []
    assert registry.history()[-1]["outcome"] == "failed"


def test_a_run_on_one_reward_value_warns_that_it_can_rank_nothing(store, registry, caplog):
    store.add_many([{"text": f"the agent tried approach {i % 7} on task {i}", "reward": 1.0} for i in range(40)])
    with caplog.at_level("WARNING", logger="memory_distill.jobs"):
        report = run_consolidation(store, registry, fast_job())
    assert report.promoted  # it does predict that value
    assert "every rewarded memory has the reward 1: the models can only learn that value and rank nothing" in caplog.text
    caplog.clear()
    store.add_many([{"text": "the agent gave up", "reward": 0.0}])
    with caplog.at_level("WARNING", logger="memory_distill.jobs"):
        run_consolidation(store, registry, fast_job())
    assert "rank nothing" not in caplog.text


def test_few_big_groups_still_train_and_one_group_is_a_clear_error(store, registry):
    """The split holds out whole groups, newest first: with two or three big groups it used to take every one of
    them (holdout, then validation) and fail with "0 training rows"; it now leaves the last for training."""
    from memory_distill.store import TrainingData
    from memory_distill.training import split_by_group_and_time

    rng = np.random.default_rng(0)
    for sizes, train, val, hold in (((58, 2), 58, 0, 2), ((40, 15, 5), 40, 0, 20), ((30, 30), 30, 0, 30),
                                    ((60,), 60, 0, 0), ((10,) * 10, 60, 20, 20)):
        groups = [f"g{g}" for g, n in enumerate(sizes) for _ in range(n)]
        n = len(groups)
        data = TrainingData([str(i) for i in range(n)], np.zeros((n, 4), np.float32), np.full(n, 0.5, np.float32),
                            np.arange(n, dtype=np.float64), groups)
        split = split_by_group_and_time(data, 0.2, 0.15, rng)
        assert (len(split.train), len(split.val), len(split.holdout)) == (train, val, hold), sizes

    t = 1.7e9
    store.add_many([{"text": f"task {g} attempt {i}: the agent {'searched' if i % 2 else 'guessed'}",
                     "reward": 0.9 if i % 2 else 0.1, "metadata": {"group": f"task-{g}"}, "created_at": t + 100 * g + i}
                    for g, n in enumerate((40, 15, 5)) for i in range(n)])
    rep = run_consolidation(store, registry, fast_job())
    assert rep.promoted and (rep.n_train, rep.n_holdout) == (40, 20)

    store.delete(where={"group": {"$ne": "task-0"}})
    with pytest.raises(ConsolidationError, match="all 40 rewarded memories share one group \\('task-0', from the "
                                                 "'group' metadata key\\).*leave 'group' out of the metadata"):
        run_consolidation(store, registry, fast_job())
    assert registry.current_version() == rep.version


def test_runs_train_from_scratch_by_default_and_reproduce_the_published_model_on_unchanged_memories(
        store, registry, episodes, embedder):
    """warm_start is off by default (a warm start ranked worse on the real data): a second run on the same memories
    trains from scratch, with bins fitted again, and (same seed) reproduces the published student exactly."""
    store.add_many(episodes)
    r1 = run_consolidation(store, registry, fast_job())
    r2 = run_consolidation(store, registry, fast_job())
    assert not r1.warm_started and not r2.warm_started and r2.promoted and r2.incumbent_version == r1.version
    texts = [e["text"] for e in episodes[:50]]
    first = Predictor(registry, embedder, version=r1.version).predict(texts)
    second = Predictor(registry, embedder, version=r2.version).predict(texts)
    np.testing.assert_array_equal([p.probs for p in first], [p.probs for p in second])
    assert r2.evaluation.student.spearman == r2.incumbent_metrics.spearman  # so the gate always lets it through


def test_consolidations_in_threads_train_the_models_they_would_alone_and_leave_the_callers_rng_alone(
        tmp_path, episodes, embedder):
    """Weight init and dropout draw from torch's global generators, which threads share: two namespaces consolidated
    at once used to draw from each other's stream (a different model each time), and every run reseeded the
    application's torch RNG. Now each run's training is seeded, serialised and restores the caller's state."""
    import torch

    from memory_distill import MemoryDistill

    eps = [{**e, "namespace": "a" if i % 2 else "b"} for i, e in enumerate(episodes)]
    texts = [e["text"] for e in episodes[:40]]

    def models(home, concurrent: bool):  # type: ignore[no-untyped-def]
        mem = MemoryDistill.open(home, embedder=embedder)
        mem.add_many(eps)
        if concurrent:
            errors: list[BaseException] = []

            def run(ns: str) -> None:
                try:
                    mem.consolidate(fast_job(), namespace=ns)
                except BaseException as e:  # noqa: BLE001 - surfaced below
                    errors.append(e)

            threads = [threading.Thread(target=run, args=(ns,)) for ns in ("a", "b")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
        else:
            for ns in ("a", "b"):
                mem.consolidate(fast_job(), namespace=ns)
        return {ns: mem.predictor_for(ns).predict_batch(texts).probs for ns in ("a", "b")}

    gpu = torch.cuda.is_available()  # device="auto" trains there: dropout then draws from the GPU's generator
    torch.manual_seed(123)
    expected_draw = torch.rand(4), torch.rand(4, device="cuda") if gpu else None
    torch.manual_seed(123)
    alone = models(tmp_path / "alone", concurrent=False)
    assert torch.equal(torch.rand(4), expected_draw[0])  # the application's stream went on where it was
    if gpu:
        assert torch.equal(torch.rand(4, device="cuda"), expected_draw[1])
    together = models(tmp_path / "together", concurrent=True)
    for ns in ("a", "b"):
        np.testing.assert_array_equal(together[ns], alone[ns])


def _gate_rows(store, registry, report, first_version):
    """The held-out rows of ``report``'s run (rewarded, not trained on), split by whether their group holds a row
    the published ``first_version`` trained on."""
    trained = set(registry.train_ids(report.version))
    held = [m for page, _ in store.iter_memories() for m in page if m.reward is not None and m.id not in trained]
    seen = {m.metadata["group"] for m in store.get_many(registry.train_ids(first_version))}
    return [m for m in held if m.metadata["group"] not in seen], [m for m in held if m.metadata["group"] in seen]


def test_the_gate_compares_on_held_out_groups_the_published_model_never_trained_on(store, registry, embedder):
    """A question asked again makes its group one of the most recent, so it is held out, though the published model
    trained on its earlier answers: that flatters the published model. The gate compares on the other held-out
    groups (neither model trained on them) when there are enough, else on all and says so."""
    from memory_distill.evaluate import spearman

    eps = synthetic_episodes(800, seed=4, pending_fraction=0.0)
    store.add_many(eps[:400])
    first = run_consolidation(store, registry, fast_job())
    old = [e for e in eps[:400] if e["id"] in set(registry.train_ids(first.version))][::4]
    later = [{**e, "id": e["id"] + "-again"} for e in old[:40]] + eps[400:520]
    order = np.random.default_rng(0).permutation(len(later))
    # repeated questions and new ones, arriving mixed: both are among the newest groups, so both are held out
    store.add_many([{**later[j], "created_at": 1.9e9 + i} for i, j in enumerate(order)])
    rep = run_consolidation(store, registry, fast_job())
    fair, flattering = _gate_rows(store, registry, rep, first.version)
    assert len(flattering) > 0 and len(fair) >= 10
    assert rep.extra["gate_rows"] == {"compared": len(fair), "left_out": len(flattering)}
    assert f"on the {len(fair)} held-out memories in groups the published model never trained on" in rep.reason
    assert registry.manifest(rep.version)["gate_rows"] == rep.extra["gate_rows"]
    # the figures in the reason are both models' Spearman on exactly those rows
    r = [m.reward for m in fair]
    cand = spearman([p.mean for p in Predictor(registry, embedder, version=rep.version).predict(
        [m.text for m in fair])], r)
    pub = spearman([p.mean for p in Predictor(registry, embedder, version=first.version).predict(
        [m.text for m in fair])], r)
    import re

    said = [float(x) for x in re.findall(r"spearman (-?[0-9.]+) (?:vs published|regresses the published model's) "
                                         r"(-?[0-9.]+)", rep.reason)[0]]
    assert said == pytest.approx([cand, pub], abs=2e-3)
    assert rep.incumbent_metrics is not None and rep.incumbent_metrics.n == len(fair) + len(flattering)

    # only repeated questions: no held-out group the published model did not train on, so all are compared (noted)
    current = registry.current_version()
    trained = set(registry.train_ids(current))
    more = [{**e, "id": e["id"] + "-third", "created_at": 2.0e9 + i}
            for i, e in enumerate(e for e in eps[:520] if e["id"] in trained) if i < 60]
    store.add_many(more)
    rep2 = run_consolidation(store, registry, fast_job())
    fair2, flattering2 = _gate_rows(store, registry, rep2, current)
    assert len(fair2) < 10 <= len(flattering2)
    assert rep2.extra["gate_rows"] == {"compared": len(fair2) + len(flattering2), "left_out": len(flattering2)}
    assert "which flatters it: too few others to compare on" in rep2.reason


def test_second_run_warm_starts_and_history_records_both(store, registry, episodes):
    store.add_many(episodes)
    r1 = run_consolidation(store, registry, fast_job(warm_start=True))
    r2 = run_consolidation(store, registry, fast_job(warm_start=True))
    assert not r1.warm_started and r2.warm_started and r2.incumbent_version == r1.version
    assert r2.bins == r1.bins  # the support is frozen in the model, never re-fitted
    hist = registry.history()
    assert [h["outcome"] for h in hist] == ["promoted", "promoted"]
    assert hist[1]["incumbent"] == r1.version and hist[1]["seconds"] > 0
    # where the time went: the phases add up to the run, and training holds the teacher's and student's own time
    assert list(r2.phases) == ["read", "train", "evaluate", "publish"] and min(r2.phases.values()) > 0
    assert sum(r2.phases.values()) == pytest.approx(r2.seconds, rel=1e-6)
    assert r2.phases["train"] >= r2.teacher.seconds + r2.distill.seconds
    assert hist[1]["phases"] == r2.phases and hist[1]["device"] == r2.device


def test_threads_bounds_the_run_and_is_restored(store, registry, episodes):
    """JobConfig.threads: torch trains with that many threads, and the process's count is restored after the run,
    also after a failed one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ConsolidationError):  # nothing stored yet
            run_consolidation(store, registry, fast_job(threads=1))
        assert torch.get_num_threads() == 2
        store.add_many(episodes)
        one = run_consolidation(store, registry, fast_job(threads=1))
        assert one.threads == 1 and torch.get_num_threads() == 2 and registry.history()[-1]["threads"] == 1
        assert run_consolidation(store, registry, fast_job()).threads == 2  # default: torch's own count
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("metric", ["spearman", "crps"])
def test_gate_rejects_a_worse_candidate(store, registry, episodes, metric):
    store.add_many(episodes)
    good = run_consolidation(store, registry, fast_job())
    # a crippled candidate: one epoch, no warm start, tiny student
    from memory_distill.config import DistillConfig, TeacherConfig

    bad_cfg = fast_job(warm_start=False, teacher=TeacherConfig(hidden=(4,), epochs=1),
                       distill=DistillConfig(hidden=(2,), epochs=1),
                       gate=GateConfig(min_holdout=10, tolerance=0.0, metric=metric))
    bad = run_consolidation(store, registry, bad_cfg)
    assert not bad.promoted and f"{metric} " in bad.reason and "regresses the published model" in bad.reason
    assert bad.evaluation.student.crps > good.evaluation.student.crps
    assert registry.current_version() == good.version
    assert registry.manifest(bad.version)["status"] == "rejected"
    assert registry.history()[-1]["outcome"] == "rejected"


def test_old_versions_are_pruned_but_the_current_and_rollback_target_stay(store, registry, episodes):
    """A worker publishing every few minutes must not fill the disk: each run keeps the newest keep_versions
    versions, plus the current one and the one rollback would restore, whatever their age."""
    store.add_many(episodes)
    job = fast_job(keep_versions=1)
    v1, v2, v3 = (run_consolidation(store, registry, job).version for _ in range(3))
    assert registry.list_versions() == [v2, v3]  # v3 current, v2 its rollback target
    assert registry.rollback() == v2
    r4 = run_consolidation(store, registry, job)  # promoted over v2; rollback from v4 restores v2
    assert r4.promoted and r4.extra["pruned_versions"] == [v3]
    assert registry.list_versions() == [v2, r4.version]
    # a rejected newest version: the current (older) one stays, and so does its rollback target
    from memory_distill.config import DistillConfig, TeacherConfig

    bad = run_consolidation(store, registry, fast_job(
        keep_versions=1, warm_start=False, teacher=TeacherConfig(hidden=(4,), epochs=1),
        distill=DistillConfig(hidden=(2,), epochs=1), gate=GateConfig(min_holdout=10, tolerance=0.0)))
    assert not bad.promoted and registry.current_version() == r4.version
    assert registry.list_versions() == [v2, r4.version, bad.version]
    assert Predictor(registry, store.embedder).predict(["Task: x. The agent guessed."])[0].model_version == r4.version
    # the history keeps every run; None keeps everything
    assert [h["version"] for h in registry.history()] == [v1, v2, v3, r4.version, bad.version]
    r6 = run_consolidation(store, registry, fast_job(keep_versions=None))
    assert r6.promoted and registry.list_versions() == [v2, r4.version, bad.version, r6.version]
    assert not list(registry.root.glob(".pruned-*"))


def test_versions_trained_on_forgotten_memories_are_deleted_and_never_restored(store, registry, episodes):
    """Their weights hold what was forgotten: forget deletes every stale version but the current one (which
    serves until replaced), the run that replaces it deletes it, and rollback never restores one."""
    early, late = episodes[:150], episodes[150:]
    store.add_many(early)
    job = fast_job(keep_versions=None)
    v1 = run_consolidation(store, registry, job).version
    late_ids = store.add_many(late)
    v2 = run_consolidation(store, registry, job).version
    registry.promote(v2)
    v3 = run_consolidation(store, registry, job).version
    registry.promote(v3)
    victim = next(i for i in late_ids if i in registry.train_ids(v2) and i in registry.train_ids(v3))
    preview = forget(store, registry, [victim], dry_run=True)
    assert preview["dry_run"] and preview["n_deleted"] == 1 and store.get(victim).id == victim
    assert (preview["stale_versions"], preview["deleted_versions"], preview["retired"]) == ([v2, v3], [v2], [])
    assert registry.list_versions() == [v1, v2, v3] and registry.stale_versions() == {}
    entry = forget(store, registry, [victim])
    # v2 and v3 trained on it: v2 is deleted at once, v3 serves on (stale) until replaced; v1 never saw it
    assert entry["stale_versions"] == [v2, v3] and entry["deleted_versions"] == [v2]
    assert registry.list_versions() == [v1, v3] and registry.stale_versions().keys() == {v3}
    assert registry.current_version() == v3
    assert Predictor(registry, store.embedder).predict(["Task: x."])[0].model_version == v3
    r4 = run_consolidation(store, registry, job)
    assert r4.promoted and r4.extra["deleted_stale_versions"] == [v3]
    assert registry.list_versions() == [v1, r4.version] and registry.stale_versions() == {}
    assert registry.rollback() == v1  # the clean v1, never the stale v3 or v2 promoted in between
    assert not list(registry.root.glob(".pruned-*"))
    assert not list(registry.root.glob(".pruned-*"))


def test_worker_skips_a_store_that_has_not_changed(store, registry):
    """A time trigger on an idle store trains nothing (no copy of the same model every few minutes, and an operator's
    rollback stands); any change to the memories or the settings, a stale model or force=True trains again."""
    from memory_distill import UnchangedDataError

    eps = synthetic_episodes(300, seed=5, pending_fraction=0.2)
    store.add_many(eps)
    w = ConsolidationWorker(store, registry, fast_job(), every_s=0.0, min_new=None)
    v1 = w.run_once().version
    assert w.run_once() is None and isinstance(w.runs[-1], UnchangedDataError) and w.runs[-1].version == v1
    assert registry.list_versions() == [v1] and registry.current_version() == v1
    skipped = registry.history()[-1]
    assert skipped["outcome"] == "skipped" and skipped["version"] == v1 and "nothing new" in skipped["reason"]
    assert skipped["n_rewarded"] == registry.history()[0]["n_rewarded"]
    # the time trigger counts from the skip
    assert ConsolidationWorker(store, registry, fast_job(), every_s=3600, min_new=None).due()[0] is False
    pending = next(m.id for page, _ in store.iter_memories() for m in page if m.reward is None)
    store.set_reward(pending, 0.9)  # a late reward
    assert w.run_once() is not None
    assert w.run_once() is None
    store.add_many([{"id": eps[0]["id"], "text": eps[0]["text"] + " It also asked a human.", "reward": eps[0]["reward"]}],
                   upsert=True)  # same id, same reward, new text
    v3 = w.run_once().version
    assert w.run_once() is None
    # the settings are part of what a run learns from; threads and retention are not
    assert ConsolidationWorker(store, registry, fast_job(threads=1, keep_versions=5), every_s=0.0).run_once() is None
    assert ConsolidationWorker(store, registry, fast_job(seed=1), every_s=0.0).run_once() is not None
    assert registry.rollback() == v3
    assert w.run_once() is not None  # the last run (v4) saw other settings
    assert registry.rollback() == v3
    assert w.run_once() is None and registry.current_version() == v3  # nothing new: the rollback stands
    assert "v000003 keeps serving" in str(w.runs[-1])
    assert w.run_once(force=True) is not None
    forget(store, registry, [eps[1]["id"]])
    assert w.run_once() is not None  # ids changed (and the model is stale)
    assert ConsolidationWorker(store, registry, fast_job(), every_s=0.0, skip_unchanged=False).run_once() is not None
    with pytest.raises(UnchangedDataError, match="nothing new since the last run"):
        run_consolidation(store, registry, fast_job(), skip_unchanged=True)
    assert [h["outcome"] for h in registry.history()].count("skipped") == 6


def test_the_worker_reports_each_run_as_it_happens(store, registry, caplog):
    """on_run: a log line, a metric or an alert per due run (report or why it was skipped); a hook that raises
    is logged and the worker goes on."""
    from memory_distill import UnchangedDataError

    store.add_many(synthetic_episodes(300, seed=7))
    seen = []
    w = ConsolidationWorker(store, registry, fast_job(), every_s=0.0, min_new=None,
                            on_run=lambda worker, result: seen.append((worker, result)))
    rep = w.run_once()
    w.run_once()
    assert [r for _, r in seen][0] is rep and isinstance(seen[1][1], UnchangedDataError)
    assert all(worker is w for worker, _ in seen)

    def broken(worker, result):
        raise RuntimeError("the metrics backend is down")

    w.on_run = broken
    assert w.run_once() is None and "on_run hook raised" in caplog.text


def test_the_data_fingerprint_sees_every_input_of_a_run(store):
    from memory_distill.jobs import data_fingerprint

    store.add_many(synthetic_episodes(50, seed=6))
    data = store.load_training_data(metadata_keys=("strategy",))
    base = data_fingerprint(data, fast_job())
    assert data_fingerprint(data, fast_job(threads=1, keep_versions=3, device="cpu")) == base
    assert data_fingerprint(data, fast_job(seed=2)) != base
    for change in (lambda d: d.embeddings.__setitem__((7, 3), d.embeddings[7, 3] + 1e-3),
                   lambda d: d.rewards.__setitem__(4, 0.123), lambda d: d.groups.__setitem__(2, "other"),
                   lambda d: d.metadata["strategy"].__setitem__(1, 99),
                   lambda d: d.features.__setitem__((0, 0), 9.0)):
        d = store.load_training_data(metadata_keys=("strategy",))
        change(d)
        assert data_fingerprint(d, fast_job()) != base


def test_single_writer_lock(store, registry, episodes):
    store.add_many(episodes)
    lk = registry.acquire()
    try:
        with pytest.raises(JobLockedError, match="another consolidation is running.*held by pid.*wait for it with lock_timeout=<seconds>.*--wait"):
            run_consolidation(store, registry, fast_job())
    finally:
        lk.release()
    assert run_consolidation(store, registry, fast_job()).promoted


def test_lock_is_exclusive_across_processes(tmp_path):
    reg = ArtifactRegistry(tmp_path)
    code = textwrap.dedent(f"""
        import time
        from memory_distill import ArtifactRegistry
        lk = ArtifactRegistry({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(30)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(JobLockedError):
            reg.acquire()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    reg.acquire().release()  # the kernel released the dead holder's lock


def test_executor_runs_in_background_and_readers_keep_serving(store, registry, episodes):
    store.add_many(episodes)
    first = run_consolidation(store, registry, fast_job())
    pred = Predictor(registry, store.embedder)
    with ConsolidationExecutor(store, registry, fast_job()) as ex:
        fut = ex.submit()
        assert ex.submit() is fut  # one run at a time
        served = []
        while not fut.done():
            served.append(pred.predict(["some episode"])[0].model_version)
            time.sleep(0.01)
        rep = fut.result()
    assert served and set(served) == {first.version}  # the published model served throughout
    assert rep.version != first.version and pred.refresh()
    from memory_distill import UnchangedDataError

    with ConsolidationExecutor(store, registry, fast_job()) as ex, pytest.raises(UnchangedDataError):
        ex.submit(skip_unchanged=True).result()
    # a run with other settings is queued behind, not answered by the one under way (it used to get that future)
    store.add_many([{**{k: v for k, v in e.items() if k != "id"}, "namespace": "team-b"} for e in episodes[:60]])
    with ConsolidationExecutor(store, registry, fast_job()) as ex:
        top, team = ex.submit(), ex.submit(fast_job(namespace="team-b"))
        assert team is not top and ex.submit(fast_job(namespace="team-b")) is team and ex.running
        assert top.result().n_rows == store.count(namespace=None) and team.result().n_rows == 60
    assert not ex.running and registry.scoped("team-b").current_version() == team.result().version


def test_worker_triggers_on_new_rewards_and_time(store, registry):
    eps = synthetic_episodes(400, seed=3, pending_fraction=0.0)
    store.add_many(eps[:300])
    w = ConsolidationWorker(store, registry, fast_job(warm_start=True), every_s=3600, min_new=50)
    assert w.due() == (True, "no consolidation has run yet")
    assert w.run_once() is not None
    assert w.due()[0] is False and w.run_once() is None
    store.add_many(eps[300:340])
    assert w.due()[0] is False  # 40 < 50
    store.add_many(eps[340:])
    due, why = w.due()
    assert due and "100 new rewarded memories" in why
    assert w.run_once().warm_started
    w2 = ConsolidationWorker(store, registry, fast_job(), every_s=0.0, min_new=None)
    assert w2.due()[0] and "elapsed" in w2.due()[1]
    # forget(): the published model trained on deleted memories is replaced at the next poll, not in an hour
    assert w.due()[0] is False
    cur = registry.current_version()
    forget(store, registry, registry.train_ids(cur)[:1], reason="user asked")
    assert w.due() == (True, f"the published model {cur} is stale (trained on deleted memories)")
    rep = w.run_once()
    assert rep.promoted and not rep.warm_started and w.due()[0] is False
    # a stale model that cannot be replaced (too few rewards left) is tried once, not at every poll
    few = ConsolidationWorker(store, registry, fast_job(min_rewarded=10_000), every_s=3600, min_new=None)
    forget(store, registry, registry.train_ids(rep.version)[:1])
    assert few.due()[0] and few.run_once() is None and "only" in str(few.runs[-1])
    assert few.due() == (False, "not due")


def test_worker_waits_for_enough_rewards_without_failing_runs(store, registry, monkeypatch):
    eps = synthetic_episodes(60, seed=4, pending_fraction=0.0)
    store.add_many(eps[:10])
    w = ConsolidationWorker(store, registry, fast_job(min_rewarded=20), every_s=0.0, min_new=1)
    assert w.due() == (False, "only 10 rewarded memories (a run needs JobConfig.min_rewarded=20)")
    for _ in range(3):  # a fresh deployment polling before the data is there
        assert w.run_once() is None
    assert registry.history() == [] and list(w.runs) == []  # no failed runs logged every poll
    store.add_many(eps[10:])
    assert w.due() == (True, "no consolidation has run yet") and w.run_once() is not None
    forget(store, registry, [m.id for page, _ in store.iter_memories() for m in page][5:])  # below min_rewarded again
    assert w.run_once(force=True) is None  # skipped, not raised
    assert isinstance(w.runs[-1], ConsolidationError) and "only 5 rewarded" in str(w.runs[-1])
    # kept without a traceback (it would hold the run's frames, the data among them), and only the latest runs
    assert w.runs[-1].__traceback__ is None and w.runs[-1].__cause__.__traceback__ is None
    monkeypatch.setattr(ConsolidationWorker, "KEEP_RUNS", 2)
    w = ConsolidationWorker(store, registry, fast_job(min_rewarded=20), every_s=0.0, min_new=1)
    for _ in range(3):
        w.run_once(force=True)
    assert len(w.runs) == 2 and all(isinstance(r, ConsolidationError) for r in w.runs)


def test_worker_run_forever_stops(store, registry, episodes):
    store.add_many(episodes)
    w = ConsolidationWorker(store, registry, fast_job(), every_s=None, min_new=1)
    t = threading.Thread(target=w.run_forever, kwargs={"poll_s": 0.05, "max_runs": 1})
    t.start()
    t.join(timeout=60)
    assert not t.is_alive() and len([r for r in w.runs if not isinstance(r, Exception)]) == 1


def test_forget_marks_models_stale_and_next_run_retrains_without_them(store, registry, episodes):
    store.add_many(episodes)
    r1 = run_consolidation(store, registry, fast_job())
    victims = registry.train_ids(r1.version)[:5]
    entry = forget(store, registry, victims, reason="user asked")
    assert entry["n_deleted"] == 5 and entry["stale_versions"] == [r1.version]
    assert registry.deletions()[-1]["reason"] == "user asked"
    assert [m["stale"] for m in registry.list()] == [True]
    r2 = run_consolidation(store, registry, fast_job(warm_start=True))
    assert not r2.warm_started  # never warm-start from a model that saw deleted data
    assert r2.promoted and "deleted memories" in r2.reason
    assert not set(victims) & set(registry.train_ids(r2.version))
    assert registry.current_version() == r2.version


def test_a_model_trained_while_its_memories_were_forgotten_is_not_promoted(store, registry, episodes, monkeypatch):
    """forget() during a run marks stale the versions that exist then; the one being trained must not be promoted
    with the forgotten memories in it (it would serve them until some later run noticed)."""
    import memory_distill.jobs as jobs_mod

    store.add_many(episodes)
    first = run_consolidation(store, registry, fast_job())
    victims = registry.train_ids(first.version)[:3]
    real = jobs_mod.train_pair

    def forgetting_meanwhile(*a, **kw):  # a user's erasure request lands while the run trains
        out = real(*a, **kw)
        forget(store, registry, victims, reason="erasure request")
        return out

    monkeypatch.setattr(jobs_mod, "train_pair", forgetting_meanwhile)
    rep = run_consolidation(store, registry, fast_job())
    assert not rep.promoted and "3 of its training memories were forgotten while it trained" in rep.reason
    assert registry.current_version() == first.version  # (stale too: forget marked it, and it serves until replaced)
    assert registry.stale_versions().keys() == {first.version} and registry.list_versions() == [first.version]
    assert rep.extra["deleted_stale_versions"] == [rep.version]  # published rejected, then deleted with what it holds
    monkeypatch.setattr(jobs_mod, "train_pair", real)
    again = run_consolidation(store, registry, fast_job())  # the next run replaces the stale model
    assert again.promoted and not set(victims) & set(registry.train_ids(again.version))


def test_a_rollback_made_while_a_run_trains_is_not_undone_by_its_promotion(store, registry, episodes, monkeypatch):
    """An operator rolled back (the served model misbehaved) while a run trained; the run, gated against the model
    rolled back from, then promoted itself over the operator's choice. It now publishes without promoting, says
    why, and the next run is gated against what the operator chose."""
    import memory_distill.jobs as jobs_mod

    store.add_many(episodes)
    loose = {"gate": {"tolerance": 1.0}}  # every run would pass the gate
    first = run_consolidation(store, registry, fast_job(**loose))
    second = run_consolidation(store, registry, fast_job(**loose))
    assert registry.current_version() == second.version
    real = jobs_mod.train_pair

    def rolled_back_meanwhile(*a, **kw):
        out = real(*a, **kw)
        assert ArtifactRegistry(registry.root).rollback() == first.version  # (another process's handle)
        return out

    monkeypatch.setattr(jobs_mod, "train_pair", rolled_back_meanwhile)
    rep = run_consolidation(store, registry, fast_job(**loose))
    assert not rep.promoted and registry.current_version() == first.version
    assert rep.reason.startswith(f"CURRENT changed while it trained ({second.version} -> {first.version}: a promote, "
                                 "rollback or retire elsewhere): not promoted")
    assert registry.manifest(rep.version)["status"] == "rejected" and registry.manifest(rep.version)["reason"] == rep.reason
    monkeypatch.setattr(jobs_mod, "train_pair", real)
    after = run_consolidation(store, registry, fast_job(**loose))
    assert after.promoted and registry.manifest(after.version)["incumbent"]["version"] == first.version


def test_memories_deleted_outside_forget_make_the_model_stale_at_the_next_run(store, registry, episodes):
    store.add_many(episodes)
    r1 = run_consolidation(store, registry, fast_job(warm_start=True))
    r2 = run_consolidation(store, registry, fast_job(warm_start=True))
    assert r2.warm_started and registry.stale_versions() == {} and r2.extra == {}
    published = registry.current_version()
    # a training memory removed behind the library's back (raw chromadb, as another process would)
    victim = registry.train_ids(published)[0]
    store._col.delete(ids=[victim])
    trained_on_it = [v for v in (r1.version, r2.version) if victim in registry.train_ids(v)]
    assert published in trained_on_it
    r3 = run_consolidation(store, registry, fast_job(warm_start=True))
    # marked stale, replaced, and deleted with what they hold
    assert r3.extra == {"deleted_training_memories": 1, "deleted_stale_versions": trained_on_it}
    assert registry.stale_versions() == {} and not set(trained_on_it) & set(registry.list_versions())
    assert not r3.warm_started and r3.promoted and "deleted memories" in r3.reason
    assert victim not in registry.train_ids(r3.version)
    # nothing missing any more: the next run warm-starts from the clean model
    r4 = run_consolidation(store, registry, fast_job(warm_start=True))
    assert r4.warm_started and r4.extra == {} and r3.version not in registry.stale_versions()


def test_forget_by_namespace(store, registry, episodes):
    store.add_many(episodes)
    # old memories (trained on) and new ones (only in the held-out evaluation slice)
    store.add_many([{"text": f"private {i}", "reward": 0.5, "created_at": 1.0e9 + i} for i in range(30)], namespace="user-42")
    store.add_many([{"text": f"recent {i}", "reward": 0.5, "created_at": 2.0e9 + i} for i in range(5)], namespace="user-7")
    r1 = run_consolidation(store, registry, fast_job())
    assert forget(store, registry, namespace="user-7")["stale_versions"] == []  # never trained on
    entry = forget(store, registry, namespace="user-42")
    assert entry["n_deleted"] == 30 and entry["stale_versions"] == [r1.version]
    assert store.count(namespace="user-42") == 0


def test_forget_checks_its_arguments_before_deleting(store, registry):
    """dry_run="yes" deleted (a truthy str), ids=[1] failed inside Chroma, a non-str reason was logged as is."""
    ids = store.add_many([{"text": f"episode {i}", "reward": 0.5} for i in range(3)])
    for kw, why in (({"dry_run": "yes"}, "dry_run must be True or False"),
                    ({"reason": 3}, "reason must be text"),
                    ({"dry_run": True, "reason": None}, "reason must be text")):
        with pytest.raises(TypeError, match=why):
            forget(store, registry, ids[:1], **kw)
    for bad, why in (([1], r"ids\[0\] must be a memory id \(a non-empty str\), got int 1"),
                     ([ids[0], ""], r"ids\[1\] must be a memory id"),
                     (7, "ids must be a list of memory ids, got int 7")):
        with pytest.raises(TypeError, match=why):
            forget(store, registry, bad)
    assert store.count() == 3
    assert forget(store, registry, (ids[0],), dry_run=np.bool_(True))["n_deleted"] == 1 and store.count() == 3
    with pytest.raises(ValueError, match="page_size must be a whole number >= 1"):
        next(store.iter_memories(page_size=0))  # (it read pages of the configured size)
    with pytest.raises(ValueError, match="page_size must be a whole number >= 1"):
        next(store.iter_pages(page_size="10"))
    with pytest.raises(TypeError, match="ids must be a list of memory ids, got NoneType"):
        store.get_many(None)



def test_jobs_name_a_wrong_store_or_registry_when_built(store, registry, tmp_path):
    """A worker or executor built on a str (or a MemoryDistill) took it and failed at its first poll or run, with
    an AttributeError; the registry may also be given as its directory."""
    from memory_distill import MemoryDistill, NamespaceWorkers

    mem = MemoryDistill.open(tmp_path / "home")
    for build in (ConsolidationWorker, NamespaceWorkers, ConsolidationExecutor):
        with pytest.raises(TypeError, match=f"{build.__name__} needs a MemoryStore, got str"):
            build("memories", registry)
        with pytest.raises(TypeError, match="got MemoryDistill: pass mem.store and mem.registry"):
            build(mem, registry)
        with pytest.raises(TypeError, match=f"{build.__name__} needs an ArtifactRegistry .* got int"):
            build(store, 3)
    for call in (run_consolidation, forget, drift_report):
        with pytest.raises(TypeError, match=f"{call.__name__} needs a MemoryStore"):
            call(mem, registry)
    worker = ConsolidationWorker(store, str(registry.root))
    assert isinstance(worker.registry, ArtifactRegistry) and worker.registry.root == registry.root


def test_switches_that_write_or_select_must_be_bools(store, registry):
    """A truthy str turned on what it meant to turn off: delete(dry_run="yes") deleted, add_many(upsert="no")
    replaced, count(rewarded_only="no") counted only rewarded memories."""
    ids = store.add_many([{"text": f"episode {i}", "reward": None if i else 0.5} for i in range(3)])
    calls = [lambda: store.delete(ids, dry_run="yes"),
             lambda: store.add_many([{"id": ids[0], "text": "replaced"}], upsert="no"),
             lambda: store.add_many([{"text": "new"}], keep_created=1),
             lambda: store.add_many([{"text": "new"}], within_namespace="no"),
             lambda: store.count(rewarded_only="no"),
             lambda: store.namespace_counts(rewarded_only="no"),
             lambda: run_consolidation(store, registry, fast_job(), skip_unchanged="no"),
             lambda: ConsolidationWorker(store, registry, fast_job(), skip_unchanged="no"),
             lambda: MemoryStore.reembed(store.embedder, store.config, client=store._client, force="no"),
             lambda: ConsolidationWorker(store, registry, fast_job()).run_once(force="no")]  # ("no" forced a run)
    for call in calls:
        with pytest.raises(TypeError, match="must be True or False"):
            call()
    assert store.count() == 3 and store.get(ids[0]).text == "episode 0" and not registry.exists()
    assert store.count(rewarded_only=np.bool_(True)) == 1 and store.count(rewarded_only=False) == 3


def test_drift_report_and_trigger(store, registry):
    eps = synthetic_episodes(500, seed=4, pending_fraction=0.0)
    store.add_many(eps)
    run_consolidation(store, registry, fast_job())
    d0 = drift_report(store, registry)
    assert d0.n == 0 and not d0.triggered and d0.crps is None and d0.baseline_crps is not None
    # the world changes: strategies that used to pay off now fail
    flipped = [{"text": e["text"], "reward": round(1.0 - e["reward"], 3), "metadata": e["metadata"]}
               for e in synthetic_episodes(60, seed=5, pending_fraction=0.0)]
    ids = store.add_many([{**f, "reward": None} for f in flipped])
    store.set_rewards({i: f["reward"] for i, f in zip(ids, flipped, strict=True)})
    d = drift_report(store, registry, threshold=0.1, min_samples=20)
    assert d.n == 60 and d.mae > d.baseline_mae + 0.2 and d.triggered
    assert d.baseline_crps is not None and d.crps > d.baseline_crps + 0.1  # the whole distribution is off too
    w = ConsolidationWorker(store, registry, fast_job(), every_s=None, min_new=None, drift_threshold=0.1)
    assert w.due()[0] and "drift" in w.due()[1]
    for bad, msg in (({"threshold": float("nan")}, "threshold must be a reward difference >= 0"),  # never triggered
                     ({"min_samples": 0}, "min_samples must be an int >= 1")):
        with pytest.raises(ValueError, match=msg):
            drift_report(store, registry, **bad)
    p = Predictor(registry, store.embedder).predict(["anything"])[0]
    with pytest.raises(ValueError, match="threshold must be a reward"):  # P(reward > NaN) read 0
        p.prob_above(float("nan"))
    assert p.prob_above(-1e9) == pytest.approx(1.0) and p.prob_above(float("inf")) == 0.0


def test_bad_rows_are_skipped_and_counted(store, registry, episodes):
    store.add_many(episodes)
    dim = store.embedder.dim
    store.add_many([{"text": "zero vector", "reward": 0.5}], embeddings=np.zeros((1, dim), np.float32))
    rep = run_consolidation(store, registry, fast_job())
    assert rep.skipped_rows == 1 and rep.n_rows == len(episodes)
    assert registry.history()[-1]["skipped_rows"] == 1


CRASH_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import fast_job
    from memory_distill import ArtifactRegistry, HashingEmbedder, MemoryStore, StoreConfig, run_consolidation
    st = MemoryStore(HashingEmbedder(dim=256), StoreConfig(path={store!r}))
    run_consolidation(st, ArtifactRegistry({reg!r}), fast_job())
    print("finished")
""")


@pytest.mark.parametrize("point", ["mid_training", "mid_publish", "before_pointer"])
def test_killed_job_leaves_model_and_memories_intact(tmp_path, embedder, point):
    from memory_distill import MemoryStore, StoreConfig

    store_path, reg_path = tmp_path / "chroma", tmp_path / "art"
    st = MemoryStore(embedder, StoreConfig(path=store_path))
    st.add_many(synthetic_episodes(400, seed=6))
    reg = ArtifactRegistry(reg_path)
    first = run_consolidation(st, reg, fast_job())
    before_pred = Predictor(reg, embedder).predict(["probe episode"])[0].mean
    n_before = st.count()
    del st  # the child process is the only writer while it runs

    script = CRASH_SCRIPT.format(tests=os.path.dirname(__file__), store=str(store_path), reg=str(reg_path))
    env = {**os.environ, "MEMORY_DISTILL_FAULT": point}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL
    assert "finished" not in proc.stdout

    reg = ArtifactRegistry(reg_path)
    assert reg.current_version() == first.version  # still the published model
    assert Predictor(reg, embedder).predict(["probe episode"])[0].mean == pytest.approx(before_pred)
    st = MemoryStore(embedder, StoreConfig(path=store_path))
    assert st.count() == n_before
    nxt = run_consolidation(st, reg, fast_job())  # the next run succeeds
    assert nxt.promoted and reg.current_version() == nxt.version
    assert not list(reg_path.glob(".staging-*"))
    assert len(reg.list_versions()) == (3 if point == "before_pointer" else 2)


@pytest.mark.parametrize("seed", [7, 21])
def test_no_version_but_a_serving_one_ever_holds_forgotten_memories(store, registry, seed):
    """Random sequences of adds, runs (top level and a namespace's, various retention), forgets (some dry runs),
    rollbacks and promotes: after every step, only a current version may have trained on a forgotten memory (and
    then it is marked stale), rollback never targets a stale one, and the current one loads. The sequence that
    once broke this: a manual promote away from a stale current model left it on disk."""
    import random

    from memory_distill.config import DistillConfig, TeacherConfig
    from memory_distill.errors import MemoryDistillError

    rnd = random.Random(seed)
    eps = synthetic_episodes(1200, seed=seed, pending_fraction=0.0)
    store.add_many(eps[:200])
    tiny = dict(teacher=TeacherConfig(hidden=(32,), epochs=3, patience=2), distill=DistillConfig(hidden=(16,), epochs=3))
    forgotten: set[str] = set()

    def check(reg: ArtifactRegistry) -> None:
        cur, stale, versions = reg.current_version(), reg.stale_versions(), reg.list_versions()
        assert set(stale) <= {cur}
        for v in versions:
            assert not set(reg.train_ids(v)) & forgotten or (v == cur and v in stale)
        if cur is not None:
            target = reg._rollback_target(cur)
            assert target is None or (target in versions and target not in stale)
            Predictor(reg, store.embedder).predict(["Task: x."])

    for _ in range(24):
        op = rnd.choice(["add", "run", "run", "run_ns", "forget", "forget_ns", "dry_run", "rollback", "promote"])
        try:
            if op == "add":
                s = rnd.randint(0, 1100)
                store.add_many([{**e, "namespace": rnd.choice(["default", "u1"])} for e in eps[s : s + 60]])
            elif op in ("run", "run_ns"):
                run_consolidation(store, registry, fast_job(**tiny, keep_versions=rnd.choice([1, 2, None]),
                                                            namespace="u1" if op == "run_ns" else None))
            elif op in ("forget", "dry_run"):
                ids = [i for page in store._iter_ids(None) for i in page]
                entry = forget(store, registry, rnd.sample(ids, rnd.randint(1, 8)), dry_run=op == "dry_run")
                forgotten |= set(entry["ids"]) if op == "forget" else set()
            elif op == "forget_ns":
                forgotten |= set(forget(store, registry, namespace="u1")["ids"])
            elif op == "rollback":
                registry.rollback()
            elif op == "promote" and registry.list_versions():
                registry.promote(rnd.choice(registry.list_versions()))
        except MemoryDistillError:
            pass  # too few rewards, nothing to roll back to: not what this checks
        check(registry)
        check(registry.scoped("u1"))


def test_worker_triggers_and_job_configs_are_checked_when_built(store, registry):
    """A NaN every_s never fired; a negative one, or min_new=0, ran at every poll; a string every_s failed at the first
    poll; a negative poll_s span the CPU; a dict config failed as "'dict' object has no attribute 'namespace'"."""
    from memory_distill import ConsolidationExecutor, NamespaceWorkers

    for cls in (ConsolidationWorker, NamespaceWorkers):
        for kw, msg in (({"every_s": float("nan")}, r"every_s must be a finite number of seconds >= 0, got nan"),
                        ({"every_s": -5}, "every_s must be a finite number of seconds >= 0, got -5"),
                        ({"every_s": "ten minutes"}, "every_s: bad duration 'ten minutes': use e.g. 30s, 10m"),
                        ({"min_new": 0}, r"min_new must be None or an int >= 1 .*got 0"),
                        ({"drift_threshold": -0.1}, r"drift_threshold must be a reward difference >= 0"),
                        ({"every_s": None, "min_new": None}, "give at least one trigger")):
            with pytest.raises(ValueError, match=msg):
                cls(store, registry, **kw)
        with pytest.raises(TypeError, match="on_run must be a function"):
            cls(store, registry, on_run="log")
        with pytest.raises(TypeError, match="config must be a JobConfig or a dict of its fields, got str"):
            cls(store, registry, "fast")
    w = ConsolidationWorker(store, registry, {"seed": 3}, every_s="10m")  # a duration as the CLI takes it; a dict
    assert w.every_s == 600.0 and w.config.seed == 3
    numpy_made = ConsolidationWorker(store, registry, min_new=np.int64(5), drift_threshold=np.float32(0.25))
    assert (numpy_made.min_new, numpy_made.drift_threshold) == (5, 0.25)  # numpy numbers, as plain ones
    for kw, msg in (({"poll_s": -1}, "poll_s must be a finite number of seconds >= 0"),
                    ({"max_runs": 0}, r"max_runs must be None \(until stop\(\)\) or an int >= 1, got 0")):
        with pytest.raises(ValueError, match=msg):
            w.run_forever(**kw)
    store.add_many(synthetic_episodes(120, seed=8))
    assert run_consolidation(store, registry, fast_job().model_dump()).promoted  # a dict, as mem.consolidate takes
    ex = ConsolidationExecutor(store, registry, {"seed": 1})
    try:
        report = ex.submit({**fast_job().model_dump(), "seed": 2}).result()
        assert ex.config.seed == 1 and registry.manifest(report.version)["config"]["seed"] == 2
    finally:
        ex.shutdown()
