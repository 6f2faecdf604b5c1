"""torchrun / DDP on CPU (gloo): 2 processes trace the loss curve of 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import conftest
from conftest import FAST, ROOT, TINY, Recorder, cfg, lora_model, make_examples, run_cli
from stepdpo.train import train
from stepdpo.model import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent
# not rewards/accuracy: a threshold at 0 that float noise flips while the policy still equals the reference
KEYS = ("loss", "grad_norm", "rewards/margin", "rewards/chosen", "tokens/nonpad", "tokens/weighted_chosen")
HIST_KEYS = ("margins/pair", "margins/first_error_step")

WORKER = textwrap.dedent('''
    import json, sys, torch
    torch.set_num_threads(1)
    from stepdpo import distributed
    from stepdpo.train import train
    from stepdpo.model import tiny_llama
    from conftest import Recorder, cfg, lora_model, make_examples, TINY

    out, cache = sys.argv[1], sys.argv[2]
    rank, world = distributed.init()
    assert world == 2, world
    res = {}
    for name, kw in (("dpo", dict(batch_size=2, grad_accum=2)),
                     ("precompute", dict(batch_size=4, precompute_ref=True, ref_cache_dir=cache))):
        policy, ref, tok = lora_model()
        rec = Recorder()
        train(cfg(max_steps=3, **kw), policy, tok, make_examples(24), rec, ref_model=ref)
        res[name] = {"rows": [m for _, m in rec.rows],
                     "params": {n: p.detach().tolist() for n, p in policy.named_parameters() if p.requires_grad}}
    torch.manual_seed(0)
    model, tok = tiny_llama(**TINY)
    rec = Recorder()
    train(cfg(loss="sft", max_steps=2, batch_size=4), model, tok, make_examples(24), rec)
    res["sft"] = {"rows": [m for _, m in rec.rows], "params": {"lm_head": model.lm_head.weight.detach().tolist()}}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(res, f)
    distributed.exit_worker()
''')


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**conftest.test_env(), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def close(a: dict, b: dict, prefix: str, rel: float = 1e-5) -> None:
    for k in KEYS:
        key = f"{prefix}/{k}"
        if key in a:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), key
    for k in HIST_KEYS:  # per-pair values gathered from every rank: the same pairs, any order
        key = f"{prefix}/{k}"
        assert (key in a) == (key in b), key
        if key in a:
            assert len(a[key]) == len(b[key]) > 0, key
            assert sorted(a[key]) == pytest.approx(sorted(b[key]), rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun(str(script), str(tmp_path), str(tmp_path / "cache"))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["dpo"]["params"] == r1["dpo"]["params"]  # DDP keeps the replicas identical

    one = {}  # the same global batches, one process: 8 pairs as 2 x 4; 8 as 1 x 8; SFT 8 examples
    for name, kw in (("dpo", dict(batch_size=4, grad_accum=2)),
                     ("precompute", dict(batch_size=8, precompute_ref=True, ref_cache_dir=str(tmp_path / "cache1")))):
        policy, ref, tok = lora_model()
        rec = Recorder()
        train(cfg(max_steps=3, **kw), policy, tok, make_examples(24), rec, ref_model=ref)
        one[name] = ([m for _, m in rec.rows], {n: p.detach() for n, p in policy.named_parameters() if p.requires_grad})
    torch.manual_seed(0)
    model, tok = tiny_llama(**TINY)
    rec = Recorder()
    train(cfg(loss="sft", max_steps=2, batch_size=8), model, tok, make_examples(24), rec)
    one["sft"] = ([m for _, m in rec.rows], {"lm_head": model.lm_head.weight.detach()})

    for name in ("dpo", "precompute", "sft"):
        rows, params = one[name]
        assert len(rows) == len(r0[name]["rows"])
        for a, b in zip(rows, r0[name]["rows"]):
            close(a, b, "train")
        for n, p in params.items():
            torch.testing.assert_close(torch.tensor(r0[name]["params"][n]), p, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~20 s on an idle 2-core box, 45 s+ on a busy one
@pytest.mark.parametrize("ref_update", ["fixed", "round"])
def test_torchrun_cli_matches_one_process(tmp_path, monkeypatch, ref_update):
    """`torchrun --nproc_per_node=2 -m stepdpo.run` end to end (gloo): the DPO losses of a 2 x 2-pair
    run equal a 1 x 4-pair run's; rank 0 alone writes the run dir. Both precompute the reference
    log-probs into one cache: the second run (both its ranks) loads the first run's file. Two on-policy
    rounds: rank 0 samples round 1's pairs from the trained policy, every rank trains on them. With
    trainer.ref_update=round every rank computes round 1's reference from its (synchronised) policy."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("STEPDPO_CACHE_DIR", str(tmp_path / "cache"))
    over = ["sft.max_steps=0", "trainer.max_steps=4", "eval.n=4", "eval.max_new_tokens=16", "eval.before=false",
            "trainer.precompute_ref=true", "trainer.rounds=2", f"trainer.ref_update={ref_update}"]
    _, one = run_cli(tmp_path / "one", *over, "trainer.batch_size=4")
    two = tmp_path / "two"
    torchrun("-m", "stepdpo.run", f"hydra.run.dir={two}", *FAST, *over, "trainer.batch_size=2")

    def dpo(run: Path) -> list[dict]:
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "dpo/loss" in r]

    a, b = dpo(one), dpo(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 4
    for x, y in zip(a, b):
        close(x, y, "dpo")
    assert (two / "adapter" / "adapter_model.safetensors").exists() and (two / "eval.json").exists()
    assert json.loads((two / "eval.json").read_text())["after"]["n"] == 4
    assert (one / "pairs_round1.jsonl").read_text() == (two / "pairs_round1.jsonl").read_text()
    # one file per precomputed round, shared by both runs (a policy reference is never written to disk)
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.pt"))) == (2 if ref_update == "fixed" else 1)


EXIT_SCRIPT = textwrap.dedent('''
    import logging, sys
    from stepdpo import distributed
    logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
    logging.getLogger("t").info("logged before the exit")
    sys.stdout.write("printed, no newline, still buffered")
    distributed.exit_worker()
    print("|after exit_worker")
''')


@pytest.mark.parametrize("world", ["1", "2"])
def test_exit_worker_ends_a_torchrun_worker_with_its_output_flushed(tmp_path, world):
    """Under torchrun (WORLD_SIZE > 1) `exit_worker` ends the process at once with exit code 0, after
    flushing stdout (os._exit alone drops a block-buffered pipe's contents) and closing the logging
    handlers; without torchrun it returns and the program goes on."""
    env = {**conftest.test_env(), "WORLD_SIZE": world,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONUNBUFFERED", None)  # a pipe is block-buffered, as under torchrun
    log = tmp_path / "run.log"
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(log)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "logged before the exit" in log.read_text()
    assert proc.stdout.startswith("printed, no newline, still buffered")
    assert proc.stdout.endswith("|after exit_worker\n") == (world == "1")
