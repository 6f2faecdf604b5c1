"""Summarise a Hydra multirun of `stepdpo.run`: mean ± std over seeds for every other setting.

    python scripts/collect_sweep.py outputs/multirun/2026-01-31/12-00-00
    python scripts/collect_sweep.py SWEEP_DIR --pool seed --pool dataset.seed --metric after/acc

Reads each job's `.hydra/overrides.yaml` and `eval.json` (jobs without eval.json are listed as
failed), groups jobs by their overrides minus the pooled keys (default: `seed`), and
- prints a markdown table (one row per group; columns: the overrides that vary, seeds, then
  mean ± std of before/after accuracy, maj@k if evaluated, and the per-seed gain after - before);
- writes sweep_results.{md,csv,json} and sweep_results.png (after-accuracy per group, error
  bars = std over seeds, before-accuracy as a marker) into SWEEP_DIR (or --out).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

def is_main(name: str) -> bool:
    """Metrics shown in the markdown table: acc and maj@k (per-level/subject ones go to CSV/JSON only)."""
    return name == "acc" or name.startswith("maj@")


def load_jobs(sweep_dir: Path) -> list[dict]:
    """One dict per job dir below sweep_dir: {dir, overrides: {key: value}, metrics: {stage/metric: x} | None}."""
    jobs = []
    for ov_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        job_dir = ov_file.parent.parent
        raw = yaml.safe_load(ov_file.read_text(encoding="utf-8")) or []
        overrides = {}
        for item in raw:
            key, eq, value = str(item).partition("=")
            if not eq:
                raise ValueError(f"{ov_file}: override {item!r} is not key=value")
            overrides[key.lstrip("+~")] = value
        ev = job_dir / "eval.json"
        metrics = None
        if ev.exists():
            data = json.loads(ev.read_text(encoding="utf-8"))
            metrics = {f"{stage}/{k}": float(v) for stage, m in data.items() for k, v in m.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("n", "seconds")}
            if "before/acc" in metrics and "after/acc" in metrics:
                metrics["gain/acc"] = metrics["after/acc"] - metrics["before/acc"]
        jobs.append({"dir": str(job_dir.relative_to(sweep_dir)), "overrides": overrides, "metrics": metrics})
    return jobs


def _sort_key(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def group_jobs(jobs: list[dict], pool: tuple[str, ...] = ("seed",)) -> tuple[list[str], list[dict]]:
    """(varying keys, groups). A group: {settings: {key: value}, seeds: [...], jobs, failed, values: {metric: [x...]}, stats}."""
    keys = sorted({k for j in jobs for k in j["overrides"]} - set(pool))
    varying = [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]
    groups: dict[tuple, dict] = {}
    for j in jobs:
        settings = {k: j["overrides"].get(k, "") for k in varying}
        g = groups.setdefault(tuple(settings.values()), {"settings": settings, "seeds": [], "jobs": [], "failed": [],
                                                          "values": {}})
        pooled = ",".join(f"{k}={j['overrides'][k]}" for k in pool if k in j["overrides"]) or j["dir"]
        if j["metrics"] is None:
            g["failed"].append(j["dir"])
            continue
        g["seeds"].append(pooled)
        g["jobs"].append(j["dir"])
        for m, v in j["metrics"].items():
            g["values"].setdefault(m, []).append(v)
    out = sorted(groups.values(), key=lambda g: [_sort_key(v) for v in g["settings"].values()])
    for g in out:
        g["stats"] = {m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
                      for m, v in g["values"].items()}
    return varying, out


def table_metrics(groups: list[dict]) -> list[str]:
    names = {m for g in groups for m in g["stats"]}
    order = {"before": 0, "after": 1, "gain": 2}
    keep = [m for m in names if is_main(m.split("/", 1)[1]) and m.split("/", 1)[0] in order]
    return sorted(keep, key=lambda m: (order[m.split("/", 1)[0]], m.split("/", 1)[1] != "acc", m))


def markdown(varying: list[str], groups: list[dict], metrics: list[str]) -> str:
    head = (varying or ["setting"]) + ["seeds"] + metrics + (["failed"] if any(g["failed"] for g in groups) else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g in groups:
        cells = list(g["settings"].values()) or ["(all jobs)"]
        cells.append(str(len(g["seeds"])))
        for m in metrics:
            s = g["stats"].get(m)
            cells.append("—" if s is None else f"{s['mean']:.4f} ± {s['std']:.4f}")
        if len(head) > len(cells):
            cells.append(str(len(g["failed"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(varying: list[str], groups: list[dict]) -> str:
    metrics = sorted({m for g in groups for m in g["stats"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(varying + ["n_seeds", "n_failed"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")])
    for g in groups:
        row = list(g["settings"].values()) + [len(g["seeds"]), len(g["failed"])]
        for m in metrics:
            s = g["stats"].get(m)
            row += ["", ""] if s is None else [f"{s['mean']:.6g}", f"{s['std']:.6g}"]
        w.writerow(row)
    return buf.getvalue()


def atomic_write(path: Path, data: str | bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot(groups: list[dict], metric: str, path: Path) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [g for g in groups if metric in g["stats"]]
    if not rows:
        return None
    labels = ["\n".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in g["settings"].items()) or "all" for g in rows]
    fig = Figure(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.6), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(rows))
    ax.bar(xs, [g["stats"][metric]["mean"] for g in rows], yerr=[g["stats"][metric]["std"] for g in rows], capsize=4,
           label=f"{metric} (mean ± std over seeds)")
    before = metric.replace("after/", "before/", 1)
    if before != metric and any(before in g["stats"] for g in rows):
        ax.plot(xs, [g["stats"].get(before, {}).get("mean", math.nan) for g in rows], "k_", markersize=18, label=before)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, max(1.0, max(g["stats"][metric]["mean"] + g["stats"][metric]["std"] for g in rows)) * 1.05)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    canvas.print_png(buf)
    atomic_write(path, buf.getvalue())
    return path


def collect(sweep_dir: Path, out_dir: Path | None = None, pool: tuple[str, ...] = ("seed",),
            metric: str = "after/acc") -> dict:
    """Everything the CLI does; returns the JSON written (varying keys, metrics, groups)."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir or sweep_dir)
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise ValueError(f"{sweep_dir}: no job directories (.hydra/overrides.yaml) found; is this a multirun sweep dir?")
    varying, groups = group_jobs(jobs, pool)
    metrics = table_metrics(groups)
    md = markdown(varying, groups, metrics)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"sweep_dir": str(sweep_dir), "pooled": list(pool), "varying": varying, "metrics": metrics,
              "n_jobs": len(jobs), "n_failed": sum(len(g["failed"]) for g in groups),
              "groups": [{k: g[k] for k in ("settings", "seeds", "jobs", "failed", "values", "stats")} for g in groups]}
    atomic_write(out_dir / "sweep_results.md", md)
    atomic_write(out_dir / "sweep_results.csv", to_csv(varying, groups))
    atomic_write(out_dir / "sweep_results.json", json.dumps(result, indent=2))
    plot(groups, metric, out_dir / "sweep_results.png")
    result["markdown"] = md
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, help="a Hydra multirun dir, e.g. outputs/multirun/2026-01-31/12-00-00")
    ap.add_argument("--pool", action="append", help="override key to average over (repeatable; default: seed)")
    ap.add_argument("--metric", default="after/acc", help="metric for the plot (stage/name, e.g. after/maj@8)")
    ap.add_argument("--out", type=Path, help="where to write sweep_results.* (default: the sweep dir)")
    args = ap.parse_args(argv)
    if not args.sweep_dir.is_dir():
        ap.error(f"{args.sweep_dir} is not a directory")
    try:
        res = collect(args.sweep_dir, args.out, tuple(args.pool or ["seed"]), args.metric)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["markdown"], end="")
    out = args.out or args.sweep_dir
    print(f"\n{res['n_jobs']} jobs ({res['n_failed']} failed) -> {out}/sweep_results.{{md,csv,json,png}}")
    best = args.sweep_dir / "optimization_results.yaml"  # Optuna sweeper
    if best.exists():
        print(f"optuna: {best}\n{best.read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
