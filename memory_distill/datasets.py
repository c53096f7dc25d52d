"""Read real episode files (``*.jsonl.gz``: text, reward, group, ...) such as ``../shared/data``.

Nothing is copied: files are streamed from where they lie. ``created_at`` is assigned so that
whole groups arrive together in a seeded random order, which makes the consolidation's
"most recent groups" hold-out a random group split.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ACTION_KEYS", "DATASETS", "find_data_dir", "iter_records", "load_episodes"]

ACTION_KEYS = ("agent", "generator", "method")
"""Record fields naming what produced an episode (agent, answering model, prompting method); kept as
metadata, where ``JobConfig.metadata_features`` can read them."""

DATASETS = {
    "reflexion": "reflexion/hotpotqa_trajectories.jsonl.gz",
    "fireact": "fireact/fireact_hotpotqa.jsonl.gz",
    "game24": "tree_of_thoughts/game24.jsonl.gz",
    "creative_writing": "tree_of_thoughts/creative_writing.jsonl.gz",
    "arena": "arena_bench_v1/arena_bench_v1_judgments.jsonl.gz",
    "vader": "vader_human_sentiment/vader_human_sentiment.jsonl.gz",
}


def find_data_dir(start: str | Path | None = None) -> Path | None:
    """``start`` if it holds ``*.jsonl.gz`` files; without ``start``, ``../shared/data`` relative to the project root
    or the working directory, if present. A ``start`` given is the only place looked at: data found elsewhere
    would silently stand in for what was asked."""
    if start:
        cands = [Path(start)]
    else:
        here = Path(__file__).resolve().parents[1]
        cands = [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    for c in cands:
        if c.is_dir() and any(c.rglob("*.jsonl.gz")):
            return c
    return None


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_episodes(name_or_path: str | Path, *, data_dir: str | Path | None = None, max_records: int | None = None,
                  max_groups: int | None = None, seed: int = 0, text_field: str = "text",
                  max_chars: int = 6000) -> list[dict[str, Any]]:
    """Episodes as Memory-ready dicts; whole groups are kept together when subsampling.

    Metadata: ``group``, ``dataset`` and the record's :data:`ACTION_KEYS` that it has.
    """
    p = Path(name_or_path)
    if not p.exists():
        base = find_data_dir(data_dir)
        if base is None or str(name_or_path) not in DATASETS:
            raise FileNotFoundError(f"no dataset {name_or_path!r} (looked for ../shared/data/{DATASETS.get(str(name_or_path), '?')})")
        p = base / DATASETS[str(name_or_path)]
    recs = list(iter_records(p))
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, r in enumerate(recs):
        g = str(r.get("group", r.get("prompt_id", i)))
        groups.setdefault(g, []).append(r)
    rng = np.random.default_rng(seed)
    names = list(groups)
    rng.shuffle(names)
    if max_groups:
        names = names[:max_groups]
    out: list[dict[str, Any]] = []
    t = 1.7e9
    for gi, g in enumerate(names):
        for j, r in enumerate(groups[g]):
            text = str(r.get(text_field) or r.get("text") or "")[:max_chars]
            if not text.strip() or r.get("reward") is None:
                continue
            out.append({
                "id": f"{p.stem.split('.')[0]}-{gi}-{j}",
                "text": text,
                "reward": float(r["reward"]),
                "metadata": {"group": g, "dataset": p.stem.split(".")[0],
                             **{k: str(r[k]) for k in ACTION_KEYS if r.get(k) is not None}},
                "created_at": t + gi,
            })
        if max_records and len(out) >= max_records:
            break
    return out
