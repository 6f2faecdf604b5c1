"""Metric trackers: `logger=jsonl` (local files, no account) and `logger=wandb`.

Both write `metrics.jsonl` in the run directory, so plots and tests never depend on W&B.
Secrets (keys whose name contains key/token/secret/password) are redacted from the logged config.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

SECRET = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)


def redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET.search(str(k)) and v not in (None, "") and not str(k).endswith("_env")
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class JsonlTracker:
    """Appends one JSON object per `log` call to out_dir/metrics.jsonl; summary to summary.json."""

    def __init__(self, out_dir: str, run_config: dict | None = None, **_):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._f = (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self.summary_data: dict[str, Any] = {"git_commit": git_commit()}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._f.write(json.dumps({"step": step, **{k: _num(v) for k, v in metrics.items()}}) + "\n")
        self._f.flush()

    def summary(self, data: dict[str, Any]) -> None:
        self.summary_data.update(data)

    def log_table(self, name: str, rows: list[dict]) -> None:  # tables live in the run dir already
        pass

    def log_histogram(self, name: str, values, step: int) -> None:
        pass

    def log_artifact(self, path: str, name: str, type: str) -> None:
        pass

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class WandbTracker(JsonlTracker):
    """JsonlTracker plus a W&B run (online, offline or disabled). One run per sweep job, grouped."""

    def __init__(self, out_dir: str, run_config: dict | None = None, *, project: str = "stepdpo", entity: str | None = None,
                 mode: str = "offline", group: str | None = None, name: str | None = None, tags: list | None = None,
                 log_model: bool = True, **_):
        super().__init__(out_dir, run_config)
        import wandb

        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode: {mode!r} is not one of online, offline, disabled")
        self.log_model = log_model
        cfg = redact(run_config or {})
        cfg["git_commit"] = self.summary_data["git_commit"]
        self.run = wandb.init(project=project, entity=entity, mode=mode, group=group, name=name,
                              tags=list(tags or []), config=cfg, dir=str(self.out_dir), reinit="finish_previous")
        self._wandb = wandb

    def log(self, metrics: dict[str, Any], step: int) -> None:
        super().log(metrics, step)
        self.run.log({k: _num(v) for k, v in metrics.items()}, step=step)

    def summary(self, data: dict[str, Any]) -> None:
        super().summary(data)
        for k, v in data.items():
            self.run.summary[k] = v

    def log_table(self, name: str, rows: list[dict]) -> None:
        if not rows:
            return
        cols = list(rows[0])
        table = self._wandb.Table(columns=cols, data=[[_cell(r.get(c)) for c in cols] for r in rows])
        self.run.log({name: table})

    def log_histogram(self, name: str, values, step: int) -> None:
        self.run.log({name: self._wandb.Histogram(list(values))}, step=step)

    def log_artifact(self, path: str, name: str, type: str) -> None:
        if not self.log_model:
            return
        art = self._wandb.Artifact(name=name, type=type)
        if os.path.isdir(path):
            art.add_dir(path)
        else:
            art.add_file(path)
        self.run.log_artifact(art)

    def close(self) -> None:
        super().close()
        if getattr(self, "run", None) is not None:
            self.run.finish()
            self.run = None


def _num(v: Any) -> Any:
    try:
        return v.item()  # tensors, numpy scalars
    except AttributeError:
        return v


def _cell(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
