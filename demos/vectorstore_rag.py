"""Runbooks in a LangChain vector store whose outcomes train the student, offline.

    python demos/vectorstore_rag.py

1. LangChain's indexing API (``index`` with a record manager) loads two runbooks per service into
   ``MemoryDistillVectorStore``: each document is a memory;
2. incidents happen: for each one the retriever returns the service's runbooks, both get tried, and how it
   went is recorded as the reward of each document used (``mem.set_reward``);
3. ``consolidate`` trains the teacher and distils the student on those documents;
4. the same question is answered from the store by similarity alone, then by similarity and predicted value;
5. re-indexing the unchanged runbooks skips them all: the rewards stay.
"""

from __future__ import annotations

import sys
import tempfile

from langchain_core.documents import Document
from langchain_core.indexing import InMemoryRecordManager, index
from langchain_memory_distill import MemoryDistillVectorStore

from memory_distill import DistillConfig, JobConfig, MemoryDistill, TeacherConfig

RUNBOOKS = {"clear the cache and retry the request": 0.2,
            "restart the pod, then check the health endpoint before closing": 0.9}


def runbooks() -> list[Document]:
    return [Document(f"Service {s} high latency runbook: {step}.", metadata={"source": f"svc{s}/{i}.md", "service": s})
            for s in range(60) for i, step in enumerate(RUNBOOKS)]


def main() -> int:
    mem = MemoryDistill.open(tempfile.mkdtemp(prefix="md-vectorstore-demo-"))
    vs = MemoryDistillVectorStore.from_memory(mem, value_weight=0.5)  # the student weighs in once published
    rm = InMemoryRecordManager("runbooks")
    rm.create_schema()
    res = index(runbooks(), rm, vs, cleanup="full", source_id_key="source", key_encoder="sha256")
    print(f"1. indexed {res['num_added']} runbooks into the vector store")

    for s in range(60):  # an incident per service: the retrieved runbooks are tried, the outcome is their reward
        for doc in vs.similarity_search("high latency runbook", k=2, filter={"service": s}):
            step = doc.page_content.split(": ", 1)[1].rstrip(".")
            mem.set_reward(str(doc.id), RUNBOOKS[step])
    print(f"2. recorded the outcome of {mem.store.count(namespace='default', rewarded_only=True)} runbook uses")

    query = "Service 7 has high latency: clear the cache and retry the request?"
    before = vs.similarity_search_with_score(query, k=2, filter={"service": 7})  # no model yet: similarity only
    job = JobConfig(teacher=TeacherConfig(hidden=(128, 64), epochs=20), distill=DistillConfig(hidden=(32,), epochs=20))
    rep = mem.consolidate(job)
    print(f"3. consolidated -> {rep.version} ({'promoted' if rep.promoted else 'rejected'}), "
          f"held-out Spearman {rep.evaluation.student.spearman:.2f}")
    after = vs.similarity_search_with_score(query, k=2, filter={"service": 7})
    for name, hits in (("similarity only", before), ("similarity + predicted value", after)):
        print(f"4. '{query}', {name}:")
        for doc, score in hits:
            print(f"   score {score:.2f}  reward {doc.metadata.get('reward')}  {doc.page_content}")
    again = index(runbooks(), rm, vs, cleanup="full", source_id_key="source", key_encoder="sha256")
    kept = mem.store.count(namespace="default", rewarded_only=True)
    print(f"5. re-indexed: {again['num_skipped']} unchanged runbooks skipped, {kept} rewards kept")
    good = (after[0][0].metadata["reward"] > before[0][0].metadata["reward"] and again["num_skipped"] == 120
            and kept == 120)
    print("OK" if good else "UNEXPECTED: the runbook that works did not move to the top, or re-indexing lost rewards")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
