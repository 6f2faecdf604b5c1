"""PNG reports without W&B: training curves, accuracy before/after, histograms."""

from __future__ import annotations

import json

from stepdpo.plots import plot_run, stage_series
from stepdpo.tracking import JsonlTracker

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(d):
    t = JsonlTracker(str(d))
    for s in (5, 10):
        t.log({"sft/loss": 3.0 - s / 10, "sft/lr": 1e-3}, step=s)
    t.log({"eval/before/acc": 0.1, "eval/before/n": 8}, step=10)
    t.log_histogram("pairs/token_weights", [0.0, 0.0, 1.0, 1.0, 1.0], step=10)
    for s in (11, 12, 13):
        t.log({"dpo/loss": 0.7 - s / 100, "dpo/loss/preference": 0.6, "dpo/rewards/margin": s / 100,
               "dpo/rewards/accuracy": 0.5}, step=s)
    t.log({"eval/during/acc": 0.2}, step=12)
    t.log({"eval/after/acc": 0.25, "eval/after/maj@4": 0.375}, step=13)
    t.close()
    (d / "eval.json").write_text(json.dumps({"before": {"acc": 0.1, "n": 8}, "after": {"acc": 0.25, "n": 8, "maj@4": 0.375}}))


def test_stage_series_splits_stages(tmp_path):
    _fake_run(tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loss = stage_series(rows, "loss")
    assert set(loss) == {"sft", "dpo"}  # not dpo/loss/preference, not eval
    assert loss["sft"] == ([5, 10], [2.5, 2.0])
    assert stage_series(rows, "rewards/margin")["dpo"][0] == [11, 12, 13]


def test_plot_run_writes_pngs(tmp_path):
    _fake_run(tmp_path)
    written = plot_run(tmp_path)
    assert [p.name for p in written] == ["training_curves.png", "accuracy.png", "histograms.png"]
    for p in written:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, p
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_plot_run_without_data(tmp_path):
    assert plot_run(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "sft/loss": 2.0}) + "\n")
    assert [p.name for p in plot_run(tmp_path)] == ["training_curves.png"]
