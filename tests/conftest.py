"""Shared test helpers.

`FAST` are the overrides that make a whole `python -m stepdpo.run` take seconds on a CPU:
tiny model, few problems, a couple of optimizer steps. `run_cli(tmp_path, *overrides)` runs the
real entrypoint in a subprocess (Hydra, config groups and all) and returns (CompletedProcess,
run_dir). Tests never touch the network: W&B runs offline, the judge talks to a local server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

FAST = [
    "dataset.n_train=64", "dataset.n_eval=16",
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=2",
    "sft.max_steps=20", "sft.log_every=5", "sft.batch_size=16",
    "trainer.max_steps=2", "trainer.log_every=1", "trainer.batch_size=4",
    "pairs.n_problems=8", "pairs.k=2", "pairs.min_pairs=16", "pairs.max_new_tokens=48",
    "eval.max_new_tokens=48", "eval.n_samples_saved=4",
]


def arith_solution(p, wrong_at: int | None = None) -> list[str]:
    """The step lines an arith problem's meta implies: the gold solution, or (`wrong_at=i`) one whose
    step i's result is off by one and whose later lines (and answer) keep the value from before step i."""
    from stepdpo.arith import true_values

    v, out = p.meta["start"], []
    for i, ((op, b), new) in enumerate(zip(p.meta["ops"], true_values(p.meta))):
        new = new + 1 if i == wrong_at else new
        out.append(f"{v} {op} {b} = {new}")
        v = new if wrong_at is None or i < wrong_at else v
    return out + [f"The answer is {v}"]


def test_env() -> dict:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HYDRA_FULL_ERROR="1")
    env.pop("OPENAI_API_KEY", None)
    return env


def run_cli(tmp_path: Path, *overrides: str, fast: bool = True, multirun: bool = False, timeout: int = 600,
            check: bool = True) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "stepdpo.run"]
    if multirun:
        args += ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    else:
        args += [f"hydra.run.dir={run_dir}"]
    args += (FAST if fast else []) + list(overrides)
    proc = subprocess.run(args, cwd=ROOT, env=test_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"stepdpo.run failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc, (tmp_path / "sweep" if multirun else run_dir)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in test_env().items():
        if k.startswith(("WANDB", "HF_", "TRANSFORMERS", "TOKENIZERS")):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
