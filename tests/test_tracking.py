"""Trackers: secret redaction, the offline W&B run read back from its run file, failed jobs.

W&B runs offline only (conftest sets WANDB_MODE=offline). Offline runs keep everything in the
`run-<id>.wandb` record log (no wandb-summary.json), so tests decode it with
`stepdpo.tracking.read_wandb_run`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from stepdpo.tracking import (JsonlTracker, WandbTracker, read_wandb_run, redact, redact_argv, sweep_group)

SECRET = "sk-test0123456789abcdef"


def finished_run(path: Path, timeout: float = 30.0) -> dict:
    """read_wandb_run once the exit record is on disk (W&B's service writes it asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        run = read_wandb_run(path)
        if run["exit_code"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def no_secret_below(root: Path, secret: str = SECRET) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_redact_keys_and_values():
    cfg = {
        "reward": {"_target_": "stepdpo.rewards.openai_judge.OpenAIJudge", "api_key": SECRET, "api_key_env": "OPENAI_API_KEY",
                   "base_url": "http://127.0.0.1:8000/v1", "headers": ["Authorization: Bearer abc.def"], "model": "gpt-4o-mini"},
        "eval": {"max_new_tokens": 96, "token_weights": [1, 2]},
        "model": {"hf_token": "hf_abcdefghijklmnopqrstuvwxyz", "pad_token": "<pad>", "openaiApiKey": "x", "path": None},
        "logger": {"password": "", "db": "postgres://user:hunter2@host/db"},
        "notes": f"judge key {SECRET}",
    }
    r = redact(cfg)
    assert r["reward"]["api_key"] == "<redacted>" and r["reward"]["api_key_env"] == "OPENAI_API_KEY"
    assert r["reward"]["headers"] == ["<redacted>"] and r["reward"]["model"] == "gpt-4o-mini"
    assert r["reward"]["base_url"] == "http://127.0.0.1:8000/v1"
    assert r["eval"] == {"max_new_tokens": 96, "token_weights": [1, 2]}  # 'token' in a name is not a secret
    assert r["model"] == {"hf_token": "<redacted>", "pad_token": "<pad>", "openaiApiKey": "<redacted>", "path": None}
    assert r["logger"] == {"password": "", "db": "<redacted>"}
    shown = {"positive_token": "+", "negative_token": "-", "cache_key": "run-a"}  # stepdpo's own settings
    assert redact({"reward": shown}) == {"reward": shown}
    assert r["notes"] == "<redacted>"
    assert SECRET not in json.dumps(r)
    assert cfg["reward"]["api_key"] == SECRET  # a copy: the run's own config is untouched
    assert redact_argv(["-m", f"reward.api_key={SECRET}", "+model.tiny.hf_token=abc", "trainer.beta=0.1", SECRET]) == \
        ["-m", "reward.api_key=<redacted>", "+model.tiny.hf_token=<redacted>", "trainer.beta=0.1", "<redacted>"]


def test_sweep_group_names():
    assert sweep_group("outputs/multirun/2026-01-31/12-00-00") == "2026-01-31_12-00-00"
    assert sweep_group("/tmp/x/beta_sweep") == "beta_sweep"


def test_jsonl_tracker_files(tmp_path):
    t = JsonlTracker(str(tmp_path))
    t.log({"train/loss": 1.5}, step=3)
    t.log_histogram("pairs/token_weights", [0.0, 0.5, 1.0, 1.0], step=3, bins=4)
    t.log({"dpo/rewards/margins": torch.tensor([0.5, -0.5]), "dpo/loss": torch.tensor(0.25)}, step=4)
    t.close()
    t.close()  # idempotent
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "train/loss": 1.5}, {"step": 4, "dpo/loss": 0.25}]
    h, m = [json.loads(x) for x in (tmp_path / "histograms.jsonl").read_text().splitlines()]
    assert h["name"] == "pairs/token_weights" and h["n"] == 4 and h["counts"] == [1, 0, 1, 2]
    assert (m["name"], m["step"], m["n"], m["min"], m["max"]) == ("dpo/rewards/margins", 4, 2, -0.5, 0.5)
    assert t.summary_data["git_commit"]  # the tests run inside the git checkout


def test_wandb_offline_run_has_config_metrics_tables_artifact(tmp_path):
    cfg = {"seed": 0, "reward": {"api_key": SECRET, "api_key_env": "OPENAI_API_KEY"}, "eval": {"max_new_tokens": 96}}
    t = WandbTracker(str(tmp_path), cfg, mode="offline", group="unit", name="roundtrip", tags=["test"])
    t.log({"dpo/loss": 0.69, "dpo/rewards/margin": 0.0}, step=1)
    t.log_histogram("pairs/token_weights", [0.0, 1.0, 1.0], step=1)
    t.log({"dpo/loss": 0.5, "dpo/rewards/margin": 0.2, "dpo/rewards/margins": [0.1, 0.3]}, step=2)  # list: histogram
    t.log_table("samples/after", [{"question": "q", "output": "o", "step_scores": [1.0, 0.0]}])
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    t.log_artifact(str(tmp_path / "adapter"), name="adapter-unit", type="model")
    t.summary({"eval/after/acc": 0.25, "eval/before/acc": 0.125})
    t.close()

    run = finished_run(tmp_path)
    assert run["exit_code"] == 0
    assert (run["project"], run["group"], run["name"], run["tags"]) == ("stepdpo", "unit", "roundtrip", ["test"])
    assert run["config"]["reward"] == {"api_key": "<redacted>", "api_key_env": "OPENAI_API_KEY"}
    assert run["config"]["eval"] == {"max_new_tokens": 96}
    assert len(run["config"]["git_commit"]) == 40
    by_step = {h["_step"]: h for h in run["history"]}
    assert by_step[1]["dpo/loss"] == pytest.approx(0.69) and by_step[2]["dpo/rewards/margin"] == pytest.approx(0.2)
    assert by_step[1]["pairs/token_weights"]["_type"] == "histogram"
    assert by_step[2]["dpo/rewards/margins"]["_type"] == "histogram"
    assert by_step[2]["samples/after"]["_type"] == "table-file"  # at the last step, not dropped as out of order
    assert run["summary"]["eval/after/acc"] == 0.25 and run["summary"]["eval/before/acc"] == 0.125
    (model,) = [a for a in run["artifacts"] if a["type"] == "model"]
    assert model["name"].startswith("adapter-unit-") and model["files"] == ["adapter_config.json"]
    assert no_secret_below(tmp_path) == []


def test_failing_job_marks_run_failed(tmp_path):
    t = WandbTracker(str(tmp_path), {"seed": 1}, mode="offline")
    with pytest.raises(RuntimeError):
        try:  # exactly run.py's shape: the tracker is closed in `finally`
            t.log({"dpo/loss": 1.0}, step=1)
            raise RuntimeError("job failed")
        finally:
            t.close()
    assert t.run is None
    assert finished_run(tmp_path)["exit_code"] == 1


def test_disabled_mode_and_bad_mode(tmp_path):
    t = WandbTracker(str(tmp_path / "d"), {"seed": 0}, mode="disabled")
    t.log({"x": 1}, step=1)
    t.log_table("samples/x", [{"a": 1}])
    t.log_histogram("h", [1, 2], step=1)
    t.close()
    assert not list((tmp_path / "d").rglob("*.wandb"))
    with pytest.raises(ValueError, match="logger.mode"):
        WandbTracker(str(tmp_path / "e"), {}, mode="onlin")


def test_a_resumed_run_continues_its_wandb_run_and_a_disabled_one_records_none(tmp_path):
    first = WandbTracker(str(tmp_path / "a"), {"seed": 0})
    first.log({"dpo/loss": 0.5}, step=3)
    first.close(exit_code=1)  # preempted
    run_id = (tmp_path / "a" / "wandb_run_id").read_text().strip()
    assert finished_run(tmp_path / "a")["id"] == run_id
    again = WandbTracker(str(tmp_path / "b"), {"seed": 0}, resume_dir=str(tmp_path / "a"))  # trainer.resume=<a>
    again.log({"dpo/loss": 0.4}, step=4)
    again.close()
    assert finished_run(tmp_path / "b")["id"] == run_id == (tmp_path / "b" / "wandb_run_id").read_text().strip()
    fresh = WandbTracker(str(tmp_path / "c"), {"seed": 0}, resume_dir=str(tmp_path / "nothing-there"))
    fresh.close()
    assert finished_run(tmp_path / "c")["id"] != run_id
    off = WandbTracker(str(tmp_path / "d"), {}, mode="disabled")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "w.bin").write_bytes(b"x" * 10)
    off.log_artifact(str(tmp_path / "adapter"), name="adapter-d", type="model")  # nothing copied, nothing kept
    off.close()
    assert not (tmp_path / "d" / "wandb_run_id").exists()


@pytest.mark.slow
def test_cli_run_logs_everything_to_offline_wandb(tmp_path, one_thread):
    _, run_dir = run_cli(tmp_path, "logger=wandb", "sft.max_steps=4", "sft.log_every=2", f"+model.tiny.hf_token={SECRET}",
                         "trainer.max_steps=4", "trainer.eval_every=2")
    run = finished_run(run_dir)
    assert run["exit_code"] == 0
    assert run["config"]["model"]["tiny"]["hf_token"] == "<redacted>"
    assert run["config"]["trainer"]["beta"] == 0.1 and run["config"]["eval"]["max_new_tokens"] == 48
    assert len(run["config"]["git_commit"]) == 40
    assert "+model.tiny.hf_token=<redacted>" in run["args"]
    keys = set().union(*run["history"])
    assert {"sft/loss", "dpo/loss", "dpo/rewards/margin", "dpo/rewards/accuracy", "eval/before/acc", "eval/after/acc",
            "pairs/token_weights", "samples/before", "samples/after", "dpo/margins/pair",
            "dpo/margins/first_error_step", "eval/during/acc", "samples/during", "eval/acc"} <= keys
    assert not [k for k in keys if k.startswith(("eval/step", "samples/step"))]  # one series, not a key per eval
    accs = [(h["_step"], h["eval/acc"]) for h in run["history"] if "eval/acc" in h]
    assert len(accs) == 3 and [a for _, a in accs][::2] == [summary_acc for summary_acc in (
        json.loads((run_dir / "eval.json").read_text())[s]["acc"] for s in ("before", "after"))]
    assert (run_dir / "samples_step2.jsonl").exists()
    # each stage's own step beside the run's (W&B's x-axis for dpo/* via define_metric): after the 4-step warm-up
    dpo_steps = [(h["_step"], h["dpo/step"]) for h in run["history"] if "dpo/step" in h]
    assert dpo_steps == [(4 + i, i) for i in range(1, 5)]
    assert run["config"]["hydra"]["choices"]["trainer"] == "stepdpo_token"
    assert f"+model.tiny.hf_token=<redacted>" in run["config"]["hydra"]["overrides"]
    margins = [h["dpo/margins/pair"] for h in run["history"] if "dpo/margins/pair" in h]
    assert margins and all(m["_type"] == "histogram" for m in margins)
    s = run["summary"]
    assert {"eval/before/acc", "eval/after/acc", "time/total_s", "eval/after/acc_se", "gain/acc", "gain/acc_se"} <= set(s)
    b, a = s["eval/before/acc"], s["eval/after/acc"]
    assert s["gain/acc"] == pytest.approx(a - b)
    assert s["eval/after/acc_se"] == pytest.approx((a * (1 - a) / s["eval/after/n"]) ** 0.5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert s["eval/after/acc"] == summary["eval"]["after"]["acc"]
    # the pair report is history too (every round at the step its pairs were built), the summary its last value
    assert [(h["_step"], h["pairs/pairs"]) for h in run["history"] if "pairs/pairs" in h] == [(4, summary["pairs"]["pairs"])]
    assert s["pairs/pairs"] == summary["pairs"]["pairs"]
    assert any(a["type"] == "model" and "adapter_model.safetensors" in a["files"] for a in run["artifacts"])
    assert no_secret_below(run_dir / "wandb") == []


@pytest.mark.slow
def test_multirun_groups_runs_and_closes_failed_job(tmp_path, one_thread):
    """Job 1 fails inside run() (bad model shape): its run is still finished, marked failed."""
    proc, sweep = run_cli(tmp_path, "logger=wandb", "sft.max_steps=2", "eval.before=false",
                          "model.tiny.num_attention_heads=4,3", "model.tiny.num_key_value_heads=4", multirun=True, check=False)
    assert proc.returncode != 0  # Hydra re-raises the failed job's error after the batch
    runs = {j: finished_run(sweep / j) for j in ("0", "1")}
    assert runs["0"]["exit_code"] == 0 and runs["1"]["exit_code"] == 1, proc.stderr[-3000:]
    assert runs["0"]["group"] == runs["1"]["group"] == "sweep"  # the sweep dir's name
    assert "model.tiny.num_attention_heads=4" in runs["0"]["name"]  # named after its overrides
    assert "model.tiny.num_attention_heads=3" in runs["1"]["name"]
    assert (sweep / "0" / "eval.json").exists() and not (sweep / "1" / "eval.json").exists()


@pytest.mark.slow
def test_cli_resume_auto_continues_the_wandb_run(tmp_path, one_thread):
    """`trainer.resume=auto` on the same run directory (a restart) logs to the first start's W&B run."""
    _, run_dir = run_cli(tmp_path, "logger=wandb", "sft.max_steps=4", "trainer.save_every=1")
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    run_cli(tmp_path, "logger=wandb", "sft.max_steps=4", "trainer.save_every=1", "trainer.resume=auto")
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
