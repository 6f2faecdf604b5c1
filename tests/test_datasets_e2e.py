"""`python -m stepdpo.run dataset=<each>` end to end at tiny sizes, one subprocess per dataset
option this package owns: gsm8k with rule-based perturbation pairs, math (on-policy pairs),
and the PRM800K, Step-DPO and pair-file fixtures with their own labels (reward=prm800k).
Each run must finish and write pairs.jsonl with valid, located pairs."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA, run_cli

pytestmark = pytest.mark.slow

TINY = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=2",
    "sft.max_steps=2", "sft.batch_size=2", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.log_every=1",
    "trainer.rounds=1",
    "eval.before=false", "eval.max_new_tokens=8", "eval.n_samples_saved=2",
    "dataset.n_train=32", "dataset.n_eval=4",
    "dataset.on_invalid=skip", "dataset.truncation=truncate_left",  # long GSM8K/MATH pairs vs a 512-char model
]

CASES = {
    "gsm8k_perturb": ["dataset=gsm8k", "pairs=perturb", "pairs.max_pairs=8"],
    "math": ["dataset=math", "dataset.levels=[1]", "pairs.n_problems=4", "pairs.k=2", "pairs.min_pairs=2",
             "pairs.max_new_tokens=16", "model.tiny.max_position_embeddings=2048",
             "trainer.max_length=2048"],  # MATH gold continuations run to ~1,300 characters
    "prm800k": ["dataset=prm800k", "dataset.path=tests/fixtures/prm800k", "dataset.whole_solution_pairs=true",
                "reward=prm800k"],
    "step_dpo": ["dataset=step_dpo", "dataset.path=tests/fixtures/step_dpo/train.jsonl", "reward=prm800k"],
    "pairs": ["dataset=pairs", "dataset.path=tests/fixtures/pairs/pairs.jsonl", "dataset.eval_fraction=0.2",
              "reward=prm800k"],
}
SOURCES = {"gsm8k_perturb": "perturb", "prm800k": "prm800k", "step_dpo": "step_dpo", "pairs": "file"}


@pytest.mark.parametrize("case", list(CASES))
def test_run_writes_pairs(tmp_path, case):
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not at {SHARED_DATA}")
    proc, run_dir = run_cli(tmp_path, *TINY, *CASES[case], fast=False, timeout=900)
    pairs_file = run_dir / "pairs.jsonl"
    assert pairs_file.exists(), proc.stderr[-3000:]
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert pairs, f"{case}: no pairs written"
    for p in pairs:
        assert p["chosen"] and p["rejected"] and p["chosen"] != p["rejected"]
        assert len(p["chosen_scores"]) == len(p["chosen"]) and len(p["rejected_scores"]) == len(p["rejected"])
        if case in SOURCES:
            assert p["source"] == SOURCES[case] and p["meta"].get("where")
    assert (run_dir / "eval.json").exists()
