"""Metric trackers: `logger=jsonl` (local files, no account) and `logger=wandb`.

Both write `metrics.jsonl` (one line per `log` call) and `histograms.jsonl` in the run directory,
so plots and tests never depend on W&B. The W&B run gets the resolved config with secrets
redacted (`redact`), the git commit, metrics, tables, histograms and the adapter artifact; in a
Hydra multirun its runs share a group (the sweep directory) and are named after their overrides.
`read_wandb_run` decodes an offline run file, to check what a `wandb sync` would upload.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

REDACTED = "<redacted>"
# key names that hold credentials: api_key, openai_api_key, apiKey, hf_token, access_token, password,
# client_secret, authorization... but not max_new_tokens or token_weights
SECRET_KEY = re.compile(r"api[_-]?key|access[_-]?key|private[_-]?key|secret|passw(or)?d|credential|authori[sz]ation"
                        r"|(^|[_.-])(token|auth|key)$", re.IGNORECASE)
# names of that shape that are stepdpo's own settings, not credentials (a PRM's label tokens, the rollout cache's
# name) and tokenizer special tokens: shown as they are
NOT_SECRET_KEY = re.compile(r"positive_token|negative_token|cache_key|(pad|bos|eos|unk|sep|cls|mask)_token(_id)?",
                            re.IGNORECASE)
# values that are credentials whatever their key is called
SECRET_VALUE = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}|\bBearer\s+\S+|\bhf_[A-Za-z0-9]{16,}|\bgh[pousr]_[A-Za-z0-9]{16,}"
                          r"|\bxox[abprs]-\S+|://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)


def is_secret(key: Any, value: Any) -> bool:
    """True if `value` must not leave the machine: a credential-like key (except `*_env`, which names
    an environment variable) with a non-empty value, or a credential-looking string anywhere."""
    if isinstance(value, str) and SECRET_VALUE.search(value):
        return True
    k = str(key)
    if NOT_SECRET_KEY.fullmatch(k):
        return False
    return bool(SECRET_KEY.search(k)) and not k.endswith("_env") and value not in (None, "") \
        and not isinstance(value, (dict, list))


def redact(obj: Any, key: Any = "") -> Any:
    """A copy of `obj` (nested dicts/lists) with every secret value replaced by '<redacted>'."""
    if isinstance(obj, dict):
        return {k: redact(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, key) for v in obj]
    return REDACTED if is_secret(key, obj) else obj


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line arguments with secret override values (`reward.api_key=sk-...`) redacted."""
    out = []
    for a in argv:
        k, eq, v = a.partition("=")
        out.append(f"{k}={REDACTED}" if eq and is_secret(k.split(".")[-1].lstrip("+~"), v)
                   else REDACTED if is_secret("", a) else a)
    return out


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """True if the work tree has uncommitted changes to tracked files (the commit alone doesn't reproduce the run)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out)


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def hydra_job() -> dict[str, Any] | None:
    """The running Hydra job: {'multirun', 'sweep_dir', 'overrides' (the command-line overrides, secrets redacted,
    comma-joined: a sweep job's name), 'choices' (every config group's option, e.g. {'trainer': 'stepdpo', 'arm':
    'dpo'}), 'num'}; None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        h = HydraConfig.get()
        return {"multirun": h.mode == RunMode.MULTIRUN, "sweep_dir": h.sweep.dir,
                "overrides": ",".join(redact_argv(list(h.overrides.task))), "num": h.job.get("num"),
                "choices": {k: v for k, v in dict(h.runtime.choices).items() if not k.startswith("hydra/")}}
    except Exception:  # no Hydra, or a config without hydra.* (tests building trackers directly)
        return None


def sweep_group(sweep_dir: str) -> str:
    """W&B group of a sweep: its directory name; the default `<date>/<time>` layout gives `<date>_<time>`."""
    p = Path(sweep_dir)
    return f"{p.parent.name}_{p.name}" if re.fullmatch(r"[\d_.:-]+", p.name) and p.parent.name else p.name


RUN_ID_FILE = "wandb_run_id"  # in the run dir: the W&B run a resume continues


def read_run_id(run_dir: str | os.PathLike | None) -> str | None:
    """The W&B run id a run directory recorded, or None (no directory, no W&B run, or logger=jsonl)."""
    p = Path(run_dir) / RUN_ID_FILE if run_dir else None
    return (p.read_text().strip() or None) if p is not None and p.exists() else None


class NullTracker:
    """What ranks other than 0 log to (`stepdpo.distributed`): nothing."""

    summary_data: dict = {}

    def log(self, *a, **k) -> None: ...

    def summary(self, *a, **k) -> None: ...

    def log_table(self, *a, **k) -> None: ...

    def log_histogram(self, *a, **k) -> None: ...

    def log_artifact(self, *a, **k) -> None: ...

    def close(self) -> None: ...


class JsonlTracker:
    """Appends one JSON object per `log` call to out_dir/metrics.jsonl; summary to summary.json."""

    def __init__(self, out_dir: str, run_config: dict | None = None, **_):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._f = (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self.summary_data: dict[str, Any] = {"git_commit": git_commit(), "git_dirty": git_dirty()}
        self.step = 0  # last step logged; tables without a step go there

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Scalars go to metrics.jsonl; sequences/tensors (e.g. per-pair margins) become histograms."""
        self.step = max(self.step, step)
        scalars, arrays = _split(metrics)
        self._f.write(json.dumps({"step": step, **scalars}) + "\n")
        self._f.flush()
        for k, v in arrays.items():
            self.log_histogram(k, v, step)

    def summary(self, data: dict[str, Any]) -> None:
        self.summary_data.update(data)

    def log_table(self, name: str, rows: list[dict]) -> None:  # tables live in the run dir already
        pass

    def log_histogram(self, name: str, values, step: int, bins: int = 32) -> None:
        """Appends {step, name, n, mean, std, min, max, counts, edges} to out_dir/histograms.jsonl."""
        v = [float(x) for x in _flat_values(values)]
        if not v:
            return
        lo, hi = min(v), max(v)
        width = (hi - lo) / bins or 1.0
        counts = [0] * bins
        for x in v:
            counts[min(int((x - lo) / width), bins - 1)] += 1
        mean = sum(v) / len(v)
        row = {"step": step, "name": name, "n": len(v), "mean": mean, "std": math.sqrt(sum((x - mean) ** 2 for x in v) / len(v)),
               "min": lo, "max": hi, "counts": counts, "edges": [lo + i * width for i in range(bins + 1)]}
        with (self.out_dir / "histograms.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def log_artifact(self, path: str, name: str, type: str) -> None:
        pass

    def close(self, exit_code: int | None = None) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close(exit_code=None if exc[0] is None else _exit_code(exc[1]))


class WandbTracker(JsonlTracker):
    """JsonlTracker plus a W&B run (online, offline or disabled). One run per sweep job, grouped.

    group: explicit `logger.group`, else (in a Hydra multirun) the sweep directory's name.
    name: explicit `logger.name`, else (in a multirun) the job's overrides, e.g. `seed=1,trainer.beta=0.3`.
    The config carries `hydra.choices` (each group's option: group runs by `+arm`, `trainer`, ...) and
    `hydra.overrides`. `resume_dir`: a run being resumed (trainer.resume); its W&B run (`wandb_run_id` in its
    directory) is continued, not a new one started.
    """

    def __init__(self, out_dir: str, run_config: dict | None = None, *, project: str = "stepdpo", entity: str | None = None,
                 mode: str = "offline", group: str | None = None, name: str | None = None, tags: list | None = None,
                 job_type: str | None = None, log_model: bool = True, resume_dir: str | None = None, **_):
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode: {mode!r} is not one of online, offline, disabled")
        super().__init__(out_dir, run_config)
        import wandb

        self.log_model = log_model
        job = hydra_job()
        if job and job["multirun"]:
            group = group or sweep_group(job["sweep_dir"])
            name = name or job["overrides"] or f"job{job['num']}"
        cfg = redact(run_config or {})
        cfg["git_commit"], cfg["git_dirty"] = self.summary_data["git_commit"], self.summary_data["git_dirty"]
        if job:
            cfg["hydra"] = {"choices": job["choices"], "overrides": job["overrides"]}
        run_id = read_run_id(resume_dir)  # None: a new run
        with _argv(redact_argv(sys.argv)):  # W&B records the command line; keep secrets given as overrides out
            self.run = wandb.init(project=project, entity=entity, mode=mode, group=group, name=name, job_type=job_type,
                                  tags=list(tags or []), config=cfg, dir=str(self.out_dir), reinit="finish_previous",
                                  id=run_id, resume="allow" if run_id else None)
        self._wandb = wandb
        self._stage_axes: set[str] = set()
        if not self.run.disabled:
            from .data import atomic_write_text

            atomic_write_text(self.out_dir / RUN_ID_FILE, self.run.id + "\n")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        super().log(metrics, step)  # histograms of array values are sent from there
        for k in metrics:  # a stage's own step (train.py logs <stage>/step): its metrics' x-axis in the W&B UI
            stage = k[: -len("/step")]
            if k.endswith("/step") and "/" not in stage and stage not in self._stage_axes:
                self.run.define_metric(f"{stage}/*", step_metric=k)
                self._stage_axes.add(stage)
        self.run.log(_split(metrics)[0], step=step)

    def summary(self, data: dict[str, Any]) -> None:
        super().summary(data)
        for k, v in redact(data).items():
            self.run.summary[k] = v

    def log_table(self, name: str, rows: list[dict]) -> None:
        if not rows:
            return
        cols = list(rows[0])
        table = self._wandb.Table(columns=cols, data=[[_cell(r.get(c)) for c in cols] for r in rows])
        self.run.log({name: table}, step=self.step)  # at the last logged step: W&B drops steps that go back

    def log_histogram(self, name: str, values, step: int, bins: int = 32) -> None:
        super().log_histogram(name, values, step, bins)
        v = [float(x) for x in _flat_values(values)]
        if v:
            self.step = max(self.step, step)
            self.run.log({name: self._wandb.Histogram(v, num_bins=bins)}, step=step)

    def log_artifact(self, path: str, name: str, type: str) -> None:
        if not self.log_model or self.run.disabled:  # a disabled run would copy the files for nothing
            return
        run_id = getattr(self.run, "id", None)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-{run_id}" if run_id else name)  # one artifact per run
        art = self._wandb.Artifact(name=name, type=type, metadata={"run_dir": str(self.out_dir),
                                                                   "git_commit": self.summary_data["git_commit"]})
        if os.path.isdir(path):
            art.add_dir(path)
        else:
            art.add_file(path)
        self.run.log_artifact(art)

    def close(self, exit_code: int | None = None) -> None:
        """Finish the W&B run. exit_code None: 1 if an exception is propagating (a `finally:` after a
        failure), else 0; W&B shows a run that finished with a non-zero code as failed."""
        if exit_code is None:
            exit_code = _exit_code(sys.exc_info()[1])
        super().close(exit_code)
        if getattr(self, "run", None) is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)


def _exit_code(exc: BaseException | None) -> int:
    if exc is None:
        return 0
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 1


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    old = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = old


def _flat_values(values) -> list:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().float().cpu().reshape(-1).tolist()
    elif hasattr(values, "ravel"):  # numpy
        values = values.ravel().tolist()
    return [x for x in values if x is not None and math.isfinite(float(x))]


def _split(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scalars, arrays): 0-d tensors and numpy scalars become numbers; lists, tuples and tensors
    or arrays with more than one element are histogram data."""
    scalars, arrays = {}, {}
    for k, v in metrics.items():
        if isinstance(v, (list, tuple)) or (getattr(v, "ndim", 0) > 0 and _numel(v) > 1):
            arrays[k] = v
        else:
            scalars[k] = _num(v)
    return scalars, arrays


def _numel(v: Any) -> int:
    n = v.numel() if hasattr(v, "numel") else v.size
    return int(n() if callable(n) else n)


def _num(v: Any) -> Any:
    try:
        return v.item()  # tensors, numpy scalars
    except AttributeError:
        return v


def _cell(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)


# ---------------------------------------------------------------- reading offline runs back
_BLOCK, _HEADER = 32768, 7  # W&B's run file: LevelDB log format (32 KiB blocks, 7-byte record headers)


def wandb_records(path: str | os.PathLike) -> Iterator[Any]:
    """The protobuf `Record`s of a W&B run file (`run-<id>.wandb`), in order.

    Layout: a 7-byte file header (':W&B', magic, version), then LevelDB log records
    (crc32 uint32, length uint16, type uint8 FULL/FIRST/MIDDLE/LAST, data) that never straddle a
    32 KiB block; a block's last < 7 bytes are zero padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (starts with {data[:4]!r})")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0:  # zero padding / preallocated tail
            pos += left
            continue
        parts.append(data[pos + _HEADER:pos + _HEADER + n])
        pos += _HEADER + n
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def read_wandb_run(path: str | os.PathLike) -> dict[str, Any]:
    """Decode an offline W&B run into plain data, for tests and for checking a run before syncing it.

    path: a `run-<id>.wandb` file, a run directory (`wandb/offline-run-*`), or any directory
    holding exactly one run. Returns {id, project, group, name, tags, config, history (one dict per
    logged step), summary, exit_code (None if the run never finished), args, artifacts}.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("run-*.wandb"))
        if len(files) != 1:
            raise ValueError(f"{p}: expected one run-*.wandb file below it, found {len(files)}")
        p = files[0]
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None, "artifacts": [], "args": None}
    for rec in wandb_records(p):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.update(id=r.run_id, project=r.project, group=r.run_group, name=r.display_name, tags=list(r.tags))
            _apply(run["config"], r.config.update, r.config.remove)
            _apply(run["summary"], r.summary.update, r.summary.remove)
        elif kind == "config":
            _apply(run["config"], rec.config.update, rec.config.remove)
        elif kind == "summary":
            _apply(run["summary"], rec.summary.update, rec.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply(row, rec.history.item, ())
            run["history"].append(row)
        elif kind == "exit":
            run["exit_code"] = rec.exit.exit_code
        elif kind == "environment" and rec.environment.args:
            run["args"] = list(rec.environment.args)
        elif kind == "artifact":
            a = rec.artifact
            run["artifacts"].append({"name": a.name, "type": a.type,
                                     "files": [e.path for e in a.manifest.contents]})
    run["config"].pop("_wandb", None)
    return run


def _apply(target: dict, updates, removes) -> None:
    for item in updates:
        keys = list(item.nested_key) or [item.key]
        if getattr(item, "value_json", ""):
            value = json.loads(item.value_json)
        else:  # typed history values
            which = item.WhichOneof("value") if hasattr(item, "WhichOneof") else None
            value = None if which in (None, "none") else getattr(item, which)
            value = json.loads(value) if which == "json" else value
        d = target
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
    for item in removes:
        keys = list(item.nested_key) or [item.key]
        d = target
        for k in keys[:-1]:
            d = d.get(k, {})
        d.pop(keys[-1], None)
