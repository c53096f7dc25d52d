"""A real `chroma run` server on 127.0.0.1, started and stopped by these tests (HTTP mode)."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import fast_job, free_port

from memory_distill import (
    ArtifactRegistry,
    EmbedderMismatchError,
    HashingEmbedder,
    MemoryStore,
    StoreConfig,
    StoreError,
    run_consolidation,
)
from memory_distill.demo_data import synthetic_episodes

pytestmark = pytest.mark.server


def start_server(port, path):
    """`chroma run` on 127.0.0.1:port over the data directory path/data; returns the process once it answers."""
    exe = shutil.which("chroma") or os.path.join(os.path.dirname(sys.executable), "chroma")
    if not os.path.exists(exe):
        pytest.skip("the chroma CLI is not installed")
    log = open(path / "server.log", "a")
    proc = subprocess.Popen([exe, "run", "--host", "127.0.0.1", "--port", str(port), "--path", str(path / "data")],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    import chromadb

    deadline = time.time() + 60
    while True:
        try:
            chromadb.HttpClient(host="127.0.0.1", port=port).heartbeat()
            return proc
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"chroma server did not start: {(path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    port = free_port()
    proc = start_server(port, tmp_path_factory.mktemp("chroma-server"))
    yield port
    stop_server(proc)


def http_store(port, collection):
    return MemoryStore(HashingEmbedder(dim=128), StoreConfig(mode="http", port=port, collection=collection))


def test_http_store_roundtrip(chroma_server):
    st = http_store(chroma_server, "roundtrip")
    ids = st.add_many([{"text": "the agent used the calculator", "reward": 0.8, "metadata": {"tool": "calc"}},
                       {"text": "the agent gave up", "reward": 0.1}, "pending"], namespace="team-a")
    assert st.search("calculator", k=1, namespace="team-a")[0].memory.id == ids[0]
    assert st.search("calculator", k=3, namespace="team-b") == []
    st.set_reward(ids[2], 0.6)
    # a second client (another process would do the same) sees every write
    other = http_store(chroma_server, "roundtrip")
    assert other.get(ids[2]).reward == 0.6 and other.count() == 3
    # an upsert replaces the row through the server too (Chroma itself would merge the old metadata in)
    first = st.get(ids[0])
    other.add_many([{"id": ids[0], "text": first.text, "metadata": {"retry": 1}}], namespace="team-a", upsert=True)
    got = st.get(ids[0])
    assert got.reward is None and got.rewarded_at is None and got.metadata == {"retry": 1}
    other.add_many([first], upsert=True)
    assert other._col.configuration["hnsw"]["space"] == "cosine"

    # moving the collection to another embedder works through the server too (side collection, rename)
    cfg = StoreConfig(mode="http", port=chroma_server, collection="roundtrip")
    moved = MemoryStore.reembed(HashingEmbedder(dim=64), cfg)
    assert moved.count() == 3 and moved.get(ids[0]).metadata == {"tool": "calc"}
    assert moved.search("calculator", k=1, namespace="team-a")[0].memory.id == ids[0]
    names = {getattr(c, "name", c) for c in moved._client.list_collections()}
    assert "roundtrip" in names and not any(n.startswith("roundtrip-") for n in names)
    with pytest.raises(EmbedderMismatchError):
        http_store(chroma_server, "roundtrip")


def test_server_behind_an_auth_proxy_and_in_its_own_database(chroma_server, tmp_path, monkeypatch, capsys) -> None:
    """Credentials in StoreConfig.headers reach the server; a missing or wrong one, or a database that does not
    exist, is a clear error naming the fix (Chroma's client says "Could not connect to tenant" for all of them)."""
    import chromadb
    from auth_proxy import start_proxy

    proxy, port = start_proxy(chroma_server, token="s3cret")
    try:
        def cfg(**kw):  # type: ignore[no-untyped-def]
            return StoreConfig(mode="http", port=port, collection="behind-proxy", **kw)

        with pytest.raises(StoreError, match=r"refused the request \(401 Unauthorized\).*StoreConfig.headers"):
            MemoryStore(HashingEmbedder(dim=64), cfg())
        with pytest.raises(StoreError, match="refused the request"):
            MemoryStore(HashingEmbedder(dim=64), cfg(headers={"Authorization": "Bearer wrong"}))
        auth = {"Authorization": "Bearer s3cret"}
        assert "s3cret" not in repr(cfg(headers=auth))
        st = MemoryStore(HashingEmbedder(dim=64), cfg(headers=auth))
        mid = st.add({"text": "written through the proxy", "reward": 0.7})
        assert st.search("through the proxy", k=1)[0].memory.id == mid and st.count() == 1
        as_url = StoreConfig(mode="http", host=f"http://127.0.0.1:{port}", collection="behind-proxy", headers=auth)
        assert MemoryStore(HashingEmbedder(dim=64), as_url).get(mid).reward == 0.7  # host given as a URL

        # a database of its own: refused until it exists, then isolated from the default one
        with pytest.raises(StoreError, match="database 'team_db' of tenant 'default_tenant' does not exist"):
            MemoryStore(HashingEmbedder(dim=64), cfg(headers=auth, database="team_db"))
        admin = chromadb.AdminClient(chromadb.Settings(chroma_api_impl="chromadb.api.fastapi.FastAPI",
                                                       chroma_server_host="127.0.0.1",
                                                       chroma_server_http_port=chroma_server))
        admin.create_database("team_db")
        team = MemoryStore(HashingEmbedder(dim=64), cfg(headers=auth, database="team_db"))
        assert team.count() == 0
        team.add({"text": "only in the team database"})
        assert team.count() == 1 and st.count() == 1

        # the command line: --database, credentials from the environment only
        from memory_distill.cli import main

        monkeypatch.setenv("MEMORY_DISTILL_EMBEDDER__KIND", "hashing")
        monkeypatch.setenv("MEMORY_DISTILL_EMBEDDER__DIM", "64")
        argv = ["-q", "--home", str(tmp_path / "h"), "--store", "http", "--port", str(port), "--database", "team_db",
                "--collection", "behind-proxy", "stats"]
        assert main(argv) != 0 and "refused the request (401" in capsys.readouterr().err
        monkeypatch.setenv("MEMORY_DISTILL_STORE__HEADERS", '{"Authorization": "Bearer s3cret"}')
        assert main(argv) == 0 and '"total": 1' in capsys.readouterr().out
    finally:
        proxy.shutdown()


AGENT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig
    from memory_distill.demo_data import synthetic_episodes
    st = MemoryStore(HashingEmbedder(dim=128), StoreConfig(mode="http", port={port}, collection="shared"))
    eps = synthetic_episodes(300, seed={seed})
    for i in range(0, 300, 10):          # an agent recording episodes as it goes
        st.add_many(eps[i:i + 10])
    print("agent done", flush=True)
""")


def test_agents_write_while_a_worker_consolidates(chroma_server, tmp_path):
    st = http_store(chroma_server, "shared")
    st.add_many(synthetic_episodes(400, seed=20))
    tests = os.path.dirname(__file__)
    agents = [subprocess.Popen([sys.executable, "-c", AGENT.format(tests=tests, port=chroma_server, seed=s)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in (21, 22)]
    reg = ArtifactRegistry(tmp_path / "art")
    reports = [run_consolidation(st, reg, fast_job())]
    outs = [a.communicate(timeout=300) for a in agents]
    assert all(a.returncode == 0 for a in agents), [o[1][-1500:] for o in outs]
    assert st.count() == 400 + 2 * 300  # no write was lost
    reports.append(run_consolidation(st, reg, fast_job()))
    assert reports[-1].n_rows == 1000 and reg.current_version() == reports[-1].version


def test_move_an_embedded_store_to_the_server(chroma_server, tmp_path, monkeypatch, capsys):
    """export --embeddings from the embedded directory, import into the server: same rows, no re-embedding."""
    from memory_distill.cli import main

    monkeypatch.setenv("MEMORY_DISTILL_EMBEDDER__DIM", "128")
    home = tmp_path / "home"
    local = MemoryStore(HashingEmbedder(dim=128), StoreConfig(path=home / "chroma", collection="moved"))
    ids = local.add_many(synthetic_episodes(300, seed=5))
    dump = tmp_path / "dump.jsonl"
    assert main(["-q", "--home", str(home), "--collection", "moved", "export", str(dump), "--embeddings"]) == 0
    capsys.readouterr()
    code = main(["-q", "--home", str(tmp_path / "other"), "--store", "http", "--port", str(chroma_server),
                 "--collection", "moved", "import", str(dump)])
    assert code == 0 and "(300 with the file's vectors, 0 embedded" in capsys.readouterr().out
    remote = http_store(chroma_server, "moved")
    assert remote.count() == 300
    assert remote.get_many(ids) == local.get_many(ids)
    q = synthetic_episodes(1, seed=99)[0]["text"]
    assert [h.memory.id for h in remote.search(q, k=10)] == [h.memory.id for h in local.search(q, k=10)]


def test_agent_keeps_running_while_the_server_restarts(tmp_path, caplog):
    """Memory never takes the agent down: no recall and a buffered episode while the server is away, written after."""
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_memory_distill import MemoryDistillMiddleware
    from lc_helpers import ScriptedChatModel

    port = free_port()
    proc = start_server(port, tmp_path)
    try:
        st = http_store(port, "outage")
        st.add_many([{"text": "Task: summarise the report. The agent read every section first", "reward": 0.9}])
        model = ScriptedChatModel(responses=[AIMessage(content="Here is the summary.")])
        mw = MemoryDistillMiddleware(st, k=1)
        agent = create_agent(model, [], middleware=[mw])

        def run(question):
            out = agent.invoke({"messages": [HumanMessage(question)]})
            sys_msgs = [m for m in model.seen[-1] if isinstance(m, SystemMessage)]
            return out, bool(sys_msgs and "Relevant past episodes" in sys_msgs[0].content)

        out, recalled = run("summarise the quarterly report")
        assert recalled and st.get(out["memory_distill_episode_id"]).text.startswith("User: summarise")

        stop_server(proc)  # the server goes away mid-deployment
        out, recalled = run("summarise the annual report")
        assert not recalled and out["messages"][-1].content == "Here is the summary."
        lost = out["memory_distill_episode_id"]
        assert list(mw.unsaved) == [lost]
        mw.feedback(lost, 0.4)  # a late reward for an episode still waiting
        assert mw.unsaved[lost]["reward"] == 0.4
        assert "recall skipped" in caplog.text and "not written yet" in caplog.text
        # the callback handler (agents you cannot rebuild) keeps its episodes the same way
        from langchain_memory_distill import EpisodeRecorder

        rec = EpisodeRecorder(st)
        create_agent(model, []).invoke({"messages": [HumanMessage("summarise the memo")]}, config={"callbacks": [rec]})
        assert list(rec.unsaved) == rec.episode_ids and len(rec.episode_ids) == 1
        # background=True: the writer thread's failure is logged, the episode waits, flush() says the store is away
        bg = MemoryDistillMiddleware(st, recall=False, background=True)
        bg_id = create_agent(model, [], middleware=[bg]).invoke(
            {"messages": [HumanMessage("summarise the minutes")]})["memory_distill_episode_id"]
        with pytest.raises(StoreError, match="unreachable"):
            bg.flush()
        assert list(bg.unsaved) == [bg_id]

        proc = start_server(port, tmp_path)  # back, same data
        out, recalled = run("summarise the monthly report")
        assert recalled and mw.unsaved == {}
        back = http_store(port, "outage")
        assert back.get(lost).reward == 0.4 and back.get(out["memory_distill_episode_id"]).reward is None
        assert rec.flush() == 1 and rec.unsaved == {} and back.get(rec.episode_ids[0]).text.startswith("User: summarise the memo")
        assert bg.flush() == 1 and bg.unsaved == {} and back.get(bg_id).text.startswith("User: summarise the minutes")
        bg.close()
        assert back.count() == 6

        strict = MemoryDistillMiddleware(st, k=1, errors="raise")
        stop_server(proc)
        with pytest.raises(StoreError, match=f"Chroma server at http://127.0.0.1:{port} is unreachable"):
            create_agent(model, [], middleware=[strict]).invoke({"messages": [HumanMessage("summarise it")]})
    finally:
        if proc.poll() is None:
            stop_server(proc)


@pytest.mark.parametrize("each_namespace", [False, True])
def test_a_worker_outlives_a_server_outage(tmp_path, caplog, each_namespace):
    """A worker runs for months: a Chroma server that goes away (while the triggers are checked or mid-run) is
    logged once and retried at the next poll, without a failed run in the history per poll, and runs resume
    when it is back."""
    import threading

    from memory_distill import ConsolidationWorker, NamespaceWorkers

    port = free_port()
    proc = start_server(port, tmp_path)
    try:
        st = http_store(port, "worker-outage")
        eps = synthetic_episodes(260, seed=8, pending_fraction=0.0)
        st.add_many(eps[:200], namespace="team-a")
        reg = ArtifactRegistry(tmp_path / "art")
        kw = {"every_s": 0.0, "min_new": 20}  # the time trigger is due at every poll
        w = (NamespaceWorkers(st, reg, fast_job(), discover_every_s=0.0, **kw) if each_namespace
             else ConsolidationWorker(st, reg, fast_job(), **kw))
        scoped = reg.scoped("team-a") if each_namespace else reg
        t = threading.Thread(target=w.run_forever, kwargs={"poll_s": 0.1}, daemon=True)
        t.start()
        deadline = time.time() + 60
        while scoped.current_version() is None and time.time() < deadline:
            time.sleep(0.1)
        first = scoped.current_version()
        assert first is not None
        stop_server(proc)
        time.sleep(1.5)  # a dozen polls against the dead server
        assert t.is_alive()
        assert caplog.text.count("poll failed, retrying at the next poll") + caplog.text.count("namespace 'team-a'") >= 1
        assert caplog.text.count("is unreachable") <= 4  # once per distinct error, not once per poll
        assert "failed" not in [h["outcome"] for h in scoped.history()]  # an outage is not a failed run
        proc = start_server(port, tmp_path)
        http_store(port, "worker-outage").add_many(eps[200:], namespace="team-a")  # 60 new rewards
        deadline = time.time() + 60
        while scoped.current_version() == first and time.time() < deadline:
            time.sleep(0.1)
        assert scoped.current_version() != first and t.is_alive()
    finally:
        w.stop()
        t.join(timeout=30)
        if proc.poll() is None:
            stop_server(proc)
