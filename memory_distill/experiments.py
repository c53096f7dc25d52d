"""Experiments on real episodes: curricula for distillation, adaptive teaching, and routing.

``run_curriculum_experiment`` trains one teacher per dataset and seed, then distils a student
with every curriculum from the same initialisation, on the same rows, and compares them on
held-out groups (on the embeddings alone: the curricula are compared without the text features
that consolidation adds by default). ``run_router_experiment`` trains a student on the cheap FireAct agent's
episodes (question -> reward) and evaluates cheap/strong routing on held-out questions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .config import DistillConfig, JobConfig, TeacherConfig
from .curriculum import CURRICULA, make_curriculum
from .datasets import DATASETS, find_data_dir, iter_records, load_episodes
from .distill import distill, teacher_logits
from .embeddings import Embedder, HashingEmbedder
from .evaluate import model_metrics
from .models import build_student, build_teacher, param_count
from .rewards import RewardBins
from .routing import routing_curve
from .store import TrainingData
from .teacher import train_teacher
from .training import split_by_group_and_time

__all__ = ["run_curriculum_experiment", "run_router_experiment"]

log = logging.getLogger(__name__)

DEFAULT_DATASETS = ("creative_writing", "arena", "reflexion", "fireact")


_F = TypeVar("_F", bound=Callable[..., Any])


def _keeps_callers_rng(fn: _F) -> _F:
    """The experiment seeds torch's CPU generator for each run; the caller's generator state is put back after."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _data(eps: list[dict[str, Any]], embedder: Embedder) -> TrainingData:
    X = embedder.embed([e["text"] for e in eps])
    return TrainingData([e["id"] for e in eps], X, np.array([e["reward"] for e in eps], np.float32),
                        np.array([e["created_at"] for e in eps], np.float64), [e["metadata"]["group"] for e in eps])


def _teacher_difficulty(t_logits: torch.Tensor) -> np.ndarray:
    """Teacher-only part of the difficulty score, so buckets are shared by every curriculum."""
    p = torch.softmax(t_logits, -1)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1) / math.log(p.shape[-1])
    return (0.3 * (1 - p.max(-1).values) + 0.3 * ent).numpy()


@_keeps_callers_rng
def run_curriculum_experiment(data_dir: str | Path | None = None, *, out_dir: str | Path = "reports/experiment",
                              datasets: tuple[str, ...] | list[str] | None = None, seeds: list[int] | tuple[int, ...] = (0, 1),
                              max_records: int = 3000, epochs: int = 15, curricula: list[str] | None = None,
                              embedder: Embedder | None = None, progress: bool = False) -> dict[str, Any]:
    """Compare curricula (+ adaptive teaching) on real data; writes results.json, curricula.png, report.md."""
    base = find_data_dir(data_dir)
    if base is None:
        where = repr(str(data_dir)) if data_dir else "../shared/data"
        raise FileNotFoundError(f"no episode data (*.jsonl.gz) found in {where}: pass --data DIR (data_dir=) with "
                                "the episode files")
    if unknown := sorted(set(datasets or ()) - set(DATASETS)):
        raise ValueError(f"unknown dataset(s) {unknown}: the datasets are {sorted(DATASETS)}")
    if unknown := sorted(set(curricula or ()) - set(CURRICULA)):
        raise ValueError(f"unknown curriculum(s) {unknown}: the curricula are {sorted(CURRICULA)}")
    names = list(datasets) if datasets else [d for d in DEFAULT_DATASETS if (base / DATASETS[d]).exists()]
    # (a directory of other *.jsonl.gz files ran no dataset, then failed drawing the empty plot)
    missing = [d for d in names if not (base / DATASETS[d]).exists()] if names else list(DEFAULT_DATASETS)
    if missing:
        raise FileNotFoundError(f"{base} has none of {', '.join(DATASETS[d] for d in missing)}: pass --data DIR "
                                "(data_dir=) with the episode files")
    variants = list(curricula or CURRICULA) + ["uniform+adaptive_teaching"]
    emb = embedder or HashingEmbedder(dim=512)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = JobConfig(teacher=TeacherConfig(epochs=30), distill=DistillConfig(epochs=epochs, patience=epochs))
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[float]]] = {}
    for name in names:
        eps = load_episodes(name, data_dir=base, max_records=max_records, seed=0)
        data = _data(eps, emb)
        for seed in seeds:
            rng = np.random.default_rng(seed)
            split = split_by_group_and_time(data, 0.25, 0.15, rng)
            bins = RewardBins.fit(data.rewards, cfg.bins)
            X = torch.from_numpy(data.embeddings)
            Y = torch.from_numpy(bins.targets(data.rewards, cfg.bins.target))
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            teacher = build_teacher(cfg.teacher, X.shape[1], bins.n_bins)
            tr, va, ho = (torch.from_numpy(i) for i in (split.train, split.val, split.holdout))
            train_teacher(teacher, X[tr], Y[tr], X[va], Y[va], cfg.teacher, generator=gen)
            T_tr, T_va, T_ho = teacher_logits(teacher, X[tr]), teacher_logits(teacher, X[va]), teacher_logits(teacher, X[ho])
            t_probs = torch.softmax(T_ho, -1).numpy()
            r_ho = data.rewards[split.holdout]
            t_met = model_metrics(t_probs, r_ho, bins)
            diff = _teacher_difficulty(T_ho)
            terciles = np.quantile(diff, [1 / 3, 2 / 3])
            bucket = np.digitize(diff, terciles)  # 0 easy, 1 medium, 2 hard
            torch.manual_seed(1000 + seed)
            init = build_student(cfg.distill, X.shape[1], bins.n_bins).state_dict()
            for variant in variants:
                cur_name, adaptive = (variant.split("+")[0], True) if "+" in variant else (variant, False)
                dcfg = cfg.distill.model_copy(update={"curriculum": cur_name, "adaptive_teaching": adaptive})
                student = build_student(dcfg, X.shape[1], bins.n_bins)
                student.load_state_dict(init)
                t0 = time.perf_counter()
                rep = distill(student, X[tr], T_tr, Y[tr], torch.ones(len(tr), dtype=torch.bool),
                              (X[va], T_va, Y[va], torch.ones(len(va), dtype=torch.bool)), dcfg,
                              generator=torch.Generator().manual_seed(seed), curriculum=make_curriculum(cur_name))
                secs = time.perf_counter() - t0
                with torch.no_grad():
                    s_logits = student(X[ho])
                s_probs = torch.softmax(s_logits, -1).numpy()
                s_met = model_metrics(s_probs, r_ho, bins)
                agree = np.abs(s_probs.argmax(1) - t_probs.argmax(1)) <= 1
                kl = float((t_probs * (np.log(np.clip(t_probs, 1e-12, None)) - np.log(np.clip(s_probs, 1e-12, None)))).sum(1).mean())
                row = {
                    "dataset": name, "seed": seed, "curriculum": variant, "n_train": len(split.train),
                    "n_holdout": len(split.holdout), "teacher_spearman": t_met.spearman,
                    "student_spearman": s_met.spearman, "student_mae": s_met.mae,
                    "retention": s_met.spearman / t_met.spearman if t_met.spearman > 1e-6 else float("nan"),
                    "agreement": float(agree.mean()),
                    "agreement_by_difficulty": [float(agree[bucket == b].mean()) if (bucket == b).any() else None for b in range(3)],
                    "within_3_bins": s_met.within_3_bins, "kl": kl, "seconds": secs, "samples": rep.samples_seen,
                    "val_kl": rep.val_kl, "samples_per_epoch": rep.samples_per_epoch,
                    "student_params": param_count(student), "teacher_params": param_count(teacher),
                    "adaptive": {"agreement_rate": rep.agreement_rate, "cumulative_reward": rep.cumulative_reward,
                                 "transfer_rate_per_1k": rep.transfer_rate_per_1k} if adaptive else None,
                    "curriculum_state": rep.curriculum_state,
                }
                rows.append(row)
                key = f"{name}/{variant}"
                cum = np.cumsum(rep.samples_per_epoch).tolist()
                curves.setdefault(key, {"samples": cum, "val_kl": rep.val_kl})
                if progress:
                    log.warning("%s seed %d %-26s student rho %.3f KL %.4f", name, seed, variant, s_met.spearman, kl)
    # sample efficiency: samples until validation KL first reaches 1.25x the best final KL of that dataset/seed
    for name in names:
        for seed in seeds:
            grp = [r for r in rows if r["dataset"] == name and r["seed"] == seed]
            target = 1.25 * min(min(r["val_kl"]) for r in grp)
            for r in grp:
                seen = 0
                r["samples_to_target_kl"] = None
                for n, k in zip(r["samples_per_epoch"], r["val_kl"], strict=False):
                    seen += n
                    if k <= target:
                        r["samples_to_target_kl"] = seen
                        break
    summary = _summarize(rows, variants)
    result = {"datasets": names, "seeds": list(seeds), "embedder": emb.name, "variants": variants,
              "rows": rows, "summary": summary}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    _plot(summary, curves, names, out / "curricula.png")
    table = _table(summary)
    (out / "report.md").write_text(_markdown(result, table))
    result["table"] = table
    return result


def _summarize(rows: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        rs = [r for r in rows if r["curriculum"] == v]

        def ms(key: str, rs: list[dict[str, Any]] = rs) -> tuple[float, float]:
            vals = np.array([r[key] for r in rs if r[key] is not None and not np.isnan(r[key])], np.float64)
            return (float(vals.mean()), float(vals.std())) if vals.size else (float("nan"), float("nan"))

        by_diff = np.array([[x if x is not None else np.nan for x in r["agreement_by_difficulty"]] for r in rs])
        out[v] = {
            "student_spearman": ms("student_spearman"), "retention": ms("retention"), "agreement": ms("agreement"),
            "kl": ms("kl"), "within_3_bins": ms("within_3_bins"), "seconds": ms("seconds"),
            "samples_to_target_kl": ms("samples_to_target_kl"),
            "agreement_by_difficulty": np.nanmean(by_diff, axis=0).tolist(),
            "adaptive": rs[0]["adaptive"] if rs and rs[0]["adaptive"] else None,
        }
    return out


def _table(summary: dict[str, dict[str, Any]]) -> list[list[str]]:
    t = [["curriculum", "student rho", "retention", "agreement (easy/med/hard)", "KL", "samples to KL", "time s"]]
    for v, s in summary.items():
        d = s["agreement_by_difficulty"]
        t.append([v, f"{s['student_spearman'][0]:.3f}±{s['student_spearman'][1]:.3f}",
                  f"{s['retention'][0]:.2f}", f"{s['agreement'][0]:.3f} ({d[0]:.2f}/{d[1]:.2f}/{d[2]:.2f})",
                  f"{s['kl'][0]:.4f}", f"{s['samples_to_target_kl'][0]:.0f}" if not math.isnan(s['samples_to_target_kl'][0]) else "never",
                  f"{s['seconds'][0]:.2f}"])
    return t


def _markdown(result: dict[str, Any], table: list[list[str]]) -> str:
    lines = [f"# Curriculum experiment ({', '.join(result['datasets'])}; seeds {result['seeds']}; {result['embedder']})", "",
             "Held-out groups; mean over datasets and seeds (± std). Agreement: student argmax within ±1 bin of the "
             "teacher's; difficulty terciles from the teacher's confidence and entropy. Samples to KL: training samples "
             "until validation KL(teacher||student) first reaches 1.25x the best final KL.", "",
             "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
    ad = result["summary"].get("uniform+adaptive_teaching", {}).get("adaptive")
    if ad:
        lines += ["", f"Adaptive teaching (first run): agreement rate {ad['agreement_rate']:.3f}, cumulative reward "
                  f"{ad['cumulative_reward']:.0f}, transfer rate {ad['transfer_rate_per_1k']:.4f} agreement per 1k samples."]
    lines += ["", "![curricula](curricula.png)", ""]
    return "\n".join(lines)


def _plot(summary: dict[str, dict[str, Any]], curves: dict[str, dict[str, list[float]]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    vs = list(summary)
    axes[0].bar(range(len(vs)), [summary[v]["student_spearman"][0] for v in vs],
                yerr=[summary[v]["student_spearman"][1] for v in vs], color="tab:blue")
    axes[0].set_xticks(range(len(vs)), vs, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("held-out Spearman (student)")
    for key, c in curves.items():
        if key.startswith(names[0] + "/"):
            axes[1].plot(c["samples"], c["val_kl"], label=key.split("/", 1)[1])
    axes[1].set_xlabel("training samples")
    axes[1].set_ylabel("validation KL(teacher||student)")
    axes[1].set_yscale("log")
    axes[1].set_title(names[0])
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@_keeps_callers_rng
def run_router_experiment(data_dir: str | Path | None = None, *, seeds: list[int] | tuple[int, ...] = (0, 1, 2),
                          cheap: str = "Llama-2-7B", strong: str = "gpt-3.5", embedder: Embedder | None = None,
                          cost_cheap: float = 1.0, cost_strong: float = 10.0) -> dict[str, Any]:
    """Route FireAct questions between a cheap and a strong agent by a student trained on the cheap one."""
    base = find_data_dir(data_dir)
    if base is None or not (base / DATASETS["fireact"]).exists():
        raise FileNotFoundError(f"FireAct data ({DATASETS['fireact']}) not found in "
                                f"{repr(str(data_dir)) if data_dir else '../shared/data'}")
    recs = list(iter_records(base / DATASETS["fireact"]))
    by_q: dict[str, dict[str, float]] = {}
    text: dict[str, str] = {}
    for r in recs:
        who = "cheap" if r["agent"].startswith(cheap) else "strong" if r["agent"].startswith(strong) else None
        if who:
            by_q.setdefault(r["group"], {})[who] = float(r["reward"])
            text[r["group"]] = r["instruction"]
    qs = sorted(q for q, v in by_q.items() if "cheap" in v and "strong" in v)
    emb = embedder or HashingEmbedder(dim=512)
    X = emb.embed([text[q] for q in qs])
    c = np.array([by_q[q]["cheap"] for q in qs], np.float32)
    s = np.array([by_q[q]["strong"] for q in qs], np.float32)
    curves, aucs = [], []
    cfg = JobConfig(teacher=TeacherConfig(hidden=(256, 128), epochs=40), distill=DistillConfig(hidden=(64,), epochs=40))
    for seed in seeds:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(qs))
        n_test = len(qs) // 4
        te, rest = perm[:n_test], perm[n_test:]
        va, tr = rest[: len(rest) // 6], rest[len(rest) // 6 :]
        bins = RewardBins(0.0, 1.0, 64)
        Xt = torch.from_numpy(X)
        Y = torch.from_numpy(bins.targets(c, "hl_gauss"))
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        teacher = build_teacher(cfg.teacher, X.shape[1], 64)
        trt, vat = torch.from_numpy(tr), torch.from_numpy(va)
        train_teacher(teacher, Xt[trt], Y[trt], Xt[vat], Y[vat], cfg.teacher, generator=gen)
        student = build_student(cfg.distill, X.shape[1], 64)
        distill(student, Xt[trt], teacher_logits(teacher, Xt[trt]), Y[trt], torch.ones(len(tr), dtype=torch.bool),
                (Xt[vat], teacher_logits(teacher, Xt[vat]), Y[vat], torch.ones(len(va), dtype=torch.bool)), cfg.distill,
                generator=gen)
        with torch.no_grad():
            pred = (torch.softmax(student(Xt[torch.from_numpy(te)]), -1).numpy() @ bins.centers)
        pts = routing_curve(pred, c[te], s[te], cost_cheap=cost_cheap, cost_strong=cost_strong,
                            thresholds=np.quantile(pred, np.linspace(0, 1, 11)[::-1]))
        rand = routing_curve(rng.random(len(te)), c[te], s[te], cost_cheap=cost_cheap, cost_strong=cost_strong,
                             thresholds=np.linspace(1, 0, 11))
        curves.append({"seed": seed, "student": [p.to_dict() for p in pts], "random": [p.to_dict() for p in rand]})
        aucs.append((_auc(pts), _auc(rand)))
    return {"n_questions": len(qs), "cheap": cheap, "strong": strong, "cost": [cost_cheap, cost_strong],
            "always_cheap_quality": float(c.mean()), "always_strong_quality": float(s.mean()),
            "quality_cost_auc_student": float(np.mean([a for a, _ in aucs])),
            "quality_cost_auc_random": float(np.mean([b for _, b in aucs])), "curves": curves}


def _auc(points: list[Any]) -> float:
    """Area under quality vs cheap-fraction (higher: more quality kept for the same saving)."""
    xs = np.array([p.cheap_fraction for p in points])
    ys = np.array([p.quality for p in points])
    o = np.argsort(xs)
    xs, ys = xs[o], ys[o]
    return float(((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2).sum())
