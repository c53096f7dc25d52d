"""CUDA check and timing for consolidation training (run on a machine with a GPU; also runs on CPU).

Checks that the training path works on CUDA end to end (teacher, distillation under every
curriculum and adaptive teaching, evaluation), that a CUDA-trained artifact loads and predicts
on the CPU with the same numbers, and times the same training on CUDA and on the CPU side by
side. Writes JSON (``--out``); ``python benchmarks/run.py`` folds ``benchmarks/gpu.json`` into
BENCHMARKS.md when it exists.

    python benchmarks/gpu.py --out benchmarks/gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memory_distill.artifacts import ArtifactRegistry  # noqa: E402
from memory_distill.config import DistillConfig, JobConfig, TeacherConfig  # noqa: E402
from memory_distill.curriculum import CURRICULA, make_curriculum  # noqa: E402
from memory_distill.demo_data import synthetic_episodes  # noqa: E402
from memory_distill.evaluate import compare_teacher_student, spearman  # noqa: E402
from memory_distill.facade import MemoryDistill  # noqa: E402
from memory_distill.models import resolve_device  # noqa: E402
from memory_distill.predictor import Predictor  # noqa: E402
from memory_distill.rewards import RewardBins  # noqa: E402
from memory_distill.store import TrainingData  # noqa: E402
from memory_distill.training import split_by_group_and_time, train_pair  # noqa: E402


def make_data(n: int, dim: int, seed: int = 0) -> TrainingData:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    w = rng.normal(size=dim).astype(np.float32)
    r = (1 / (1 + np.exp(-(X @ w) * 3)) + rng.normal(0, 0.05, n)).clip(0, 1).astype(np.float32)
    r[rng.random(n) < 0.1] = np.nan  # unrewarded rows: transfer data for the KL term
    return TrainingData([f"m{i}" for i in range(n)], X, r, np.arange(n, dtype=np.float64), [f"g{i // 4}" for i in range(n)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(data: TrainingData, device: torch.device, cfg: JobConfig, curriculum: str | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    split = split_by_group_and_time(data, 0.1, 0.15, rng)
    bins = RewardBins.fit(data.rewards[~np.isnan(data.rewards)], cfg.bins)
    torch.manual_seed(0)
    sync(device)
    t = time.perf_counter()
    pair = train_pair(data, split, bins, cfg, device=device, generator=torch.Generator().manual_seed(0),
                      curriculum=make_curriculum(curriculum) if curriculum else None)
    sync(device)
    secs = time.perf_counter() - t
    Xh = pair.X[torch.from_numpy(split.holdout).to(device)]
    rh = data.rewards[split.holdout]
    ok = ~np.isnan(rh)
    with torch.no_grad():
        s_mean = torch.softmax(pair.student.eval()(Xh), -1).cpu().numpy() @ bins.centers
        t_mean = torch.softmax(pair.teacher.eval()(Xh), -1).cpu().numpy() @ bins.centers
    cmp = compare_teacher_student(pair.teacher, pair.student, Xh[torch.from_numpy(ok).to(device)], rh[ok], bins)
    d = pair.distill_report
    return {"device": str(device), "curriculum": curriculum or "uniform", "seconds": secs,
            "teacher_epochs": pair.teacher_report.epochs_run,
            "distill_epochs": d.epochs_run, "student_spearman": spearman(s_mean[ok], rh[ok]),
            "teacher_spearman": spearman(t_mean[ok], rh[ok]), "final_val_kl": d.val_kl[-1] if d.val_kl else None,
            "finite_losses": bool(np.isfinite(d.train_loss).all()), "eval_report": type(cmp).__name__,
            "pair": pair, "bins": bins, "holdout_X": Xh.cpu().numpy()}


def job_check(dev: torch.device) -> dict[str, Any]:
    """The whole job on ``dev`` (store -> text and metadata features -> ranking head -> gate -> publish,
    then a warm-started second run and a namespace's own model); the published student served on the
    CPU and on ``dev`` must give the same probabilities and ranking-head advantages."""
    eps = synthetic_episodes(3000, seed=3)
    for i, e in enumerate(eps):  # a metadata feature that moves the reward
        e["metadata"]["agent"] = "careful" if i % 3 else "hasty"
        e["namespace"] = "ops" if i % 2 else "research"
        if e["reward"] is not None and i % 3 == 0:
            e["reward"] = round(e["reward"] * 0.5, 4)
    cfg = JobConfig(device="cuda" if dev.type == "cuda" else "cpu", metadata_features=("agent",), warm_start=True,
                    teacher=TeacherConfig(epochs=6), distill=DistillConfig(epochs=6))
    with tempfile.TemporaryDirectory() as d:
        mem = MemoryDistill.open(d)
        mem.add_many(eps)
        t = time.perf_counter()
        first = mem.consolidate(cfg)
        second = mem.consolidate(cfg)  # warm start from the CUDA-trained, published models
        ns = mem.consolidate(cfg, namespace="ops")
        secs = time.perf_counter() - t
        texts = [e["text"] for e in eps[:400]]
        md = [e["metadata"] for e in eps[:400]]
        ref = mem.predictor_for(None)
        cpu = Predictor(mem.registry, mem.embedder, device="cpu").predict_batch(texts, metadata=md)
        on_dev = Predictor(mem.registry, mem.embedder, device=dev.type).predict_batch(texts, metadata=md)
        ns_cpu = Predictor(mem.registry, mem.embedder, device="cpu", namespace="ops").predict_batch(texts, metadata=md)
        ns_dev = Predictor(mem.registry, mem.embedder, device=dev.type, namespace="ops").predict_batch(texts, metadata=md)
        assert cpu.advantage is not None and on_dev.advantage is not None, "no ranking head was published"
        out: dict[str, Any] = {
            "seconds_three_runs": secs, "devices": [first.device, second.device, ns.device],
            "warm_started": second.warm_started, "promoted": [first.promoted, second.promoted, ns.promoted],
            "features": first.features.to_dict() if first.features else None,
            "student_spearman": first.evaluation.student.spearman,
            "holdout_within_spearman": first.ranking.holdout_within_spearman if first.ranking else None,
            "default_predictor_device": str(ref.device),
            "max_abs_prob_diff": float(np.abs(cpu.probs - on_dev.probs).max()),
            "max_abs_advantage_diff": float(np.abs(cpu.advantage - on_dev.advantage).max()),
            "namespace_max_abs_prob_diff": float(np.abs(ns_cpu.probs - ns_dev.probs).max()),
        }
    assert out["devices"] == [str(dev)] * 3 or dev.type == "cpu", out["devices"]
    assert out["warm_started"], "the second run did not warm-start from the CUDA-trained models"
    worst = max(float(out[k]) for k in ("max_abs_prob_diff", "max_abs_advantage_diff", "namespace_max_abs_prob_diff"))
    assert worst < 1e-4, out
    return out


def e2e(n: int, dim: int, dev: torch.device) -> dict[str, Any]:
    """The whole consolidation job from a Chroma store of ``n`` memories (read in pages, teacher 5 epochs, distil
    5 epochs, evaluation, gate, publish) on ``dev`` and on this machine's CPU, side by side on the same store."""
    from memory_distill import HashingEmbedder, MemoryStore, StoreConfig, run_consolidation
    from memory_distill.config import GateConfig

    rng = np.random.default_rng(1)
    w = rng.normal(size=dim).astype(np.float32)
    out: dict[str, Any] = {"n": n, "dim": dim, "runs": []}
    with tempfile.TemporaryDirectory() as d:
        st = MemoryStore(HashingEmbedder(dim=dim), StoreConfig(path=Path(d) / "chroma"))
        t = time.perf_counter()
        for s in range(0, n, 50_000):
            m = min(50_000, n - s)
            X = rng.normal(size=(m, dim)).astype(np.float32)
            X /= np.linalg.norm(X, axis=1, keepdims=True)
            r = 1 / (1 + np.exp(-(X @ w) * 3))
            st.add_many([{"id": f"m{s + i}", "text": f"e{s + i}", "reward": float(r[i]), "created_at": float(s + i)}
                         for i in range(m)], embeddings=X)
        out["ingest_s"] = time.perf_counter() - t
        print("e2e ingest", out["ingest_s"], flush=True)
        for device in ([dev.type, "cpu"] if dev.type == "cuda" else ["cpu"]):
            cfg = JobConfig(device="cuda" if device == "cuda" else "cpu", teacher=TeacherConfig(epochs=5, patience=100),
                            distill=DistillConfig(epochs=5, patience=100), gate=GateConfig(holdout_fraction=0.1))
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with tempfile.TemporaryDirectory() as reg:
                t = time.perf_counter()
                rep = run_consolidation(st, ArtifactRegistry(reg), cfg)
                secs = time.perf_counter() - t
            row = {"device": rep.device, "seconds": secs, "student_spearman": rep.evaluation.student.spearman,
                   "teacher_spearman": rep.evaluation.teacher.spearman, "promoted": rep.promoted, "phases": rep.phases}
            if device == "cuda":
                row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
            out["runs"].append(row)
            print("e2e", json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu.json"))
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--check-n", type=int, default=20_000, help="rows for the per-curriculum checks")
    ap.add_argument("--cpu-threads", type=int, default=0, help="0: torch default")
    ap.add_argument("--e2e", type=int, default=0, metavar="N",
                    help="only time the whole job from a Chroma store of N memories (dim 384), GPU and CPU, and "
                         "add it to --out as 'e2e' (the other sections there are kept)")
    args = ap.parse_args()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    dev = resolve_device("auto")
    if args.e2e:
        path = Path(args.out)
        kept = json.loads(path.read_text()) if path.exists() else {}
        kept["e2e"] = {**e2e(args.e2e, 384, dev), "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
                       "cpu_threads": torch.get_num_threads()}
        path.write_text(json.dumps(kept, indent=1))
        return
    out: dict[str, Any] = {"torch": torch.__version__, "device": str(dev),
                           "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
                           "cpu_threads": torch.get_num_threads(), "checks": {}, "timing": []}
    print(json.dumps({k: out[k] for k in ("torch", "device", "gpu", "cpu_threads")}), flush=True)

    # 1) every curriculum and adaptive teaching on the resolved device (small data, short runs)
    small = make_data(args.check_n, 384, seed=1)
    short = JobConfig(teacher=TeacherConfig(epochs=4, patience=100), distill=DistillConfig(epochs=4, patience=100))
    for name in sorted(CURRICULA):
        r = train(small, dev, short, name)
        out["checks"][f"curriculum_{name}"] = {k: r[k] for k in ("seconds", "student_spearman", "final_val_kl", "finite_losses")}
        print(name, json.dumps(out["checks"][f"curriculum_{name}"]), flush=True)
        assert r["finite_losses"] and r["student_spearman"] > 0.3, (name, r["student_spearman"])
    adaptive = short.model_copy(update={"distill": short.distill.model_copy(update={"adaptive_teaching": True})})
    r = train(small, dev, adaptive)
    out["checks"]["adaptive_teaching"] = {k: r[k] for k in ("seconds", "student_spearman", "final_val_kl")}
    print("adaptive_teaching", json.dumps(out["checks"]["adaptive_teaching"]), flush=True)

    # 2) a model trained on this device, published, then served on the CPU: same predictions
    pair, bins = r["pair"], r["bins"]
    with tempfile.TemporaryDirectory() as d:
        reg = ArtifactRegistry(d)
        manifest = {"bins": bins.to_dict(), "embedder": {"name": "hashing-test", "dim": 384}, "reason": "gpu check"}
        version = reg.publish(pair.teacher, pair.student, manifest, promote=True)
        Xh = r["holdout_X"][:512]
        with torch.no_grad():
            ref = torch.softmax(pair.student.eval()(torch.from_numpy(Xh).to(dev)), -1).cpu().numpy()
        cpu_pred = Predictor(reg, device="cpu").predict_embeddings(Xh)
        dev_pred = Predictor(reg, device=str(dev.type)).predict_embeddings(Xh)
        err_cpu = float(np.abs(np.asarray(cpu_pred.probs) - ref).max())
        err_dev = float(np.abs(np.asarray(dev_pred.probs) - ref).max())
    out["checks"]["artifact_roundtrip"] = {"version": version, "max_abs_prob_diff_cpu": err_cpu, "max_abs_prob_diff_device": err_dev}
    print("artifact", json.dumps(out["checks"]["artifact_roundtrip"]), flush=True)
    assert err_cpu < 1e-4 and err_dev < 1e-4

    # 2b) the whole job with every newer input (text and metadata features, ranking head, warm start, namespace)
    out["checks"]["job"] = job_check(dev)
    print("job", json.dumps(out["checks"]["job"]), flush=True)

    # 3) timing: the same training (teacher 5 epochs, distil 5 epochs) on the device and on the CPU
    big = make_data(args.n, args.dim)
    five = JobConfig(teacher=TeacherConfig(epochs=5, patience=100), distill=DistillConfig(epochs=5, patience=100))
    devices = [dev, torch.device("cpu")] if dev.type == "cuda" else [dev]
    for device in devices:
        r = train(big, device, five)
        row = {k: r[k] for k in ("device", "seconds", "student_spearman", "teacher_spearman", "final_val_kl")}
        row.update(n=args.n, dim=args.dim)
        out["timing"].append(row)
        print("timing", json.dumps(row), flush=True)
    if len(out["timing"]) == 2:
        out["speedup"] = out["timing"][1]["seconds"] / out["timing"][0]["seconds"]

    # 4) student inference throughput on the device (torch module, batch 1024 and 65536)
    student = pair.student.eval().to(dev)
    inf = {}
    for bs in (1024, 65536):
        x = torch.randn(bs, 384, device=dev)
        with torch.inference_mode():
            for _ in range(5):
                student(x)
            sync(dev)
            t = time.perf_counter()
            for _ in range(50):
                student(x)
            sync(dev)
        inf[str(bs)] = bs * 50 / (time.perf_counter() - t)
    out["inference_rows_per_s"] = inf
    print("inference", json.dumps(inf), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
