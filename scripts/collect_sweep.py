"""Summarise Hydra multiruns of `stepdpo.run`: mean ± std over seeds for every other setting.

    python scripts/collect_sweep.py outputs/multirun/2026-01-31/12-00-00
    python scripts/collect_sweep.py SWEEP_DIR --pool seed --pool dataset.seed --metric after/acc
    python scripts/collect_sweep.py SWEEP_A SWEEP_B --out results --vs trainer=dpo --vs trainer=sft_control

Reads each job's `.hydra/overrides.yaml` and `eval.json` (jobs without eval.json are listed as
failed), groups jobs by their overrides minus the pooled keys (default: `seed`), and
- prints a markdown table (one row per group; columns: the overrides that vary, seeds, then
  mean ± std of before/after accuracy, maj@k if evaluated, and the per-seed gain after - before);
- with --vs KEY=VALUE (repeatable; several keys in one quoted argument narrow the match), a
  paired table against that baseline group: for every other group, the per-seed difference of
  --metric over the seeds both have, its mean ± std, standard error, and on how many seeds it
  is ahead / behind / level. Arms that start from the same SFT warm-up per seed (the experiment)
  differ by much less than their spread over seeds, which only a paired comparison shows;
- writes sweep_results.{md,csv,json} and sweep_results.png (after-accuracy per group, error
  bars = std over seeds, before-accuracy as a marker) into SWEEP_DIR (or --out; required when
  several sweeps are pooled, e.g. seeds 0-2 and 3-5 run as two multiruns).
A setting seen twice for the same seed (a sweep passed twice, or a re-run) is an error.
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


def load_jobs(sweep_dir: Path, root: Path | None = None) -> list[dict]:
    """One dict per job dir below sweep_dir: {dir (relative to root, default sweep_dir), overrides: {key: value},
    metrics: {stage/metric: x} | None}."""
    jobs = []
    root = root or sweep_dir
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
        jobs.append({"dir": str(job_dir.relative_to(root)), "overrides": overrides, "metrics": metrics})
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
                                                          "by_seed": {}})
        pooled = ",".join(f"{k}={j['overrides'][k]}" for k in pool if k in j["overrides"]) or j["dir"]
        if j["metrics"] is None:
            g["failed"].append(j["dir"])
            continue
        if pooled in g["seeds"]:
            other = g["jobs"][g["seeds"].index(pooled)]
            raise ValueError(f"jobs {other} and {j['dir']} both ran {pooled} with the same settings "
                             f"({settings or 'no varying overrides'}); pass each sweep once, or move the re-run out")
        g["seeds"].append(pooled)
        g["jobs"].append(j["dir"])
        for m, v in j["metrics"].items():
            g["by_seed"].setdefault(m, {})[pooled] = v  # {metric: {pooled seed label: value}}, in job order
    out = sorted(groups.values(), key=lambda g: [_sort_key(v) for v in g["settings"].values()])
    for g in out:
        g["values"] = {m: list(by.values()) for m, by in g["by_seed"].items()}
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


TIE = 1e-9  # |difference| below this is level (accuracies are k/n; gains differ by float rounding)


def _matches(value: str, want: str) -> bool:
    if value == want:
        return True
    try:
        return float(value) == float(want)  # 3e-3 == 0.003 == 3.0e-3
    except ValueError:
        return False


def parse_selector(text: str) -> dict[str, str]:
    """'trainer=dpo trainer.lr=3e-3' -> {key: value}."""
    sel = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--vs {text!r}: {item!r} is not KEY=VALUE (e.g. --vs trainer=dpo)")
        sel[key] = value
    if not sel:
        raise ValueError("--vs needs KEY=VALUE, e.g. --vs trainer=dpo")
    return sel


def paired(groups: list[dict], selector: dict[str, str], metric: str) -> dict:
    """Every group against the one group `selector` picks, seed by seed on `metric`.
    Returns {baseline: settings, metric, rows: [{settings, n, diffs: {seed: d}, mean, std, se, ahead, behind, level}]}."""
    desc = " ".join(f"{k}={v}" for k, v in selector.items())
    varying = list(groups[0]["settings"]) if groups else []
    unknown = [k for k in selector if k not in varying]
    if unknown:
        raise ValueError(f"--vs {desc}: {', '.join(unknown)} does not vary across these jobs "
                         f"(varying: {', '.join(varying) or 'none'})")
    base = [g for g in groups if all(_matches(g["settings"][k], v) for k, v in selector.items())]
    if len(base) != 1:
        found = "; ".join(" ".join(f"{k}={v}" for k, v in g["settings"].items()) for g in base)
        raise ValueError(f"--vs {desc}: matches {len(base)} groups{' (' + found + ')' if found else ''}; "
                         "name one group, e.g. add more KEY=VALUE in the same quoted argument")
    base = base[0]
    ref = base["by_seed"].get(metric, {})
    rows = []
    for g in groups:
        if g is base:
            continue
        mine = g["by_seed"].get(metric, {})
        common = sorted(set(mine) & set(ref), key=lambda s: [_sort_key(x) for x in s.split(",")])
        diffs = {s: mine[s] - ref[s] for s in common}
        d = list(diffs.values())
        std = statistics.stdev(d) if len(d) > 1 else 0.0
        rows.append({"settings": g["settings"], "n": len(d), "diffs": diffs,
                     "mean": statistics.fmean(d) if d else math.nan, "std": std,
                     "se": std / math.sqrt(len(d)) if len(d) > 1 else math.nan,
                     "ahead": sum(x > TIE for x in d), "behind": sum(x < -TIE for x in d),
                     "level": sum(abs(x) <= TIE for x in d)})
    return {"baseline": base["settings"], "selector": selector, "metric": metric, "rows": rows}


def _seed_label(pooled: str) -> str:
    """'seed=3' -> '3'; 'seed=3,dataset.seed=1' -> '3,1' (the pooled values, in --pool order)."""
    return ",".join(part.partition("=")[2] or part for part in pooled.split(","))


def paired_markdown(varying: list[str], comp: dict) -> str:
    desc = " ".join(f"{k}={v}" for k, v in comp["selector"].items())
    head = (varying or ["setting"]) + ["seeds", f"{comp['metric']} − baseline", "std err", "ahead / behind / level",
                                       "per seed"]
    lines = [f"Paired per seed vs {desc} ({comp['metric']}):", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in comp["rows"]:
        cells = list(r["settings"].values()) or ["(all jobs)"]
        if r["n"] == 0:
            cells += ["0", "—", "—", "—", "no seed in common"]
        else:
            cells += [str(r["n"]), f"{r['mean']:+.4f} ± {r['std']:.4f}", "—" if math.isnan(r["se"]) else f"{r['se']:.4f}",
                      f"{r['ahead']} / {r['behind']} / {r['level']}",
                      " / ".join(f"{_seed_label(s)}: {d:+.4f}" for s, d in r["diffs"].items())]
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


def collect(sweep_dir: Path | list[Path], out_dir: Path | None = None, pool: tuple[str, ...] = ("seed",),
            metric: str = "after/acc", vs: list[str] = ()) -> dict:
    """Everything the CLI does; returns the JSON written (varying keys, metrics, groups, paired comparisons).
    sweep_dir: one multirun dir, or several whose jobs are pooled (then out_dir is required)."""
    dirs = [Path(d) for d in (sweep_dir if isinstance(sweep_dir, (list, tuple)) else [sweep_dir])]
    if len(dirs) > 1 and out_dir is None:
        raise ValueError(f"{len(dirs)} sweep dirs: pass --out DIR for the pooled results")
    multi = len(dirs) > 1  # job dirs are then named relative to the sweeps' common parent
    root = Path(os.path.commonpath([d.resolve() for d in dirs])) if multi else None
    out_dir = Path(out_dir or dirs[0])
    jobs = []
    for d in dirs:
        found = load_jobs(d.resolve() if multi else d, root)
        if not found:
            raise ValueError(f"{d}: no job directories (.hydra/overrides.yaml) found; is this a multirun sweep dir?")
        jobs += found
    seen = {m for j in jobs if j["metrics"] for m in j["metrics"]}
    if seen and metric not in seen:
        raise ValueError(f"--metric {metric}: no job has it (e.g. after/acc, gain/acc, after/maj@8)")
    selectors = [parse_selector(v) for v in vs]  # bad --vs fails before anything is written
    varying, groups = group_jobs(jobs, pool)
    comps = [paired(groups, sel, metric) for sel in selectors]
    metrics = table_metrics(groups)
    md = markdown(varying, groups, metrics) + "".join("\n" + paired_markdown(varying, c) for c in comps)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"sweep_dir": str(dirs[0]) if len(dirs) == 1 else [str(d) for d in dirs], "pooled": list(pool),
              "varying": varying, "metrics": metrics,
              "n_jobs": len(jobs), "n_failed": sum(len(g["failed"]) for g in groups),
              "groups": [{k: g[k] for k in ("settings", "seeds", "jobs", "failed", "values", "stats")} for g in groups],
              "paired": comps}
    atomic_write(out_dir / "sweep_results.md", md)
    atomic_write(out_dir / "sweep_results.csv", to_csv(varying, groups))
    atomic_write(out_dir / "sweep_results.json", json.dumps(result, indent=2))
    plot(groups, metric, out_dir / "sweep_results.png")
    result["markdown"] = md
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, nargs="+",
                    help="Hydra multirun dir(s), e.g. outputs/multirun/2026-01-31/12-00-00; several are pooled")
    ap.add_argument("--pool", action="append", help="override key to average over (repeatable; default: seed)")
    ap.add_argument("--metric", default="after/acc", help="metric for the plot and --vs (stage/name, e.g. after/maj@8, gain/acc)")
    ap.add_argument("--out", type=Path, help="where to write sweep_results.* (default: the sweep dir; required for several)")
    ap.add_argument("--vs", action="append", default=[], metavar="KEY=VALUE",
                    help="baseline group for per-seed paired differences of --metric (repeatable), e.g. trainer=dpo")
    args = ap.parse_args(argv)
    for d in args.sweep_dir:
        if not d.is_dir():
            ap.error(f"{d} is not a directory")
    try:
        res = collect(args.sweep_dir, args.out, tuple(args.pool or ["seed"]), args.metric, args.vs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["markdown"], end="")
    out = args.out or args.sweep_dir[0]
    print(f"\n{res['n_jobs']} jobs ({res['n_failed']} failed) -> {out}/sweep_results.{{md,csv,json,png}}")
    for d in args.sweep_dir:
        best = d / "optimization_results.yaml"  # Optuna sweeper
        if best.exists():
            print(f"optuna: {best}\n{best.read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
