"""`python -m stepdpo.run reward=openai` end to end against the fake OpenAI server (127.0.0.1).

The run must finish; every pair in the run dir must carry the judge's step scores and
provenance; the judge summary (requests, cost) must be in summary.json; `reward.dry_run=true`
must print the estimate and stop without calling the API; `pairs=llm` builds its pairs from
LLM-written flawed solutions through the same server.
"""

from __future__ import annotations

import json

import pytest

from stepdpo.data import read_jsonl

from conftest import FAST, run_cli
from fake_openai import FakeOpenAI

SPEED = ["eval.before=false", "reward.engine.progress=false", "reward.engine.backoff_base=0.01",
         "reward.engine.timeout=10"]


@pytest.mark.slow
def test_run_with_the_llm_judge(tmp_path):
    cache = tmp_path / "judge.sqlite"
    with FakeOpenAI() as fake:
        proc, run_dir = run_cli(tmp_path, "reward=openai", f"reward.engine.base_url={fake.base_url}",
                                f"reward.engine.cache_path={cache}", *SPEED)
        chat = fake.counts["chat"]
    pairs = [row for _, row in read_jsonl(run_dir / "pairs.jsonl")]
    assert pairs
    for p in pairs:
        assert p["meta"]["scored_by"] == "openai" and p["meta"]["provenance"] == "openai:gpt-4o-mini"
        assert len(p["chosen_scores"]) == len(p["chosen"]) and len(p["rejected_scores"]) == len(p["rejected"])
        assert all(0.0 <= s <= 1.0 for s in p["chosen_scores"] + p["rejected_scores"])
    # the fake judge checks arithmetic: corrupted rejected continuations get a low score somewhere
    assert any(min(p["rejected_scores"], default=1.0) < 0.5 for p in pairs)
    summary = json.loads((run_dir / "summary.json").read_text())
    j = summary["judge"]
    assert j["requests"] > 0 and j["succeeded"] == j["requests"] and j["failures"] == 0
    assert j["cost_usd"] > 0 and j["prompt_tokens"] > 0 and j["model"] == "gpt-4o-mini"
    assert 0 < j["api_calls"] <= chat
    assert len(list(read_jsonl(run_dir / "pairs.jsonl"))) == summary["pairs"]["pairs"]


@pytest.mark.slow
def test_dry_run_prints_the_estimate_and_calls_nothing(tmp_path):
    with FakeOpenAI() as fake:
        proc, run_dir = run_cli(tmp_path, "reward=openai", f"reward.engine.base_url={fake.base_url}",
                                f"reward.engine.cache_path={tmp_path / 'judge.sqlite'}", "reward.dry_run=true", *SPEED)
        assert fake.counts["chat"] == 0
    est = json.loads((run_dir / "dry_run.json").read_text())
    assert est["calls_needed"] > 0 and est["est_cost_usd"] > 0 and est["est_prompt_tokens"] > 0
    assert '"dry_run"' in proc.stdout
    assert not (run_dir / "summary.json").exists()  # stopped before training


@pytest.mark.slow
def test_run_with_llm_written_pairs_judged_by_the_llm(tmp_path):
    cache = tmp_path / "judge.sqlite"
    fast = [o for o in FAST if not o.startswith("pairs.")]  # on_policy knobs; pairs=llm has its own
    with FakeOpenAI() as fake:
        proc, run_dir = run_cli(tmp_path, *fast, "pairs=llm", f"pairs.engine.base_url={fake.base_url}",
                                "pairs.n_problems=8", f"pairs.engine.cache_path={cache}", "pairs.engine.progress=false",
                                "reward=openai", f"reward.engine.base_url={fake.base_url}",
                                f"reward.engine.cache_path={cache}", *SPEED, fast=False)
    pairs = [row for _, row in read_jsonl(run_dir / "pairs.jsonl")]
    assert len(pairs) == 8
    for p in pairs:
        assert p["source"] == "llm" and p["meta"]["generated_by"] == "openai:gpt-4o-mini"
        assert p["meta"]["scored_by"] == "openai"  # then graded step by step by the judge
        assert min(p["rejected_scores"]) < 0.5 <= min(p["chosen_scores"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pairs"]["llm"]["requests"] == 8 and summary["pairs"]["llm"]["failures"] == 0
    assert summary["judge"]["requests"] == 16  # chosen + rejected of each pair
