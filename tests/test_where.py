"""The Python reading of a `where` filter (used to post-filter search candidates) agrees with Chroma's."""

import random

import chromadb
import pytest

from memory_distill.store import _where_clauses, compile_where

VALUES = [0, 1, 2, -1, 1.0, 2.5, -0.5, True, False, "a", "b", "1", ""]


def _cond(rng: random.Random, depth: int = 0) -> dict:
    if depth < 2 and rng.random() < 0.3:
        return {rng.choice(["$and", "$or"]): [_cond(rng, depth + 1) for _ in range(rng.randint(2, 3))]}
    field = rng.choice(["a", "b"])
    op = rng.choice(["", "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin"])
    if op in ("$in", "$nin"):
        kind = rng.choice([int, float, bool, str, None])
        pool = [v for v in VALUES if kind is None or type(v) is kind]
        arg = rng.sample(pool, rng.randint(1, min(3, len(pool))))
        return {field: {op: arg}}
    arg = rng.choice(VALUES)
    return {field: arg} if op == "" else {field: {op: arg}}


@pytest.fixture(scope="module")
def rows():
    rng = random.Random(0)
    out = []
    for _ in range(120):
        meta = {k: rng.choice(VALUES) for k in ("a", "b") if rng.random() < 0.8}
        out.append(meta or {"c": 1})
    col = chromadb.EphemeralClient().get_or_create_collection("where-check")
    col.add(ids=[f"r{i}" for i in range(len(out))], embeddings=[[1.0, 0.0]] * len(out), metadatas=out)
    return col, out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compiled_where_matches_chroma_on_random_filters(rows, seed):
    col, metas = rows
    rng = random.Random(seed)
    compiled = refused = 0
    for _ in range(400):
        flt = _cond(rng)
        match = compile_where(flt)
        try:
            want = set(col.get(where=flt)["ids"])
        except Exception:
            assert match is None, f"Chroma refuses {flt}, so the Python reading must too"
            refused += 1
            continue
        if match is None:
            continue
        compiled += 1
        got = {f"r{i}" for i, m in enumerate(metas) if match(m)}
        assert got == want, flt
    assert compiled > 250 and refused > 10  # both sides of the contract were exercised


def test_memory_fields_are_translated_inside_and_or():
    (clause,) = _where_clauses({"$or": [{"reward": {"$gte": 0.5}}, {"namespace": "x", "tool": "t"}]}, "where")
    assert clause == {"$or": [{"_md_reward": {"$gte": 0.5}}, {"$and": [{"_md_ns": "x"}, {"tool": "t"}]}]}
