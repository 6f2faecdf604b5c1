"""Bad input is refused before anything is spent (issue 29 point 3), in one line naming the file,
the line and the field where there is one: an empty pairs file, unknown keys in a pair row, a run or
validation that ends with no usable pair, a file's own scores under a reward that would replace
them, and with reward=openai every free check (fields, token lengths) before any judge request.

The check functions are tested here in the fast tier; each case also runs through the CLI (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from stepdpo.data import StepPair
from stepdpo.datasets import pairs_file
from stepdpo.pairs import call_builder, check_own_scores, no_pairs_message
from stepdpo.rewards.base import ScoreResult
from stepdpo.rewards.fixed import LabelScorer
from stepdpo.rewards.rule import RuleScorer

from conftest import ROOT, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "pairs" / "pairs.jsonl"
ROW = {"prompt": "What is 2 + 3?", "chosen": ["2 + 3 = 5", "The answer is 5"],
       "rejected": ["2 + 3 = 6", "The answer is 6"], "answer": "5"}


def write(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def one_error_line(proc) -> str:
    """The CLI's bad-input contract: exit 2 and one `error: ...` line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- fast: the check functions


def test_empty_pairs_file_names_the_file_and_the_row_layout(tmp_path):
    for text in ("", "\n  \n"):
        f = tmp_path / "empty.jsonl"
        f.write_text(text)
        with pytest.raises(ValueError) as e:
            pairs_file.load(path=str(f))
        msg = str(e.value)
        assert msg.startswith(f"{f}: the pairs file is empty") and '"chosen"' in msg and "\n" not in msg


def test_unknown_row_keys_name_file_line_and_the_closest_field(tmp_path):
    bad = {**ROW, "chosen_step_scores": [1.0, 1.0], "rejected_step_scores": [0.0, 0.0], "zzz": 1}
    f = write(tmp_path / "p.jsonl", ROW, bad)
    with pytest.raises(ValueError) as e:
        pairs_file.load(path=str(f), eval_fraction=None)
    msg = str(e.value)
    assert msg.startswith(f"{f}:2: unknown fields 'chosen_step_scores' (did you mean 'chosen_scores'?), "
                          "'rejected_step_scores' (did you mean 'rejected_scores'?), 'zzz';")
    assert "dataset.extra_fields=ignore" in msg
    b = pairs_file.load(path=str(f), eval_fraction=None, extra_fields="ignore")
    assert len(b.pairs) == 2 and all(p.chosen_scores is None for p in b.pairs)  # the misspelt columns are dropped
    with pytest.raises(ValueError, match="dataset.extra_fields"):
        pairs_file.load(path=str(f), extra_fields="keep")


def test_file_scores_are_kept_by_labels_and_refused_by_a_scoring_reward(tmp_path):
    f = write(tmp_path / "p.jsonl", ROW, {**ROW, "prompt": "What is 2 + 4?", "chosen_scores": [1.0, 1.0],
                                            "rejected_scores": [0.0, 0.0]})
    pairs = pairs_file.load(path=str(f), eval_fraction=None).pairs
    check_own_scores(pairs, LabelScorer(), reward="reward=prm800k")  # labels: the file's scores are the point
    check_own_scores(pairs[:1], RuleScorer(), reward="reward=rule")  # no scores in the file: nothing to replace
    with pytest.raises(ValueError) as e:
        check_own_scores(pairs, RuleScorer(), reward="reward=rule")
    assert str(e.value).startswith(f"{f}:2: the pairs file carries its own step scores")
    assert "reward=prm800k" in str(e.value) and "dataset.rescore=true" in str(e.value)
    rescored = pairs_file.load(path=str(f), eval_fraction=None, rescore=True).pairs
    assert [p.chosen_scores for p in rescored] == [None, None]
    check_own_scores(rescored, RuleScorer(), reward="reward=rule")


def test_no_pairs_message_says_where_and_the_fix():
    msg = no_pairs_message({"source": "dataset", "rows": 3, "kept": 3, "dropped_unlabelled": 3, "pairs": 0},
                           source="my.jsonl", builder="pairs=on_policy", reward="reward=prm800k")
    assert msg.startswith("my.jsonl: no usable pairs (rows=3, kept=3, dropped_unlabelled=3): reward=prm800k keeps only")
    assert "'chosen_scores'" in msg
    msg = no_pairs_message({"dropped": 2, "examples": {"too_long": ["my.jsonl:4: pair is 99 tokens"]}},
                           source="my.jsonl", builder="pairs=on_policy", reward="reward=rule")
    assert msg.endswith("first: my.jsonl:4: pair is 99 tokens")
    msg = no_pairs_message({"problems": 4, "samples": 8}, source=None, builder="pairs=on_policy", reward="reward=rule")
    assert msg.startswith("pairs=on_policy: no usable pairs were built (problems=4, samples=8)") and "pairs.k" in msg
    msg = no_pairs_message({"problems": 4, "samples": 8, "no_chosen": 5}, source=None, builder="pairs=outcome",
                           reward="reward=rollout")
    assert "pairs.use_gold=true, or pairs.chosen=answer" in msg and "min_pairs" not in msg  # outcome's own knobs


def test_call_builder_passes_only_what_a_builder_names_and_checks_the_return():
    seen = {}

    def builder(problems, *, seed=0, scorer=None):
        seen.update(problems=problems, seed=seed, scorer=scorer)
        return [], {"n": 0}

    assert call_builder(builder, ["p"], pool=[], model="m", tokenizer="t", scorer="s", seed=3) == ([], {"n": 0})
    assert seen == {"problems": ["p"], "seed": 3, "scorer": "s"}
    with pytest.raises(TypeError, match=r"must return \(pairs, report\)"):
        call_builder(lambda problems: [], [])


def test_every_pairs_builder_keeps_the_contract():
    """Every `pairs` group target: no catch-all **kwargs; every parameter is a setting its YAML sets, a
    runtime input, or has a default."""
    import inspect

    from omegaconf import OmegaConf

    from stepdpo.config import _import
    from stepdpo.pairs import RUNTIME_INPUTS

    for yaml in sorted((ROOT / "conf" / "pairs").glob("*.yaml")):
        node = OmegaConf.load(yaml)
        params = inspect.signature(_import(node._target_)).parameters
        assert not any(p.kind == p.VAR_KEYWORD for p in params.values()), yaml.name
        for name, p in list(params.items())[1:]:
            assert name in node or name in RUNTIME_INPUTS or p.default is not p.empty, (yaml.name, name)


class CountingScorer:
    name = "counting"

    def __init__(self):
        self.requests = 0

    def score(self, requests):
        self.requests += len(requests)
        return [ScoreResult([1.0] * len(r.steps)) for r in requests]


def test_free_checks_run_before_any_scoring(tmp_path):
    """finish_pairs validates (fields, token lengths) before the scorer sees a pair: a too-long pair
    stops the round with zero scoring requests; a fitting one is scored."""
    from stepdpo.model import char_tokenizer
    from stepdpo.run import finish_pairs

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=pairs", "dataset.path=x.jsonl", "trainer.max_length=16"])
    tok = char_tokenizer()
    pair = StepPair(id="p1", question=ROW["prompt"], answer="5", prefix=[], chosen=ROW["chosen"],
                    rejected=ROW["rejected"], meta={"where": "x.jsonl:1"})
    scorer = CountingScorer()
    with pytest.raises(ValueError, match=r"x.jsonl:1: pair is \d+ tokens .* > max_length=16"):
        finish_pairs([pair], {}, scorer, tok, cfg, tmp_path / "pairs.jsonl")
    assert scorer.requests == 0 and not (tmp_path / "pairs.jsonl").exists()
    cfg.trainer.max_length = 512
    pairs, report = finish_pairs([pair], {}, scorer, tok, cfg, tmp_path / "pairs.jsonl")
    assert scorer.requests == 2 and report["scored"] == 1 and report["pairs"] == 1


# ----------------------------------------------------------------------------- slow: through the CLI


@pytest.mark.slow
def test_cli_empty_pairs_file(tmp_path):
    f = write(tmp_path / "empty.jsonl", "")
    proc, run_dir = run_cli(tmp_path, "dataset=pairs", f"dataset.path={f}", check=False)
    line = one_error_line(proc)
    assert f"{f}: the pairs file is empty" in line and "DatasetGenerationError" not in proc.stderr
    assert not (run_dir / "config_resolved.yaml").exists()  # refused before any work


@pytest.mark.slow
def test_cli_unknown_keys_then_zero_usable_pairs(tmp_path):
    rows = [{**ROW, "prompt": f"What is 2 + {i}?", "chosen_step_scores": [1.0, 1.0],
             "rejected_step_scores": [0.0, 0.0]} for i in range(3)]
    f = write(tmp_path / "misspelt.jsonl", *rows)
    common = ["dataset=pairs", f"dataset.path={f}", "dataset.eval_fraction=null", "reward=prm800k"]
    proc, run_dir = run_cli(tmp_path / "a", *common, "validate_only=true", check=False)
    line = one_error_line(proc)
    assert f"{f}:1: unknown fields 'chosen_step_scores' (did you mean 'chosen_scores'?)" in line
    # told to ignore the keys, nothing is labelled: a validation with no usable pair fails, it never exits 0
    for extra in (["validate_only=true"], []):
        proc, run_dir = run_cli(tmp_path / f"b{len(extra)}", *common, "dataset.extra_fields=ignore", *extra,
                                check=False)
        line = one_error_line(proc)
        assert line.startswith(f"error: {f}: no usable pairs (") and "dropped_unlabelled=3" in line
        assert not (run_dir / "validation.json").exists() and not (run_dir / "config_resolved.yaml").exists()


@pytest.mark.slow
def test_cli_file_scores_under_the_default_reward(tmp_path):
    proc, run_dir = run_cli(tmp_path / "a", "dataset=pairs", f"dataset.path={FIXTURE}", "validate_only=true",
                            check=False)
    line = one_error_line(proc)
    assert line.startswith(f"error: {FIXTURE}:1: the pairs file carries its own step scores")
    assert "and reward=rule would replace them" in line and "add reward=prm800k" in line
    assert not (run_dir / "config_resolved.yaml").exists()
    quick = ["validate_only=true", "sft.max_steps=0", "eval.before=false"]  # the pairs are all this test reads
    _, kept = run_cli(tmp_path / "b", "dataset=pairs", f"dataset.path={FIXTURE}", *quick, "reward=prm800k")
    _, rescored = run_cli(tmp_path / "c", "dataset=pairs", f"dataset.path={FIXTURE}", *quick, "dataset.rescore=true")
    file_scores = {r["id"]: r.get("chosen_scores") for r in map(json.loads, FIXTURE.read_text().splitlines())}
    k = {r["id"]: r for r in map(json.loads, (kept / "pairs.jsonl").read_text().splitlines())}
    assert k and all(k[i]["chosen_scores"] == file_scores[i] for i in k)
    r = [json.loads(line) for line in (rescored / "pairs.jsonl").read_text().splitlines()]
    assert r and all(p["meta"]["scored_by"] == "rule" for p in r)


@pytest.mark.slow
def test_cli_judge_is_not_called_when_lengths_fail(tmp_path):
    from fake_openai import FakeOpenAI

    with FakeOpenAI() as fake:
        proc, run_dir = run_cli(tmp_path, "dataset=pairs", f"dataset.path={FIXTURE}", "dataset.rescore=true",
                                "reward=openai", f"reward.engine.base_url={fake.base_url}",
                                f"reward.engine.cache_path={tmp_path / 'judge.sqlite'}", "reward.engine.progress=false",
                                "trainer.max_length=24", check=False)  # eval.before=true: its samples are judged too
        requests = dict(fake.counts)
    line = one_error_line(proc)
    assert line.startswith(f"error: {FIXTURE}:1: pair is ") and "> max_length=24" in line
    assert sum(requests.values()) == 0, requests
    assert not (run_dir / "base_model").exists() and not (run_dir / "eval_before.json").exists()


def test_no_pairs_leave_no_pairs_file(tmp_path):
    """A round with no usable pair writes no pairs.jsonl (require_pairs then stops the run): an empty file would be
    taken as that round's finished pairs by trainer.resume=auto after the config is fixed."""
    from conftest import compose_config
    from stepdpo.model import char_tokenizer
    from stepdpo.rewards.rule import RuleScorer
    from stepdpo.run import finish_pairs, require_pairs

    cfg = compose_config()
    path = tmp_path / "pairs.jsonl"
    pairs, report = finish_pairs([], {"source": "pairs=outcome"}, RuleScorer(), char_tokenizer(), cfg, path)
    assert pairs == [] and report["pairs"] == 0 and not path.exists()
    with pytest.raises(ValueError, match="no usable pairs"):
        require_pairs(cfg, False, pairs, report)


@pytest.mark.slow
def test_cli_all_zero_token_weights_is_an_error(tmp_path):
    """weighting=advantage reads step values; reward=none gives none, so every token weight is 0: the run stops
    before training with the reason, instead of training a constant preference loss."""
    proc, run_dir = run_cli(tmp_path, "trainer=stepdpo", "trainer.weighting=advantage", "reward=none", check=False)
    line = one_error_line(proc)
    assert "trainer.weighting=advantage: every token weight of the" in line and "(reward=none;" in line
    assert "reward=rollout" in line and not (run_dir / "adapter").exists()


@pytest.mark.slow
def test_cli_rollout_on_pairs_without_answers(tmp_path):
    """reward=rollout values a step by reaching the reference answer: a pairs file without answers is refused,
    naming the row, before the model is built (not after the warm-up, as "every pair failed to score")."""
    rows = [{k: v for k, v in ROW.items() if k != "answer"} | {"prompt": f"What is 2 + {i}?"} for i in range(3)]
    f = write(tmp_path / "no_answers.jsonl", *rows)
    proc, run_dir = run_cli(tmp_path, "dataset=pairs", f"dataset.path={f}", "dataset.eval_fraction=null",
                            "reward=rollout", "trainer=stepdpo", "trainer.weighting=advantage", check=False)
    line = one_error_line(proc)
    assert f"{f}:1: field 'answer' is empty (3 of 3 pairs): reward=rollout" in line
    assert not (run_dir / "config_resolved.yaml").exists()
