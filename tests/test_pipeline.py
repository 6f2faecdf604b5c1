"""`python -m stepdpo.run` end to end at tiny sizes: the run directory, the adapter, generation."""

import json

import pytest
import torch

from conftest import run_cli


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    proc, run_dir = run_cli(tmp_path_factory.mktemp("default"))
    return proc, run_dir


@pytest.mark.slow
def test_run_dir_has_everything(default_run):
    proc, run_dir = default_run
    for name in ("config_resolved.yaml", ".hydra/config.yaml", "metrics.jsonl", "eval.json", "summary.json",
                 "pairs.jsonl", "samples_before.jsonl", "samples_after.jsonl", "adapter/adapter_config.json",
                 "adapter/stepdpo.json", "base_model/config.json"):
        assert (run_dir / name).exists(), name
    ev = json.loads((run_dir / "eval.json").read_text())
    assert set(ev) == {"before", "after"} and ev["after"]["n"] == 16
    assert "accuracy" in proc.stdout and "before" in proc.stdout  # the printed table
    pairs = _read_jsonl(run_dir / "pairs.jsonl")
    assert len(pairs) >= 16  # min_pairs top-up
    for p in pairs:
        assert len(p["chosen_scores"]) == len(p["chosen"]) and len(p["rejected_scores"]) == len(p["rejected"])
        assert p["chosen"] != p["rejected"]
        assert min(p["rejected_scores"]) < 0.5  # every rejected continuation has a located wrong step
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    dpo = [m for m in metrics if "dpo/loss" in m]
    assert len(dpo) == 2  # trainer.max_steps=2, log_every=1
    for key in ("dpo/rewards/margin", "dpo/rewards/accuracy", "dpo/rewards/first_error_margin", "dpo/lr",
                "dpo/grad_norm", "dpo/tokens_per_s", "dpo/peak_rss_mb", "dpo/tokens/weighted_rejected"):
        assert key in dpo[-1], key
    assert any("sft/loss" in m for m in metrics)
    hists = _read_jsonl(run_dir / "histograms.jsonl")  # token weights once; per-pair margins every log step
    by_name = {n: [h for h in hists if h["name"] == n] for n in
               ("pairs/token_weights", "dpo/margins/pair", "dpo/margins/first_error_step")}
    assert len(by_name["pairs/token_weights"]) == 1
    assert [h["step"] for h in by_name["dpo/margins/pair"]] == [m["step"] for m in dpo]
    for h, m in zip(by_name["dpo/margins/pair"], dpo):
        assert sum(h["counts"]) == h["n"] > 0 and h["mean"] == pytest.approx(m["dpo/rewards/margin"], abs=1e-6)
    assert len(by_name["dpo/margins/first_error_step"]) == 2


@pytest.mark.slow
def test_lora_changed_base_did_not(default_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run_dir = default_run
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at 0: training moved it
    merged_free = model.get_base_model().state_dict()
    for k, v in base_sd.items():
        k2 = k.replace(".weight", ".base_layer.weight") if k.replace(".weight", ".base_layer.weight") in merged_free else k
        assert torch.equal(merged_free[k2], v), k  # base weights untouched


@pytest.mark.slow
def test_generate_from_run(default_run, capsys):
    """`python -m stepdpo.generate RUN_DIR q1 q2` prints each prompt and the trained model's greedy continuation:
    the same text as an argmax loop over the run's base model with its adapter, loaded here with peft directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepdpo.generate import main

    _, run_dir = default_run
    questions = ["Start with 3, add 4. What is the result?", "Start with 12, subtract 5, subtract 3. What is the result?"]
    assert main([str(run_dir), *questions, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out

    tok = AutoTokenizer.from_pretrained(run_dir / "base_model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"),
                                      str(run_dir / "adapter")).eval()
    pos = 0
    for q in questions:
        prompt = f"Question: {q}\nAnswer:\n"  # the plain prompt format the run trained with
        ids = [tok.bos_token_id] * (tok.bos_token_id is not None) + tok(prompt, add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        want = prompt + tok.decode(new, skip_special_tokens=True)
        assert new and want in out[pos:], f"want {want!r} in order in:\n{out}"
        pos = out.index(want, pos) + len(want)


def test_generate_ends_where_the_runs_eval_ended(tmp_path):
    """stepdpo.generate's defaults are the run's eval.max_new_tokens and eval.stop (escapes read as eval reads them)."""
    from stepdpo.generate import eval_settings

    assert eval_settings(tmp_path) == (128, [])  # no config_resolved.yaml
    (tmp_path / "config_resolved.yaml").write_text('eval:\n  max_new_tokens: 512\n  stop: ["\\\\n\\\\nQuestion:"]\n')
    assert eval_settings(tmp_path) == (512, ["\n\nQuestion:"])


def test_generate_names_bad_run_dir(tmp_path, capsys):
    from stepdpo.generate import main

    assert main([str(tmp_path), "q"]) == 2
    assert "stepdpo run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_qlora_end_to_end(tmp_path):
    """bitsandbytes nf4 4-bit base + LoRA, forward and backward on the CPU."""
    import bitsandbytes as bnb

    from stepdpo.generate import load_trained

    proc, run_dir = run_cli(tmp_path, "lora=qlora", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128")
    assert (run_dir / "adapter/adapter_config.json").exists()
    assert json.loads((run_dir / "adapter/stepdpo.json").read_text())["load_in_4bit"] is True
    model, _ = load_trained(run_dir)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    dpo = [m for m in _read_jsonl(run_dir / "metrics.jsonl") if "dpo/loss" in m]
    assert len(dpo) == 2 and all(m["dpo/grad_norm"] > 0 for m in dpo)


@pytest.mark.slow
def test_full_finetune_and_sft_main_stage(tmp_path):
    proc, run_dir = run_cli(tmp_path / "none", "lora=none")
    assert (run_dir / "model/config.json").exists()
    proc, run_dir = run_cli(tmp_path / "sft", "trainer=sft")
    assert not (run_dir / "pairs.jsonl").exists()
    assert any("train_sft/loss" in m for m in _read_jsonl(run_dir / "metrics.jsonl"))


@pytest.mark.slow
def test_sft_warmup_is_shared_through_the_cache(tmp_path):
    """A job reuses the warm-up another job cached; one that starts while the same warm-up is still
    being trained (its lock held) waits for it instead of training it a second time."""
    import subprocess
    import sys
    import time

    from conftest import FAST, ROOT, test_env
    from stepdpo.locks import exclusive_lock
    from stepdpo.sft_cache import lock_path as sft_lock_path

    cache = tmp_path / "cache"
    _, first = run_cli(tmp_path / "a", f"sft_cache_dir={cache}")
    (key,) = [p for p in cache.iterdir() if p.is_dir()]
    held = key.rename(tmp_path / "held")  # as if the first job were still training the warm-up...
    second, log = tmp_path / "b" / "run", tmp_path / "b.out"
    with exclusive_lock(sft_lock_path(key)), open(log, "w") as out:  # ...and held its lock
        proc = subprocess.Popen([sys.executable, "-m", "stepdpo.run", f"hydra.run.dir={second}", *FAST,
                                 f"sft_cache_dir={cache}", "trainer=dpo", "threads=1"],
                                cwd=ROOT, env=test_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "waiting for another job's SFT warm-up" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        held.rename(key)  # the first job writes the cache and releases the lock
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [key.name]  # `threads` is not part of the key
    s2 = json.loads((second / "summary.json").read_text())
    assert s2["sft_cached"] == str(key) and "time/sft_s" not in s2 and s2["threads"] == 1
    assert not any("sft/loss" in m for m in _read_jsonl(second / "metrics.jsonl"))
    before = [json.loads((d / "eval.json").read_text())["before"]["acc"] for d in (first, second)]
    assert before[0] == before[1]  # the same SFT model
    assert [json.loads(line)["output"] for line in (first / "samples_before.jsonl").read_text().splitlines()] == \
           [json.loads(line)["output"] for line in (second / "samples_before.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rounds_resample_pairs_from_the_trained_policy(tmp_path):
    """trainer.rounds=2: a second set of on-policy pairs is sampled half-way, from the policy being
    trained, written beside the first, logged and summarised."""
    proc, run_dir = run_cli(tmp_path, "trainer.max_steps=4", "trainer.rounds=2",
                            "pairs.n_problems=16", "pairs.k=4")
    first, second = _read_jsonl(run_dir / "pairs.jsonl"), _read_jsonl(run_dir / "pairs_round1.jsonl")
    assert first and second
    summary = json.loads((run_dir / "summary.json").read_text())
    (r1,) = summary["pairs_rounds"]
    assert r1["round"] == 1 and r1["step"] == 20 + 2 and r1["pairs"] == len(second) and r1["samples"] == 16 * 4
    logged = [m for m in _read_jsonl(run_dir / "metrics.jsonl") if "pairs/pairs" in m]
    assert [(m["step"], m["pairs/pairs"]) for m in logged] == [(20, len(first)), (22, len(second))]  # each round
    dpo_steps = [m["step"] for m in _read_jsonl(run_dir / "metrics.jsonl") if "dpo/loss" in m]
    assert dpo_steps == [21, 22, 23, 24]


@pytest.mark.slow
def test_sft_control_on_the_chosen_sides_of_the_same_pairs(tmp_path):
    """trainer=sft_control trainer.sft_data=chosen: SFT on each distinct chosen solution of the very pairs
    trainer=dpo builds from the same warm-up and seed (rejection-sampling fine-tuning), re-built each round."""
    cache = tmp_path / "cache"
    _, dpo = run_cli(tmp_path / "dpo", f"sft_cache_dir={cache}", "trainer=dpo")
    _, sft = run_cli(tmp_path / "sft", f"sft_cache_dir={cache}", "trainer=sft_control", "trainer.sft_data=chosen",
                     "trainer.max_steps=4", "trainer.rounds=2", "trainer.batch_size=4")
    pairs = _read_jsonl(sft / "pairs.jsonl")
    assert pairs and pairs == _read_jsonl(dpo / "pairs.jsonl")  # the same first-round pairs as the DPO arm
    distinct = {(p["question"], tuple(p["prefix"] + p["chosen"])) for p in pairs}
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["pairs"]["sft_examples"] == len(distinct) <= len(pairs)
    (r1,) = summary["pairs_rounds"]  # round 2 re-sampled from the policy being trained
    assert r1["step"] == 20 + 2 and (sft / "pairs_round1.jsonl").exists()
    metrics = _read_jsonl(sft / "metrics.jsonl")
    assert [m["step"] for m in metrics if "train_sft/loss" in m] == [21, 22, 23, 24]
    assert not any("dpo/loss" in m for m in metrics)
    _, gold = run_cli(tmp_path / "gold", f"sft_cache_dir={cache}", "trainer=sft_control", "trainer.rounds=2",
                      "trainer.max_steps=2")
    assert not (gold / "pairs.jsonl").exists() and "pairs_rounds" not in json.loads((gold / "summary.json").read_text())


@pytest.mark.slow
def test_arms_train_on_the_pairs_in_the_cache(tmp_path):
    """pairs_cache_dir: a second arm (another trainer) reads the pairs the first one built instead of sampling its
    own (the entry is edited in between, so only a run that read it trains on one pair fewer); a later round, from the
    policy that has trained, is built and kept as a new entry."""
    cache, pcache = tmp_path / "cache", tmp_path / "pairs"
    _, dpo = run_cli(tmp_path / "dpo", f"sft_cache_dir={cache}", f"pairs_cache_dir={pcache}", "trainer=dpo")
    (entry,) = [p for p in pcache.iterdir() if p.is_dir()]
    built = _read_jsonl(entry / "pairs.jsonl")
    dpo_pairs = _read_jsonl(dpo / "pairs.jsonl")
    unscored = lambda rows: [(r["id"], r["prefix"], r["chosen"], r["rejected"]) for r in rows]  # noqa: E731
    assert len(built) >= 2 and unscored(built) == unscored(dpo_pairs)
    assert "pairs_cached" not in json.loads((dpo / "summary.json").read_text())
    (entry / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in built[:-1]))
    _, sft = run_cli(tmp_path / "sft", f"sft_cache_dir={cache}", f"pairs_cache_dir={pcache}", "trainer=sft_control",
                     "trainer.sft_data=chosen", "trainer.max_steps=4", "trainer.rounds=2", "trainer.batch_size=4")
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["pairs_cached"] == [str(entry)]  # round 0 only
    assert unscored(_read_jsonl(sft / "pairs.jsonl")) == unscored(dpo_pairs)[:-1]
    assert summary["pairs"]["samples"] == json.loads((dpo / "summary.json").read_text())["pairs"]["samples"]
    entries = sorted(p.name for p in pcache.iterdir() if p.is_dir())
    assert len(entries) == 2 and entry.name in entries  # round 1's pairs, from the trained policy: a new entry
    (r1,) = [p for p in pcache.iterdir() if p.is_dir() and p != entry]
    assert unscored(_read_jsonl(r1 / "pairs.jsonl")) == unscored(_read_jsonl(sft / "pairs_round1.jsonl"))


@pytest.mark.slow
def test_rounds_need_pairs_built_by_the_run(tmp_path):
    proc, _ = run_cli(tmp_path, "dataset=pairs", "dataset.path=tests/fixtures/pairs/pairs.jsonl", "trainer.rounds=2",
                      check=False)
    assert proc.returncode != 0
    assert "trainer.rounds=2" in proc.stderr and "brings its own pairs" in proc.stderr
    assert not (tmp_path / "run" / "config_resolved.yaml").exists()  # failed before any work


@pytest.mark.slow
def test_pairs_from_the_answer_only_pool(tmp_path):
    """pairs.from_split=pool: pairs are sampled on dataset.n_pool answer-only problems the SFT stage
    never sees (rule-based top-ups still corrupt SFT problems); the SFT cache ignores n_pool."""
    cache = tmp_path / "cache"
    _, plain = run_cli(tmp_path / "a", f"sft_cache_dir={cache}", "trainer.max_steps=1", "trainer.rounds=1")
    _, run_dir = run_cli(tmp_path / "b", f"sft_cache_dir={cache}", "dataset.n_pool=24", "pairs.from_split=pool",
                         "pairs.n_problems=1000", "pairs.k=2", "pairs.resample_k=2")
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1
    assert "sft_cached" in json.loads((run_dir / "summary.json").read_text())  # the same warm-up
    pairs = _read_jsonl(run_dir / "pairs.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pairs"]["problems"] == 24 and summary["pairs"]["samples"] == 24 * 2  # the pool, not the 64 SFT problems
    assert pairs and len(pairs) == summary["pairs"]["pairs"]
    rep = summary["pairs"]  # the samples' rejected prefixes without a correct sample were continued twice each
    assert rep["resample_prefixes"] > 0 and rep["resample_samples"] == 2 * rep["resample_prefixes"]
    assert sum(p["source"] == "on_policy_resampled" for p in pairs) == rep.get("pairs_resampled", 0)
    for p in pairs:
        kind = "pool" if p["source"].startswith("on_policy") else "train"
        assert p["meta"]["problem_id"].startswith(f"arith-{kind}-"), p
    proc, _ = run_cli(tmp_path / "c", "pairs.from_split=pool", check=False)
    assert proc.returncode != 0 and "pairs.from_split=pool" in proc.stderr and "dataset.n_pool" in proc.stderr
    assert not (tmp_path / "c" / "run" / "config_resolved.yaml").exists()
    proc, _ = run_cli(tmp_path / "d", "pairs.from_split=eval", check=False)
    assert proc.returncode != 0 and "choose train" in proc.stderr
    proc, _ = run_cli(tmp_path / "f", "pairs.resample_k=-2", check=False)
    assert proc.returncode != 0 and "pairs.resample_k=-2: must be >= 0" in proc.stderr
    proc, _ = run_cli(tmp_path / "e", "pairs.reject=outcome", check=False)
    assert proc.returncode != 0 and "pairs.reject='outcome'" in proc.stderr and "process, answer" in proc.stderr
    assert not (tmp_path / "e" / "run" / "config_resolved.yaml").exists()  # before any work


@pytest.mark.slow
def test_validate_only_builds_checks_and_stops(tmp_path):
    """validate_only=true: the pairs are built, scored and validated, validation.json holds the
    report, and nothing is trained; trainer.rounds is ignored (only the first round can be built)."""
    proc, run_dir = run_cli(tmp_path, "validate_only=true", "trainer.rounds=2")
    report = json.loads((run_dir / "validation.json").read_text())
    pairs = _read_jsonl(run_dir / "pairs.jsonl")
    assert report["pairs"] == len(pairs) >= 16 and '"validation"' in proc.stdout
    assert not (run_dir / "adapter").exists() and not (run_dir / "pairs_round1.jsonl").exists()
    assert not any("dpo/loss" in m for m in _read_jsonl(run_dir / "metrics.jsonl"))


@pytest.mark.slow
def test_stepdpo_token_reads_rejected_sides_off_the_chosen_rows(tmp_path):
    """trainer=stepdpo_token end to end: each pair's one weighted rejected token is read off its
    chosen row, so the model runs on one sequence per pair."""
    proc, run_dir = run_cli(tmp_path, "trainer=stepdpo_token", "trainer.batch_size=4")
    dpo = [m for m in _read_jsonl(run_dir / "metrics.jsonl") if "dpo/loss" in m]
    assert len(dpo) == 2
    for m in dpo:  # the rule reward's wrong step always differs from the chosen one: one token, one row per pair
        assert m["dpo/tokens/rows"] == 4 and m["dpo/tokens/weighted_rejected"] == 4
    cfg = (run_dir / "config_resolved.yaml").read_text()
    assert "error_span: token" in cfg and "weighting: first_error" in cfg
