"""Exact resume: checkpoints are atomic, and losses after a resume equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import conftest
from conftest import FAST, ROOT, TINY, Recorder, cfg, lora_model, make_examples, run_cli
from stepdpo import checkpoint
from stepdpo.model import LoraSpec, add_lora, tiny_llama
from stepdpo.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_from_a_checkpoint_is_bitwise_equal_to_the_uninterrupted_run(tmp_path):
    ex = make_examples(24)  # 6 batches of 4 per epoch: 8 steps cross an epoch boundary
    policy, ref, tok = lora_model()
    full = Recorder()
    train(cfg(max_steps=8, save_every=3, keep_checkpoints=2), policy, tok, ex, full, ref_model=ref,
          ckpt_dir=tmp_path / "a")
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "a")] == ["step_000003", "step_000006"]
    want = {n: p.detach().clone() for n, p in policy.named_parameters()}

    policy2, ref2, _ = lora_model(lora_seed=123)  # another adapter init: the checkpoint must overwrite it
    resumed = Recorder()
    train(cfg(max_steps=8, save_every=3), policy2, tok, ex, resumed, ref_model=ref2, ckpt_dir=tmp_path / "b",
          resume_from=tmp_path / "a" / "step_000003")
    assert [s for s, _ in resumed.rows] == [4, 5, 6, 7, 8]
    for (s, a), (_, b) in zip(full.rows[3:], resumed.rows):
        for k in ("train/loss", "train/grad_norm", "train/lr", "train/rewards/margin", "train/tokens/nonpad"):
            assert a[k] == b[k], (s, k)  # bitwise
    for n, p in policy2.named_parameters():
        assert torch.equal(p, want[n]), n


def test_full_finetune_resume_restores_every_weight(tmp_path):
    def build():
        torch.manual_seed(0)
        model, tok = tiny_llama(**TINY)
        policy, ref = add_lora(model, LoraSpec(name="none"))
        return policy, ref, tok

    ex = make_examples(16)
    policy, ref, tok = build()
    full = Recorder()
    train(cfg(max_steps=4, save_every=2), policy, tok, ex, full, ref_model=ref, ckpt_dir=tmp_path / "a")
    policy2, ref2, _ = build()
    resumed = Recorder()
    train(cfg(max_steps=4), policy2, tok, ex, resumed, ref_model=ref2, resume_from=checkpoint.latest(tmp_path / "a"))
    assert [s for s, _ in resumed.rows] == []  # the newest checkpoint is the last step: nothing left to do
    for n, p in policy2.named_parameters():
        assert torch.equal(p, dict(policy.named_parameters())[n]), n
    # keep_checkpoints=1: only the newest survives
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "a")] == ["step_000004"]


def test_resume_refuses_a_different_global_batch(tmp_path):
    ex = make_examples(16)
    policy, ref, tok = lora_model()
    train(cfg(max_steps=2, save_every=2), policy, tok, ex, Recorder(), ref_model=ref, ckpt_dir=tmp_path)
    policy, ref, tok = lora_model()
    with pytest.raises(ValueError, match="global_batch=4.*this run has 8"):
        train(cfg(max_steps=4, batch_size=8), policy, tok, ex, Recorder(), ref_model=ref,
              resume_from=checkpoint.latest(tmp_path))
    other, _ = tiny_llama(**TINY)
    other, ref_o = add_lora(other, LoraSpec(name="lora", r=8, alpha=8))
    with pytest.raises(ValueError, match="shape"):
        train(cfg(max_steps=4), other, tok, ex, Recorder(), ref_model=ref_o, resume_from=checkpoint.latest(tmp_path))


def test_checkpoint_dirs_are_atomic_and_pruned(tmp_path):
    root = tmp_path / "checkpoints" / "dpo"
    for step in (2, 4, 6):
        checkpoint.save(root, step, {"step": step, "meta": {"stage": "dpo"}}, keep=2)
    (root / ".tmp-step_000008-abc").mkdir()  # what a kill mid-write leaves behind
    (root / "step_000010").mkdir()  # no state.pt: not a checkpoint
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step_000004", "step_000006"]
    assert checkpoint.latest(root).name == "step_000006"
    assert checkpoint.load(checkpoint.latest(root))["step"] == 6
    assert json.loads((root / "step_000006" / "meta.json").read_text())["step"] == 6
    with pytest.raises(RuntimeError), checkpoint.atomic_dir(tmp_path / "half") as tmp:
        (tmp / "x").write_text("partial")
        raise RuntimeError("killed")
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".tmp-half-*"))


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    checkpoint.save(run / "checkpoints" / "dpo", 5, {"step": 5, "meta": {}})
    checkpoint.save(run / "checkpoints" / "sft", 7, {"step": 7, "meta": {}})
    (run / "pairs.jsonl").write_text("")
    assert checkpoint.resolve_resume(None, run) is None
    auto = checkpoint.resolve_resume("auto", run)
    assert auto.run_dir == run and auto.checkpoint("dpo").name == "step_000005"
    assert auto.artifact("pairs.jsonl") == run / "pairs.jsonl" and auto.artifact("base_model") is None
    fresh = checkpoint.resolve_resume("auto", tmp_path / "new")
    assert fresh.checkpoint("dpo") is None and fresh.artifact("pairs.jsonl") is None
    pinned = checkpoint.resolve_resume(str(run / "checkpoints" / "dpo" / "step_000005"), tmp_path / "elsewhere")
    assert pinned.run_dir == run and pinned.checkpoint("dpo").name == "step_000005" and pinned.checkpoint("sft") is None
    assert checkpoint.resolve_resume(str(run), tmp_path).checkpoint("sft").name == "step_000007"
    with pytest.raises(FileNotFoundError, match="trainer.resume"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), tmp_path)


# ----------------------------------------------------------------------------- a real run, killed


def _losses(run_dir: Path) -> dict[tuple[str, int], float]:
    """(stage, step) -> loss; a step logged twice (before a kill and after the resume) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for stage in ("sft", "dpo"):
            if f"{stage}/loss" in row:
                out[(stage, row["step"])] = row[f"{stage}/loss"]
    return out


def _run_until(args: list[str], marker: Path, timeout: float = 300) -> bool:
    """Start the CLI; SIGKILL it as soon as `marker` exists. Returns whether it was killed."""
    env = {**conftest.test_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t = time.monotonic()
    while proc.poll() is None and time.monotonic() - t < timeout:
        if marker.exists():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    err = proc.stderr.read().decode()[-3000:]
    proc.wait()
    assert proc.returncode == 0, err
    return False


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # same thread count in every process: bitwise comparable
    over = ["sft.max_steps=40", "sft.log_every=1", "sft.save_every=4", "trainer.max_steps=24", "trainer.save_every=4",
            "trainer.batch_size=2", "eval.n=4", "eval.max_new_tokens=16", "trainer.resume=auto"]
    run_cli(tmp_path / "a", *over)
    a = tmp_path / "a" / "run"

    b = tmp_path / "b"
    args = [sys.executable, "-m", "stepdpo.run", f"hydra.run.dir={b}", *FAST, *over]
    killed_sft = _run_until(args, b / "checkpoints" / "sft" / "step_000004")
    killed_dpo = _run_until(args, b / "checkpoints" / "dpo" / "step_000004")
    assert killed_sft and killed_dpo, "the run finished before it could be killed; make it longer"
    assert not (b / "eval.json").exists()
    assert not _run_until(args, b / "never")  # runs to the end, from the DPO checkpoint

    want, got = _losses(a), _losses(b)
    assert {s for s, _ in want} == {"sft", "dpo"} and set(got) == set(want)
    assert got == want  # bitwise, every step of both stages
    sft_steps = [s for st, s in got if st == "sft"]
    assert len(sft_steps) == 40
    assert json.loads((b / "eval.json").read_text())["after"]["acc"] == json.loads((a / "eval.json").read_text())["after"]["acc"]
    assert (b / "adapter" / "adapter_model.safetensors").exists()
