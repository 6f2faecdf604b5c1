"""Shared test helpers and fixtures: test files import helpers from here (`from conftest import ...`),
never from each other.

- `compose_config(*overrides)`: the real `conf/` composed in-process (Hydra's compose API), no run.
- `FAST` are the overrides that make a whole `python -m stepdpo.run` take seconds on a CPU: tiny model, few
  problems, a couple of optimizer steps. `run_cli(tmp_path, *overrides)` runs the real entrypoint in a
  subprocess (Hydra, config groups and all) and returns (CompletedProcess, run_dir). A test that calls it (or
  any other subprocess that runs a pipeline) is marked `@pytest.mark.slow`: `pytest -m "not slow"` is the
  fast loop, CI runs everything.
- `TINY`, `lora_model`, `make_examples`, `cfg`, `Recorder`, `token_span_pairs`: a tiny Llama with a LoRA
  adapter, random preference examples, a TrainerConfig and a metrics recorder for calling `train()` directly.
- `one_thread` (opt in with `pytestmark = pytest.mark.usefixtures("one_thread")` or as an argument): torch and
  OpenMP at one thread.

Tests never touch the network: W&B runs offline, the judge talks to a local server.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

FAST = [
    "dataset.n_train=64", "dataset.n_eval=16",
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=2",
    "sft.max_steps=20", "sft.log_every=5", "sft.batch_size=16",
    "trainer.max_steps=2", "trainer.log_every=1", "trainer.batch_size=4", "trainer.rounds=1",
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
    env = test_env()  # caches (rollout values, reference log-probs) stay in the run's dir unless the test shares one
    if env.get("STEPDPO_CACHE_DIR") in (None, _PER_TEST_CACHE.get("dir")):
        env["STEPDPO_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"stepdpo.run failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc, (tmp_path / "sweep" if multirun else run_dir)


_PER_TEST_CACHE: dict = {}  # the cache dir _offline gave the current test (run_cli gives each run dir its own)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    for k, v in test_env().items():
        if k.startswith(("WANDB", "HF_", "TRANSFORMERS", "TOKENIZERS")):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # every cache (stepdpo/cache.py) in a fresh dir per test: a developer's sweep cache never reaches a test, and no
    # test writes into the repo's .cache or another test's
    _PER_TEST_CACHE["dir"] = str(tmp_path_factory.mktemp("cache"))
    monkeypatch.setenv("STEPDPO_CACHE_DIR", _PER_TEST_CACHE["dir"])


@pytest.fixture(scope="module")
def tiny():
    """A small random Llama with the character tokenizer (model, tokenizer), built once per module, one thread."""
    from stepdpo.model import tiny_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest and avoids contention on shared CPUs
    torch.manual_seed(0)
    model, tok = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    yield model, tok
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models gain nothing from threads, and on a shared 2-core box OpenMP threads waiting for
    each other make them several times slower. OMP_NUM_THREADS=1 reaches the subprocesses a test starts."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the config, in-process


def compose_config(*overrides: str, hydra: bool = False):
    """conf/config.yaml composed with `overrides` (as on the command line, without -m), as `run` would see it.
    hydra=True keeps the `hydra` node (launcher, sweeper, runtime.choices)."""
    from hydra import compose, initialize_config_dir

    from stepdpo.config import register_configs

    register_configs()  # the typed schema conf/config.yaml's defaults name
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


# ----------------------------------------------------------------------------- train() without the CLI

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


class Recorder:
    """A tracker that keeps every logged row: [(step, metrics)]."""

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def make_examples(n: int, seed: int = 0, vocab: int = 90):
    """n random encoded pairs (prompt, chosen, rejected ids ending in EOS id 2; 0/1 token weights)."""
    from stepdpo.batching import Example

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [1] + [rng.randrange(4, vocab) for _ in range(rng.randrange(2, 9))]
        c = [rng.randrange(4, vocab) for _ in range(rng.randrange(2, 10))] + [2]
        r = [rng.randrange(4, vocab) for _ in range(rng.randrange(2, 10))] + [2]
        cw = [rng.choice([0.0, 1.0]) for _ in c]
        rw = [rng.choice([0.0, 1.0]) for _ in r]
        out.append(Example(p, c, r, cw, rw, [float(w) for w in cw], [float(w) for w in rw]))
    return out


def lora_model(seed: int = 0, lora_seed: int | None = None):
    """(policy, ref, tokenizer): a tiny Llama (TINY) with a r=4 LoRA adapter; ref is None (adapter disabled)."""
    from stepdpo.model import LoraSpec, add_lora, tiny_llama

    torch.manual_seed(seed)
    model, tok = tiny_llama(**TINY)
    if lora_seed is not None:
        torch.manual_seed(lora_seed)
    policy, ref = add_lora(model, LoraSpec(name="lora", r=4, alpha=8))
    return policy, ref, tok


def cfg(**kw):
    """A TrainerConfig for tests: 3 steps of 4 pairs at lr 1e-2 on the CPU, no warm-up, no NLL anchor."""
    from stepdpo.config import TrainerConfig

    base = dict(max_steps=3, batch_size=4, log_every=1, lr=1e-2, device="cpu", warmup_steps=0, nll_alpha=0.0)
    base.update(kw)
    return TrainerConfig(**base)


def token_span_pairs(tok, n: int = 6):
    """n encoded arith pairs whose first rejected step is wrong (a miscopied operand or a wrong result),
    weighted first_error with error_span=token: one weighted token per side."""
    from stepdpo.batching import encode_pair
    from stepdpo.data import StepPair

    pairs = []
    for i in range(n):
        a, b = 10 + i, 1 + i % 4
        wrong_operand = i % 2 == 0  # "13 - 7 = 6" for "13 - 4 = 9"; else a wrong result "13 - 4 = 8"
        rej = f"{a} - {b + 2} = {a - b - 2}" if wrong_operand else f"{a} - {b} = {a - b + 1}"
        pairs.append(StepPair(id=str(i), question=f"Start with {a}, subtract {b}, subtract 1. What is the result?",
                              answer=str(a - b - 1), prefix=[] if i % 3 else [f"{a} - 0 = {a}"],
                              chosen=[f"{a} - {b} = {a - b}", f"{a - b} - 1 = {a - b - 1}", f"The answer is {a - b - 1}"],
                              rejected=[rej, "x - 1 = y", "The answer is y"],
                              chosen_scores=[1.0, 1.0, 1.0], rejected_scores=[0.0, 1.0, 1.0]))
    return [encode_pair(p, tok, weighting="first_error", weighting_kwargs={"error_span": "token"}) for p in pairs]
