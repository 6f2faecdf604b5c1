"""Progress reporting (stepdpo/progress.py): the non-terminal fallback's lines, checked against numbers
worked by hand on a fake clock, and the hooks in the training loop and evaluation."""

from __future__ import annotations

import io
import logging
import random
import re

import pytest
import torch

from stepdpo import progress


@pytest.fixture
def clock(monkeypatch):
    """A fake perf_counter for progress.py: each tick() advances it by `dt` seconds."""
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])

    def tick(dt: float = 1.0):
        now[0] += dt

    return tick


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stepdpo.progress"]


def test_log_mode_prints_every_n_steps_with_loss_tokens_per_s_and_eta(monkeypatch, caplog, clock):
    monkeypatch.setenv("STEPDPO_PROGRESS", "auto")
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())  # not a terminal (CI, `2> log`): log mode
    assert progress.mode() == "log"
    caplog.set_level(logging.INFO, logger="stepdpo.progress")
    with progress.bar("sft", total=10, unit="step", every=4) as bar:
        for step in range(1, 11):
            clock(2.0)  # 2 s per step, 300 tokens per step: 150 tokens/s
            bar.update(loss=1.0 / step, tokens=300)
    got = lines(caplog)
    # steps 4 and 8 (every 4; the last step gets the "done" line instead), then the end
    assert got == [
        "sft: step 4/10 (40%) loss 0.2500 tokens/s 150.0 | 8s elapsed, ETA 12s",
        "sft: step 8/10 (80%) loss 0.1250 tokens/s 150.0 | 16s elapsed, ETA 4s",
        "sft: step 10/10 (100%) loss 0.1000 tokens/s 150.0 | done in 20s",
    ]


def test_generation_bars_count_samples_and_accuracy_and_skip_training_bars(monkeypatch, caplog, clock):
    monkeypatch.setenv("STEPDPO_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="stepdpo.progress")
    golds = ["1", "2", "3", "4"]
    right = lambda text, gold: text == gold  # noqa: E731
    train_bar = progress.bar("dpo", total=5, every=100)
    with progress.bar("eval", total=4, unit="problem", every=2,
                      on_outputs=progress.accuracy_so_far(golds, right)):
        clock(1.0)
        progress.advance(2, {0: ["1"], 1: ["9"]})  # one of two right
        clock(1.0)
        progress.advance(2, {2: ["3"], 3: ["4"]})  # three of four
    progress.advance(3, {0: ["1"]})  # no generation bar open: the training bar must not move
    assert train_bar.n == 0
    train_bar.close()
    got = lines(caplog)
    assert got[0] == "eval: problem 2/4 (50%) problems/s 2.0 acc 0.5000 | 1s elapsed, ETA 1s"
    assert got[1] == "eval: problem 4/4 (100%) problems/s 2.0 acc 0.7500 | done in 2s"
    assert got[2].startswith("dpo: step 0/5 (0%)")


def test_samples_so_far_counts_distinct_wrong_samples_up_to_the_cap():
    cb = progress.samples_so_far(["5", "7"], lambda t, g: t == g, cap=2)
    # problem 0: 2 right, 3 wrong but 2 distinct -> 2; problem 1: 4 distinct wrong, capped at 2
    out = cb({0: ["5", "5", "4", "4", "3"], 1: ["1", "2", "3", "4", "7"]})
    assert out == {"right": 3 / 10, "wrong": 4}


def test_bar_mode_draws_a_tqdm_bar_with_the_fields(monkeypatch):
    monkeypatch.setenv("STEPDPO_PROGRESS", "bar")
    buf = io.StringIO()
    with progress.bar("sft", total=3, stream=buf) as bar:
        for _ in range(3):
            bar.update(loss=0.5, tokens=10)
    text = buf.getvalue()
    assert "sft" in text and "3/3" in text and "loss=0.5000" in text and "tokens/s=" in text


def test_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv("STEPDPO_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="STEPDPO_PROGRESS='fancy'"):
        progress.mode()


def test_the_training_loop_and_evaluation_report_progress(monkeypatch, caplog):
    """The hooks: train() logs its steps with the loss it returns; math_accuracy its running accuracy."""
    from stepdpo.arith import load
    from stepdpo.config import TrainerConfig
    from stepdpo.evaluate import math_accuracy
    from stepdpo.model import tiny_llama
    from stepdpo.train import train
    from tests.test_train import Recorder, make_examples

    monkeypatch.setenv("STEPDPO_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="stepdpo.progress")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    model, tok = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4)
    rec = Recorder()
    cfg = TrainerConfig(loss="sft", max_steps=4, batch_size=4, log_every=2, lr=1e-2, device="cpu", warmup_steps=0)
    train(cfg, model, tok, make_examples(12), rec, prefix="sft")
    got = lines(caplog)
    assert [re.match(r"sft: step (\d+)/4", s).group(1) for s in got] == ["2", "4"]
    loss_at_4 = [m["sft/loss"] for s, m in rec.rows if s == 4][0]
    assert f"loss {loss_at_4:.4f}" in got[-1] and "done in" in got[-1]

    caplog.clear()
    problems = load(n_train=4, n_eval=6, max_operand=9, max_value=30, ops="-", seed=0).eval
    metrics, records = math_accuracy(model, tok, problems, max_new_tokens=8, batch_size=4)
    got = lines(caplog)
    assert got[-1].startswith("eval: problem 6/6 (100%)")
    assert f"acc {sum(r['correct'] for r in records) / 6:.4f}" in got[-1]


def test_training_tokens_per_s_leaves_out_time_spent_in_nested_bars(monkeypatch, caplog, clock):
    """A round's sampling (or an eval) inside a training stage is not training time."""
    monkeypatch.setenv("STEPDPO_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="stepdpo.progress")
    with progress.bar("dpo", total=3, every=1) as train_bar:
        clock(1.0)
        train_bar.update(loss=0.5, tokens=100)
        with progress.bar("sampling", total=4, unit="sample", gen=True):
            clock(9.0)
            progress.advance(4)
        clock(1.0)
        train_bar.update(loss=0.5, tokens=100)
        clock(1.0)
        train_bar.update(loss=0.5, tokens=100)
    assert train_bar.fields["tokens/s"] == 100.0  # 300 tokens in 3 s of training, not in 12 s
    # step 2: 11 s elapsed, 2 s of them training: 1 s per step, so 1 s to go
    assert lines(caplog) == ["dpo: step 1/3 (33%) loss 0.5000 tokens/s 100.0 | 1s elapsed, ETA 2s",
                             "sampling: sample 4/4 (100%) samples/s 0.4 | done in 9s",
                             "dpo: step 2/3 (67%) loss 0.5000 tokens/s 100.0 | 11s elapsed, ETA 1s",
                             "dpo: step 3/3 (100%) loss 0.5000 tokens/s 100.0 | done in 12s"]


def test_library_bars_off_outside_a_terminal(monkeypatch, tmp_path, capfd):
    """In log mode transformers' own bars (e.g. "Writing model shards" when a model is saved) print nothing;
    in bar mode (a terminal) they stay on."""
    from transformers.utils import logging as hf_logging

    from stepdpo.model import tiny_llama

    model, _ = tiny_llama(hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    try:
        monkeypatch.setenv("STEPDPO_PROGRESS", "bar")
        progress.quiet_library_bars()
        assert hf_logging.is_progress_bar_enabled()
        capfd.readouterr()
        model.save_pretrained(tmp_path / "a")
        assert "Writing model shards" in capfd.readouterr().err  # what the log would have shown
        monkeypatch.setenv("STEPDPO_PROGRESS", "log")
        progress.quiet_library_bars()
        assert not hf_logging.is_progress_bar_enabled()
        capfd.readouterr()
        model.save_pretrained(tmp_path / "b")
        assert "Writing model shards" not in capfd.readouterr().err
    finally:
        hf_logging.enable_progress_bar()
