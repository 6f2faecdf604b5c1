"""The table a run ends with (run.format_table): numbers checked against a hand computation."""

from pathlib import Path

from stepdpo.run import format_table


def test_table_gives_accuracy_n_standard_errors_gain_wall_time_and_run_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "outputs" / "2026-11-30" / "14-00-00"
    text = format_table({"before": {"acc": 0.452, "n": 500}, "after": {"acc": 0.568, "n": 500}},
                        "dpo/first_error", 312.4, out, cpu_seconds=290.2)
    rows = {line.split("  ")[0].strip(): line.split() for line in text.splitlines() if line.strip()}
    # s.e. = 100 * sqrt(p (1 - p) / n): 0.452 -> 2.2257, 0.568 -> 2.2154; gain s.e. = hypot = 3.1404
    assert rows["before"][1:] == ["45.2", "2.2", "500"]
    assert rows["after (dpo/first_error)"][-3:] == ["56.8", "2.2", "500"]
    assert rows["gain (points)"][-2:] == ["+11.6", "3.1"]
    assert "wall time 5m12s (312 s), CPU time 290 s (all threads)" in text
    assert f"run dir   {Path('outputs/2026-11-30/14-00-00')}" in text  # relative to where the user ran it
