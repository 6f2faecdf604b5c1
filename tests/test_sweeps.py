"""Sweeps: basic, joblib (`hydra/launcher=parallel`), submitit local and Optuna (`hydra/sweeper=tune`)
multiruns of the real entrypoint, each collected by scripts/collect_sweep.py.

Every job uses conftest's FAST overrides (tiny model, 2 DPO steps); runs are kept to 2-4 jobs.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, compose_config, run_cli

spec = importlib.util.spec_from_file_location("collect_sweep", ROOT / "scripts" / "collect_sweep.py")
collect_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(collect_sweep)

SHORT = ["sft.max_steps=4"]  # the warm-up is irrelevant to sweep plumbing


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls; parallel jobs must not fight over 2 cores


def fake_job(sweep: Path, num: int, overrides: list[str], evals: dict | None) -> None:
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if evals is not None:
        (d / "eval.json").write_text(json.dumps(evals))


def test_collect_sweep_mean_std_over_seeds(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    accs = {("0.1", 0): 0.2, ("0.1", 1): 0.4, ("0.1", 2): 0.6, ("0.3", 0): 0.5, ("0.3", 1): 0.5}
    for i, ((beta, seed), acc) in enumerate(accs.items()):
        fake_job(sweep, i, ["dataset.n_eval=16", f"trainer.beta={beta}", f"seed={seed}"],
                 {"before": {"acc": 0.1, "n": 16, "seconds": 1.0}, "after": {"acc": acc, "n": 16, "maj@4": acc / 2, "acc/level/1": 1.0}})
    fake_job(sweep, 5, ["dataset.n_eval=16", "trainer.beta=0.3", "seed=2"], None)  # a failed job: no eval.json

    assert collect_sweep.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("|")]
    assert lines[0] == "| trainer.beta | seeds | before/acc | after/acc | after/maj@4 | gain/acc | failed |"
    assert lines[2] == "| 0.1 | 3 | 0.1000 ± 0.0000 | 0.4000 ± 0.2000 | 0.2000 ± 0.1000 | 0.3000 ± 0.2000 | 0 |"
    assert lines[3] == "| 0.3 | 2 | 0.1000 ± 0.0000 | 0.5000 ± 0.0000 | 0.2500 ± 0.0000 | 0.4000 ± 0.0000 | 1 |"
    assert len(lines) == 4  # header, rule, one row per beta
    res = json.loads((sweep / "sweep_results.json").read_text())
    assert res["varying"] == ["trainer.beta"] and res["n_jobs"] == 6 and res["n_failed"] == 1
    assert res["groups"][1]["failed"] == ["5"]
    rows = list(csv.DictReader((sweep / "sweep_results.csv").open()))
    assert [r["trainer.beta"] for r in rows] == ["0.1", "0.3"]
    assert float(rows[0]["after/acc_mean"]) == pytest.approx(0.4) and rows[0]["after/acc/level/1_mean"] == "1"
    assert (sweep / "sweep_results.png").read_bytes().startswith(b"\x89PNG")
    assert (sweep / "sweep_results.md").read_text().splitlines() == lines


def test_collect_sweep_errors(tmp_path, capsys):
    assert collect_sweep.main([str(tmp_path)]) == 2
    assert "no job directories" in capsys.readouterr().err


def test_collect_sweep_pools_sweeps_and_pairs_by_seed(tmp_path, capsys):
    """Two multiruns (seeds 0-1 and 2-3) pooled; --vs compares every arm with one baseline seed by seed."""
    after = {"dpo": [0.30, 0.50, 0.20, 0.60], "stepdpo": [0.34, 0.49, 0.26, 0.60], "sft_control": [0.32, 0.52, 0.24, 0.61]}
    for half, seeds in (("a", (0, 1)), ("b", (2, 3))):
        i = 0
        for trainer, accs in after.items():
            extra = ["trainer.nll_alpha=10"] if trainer != "sft_control" else []
            for seed in seeds:
                fake_job(tmp_path / half, i, [f"trainer={trainer}", f"seed={seed}", *extra],
                         {"before": {"acc": 0.1 * seed}, "after": {"acc": accs[seed]}})
                i += 1
    out = tmp_path / "pooled"
    assert collect_sweep.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--vs", "trainer=dpo",
                               "--vs", "trainer=stepdpo trainer.nll_alpha=10.0"]) == 0
    text = capsys.readouterr().out
    res = json.loads((out / "sweep_results.json").read_text())
    assert res["n_jobs"] == 12 and [len(g["seeds"]) for g in res["groups"]] == [4, 4, 4]
    assert res["groups"][0]["jobs"][0] == "a/0"  # job dirs named relative to the sweeps' common parent
    vs_dpo, vs_step = res["paired"]
    assert vs_dpo["baseline"] == {"trainer": "dpo", "trainer.nll_alpha": "10"}
    step = next(r for r in vs_dpo["rows"] if r["settings"]["trainer"] == "stepdpo")
    d = [0.04, -0.01, 0.06, 0.0]
    assert step["n"] == 4 and list(step["diffs"]) == ["seed=0", "seed=1", "seed=2", "seed=3"]
    assert step["diffs"]["seed=2"] == pytest.approx(0.06)
    assert step["mean"] == pytest.approx(sum(d) / 4) and (step["ahead"], step["behind"], step["level"]) == (2, 1, 1)
    import statistics
    assert step["std"] == pytest.approx(statistics.stdev(d)) and step["se"] == pytest.approx(statistics.stdev(d) / 2)
    sft = next(r for r in vs_step["rows"] if r["settings"]["trainer"] == "sft_control")
    assert [round(x, 6) for x in sft["diffs"].values()] == [-0.02, 0.03, -0.02, 0.01]
    assert "| stepdpo | 10 | 4 | +0.0225 ± 0.0330 | 0.0165 | 2 / 1 / 1 | 0: +0.0400 / 1: -0.0100 / 2: +0.0600 / 3: +0.0000 |" in text
    assert (out / "sweep_results.md").read_text() in text and not (tmp_path / "a" / "sweep_results.md").exists()


@pytest.mark.parametrize("args, message", [
    (["a", "b"], "pass --out"),
    (["a", "a", "--out", "o"], "both ran seed=0 with the same settings"),
    (["a", "--vs", "trainer"], "'trainer' is not KEY=VALUE"),
    (["a", "--vs", "trainer=ppo"], "matches 0 groups"),
    (["a", "--vs", "model=tiny"], "model does not vary"),
    (["a", "--metric", "after/maj@8"], "--metric after/maj@8: no job has it"),
])
def test_collect_sweep_bad_arguments(tmp_path, capsys, monkeypatch, args, message):
    for name in ("a", "b"):
        for i, trainer in enumerate(("dpo", "stepdpo")):
            fake_job(tmp_path / name, i, [f"trainer={trainer}", "seed=0"], {"after": {"acc": 0.5}})
    monkeypatch.chdir(tmp_path)
    assert collect_sweep.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "a" / "sweep_results.md").exists()  # nothing written


def test_slurm_config_renders_sbatch(tmp_path, monkeypatch):
    """conf/hydra/launcher/slurm.yaml through submitit's SlurmExecutor, as the plugin's launch() passes it
    (hydra_submitit_launcher/submitit_launcher.py), up to the sbatch script; nothing is submitted."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that it runs on a cluster
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    cfg = compose_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}",
                         hydra=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert params.pop("_target_").endswith("SlurmLauncher")
    ex = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / ".submitit" / "%j"),
                               slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    params["name"] = "run"  # ${hydra.job.name}, set by Hydra at launch
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})  # unknown keys raise
    sbatch = ex._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=1", "--time=240", "--cpus-per-task=8", "--mem=48GB"):
        assert f"#SBATCH {line}" in sbatch, sbatch


def _check_sweep(sweep: Path, n_jobs: int, rows: list[str], seeds: int) -> dict:
    for i in range(n_jobs):
        ev = json.loads((sweep / str(i) / "eval.json").read_text())
        assert {"before", "after"} <= set(ev) and 0 <= ev["after"]["acc"] <= 1
    res = collect_sweep.collect(sweep)
    assert res["n_jobs"] == n_jobs and res["n_failed"] == 0
    assert [" ".join(g["settings"].values()) for g in res["groups"]] == rows
    assert all(len(g["seeds"]) == seeds for g in res["groups"])
    return res


@pytest.mark.slow
def test_basic_launcher_beta_by_seed(tmp_path):
    _, sweep = run_cli(tmp_path, *SHORT, "trainer.beta=0.1,0.3", "seed=0,1", multirun=True)
    res = _check_sweep(sweep, 4, ["0.1", "0.3"], seeds=2)
    assert res["varying"] == ["trainer.beta"]
    assert (sweep / "0" / "training_curves.png").stat().st_size > 0 and (sweep / "0" / "accuracy.png").exists()


@pytest.mark.slow
def test_failed_job_does_not_end_the_sweep(tmp_path):
    proc, sweep = run_cli(tmp_path, *SHORT, "trainer.beta=-1,0.1", multirun=True, check=False)
    assert proc.returncode != 0 and "trainer.beta: must be > 0" in proc.stderr
    assert (sweep / "1" / "eval.json").exists()  # the job after the bad one still ran
    res = collect_sweep.collect(sweep)
    assert res["n_failed"] == 1 and [g["failed"] for g in res["groups"]] == [["0"], []]


@pytest.mark.slow
def test_joblib_launcher_parallel(tmp_path):
    proc, sweep = run_cli(tmp_path, *SHORT, "hydra/launcher=parallel", "seed=0,1", multirun=True)
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    _check_sweep(sweep, 2, [""], seeds=2)  # only the seed varies: one group


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    proc, sweep = run_cli(tmp_path, *SHORT, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "seed=0,1",
                          multirun=True)
    assert "Submitit 'local' sweep" in proc.stdout + proc.stderr
    assert (sweep / ".submitit").is_dir()
    _check_sweep(sweep, 2, [""], seeds=2)


@pytest.mark.slow
def test_optuna_sweeper_two_trials(tmp_path):
    """Two TPE trials with the study stored in sqlite (the `sweeps` extra pins SQLAlchemy 1.4 for optuna 2.10)."""
    db = tmp_path / "optuna.db"
    _, sweep = run_cli(tmp_path, *SHORT, "hydra/sweeper=tune", "hydra.sweeper.n_trials=2",
                       f"hydra.sweeper.storage=sqlite:///{db}", multirun=True)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"trainer.beta", "trainer.lr"}
    assert 0.05 <= best["best_params"]["trainer.beta"] <= 0.5
    res = collect_sweep.collect(sweep)
    assert res["n_jobs"] == 2 and res["n_failed"] == 0 and res["varying"] == ["trainer.beta", "trainer.lr"]
    assert len(res["groups"]) == 2 and all(len(g["seeds"]) == 1 for g in res["groups"])
    accs = [json.loads((sweep / str(i) / "eval.json").read_text())["after"]["acc"] for i in range(2)]
    assert best["best_value"] == max(accs)  # the sweeper maximised what run() returned
    import optuna  # the stored study holds both finished trials: a later sweep with the same storage resumes it

    study = optuna.load_study(study_name="stepdpo", storage=f"sqlite:///{db}")
    assert sorted(t.value for t in study.trials if t.value is not None) == sorted(accs)
