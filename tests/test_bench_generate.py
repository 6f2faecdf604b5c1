"""scripts/bench_generate.py end to end on a tiny model: one JSON line, greedy token-identical, and the
forward clock behind greedy_speedup_bound."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_bench_generate_prints_one_line_with_speedups_and_the_greedy_bound():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--threads", "1", "--repeats",
                           "2", "--n-problems", "4", "--n-eval", "8", "--sft-steps", "20"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["greedy_identical"] is True
    assert res["sampling_speedup"] > 0 and res["greedy_speedup"] > 0
    assert res["sampling_ours"]["tokens"] > 0 and res["greedy_ours"]["tokens"] == res["greedy_hf"]["tokens"]
    assert 0.5 < res["greedy_forward_share"] <= 1.0  # decoding is mostly the model's forwards
    # same tokens, so per repeat: generate / ours <= generate / (ours' forwards)
    for speedup, bound in zip(res["greedy_speedup_per_repeat"], res["greedy_speedup_bound_per_repeat"]):
        assert speedup <= bound + 0.01
