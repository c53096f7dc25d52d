"""Consolidation reports: loss curves + calibration plot (PNG) and a markdown/HTML summary."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["feature_lines", "write_consolidation_report"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def feature_lines(report: Any) -> list[str]:
    """What the student's distribution adds to the base rate, what the models read next to the embedding, and the
    best-of-n ranking head (when the report has them)."""
    lines = []
    ev = getattr(report, "evaluation", None)
    if ev is not None and getattr(ev, "histogram_crps", None) is not None:
        lines.append(f"held-out CRPS: student {ev.student.crps:.4f} vs {ev.histogram_crps:.4f} for the training "
                     "rewards' histogram (the same forecast for every memory; lower is better)")
    mix = getattr(report, "histogram_mix", None)
    if mix is not None:
        if mix.weight:
            lines.append(f"histogram mix: {mix.weight:.2f} of the served distribution is that histogram (validation "
                         f"CRPS {mix.val_crps:.4f} vs {mix.val_crps_student:.4f} for the student alone, {mix.n_val} rows)")
        elif mix.not_tried:
            lines.append(f"histogram mix: none ({mix.not_tried})")
        else:
            lines.append(f"histogram mix: none (the student alone had the lowest validation CRPS, {mix.val_crps:.4f} "
                         f"on {mix.n_val} rows)")
    spec = getattr(report, "features", None)
    if spec is not None:
        meta = "; ".join(f"{k} (number)" if k in spec.numeric else f"{k} ({len(v)} values)" if v
                         else f"{k} (unused: fewer than 2 values)" for k, v in spec.metadata)
        lines.append(f"inputs: embedding{' + 4 text statistics' if spec.text else ''}"
                     + (f"; metadata features: {meta}" if meta else ""))
    rk = getattr(report, "ranking", None)
    if rk is not None:
        if rk.attached:
            held = ("" if rk.holdout_within_spearman is None else
                    f"; held-out groups {rk.holdout_within_spearman:.3f} vs {rk.holdout_within_spearman_mean:.3f}")
            lines.append(f"best-of-n ranking head: {rk.n_groups} groups, head + {rk.weight_mean:.2f} x expected "
                         f"reward; within-group Spearman (head vs expected reward) validation "
                         f"{rk.val_within_spearman:.3f} vs {rk.val_within_spearman_mean:.3f}{held}")
        else:
            lines.append(f"best-of-n ranking head: none ({rk.reason}); best_of_n ranks by expected reward")
    return lines


def write_consolidation_report(report: Any, out_dir: str | Path, *, calibration: dict[str, Any] | None = None,
                               calibration_rows: int | None = None) -> dict[str, Path]:
    """Write ``losses.png``, ``calibration.png`` (if data given), ``report.md`` and ``report.html``.

    ``calibration``: ``{model name: calibration_curve(...)}`` on ``calibration_rows`` held-out memories.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    paths: dict[str, Path] = {}

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    t, d = report.teacher, report.distill
    axes[0].plot(t.train_loss, label="train")
    axes[0].plot(t.val_loss, label="validation")
    axes[0].set_title("teacher cross-entropy")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    axes[1].plot(d.train_loss, label="train distillation loss")
    axes[1].plot(d.val_kl, label="validation KL(teacher||student)")
    axes[1].set_title(f"distillation ({d.curriculum})")
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    fig.tight_layout()
    paths["losses"] = out / "losses.png"
    fig.savefig(paths["losses"], dpi=110)
    plt.close(fig)

    if calibration:
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
        for name, (qs, cov) in calibration.items():
            ax.plot(qs, cov, "o-", label=name)
        ax.set_xlabel("predicted quantile level")
        ax.set_ylabel("fraction of rewards below it")
        ax.set_title("calibration (held-out)")
        ax.legend()
        fig.tight_layout()
        paths["calibration"] = out / "calibration.png"
        fig.savefig(paths["calibration"], dpi=110)
        plt.close(fig)

    ev = report.evaluation
    rows = [("metric", "teacher", "student")]
    for k in ("mae", "spearman", "crps", "nll", "calibration_error", "within_1_bin", "within_3_bins"):
        rows.append((k, f"{getattr(ev.teacher, k):.4f}", f"{getattr(ev.student, k):.4f}"))
    md = [
        f"# Consolidation {report.version}",
        "",
        f"- outcome: **{'promoted' if report.promoted else 'rejected'}** ({report.reason})",
        f"- rows: {report.n_rows} ({report.n_rewarded} rewarded; train {report.n_train}, val {report.n_val}, "
        f"held-out {report.n_holdout}, transfer {report.n_transfer}, skipped {report.skipped_rows})",
        f"- warm start: {report.warm_started}; incumbent: {report.incumbent_version}",
        f"- compression {ev.compression_ratio:.1f}x ({ev.teacher_params:,} -> {ev.student_params:,} params); "
        f"prediction match {ev.prediction_match:.3f}; KL {ev.kl_divergence:.4f}; retention {ev.retention:.3f}",
        f"- student latency {ev.student_latency_ms * 1000:.0f} us/row; run took {report.seconds:.1f}s on {report.device}",
        *(f"- {line}" for line in feature_lines(report)),
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows[1:]),
        "",
        "![losses](losses.png)",
    ]
    if "calibration" in paths:
        if calibration_rows is not None:
            md.append(f"calibration on {calibration_rows} held-out memories (rewarded, not trained on):")
            md.append("")
        md.append("![calibration](calibration.png)")
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(md) + "\n")
    body = "".join(f"<p>{html.escape(line)}</p>" for line in md[2:6])
    table = "<table border=1>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    imgs = "".join(f'<img src="{p.name}">' for k, p in paths.items() if k in ("losses", "calibration"))
    paths["html"] = out / "report.html"
    paths["html"].write_text(f"<html><body><h1>Consolidation {report.version}</h1>{body}{table}{imgs}</body></html>")
    return paths


def calibration_curve(probs: np.ndarray, rewards: np.ndarray, bins: Any) -> tuple[list[float], list[float]]:
    """(quantile levels, fraction of rewards at or below each predicted quantile) for a calibration plot.

    Read from the probability integral transform at bin resolution (:func:`memory_distill.evaluate.pit_coverage`),
    the same reading as ``ModelMetrics.calibration_error``.
    """
    from .evaluate import pit_coverage

    qs = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
    return qs, [float(c) for c in pit_coverage(probs, rewards, bins, qs)]
