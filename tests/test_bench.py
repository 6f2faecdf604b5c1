"""scripts/bench_train.py: offline setup helpers, the stepdpo side of the benchmark, log-prob memory."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT, SHARED_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def run(capsys, *argv: str) -> dict:
    assert bench.main(list(argv)) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, lines  # exactly one JSON line
    return json.loads(lines[0])


@pytest.mark.slow  # a subprocess run: kept out of the fast tier
@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "train.jsonl").exists(), reason="needs ../shared/data/gsm8k")
def test_stepdpo_side_reports_throughput_memory_and_loss(tmp_path, capsys):
    model, pairs = tmp_path / "model", tmp_path / "pairs.jsonl"
    run(capsys, "--make-model", str(model), "--vocab", "600", "--hidden", "64", "--layers", "2",
        "--make-pairs", str(pairs), "--n-pairs", "12")
    rows = [json.loads(ln) for ln in pairs.read_text().splitlines()]
    assert len(rows) == 12 and {"prompt", "chosen", "rejected", "chosen_scores", "rejected_scores"} <= set(rows[0])
    assert all(r["chosen"] != r["rejected"] and 0.0 in r["rejected_scores"] for r in rows)
    assert (model / "config.json").exists() and (model / "tokenizer.json").exists()
    for extra in ([], ["--precompute-ref"]):
        res = run(capsys, "--model-dir", str(model), "--pairs", str(pairs), "--steps", "2", "--batch-size", "2",
                  "--max-length", "384", "--impl", "stepdpo", "--repeats", "1", *extra)
        assert res["impl"] == "stepdpo" and res["steps"] == 2 and res["precompute_ref"] == bool(extra)
        assert res["tokens_per_s"] > 0 and res["peak_rss_mb"] > 0 and res["tokens"] > 0
        assert 0.0 < res["final_loss"] < 5.0 and len(res["losses"]) == 2
        assert 0.3 < res["run_fraction"] < 0.9  # packed: each pair's prompt and shared steps run once
        assert res["losses"][0] == pytest.approx(0.693147, abs=1e-3)  # policy == reference at step 1 (bf16)


def test_logp_memory_mode_meets_the_target(capsys):
    res = run(capsys, "--mode", "logp-memory", "--vocab", "4096", "--hidden", "32", "--rows", "4", "--seq", "64")
    for name in ("stepdpo_head", "token_logps"):
        for dt in ("fp32", "bf16"):
            r = res[f"{name}_{dt}"]
            # stepdpo_head bf16 holds on CPUs without bf16 instructions too (3.008 there before the
            # LM-head GEMM ran in row chunks: a bf16 GEMM's fp32 output buffer)
            assert max(r["nograd"], r["fwd"], r["bwd"]) <= res["target"], (name, dt, r)
    assert res["naive_fp32"]["fwd"] > 1.9  # the contrast: a full fp32 log-softmax


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_is_native_bf16_or_fp32_for_both_trainers(monkeypatch, native):
    """--precision auto picks bf16 only where bf16 matmuls are native, and TRL gets the same `bf16`
    (its own default is bf16 everywhere); an explicit --trl-arg bf16=... still wins."""
    import stepdpo.train

    monkeypatch.setattr(stepdpo.train, "native_bf16", lambda device: native)
    _, a = bench.parse(["--model-dir", "m", "--pairs", "p"])
    assert a.precision == ("bf16" if native else "fp32") and a.trl_args == {"bf16": native}
    _, a = bench.parse(["--precision", "fp32", "--trl-arg", "bf16=true", "--trl-arg", "gradient_checkpointing=false"])
    assert a.precision == "fp32" and a.trl_args == {"bf16": True, "gradient_checkpointing": False}
