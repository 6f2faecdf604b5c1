"""PNG reports in the run directory, without W&B: training curves and accuracy before/after.

    python -m stepdpo.plots outputs/2026-01-31/12-00-00      (re-draw the plots of a finished run)

Reads what every run writes anyway (metrics.jsonl, eval.json, histograms.jsonl) and draws with
matplotlib's Agg canvas (no display, no global pyplot state), writing each PNG atomically.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

CURVES = ("loss", "rewards/margin", "rewards/accuracy")  # one panel each; a line per stage (sft, dpo, ...)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def stage_series(rows: list[dict], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """{stage: (steps, values)} for every logged key `<stage>/<metric>` (e.g. sft/loss, dpo/loss)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        for k, v in r.items():
            stage, _, rest = k.partition("/")
            if rest == metric and stage != "eval" and isinstance(v, (int, float)):
                xs, ys = out.setdefault(stage, ([], []))
                xs.append(r["step"])
                ys.append(float(v))
    return out


def _figure(n_panels: int, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * n_panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]


def save_png(fig, path: Path) -> Path:
    """Write atomically: a partly written PNG never replaces a good one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_training_curves(rows: list[dict], path: Path) -> Path | None:
    panels = [(m, stage_series(rows, m)) for m in CURVES]
    panels = [(m, s) for m, s in panels if s]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (metric, series) in zip(axes, panels):
        for stage, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=stage)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_accuracy(results: dict[str, dict], rows: list[dict], path: Path) -> Path | None:
    """Bars: before vs after (acc and any maj@k); line: acc at every evaluation over training steps."""
    evals = sorted((r["step"], k.split("/")[1], r[k]) for r in rows for k in r
                   if k.startswith("eval/") and k.endswith("/acc") and k.count("/") == 2)
    if not results and not evals:
        return None
    stages = list(results)
    metrics = [m for m in ("acc", *sorted({k for s in results.values() for k in s if k.startswith("maj@")}))
               if any(m in results[s] for s in stages)]
    fig, axes = _figure(2 if len(evals) > 1 else 1)
    ax = axes[0]
    width = 0.8 / max(1, len(stages))
    for i, stage in enumerate(stages):
        xs = [j + i * width for j in range(len(metrics))]
        ys = [float(results[stage].get(m, 0.0)) for m in metrics]
        bars = ax.bar(xs, ys, width=width, label=f"{stage} (n={results[stage].get('n', '?')})")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks([j + width * (len(stages) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylim(0, 1.05)
    ax.set_title("held-out accuracy")
    if stages:
        ax.legend(fontsize=8)
    if len(evals) > 1:
        ax = axes[1]
        ax.plot([e[0] for e in evals], [e[2] for e in evals], marker="o")
        for step, stage, acc in evals:
            ax.annotate(stage, (step, acc), fontsize=7, textcoords="offset points", xytext=(0, 4))
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("step")
        ax.set_title("accuracy during training")
        ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_histograms(hists: list[dict], path: Path) -> Path | None:
    """The last logged histogram of each name (histograms.jsonl), e.g. pairs/token_weights."""
    last = {h["name"]: h for h in hists}
    if not last:
        return None
    fig, axes = _figure(len(last))
    for ax, (name, h) in zip(axes, last.items()):
        e = h["edges"]
        ax.stairs(h["counts"], e, fill=True)
        ax.set_title(f"{name} (step {h['step']}, n={h['n']})", fontsize=9)
    return save_png(fig, path)


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write training_curves.png, accuracy.png and histograms.png (those with data) into run_dir."""
    d = Path(run_dir)
    rows = read_metrics(d / "metrics.jsonl")
    results = json.loads((d / "eval.json").read_text()) if (d / "eval.json").exists() else {}
    written = [plot_training_curves(rows, d / "training_curves.png"),
               plot_accuracy(results, rows, d / "accuracy.png"),
               plot_histograms(read_metrics(d / "histograms.jsonl"), d / "histograms.png")]
    return [p for p in written if p is not None]


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m stepdpo.plots RUN_DIR")
    for p in plot_run(sys.argv[1]):
        print(p)
