"""Dataset loaders on the real shared data (GSM8K, MATH-500) and on PRM800K / Step-DPO / pair
fixtures written in the published layouts; every option and the located errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from stepdpo.answers import answers_match, extract_answer, last_boxed
from stepdpo.data import DatasetBundle, read_jsonl
from stepdpo.datasets import gsm8k, math as math_ds, pairs_file, prm800k, step_dpo

from conftest import ROOT, SHARED_DATA as DATA, compose_config

FIX = ROOT / "tests" / "fixtures"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k" / "train.jsonl").exists(), reason=f"shared data not at {DATA}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- GSM8K


@pytest.fixture(scope="module")
def gsm8k_full() -> DatasetBundle:
    return gsm8k.load(path=str(DATA / "gsm8k"))


@needs_data
def test_gsm8k_all_rows_load_and_segment(gsm8k_full):
    b = gsm8k_full
    assert (b.name, b.answer_format, b.pairs) == ("gsm8k", "gsm8k", None)
    assert len(b.train) == 7473 and len(b.eval) == 1319
    assert len({p.id for p in b.train + b.eval}) == 7473 + 1319
    raw = {ln: row for ln, row in read_jsonl(DATA / "gsm8k" / "train.jsonl")}
    for p in b.train:
        assert len(p.steps) >= 2 and p.steps[-1] == f"#### {raw[int(p.id.rsplit('-', 1)[1])]['answer'].split('####')[-1].strip()}"
        assert all(s and "\n" not in s for s in p.steps)
        assert "####" not in "".join(p.steps[:-1])
        assert answers_match(extract_answer(p.solution), p.answer)  # what evaluation will extract
        assert "," not in p.answer
    assert sum(p.meta["n_annotations"] for p in b.train) == 23716
    first = b.train[0]
    assert first.steps == ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
                           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.", "#### 72"]
    assert first.answer == "72" and first.meta["where"].endswith("gsm8k/train.jsonl:1")


@needs_data
def test_gsm8k_subsample_is_seeded_and_options():
    a = gsm8k.load(path=str(DATA / "gsm8k"), n_train=20, n_eval=5, seed=1)
    b = gsm8k.load(path=str(DATA / "gsm8k"), n_train=20, n_eval=5, seed=1)
    c = gsm8k.load(path=str(DATA / "gsm8k"), n_train=20, n_eval=5, seed=2)
    assert [p.id for p in a.train] == [p.id for p in b.train] != [p.id for p in c.train]
    assert len(a.train) == 20 and len(a.eval) == 5
    s = gsm8k.load(path=str(DATA / "gsm8k"), n_train=20, n_eval=0, seed=1, strip_annotations=True, answer_step=False)
    assert [p.id for p in s.train] == [p.id for p in a.train] and s.eval == []
    for p, q in zip(s.train, a.train):
        assert "<<" not in p.solution and p.meta["annotated_steps"] == q.steps[:-1]
        assert not p.steps[-1].startswith("####")


@needs_data
def test_gsm8k_answer_only_pool():
    a = gsm8k.load(path=str(DATA / "gsm8k"), n_train=20, n_eval=5, seed=1)
    b = gsm8k.load(path=str(DATA / "gsm8k"), n_train=20, n_eval=5, seed=1, n_pool=30)
    assert [p.id for p in b.train] == [p.id for p in a.train] and a.pool == []
    assert len(b.pool) == 30 and all(p.steps == [] and p.answer for p in b.pool)
    assert not {p.question for p in b.pool} & {p.question for p in b.train}
    assert not {p.question for p in b.pool} & {p.question for p in b.eval}
    with pytest.raises(ValueError, match=r"dataset.n_pool=7470: only 7453 training problems"):
        gsm8k.load(path=str(DATA / "gsm8k"), n_train=20, n_eval=5, n_pool=7470)


@needs_data
def test_gsm8k_single_file_needs_an_eval_split():
    f = DATA / "gsm8k" / "test.jsonl"
    with pytest.raises(ValueError, match="is a single file: set dataset.eval_path .* or dataset.eval_fraction"):
        gsm8k.load(path=str(f))
    b = gsm8k.load(path=str(f), eval_fraction=0.25)
    assert len(b.train) + len(b.eval) == 1319 and abs(len(b.eval) - 330) <= 1
    assert not {p.question for p in b.train} & {p.question for p in b.eval}
    with pytest.raises(ValueError, match="both set"):
        gsm8k.load(path=str(f), eval_path=str(f), eval_fraction=0.1)
    with pytest.raises(FileNotFoundError, match="relative paths are resolved from the current directory"):
        gsm8k.load(path="no/such/dir")
    with pytest.raises(ValueError, match="dataset.n_train: must be null"):
        gsm8k.load(path=str(DATA / "gsm8k"), n_train=-1)


def test_gsm8k_bad_rows(tmp_path, caplog):
    good = {"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5\n#### 5"}
    f = write_jsonl(tmp_path / "train.jsonl", [
        good,
        {"question": "No answer key"},
        '{"question": "broken json", ',
        {"question": "Q", "answer": "no final line"},
        {"question": 3, "answer": "x\n#### 1"},
        "",
        {"question": "Q", "answer": "#### 4"},
        {"question": "Q", "answer": "1 + 1 = 2\n####   "},
        good,
    ])
    write_jsonl(tmp_path / "test.jsonl", [good])
    with pytest.raises(ValueError, match=r"train\.jsonl:2: field 'answer' missing \(keys: \['question'\]\)"):
        gsm8k.load(path=str(tmp_path))
    caplog.set_level(logging.WARNING)
    b = gsm8k.load(path=str(tmp_path), on_invalid="skip")
    assert len(b.train) == 2 and [p.id for p in b.train] == ["gsm8k-train-1", "gsm8k-train-9"]
    msg = caplog.text
    assert "skipped 6 of 8 rows" in msg  # the blank line 6 is not a row
    for expected in ("train.jsonl:2: field 'answer' missing", "train.jsonl:3: invalid JSON"):
        assert expected in msg or expected.split(": ", 1)[1].split(" (")[0] in msg

    from stepdpo.datasets.common import InvalidRows, read_converted

    inv = InvalidRows("skip", str(f))
    read_converted(f, gsm8k.convert, inv)
    rep = inv.report()
    assert rep["rows"] == 8 and rep["skipped"] == 6
    assert rep["skipped_by_reason"] == {"field 'answer' missing": 1, "invalid JSON": 1,
                                        "field 'answer' has no '#### <final answer>' line": 1,
                                        "field 'question' must be str": 1,
                                        "field 'answer' has no reasoning lines before '####'": 1,
                                        "field 'answer' has nothing after '####'": 1}
    assert rep["examples"][0].startswith(f"{f}:2: field 'answer' missing")
    assert any(e.startswith(f"{f}:5: field 'question' must be str, got int") for e in rep["examples"])


# ----------------------------------------------------------------------------- MATH-500


@needs_data
def test_math500_boxed_answers_agree_with_answer_field():
    """Measured: the last \\boxed{} of all 500 MATH-500 solutions equals the `answer` field (500/500
    under answers_match, 500/500 under math-verify's verify directly, 500/500 even as strings)."""
    from math_verify import parse, verify

    rows = [row for _, row in read_jsonl(DATA / "math500" / "test.jsonl")]
    boxed = [last_boxed(r["solution"]) for r in rows]
    agree = sum(answers_match(b, r["answer"]) for b, r in zip(boxed, rows))
    mv = sum(bool(verify(parse(f"${r['answer']}$"), parse(f"${b}$"))) for b, r in zip(boxed, rows))
    same = sum(b is not None and b.strip() == r["answer"].strip() for b, r in zip(boxed, rows))
    print(f"\nMATH-500: boxed vs answer: answers_match {agree}/500, math-verify {mv}/500, identical strings {same}/500")
    assert len(rows) == 500
    assert agree == 500 and mv == 500 and same == 500


@needs_data
def test_math500_loads_split_and_segments():
    b = math_ds.load(path=str(DATA / "math500" / "test.jsonl"))
    assert (b.name, b.answer_format) == ("math", "boxed")
    assert len(b.train) == 400 and len(b.eval) == 100
    assert not {p.question for p in b.train} & {p.question for p in b.eval}
    probs = b.train + b.eval
    assert len({p.id for p in probs}) == 500 and probs[0].id.startswith("test/")
    assert all(p.steps and all("\n" not in s and s.strip() for s in p.steps) for p in probs)
    # the answer survives segmentation: evaluation extracts it from the model-format solution text
    assert sum(answers_match(extract_answer(p.solution), p.answer) for p in probs) == 500
    multi = sum(len(p.steps) > 1 for p in probs)
    assert multi == 414  # sentences; paragraphs would give 150
    assert sum(len(p.steps) > 1 for p in math_ds.load(path=str(DATA / "math500" / "test.jsonl"),
                                                       step_mode="paragraphs").train) < 150
    subj = {p.meta["subject"] for p in probs}
    assert "Algebra" in subj and {p.meta["level"] for p in probs} == {1, 2, 3, 4, 5}
    lv = math_ds.load(path=str(DATA / "math500" / "test.jsonl"), levels=[1], subjects=["algebra"], n_eval=3)
    assert lv.train and all(p.meta["level"] == 1 and p.meta["subject"] == "Algebra" for p in lv.train + lv.eval)
    assert len(lv.eval) <= 3


def test_math_answer_fallback_and_errors(tmp_path):
    rows = [
        {"problem": "What is $1+1$?", "solution": "We get $1 + 1 = \\boxed{2}$.", "subject": "Prealgebra",
         "level": "Level 1"},
        {"problem": "What is $2+2$?", "solution": "Step 1: add.\nStep 2: $\\boxed{4}$.", "answer": 4, "level": "Level ?"},
        {"problem": "P", "solution": "no box here"},
        {"problem": "P", "solution": "$\\boxed{1}$", "answer": ""},
        {"solution": "$\\boxed{1}$"},
    ]
    d = tmp_path / "m"
    d.mkdir()
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "test.jsonl", rows[:1])
    with pytest.raises(ValueError, match=r"train\.jsonl:3: field 'answer' missing and field 'solution' has no "):
        math_ds.load(path=str(d), eval_fraction=None)
    b = math_ds.load(path=str(d), eval_fraction=None, on_invalid="skip", step_mode="auto")
    assert [p.answer for p in b.train] == ["2", "4"] and len(b.eval) == 1
    assert b.train[0].meta["level"] == 1 and b.train[1].meta["level"] == "Level ?"
    assert b.train[1].steps == ["Step 1: add.", "Step 2: $\\boxed{4}$."]
    assert b.train[0].id == "math-train-1"
    with pytest.raises(ValueError, match="dataset.step_mode: 'words' is not one of"):
        math_ds.load(path=str(d), step_mode="words")
    with pytest.raises(ValueError, match="dataset.levels"):
        math_ds.load(path=str(d), eval_fraction=None, on_invalid="skip", levels="1")
    for i, expected in ((3, "field 'answer' must be non-empty"), (4, "field 'problem' missing")):
        from stepdpo.datasets.common import InvalidRows, read_converted

        inv = InvalidRows("skip", "m")
        read_converted(d / "train.jsonl", math_ds.convert, inv)
        assert any(e.startswith(f"{d / 'train.jsonl'}:{i + 1}: {expected}") for e in inv.report()["examples"])


# ----------------------------------------------------------------------------- PRM800K


def _prm(**kw) -> DatasetBundle:
    kw.setdefault("eval_path", None)
    return prm800k.load(path=str(FIX / "prm800k"), **kw)


def _view(pairs):
    return [(p.meta["where"].rsplit("/", 1)[1], p.prefix, p.chosen, p.chosen_scores, p.rejected, p.rejected_scores)
            for p in pairs]


P1, P2 = "phase1_train.jsonl", "phase2_train.jsonl"
ADD = "I need to add $2$ and $3$."
DEFAULT_STEP_PAIRS = [
    (f"{P1}:1", [ADD], ["$2 + 3 = 5$."], [1.0], ["$2 + 3 = 6$."], [0.0]),
    (f"{P1}:1", [ADD, "$2 + 3 = 5$."], ["So the sum is $5$."], [1.0], ["So the sum is $6$."], [0.0]),
    (f"{P1}:1", [ADD, "$2 + 3 = 5$."], ["So the sum is $5$."], [1.0], ["So the sum is $7$."], [0.0]),
    (f"{P1}:6", [], ["$17 = 3 \\cdot 5 + 2$."], [1.0], ["$17 = 3 \\cdot 5 + 3$."], [0.0]),
    (f"{P2}:1", ["Both $14$ and $21$ are divisible by $7$."], ["So $\\frac{14}{21} = \\frac{2}{3}$."], [1.0],
     ["So $\\frac{14}{21} = \\frac{2}{4}$. The answer is $\\boxed{\\frac{2}{4}}$"], [0.0]),
]


def test_prm800k_default_step_pairs():
    b = _prm()
    assert (b.name, b.answer_format) == ("prm800k", "boxed")
    assert _view(b.pairs) == DEFAULT_STEP_PAIRS
    assert [p.question for p in b.train] == ["What is $2 + 3$?", "What is the remainder when $17$ is divided by $5$?",
                                             "Simplify $\\frac{14}{21}$."]
    assert [p.answer for p in b.train] == ["5", "2", "\\frac{2}{3}"]
    assert b.train[0].steps == ["We have $2 + 3 = 5$.", "So the answer is $\\boxed{5}$."]
    assert b.eval == []
    assert all(p.source == "prm800k" and p.meta["kind"] == "step" and p.answer for p in b.pairs)
    assert len({p.id for p in b.pairs}) == len(b.pairs)
    assert {p.meta["phase"] for p in b.pairs} == {1, 2} and b.pairs[-1].meta["generation"] == 5


def test_prm800k_whole_solution_pairs_carry_every_rating():
    b = _prm(whole_solution_pairs=True)
    whole = [p for p in b.pairs if p.meta["kind"] == "whole"]
    assert _view(b.pairs)[:5] == DEFAULT_STEP_PAIRS
    assert _view(whole) == [
        (f"{P1}:2", [], [ADD, "$2 + 3 = 5$.", "So the sum is $5$.", "The answer is $\\boxed{5}$"], [0.5, 1.0, 1.0, 1.0],
         [ADD, "$2 + 3 = 23$, putting the digits together."], [0.5, 0.0]),
        (f"{P2}:1", [], ["The greatest common divisor of $14$ and $21$ is $7$.",
                         "So $\\frac{14}{21} = \\frac{2}{3}$. The answer is $\\boxed{\\frac{2}{3}}$"], [1.0, 1.0],
         ["Both $14$ and $21$ are divisible by $7$.",
          "So $\\frac{14}{21} = \\frac{2}{4}$. The answer is $\\boxed{\\frac{2}{4}}$"], [1.0, 0.0]),
    ]
    assert whole[0].meta["rejected_ratings"] == [0, -1] and whole[0].meta["chosen_ratings"] == [0, 1, 1, 1]
    only = _prm(step_pairs=False, whole_solution_pairs=True)
    assert _view(only.pairs) == _view(whole)
    with pytest.raises(ValueError, match="both false: no pairs to build"):
        _prm(step_pairs=False)


def test_prm800k_rating_scores_mapping():
    b = _prm(whole_solution_pairs=True, rating_scores={"-1": 0.1, "0": 0.4, "1": 0.9})
    assert b.pairs[0].chosen_scores == [0.9] and b.pairs[0].rejected_scores == [0.1]
    assert b.pairs[-2].chosen_scores == [0.4, 0.9, 0.9, 0.9] and b.pairs[-2].rejected_scores == [0.4, 0.1]
    for bad, msg in (({-1: 0.0, 1: 1.0}, r"missing ratings \[0\]"), ({-1: 0.0, 0: 0.5, 1: 2.0}, r"rating_scores\[1\]"),
                     ({-1: 1.0, 0: 0.5, 1: 0.0}, "must be below"), ({-2: 0, -1: 0, 0: 0, 1: 1}, "key -2"),
                     ({-1: 0.6, 0: 0.8, 1: 1.0}, r"-1 must score below 0.5"),  # no step would be wrong (is_wrong)
                     ({-1: 0.0, 0: 0.2, 1: 0.4}, r"\+1 at least 0.5"),
                     ([0, 1], "must be a mapping")):
        with pytest.raises(ValueError, match=msg):
            _prm(rating_scores=bad)


@pytest.mark.parametrize("opts,added,removed", [
    ({"drop_quality_control": False}, [(f"{P1}:3", [], ["$3 \\cdot 4 = 12$."], [1.0], ["$3 \\cdot 4 = 7$."], [0.0])], []),
    ({"drop_initial_screening": False}, [(f"{P1}:4", [], ["$10 - 7 = 3$."], [1.0], ["$10 - 7 = 4$."], [0.0])], []),
    ({"bad_problem": "keep"}, [(f"{P1}:5", [], ["Subtracting $x$ gives $0 = 1$."], [1.0], ["So $x = 0$."], [0.0]),
                               (f"{P1}:8", [], ["There is no solution since $0 = 1$ is false."], [1.0], ["So $x = 0$."],
                                [0.0])], []),
    ({"bad_problem": "drop_row"}, [(f"{P1}:8", [], ["There is no solution since $0 = 1$ is false."], [1.0],
                                    ["So $x = 0$."], [0.0])], []),
    ({"give_up": "drop_row"}, [], [3]),
    ({"skip_flagged": False}, [(f"{P1}:7", [], ["$2 + 3$ is five."], [1.0], ["$2 + 3$ is four."], [0.0])], []),
    ({"use_human_completions": False}, [], [1, 2]),
    ({"max_pairs_per_step": 1}, [], [2]),
])
def test_prm800k_options(opts, added, removed):
    got = _view(_prm(**opts).pairs)
    expected = [p for i, p in enumerate(DEFAULT_STEP_PAIRS) if i not in removed]
    assert sorted(got, key=str) == sorted(expected + added, key=str)


def test_prm800k_problem_filters_and_answer_style():
    assert "Find $x$ if $x = x + 1$." in [p.question for p in _prm(bad_problem="keep").train]
    assert "Find $x$ if $x = x + 1$." in [p.question for p in _prm(bad_problem="drop_row").train]  # row 8 is fine
    assert "What is the remainder when $17$ is divided by $5$?" not in [p.question for p in _prm(give_up="drop_row").train]
    keep = _prm(answer_style="keep", single_line=False)
    assert keep.pairs[-1].rejected == ["So $\\frac{14}{21} = \\frac{2}{4}$.\n\n# Answer\n\n\\frac{2}{4}"]
    # the boxed rewrite is what evaluation extracts
    assert extract_answer(_prm().pairs[-1].rejected[0]) == "\\frac{2}{4}"
    one = prm800k.load(path=str(FIX / "prm800k" / P2), eval_path=None)
    assert [p.question for p in one.train] == ["Simplify $\\frac{14}{21}$."] and len(one.pairs) == 1
    assert one.train[0].steps  # from the phase-2 row that has ground_truth_solution


@needs_data
def test_prm800k_eval_split_and_caps():
    b = _prm(eval_path=str(DATA / "math500" / "test.jsonl"), n_eval=7)
    assert len(b.eval) == 7 and all(p.meta["source"] == "math" for p in b.eval) and len(b.pairs) == 5
    h = _prm(eval_fraction=0.34, seed=0)
    assert len(h.eval) == 1 and len(h.train) == 2
    assert all(p.question in {q.question for q in h.train} for p in h.pairs)  # pairs follow their problems
    assert len(_prm(max_pairs=2).pairs) == 2
    assert len(_prm(n_train=1, seed=3).train) == 1


def test_prm800k_bad_rows(tmp_path):
    rows = [json.loads(line) for line in (FIX / "prm800k" / P1).read_text().splitlines()]
    bad_rating = json.loads(json.dumps(rows[0]))
    bad_rating["label"]["steps"][1]["completions"][1]["rating"] = 2
    bad_finish = json.loads(json.dumps(rows[0]))
    bad_finish["label"]["finish_reason"] = "timeout"
    bad_chosen = json.loads(json.dumps(rows[0]))
    bad_chosen["label"]["steps"][0]["chosen_completion"] = 3
    no_answer = json.loads(json.dumps(rows[0]))
    del no_answer["question"]["ground_truth_answer"], no_answer["question"]["ground_truth_solution"]
    f = write_jsonl(tmp_path / "phase1_train.jsonl", [rows[0], bad_rating, bad_finish, bad_chosen, no_answer,
                                                     {"question": "text", "label": {}}])
    with pytest.raises(ValueError, match=r"phase1_train\.jsonl:2: field 'label\.steps\[1\]\.completions\[1\]\.rating' "
                                         r"must be -1, 0, 1 or null, got 2"):
        prm800k.load(path=str(f), eval_path=None)
    from stepdpo.datasets.common import InvalidRows, read_converted

    inv = InvalidRows("skip", str(f))
    good = read_converted(f, prm800k.convert, inv, rating_scores=prm800k.DEFAULT_RATING_SCORES)
    assert len(good) == 1
    ex = inv.report()["examples"]
    assert ex[1] == (f"{f}:3: field 'label.finish_reason' is 'timeout'; expected one of "
                     "('solution', 'found_error', 'give_up', 'bad_problem')")
    assert ex[2].startswith(f"{f}:4: field 'label.steps[0].chosen_completion' must be null or an index into its 1 ")
    assert ex[3].startswith(f"{f}:5: field 'question.ground_truth_answer' must be a non-empty string")
    assert ex[4].startswith(f"{f}:6: field 'question' must be dict, got str")
    b = prm800k.load(path=str(f), eval_path=None, on_invalid="skip")
    assert len(b.pairs) == 3


# ----------------------------------------------------------------------------- Step-DPO


def test_step_dpo_pairs_and_problems():
    b = step_dpo.load(path=str(FIX / "step_dpo" / "train.jsonl"), eval_path=None)
    assert (b.name, b.answer_format, len(b.pairs), len(b.train)) == ("step_dpo", "boxed", 4, 3)
    p = b.pairs[0]
    assert p.prefix == ["Let's think step by step.", "Step 1: Subtract $2$ from both sides to get $3x = 9$."]
    assert p.chosen == ["Step 2: Divide both sides by $3$ to get $x = 3$."] and p.chosen_scores == [1.0]
    assert p.rejected == ["Step 2: Divide both sides by $3$ to get $x = 4$."] and p.rejected_scores == [0.0]
    assert p.meta["where"].endswith("step_dpo/train.jsonl:1") and p.meta["dataset"] == "MATH_Rephrased"
    assert b.pairs[1].prefix == ["Let's think step by step."]  # "...step by step. Step 1:" diverges at step 1
    assert b.pairs[1].chosen == ["Step 1: Tom has $4 \\times 6 = 24$ apples."]
    assert b.pairs[2].answer == "\\frac{5}{6}"  # no answer field: last \boxed{} of full_chosen
    assert b.pairs[2].chosen == ["Step 3: Adding gives $\\frac{3}{6} + \\frac{2}{6} = \\frac{5}{6}$."]
    assert b.pairs[0].meta["problem_id"] == b.pairs[3].meta["problem_id"] == b.train[0].id
    assert b.train[0].steps == ["Let's think step by step.", "Step 1: Subtract $2$ from both sides to get $3x = 9$.",
                                "Step 2: Divide both sides by $3$ to get $x = 3$.",
                                "Step 3: The value of $x$ is $\\boxed{3}$. The answer is: 3"]
    assert all(answers_match(extract_answer(q.solution), q.answer) for q in b.train)

    full = step_dpo.load(path=str(FIX / "step_dpo"), eval_path=None, full_continuation=True, chosen_score=0.9,
                         rejected_score=0.2)
    assert full.pairs[1].rejected == ["Step 1: Tom has $4 + 6 = 10$ apples.",
                                      "Step 2: After eating 5, he has $10 - 5 = 5$ apples left. The answer is $\\boxed{5}$."]
    assert full.pairs[1].chosen_scores == [0.9, 0.9] and full.pairs[1].rejected_scores == [0.2, 0.2]
    assert len(step_dpo.load(path=str(FIX / "step_dpo"), eval_fraction=0.34, eval_path=None).eval) == 1
    with pytest.raises(ValueError, match="dataset.chosen_score"):
        step_dpo.load(path=str(FIX / "step_dpo"), eval_path=None, chosen_score=2)
    with pytest.raises(ValueError, match=r"dataset.rejected_score must be below 0.5"):  # weights.is_wrong's line
        step_dpo.load(path=str(FIX / "step_dpo"), eval_path=None, rejected_score=0.5)


def test_step_dpo_bad_rows(tmp_path):
    row = json.loads((FIX / "step_dpo" / "train.jsonl").read_text().splitlines()[0])
    same = {**row, "rejected": row["chosen"]}
    no_prompt = {k: v for k, v in row.items() if k != "prompt"}
    f = write_jsonl(tmp_path / "s.jsonl", [row, same, no_prompt, {**row, "full_chosen": 3}])
    with pytest.raises(ValueError, match=r"s\.jsonl:2: field 'chosen' equals field 'rejected'"):
        step_dpo.load(path=str(f), eval_path=None)
    from stepdpo.datasets.common import InvalidRows, read_converted

    inv = InvalidRows("skip", str(f))
    read_converted(f, step_dpo.convert, inv)
    ex = inv.report()["examples"]
    assert ex[1].startswith(f"{f}:3: field 'prompt' missing") and ex[2] == (
        f"{f}:4: field 'full_chosen' must be a string or absent, got int")


# ----------------------------------------------------------------------------- pair files


def test_pairs_file_loads_lists_strings_and_scores():
    b = pairs_file.load(path=str(FIX / "pairs" / "pairs.jsonl"), eval_fraction=None)
    assert (b.name, len(b.pairs), len(b.train), b.eval) == ("pairs", 6, 5, [])
    by_id = {p.id: p for p in b.pairs}
    assert by_id["p3"].chosen == ["4 * 3 = 12", "#### 12"] and by_id["p3"].chosen_scores is None
    assert by_id["p3"].answer == "12" and by_id["p3"].question == "A pen costs $3. How much do 4 pens cost?"
    assert by_id["p2"].prefix == ["7 * 3 = 21"] and by_id["p2"].rejected_scores == [0.0, 0.2]
    assert by_id["p6"].prefix == ["12 + 30 = 42"] and by_id["p5"].chosen_scores == [1.0, 1.0]
    assert by_id["p4"].meta["origin"] == "hand-written" and by_id["p4"].meta["where"].endswith("pairs.jsonl:4")
    assert b.train[0].steps == ["12 + 30 = 42", "The answer is 42"]
    h = pairs_file.load(path=str(FIX / "pairs" / "pairs.jsonl"), eval_fraction=0.4, seed=0)
    assert len(h.eval) == 2 and len(h.train) == 3
    assert {p.question for p in h.pairs} <= {q.question for q in h.train}
    assert len(pairs_file.load(path=str(FIX / "pairs" / "pairs.jsonl"), max_pairs=2).pairs) == 2


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,overrides", [
    ("gsm8k", ["dataset.n_train=3", "dataset.n_eval=2"]),
    ("math", ["dataset.n_train=3", "dataset.n_eval=2"]),
    ("prm800k", ["dataset.path=tests/fixtures/prm800k", "dataset.n_eval=2"]),
    ("step_dpo", ["dataset.path=tests/fixtures/step_dpo/train.jsonl", "dataset.n_eval=2"]),
    ("pairs", ["dataset.path=tests/fixtures/pairs/pairs.jsonl"]),
])
def test_dataset_configs_build(name, overrides, monkeypatch):
    """Each conf/dataset YAML composes, binds to its loader and builds (paths relative to the root)."""
    if not DATA.exists() and name in ("gsm8k", "math", "prm800k", "step_dpo"):
        pytest.skip("shared data missing")
    from stepdpo.config import build

    monkeypatch.chdir(ROOT)
    cfg = compose_config(f"dataset={name}", "pairs=perturb", *overrides)
    text = (ROOT / "conf" / "dataset" / f"{name}.yaml").read_text()
    assert text.startswith("# python -m stepdpo.run dataset=")
    for line in text.splitlines():
        if line and not line.startswith((" ", "#", "_target_")):
            assert "#" in line, f"{name}.yaml: undocumented key: {line}"
    bundle = build(cfg.dataset, "dataset")
    assert isinstance(bundle, DatasetBundle) and bundle.train
    assert (bundle.pairs is not None) == (name in ("prm800k", "step_dpo", "pairs"))
    fn = build(cfg.pairs, "pairs")
    assert callable(fn)


# ----------------------------------------------------------------------------- Hub paths (network replaced)


def test_hub_paths_with_a_stand_in_for_the_hub(monkeypatch):
    """path=null reads the Hub through datasets.load_dataset; here it returns local rows instead."""
    import datasets

    calls = []
    gsm = [{"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5\n#### 5"},
           {"question": "What is 4*2?", "answer": "4*2 = <<4*2=8>>8\n#### 8"}]
    sdpo = [json.loads(line) for line in (FIX / "step_dpo" / "train.jsonl").read_text().splitlines()]

    def fake_load_dataset(name, *args, split=None, **kw):
        calls.append((name, args, split))
        if name == "openai/gsm8k":
            return datasets.DatasetDict({"train": datasets.Dataset.from_list(gsm),
                                         "test": datasets.Dataset.from_list(gsm[:1])})
        assert name == step_dpo.HUB_ID and split == "train"
        return datasets.Dataset.from_list(sdpo)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    b = gsm8k.load(path=None)
    assert calls[0] == ("openai/gsm8k", ("main",), None)
    assert [p.id for p in b.train] == ["gsm8k-train-0", "gsm8k-train-1"] and [p.answer for p in b.eval] == ["5"]
    assert b.train[1].meta["where"] == "openai/gsm8k:train[1]"
    s = step_dpo.load(path=None, eval_path=None)
    assert len(s.pairs) == 4 and s.pairs[0].meta["where"] == f"{step_dpo.HUB_ID}:train[0]"
    assert s.pairs[0].id == "step_dpo-0"
