"""Rule-based GSM8K perturbation pairs: the corrupted step is arithmetically wrong, the error is
carried to a wrong final answer, the chosen side is the gold rest; the step rule scores them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from stepdpo.answers import answers_match, extract_answer
from stepdpo.data import Problem
from stepdpo.perturb import build_perturb_pairs, perturb_problem
from stepdpo.rewards.rule import score_gsm8k_steps
from stepdpo.calculator import annotations, check_annotation

DATA = Path(__file__).parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k" / "train.jsonl").exists(), reason=f"shared data not at {DATA}")

NATALIA = Problem(
    id="gsm8k-train-1", answer="72",
    question="Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?",
    steps=["Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.", "#### 72"])


def final(steps) -> str | None:
    return extract_answer("\n".join(steps))


@pytest.fixture(scope="module")
def gsm8k_train():
    from stepdpo.datasets import gsm8k

    return gsm8k.load(path=str(DATA / "gsm8k"), n_eval=0).train


def check_pair(pair, problem: Problem):
    k = pair.meta["corrupted_step"]
    assert pair.prefix + pair.chosen == problem.steps and pair.prefix == problem.steps[:k]
    assert len(pair.rejected) == len(pair.chosen) and pair.rejected != pair.chosen
    assert pair.chosen_scores == [1.0] * len(pair.chosen) and pair.rejected_scores == [0.0] * len(pair.rejected)
    assert answers_match(final(pair.chosen), problem.answer)  # chosen: the correct solution
    assert not answers_match(final(pair.rejected), problem.answer)  # rejected: a wrong final answer
    assert pair.rejected[-1].startswith("#### ") and pair.rejected[-1] != pair.chosen[-1]
    if "<<" in "".join(pair.rejected):  # (not when the model text has its annotations stripped)
        # the corrupted step's annotation no longer recomputes; every later one does (error carried consistently)
        assert score_gsm8k_steps(pair.rejected) == [0.0] + [1.0] * (len(pair.rejected) - 1)
        assert score_gsm8k_steps(pair.chosen) == [1.0] * len(pair.chosen)
    assert (pair.source, pair.id, pair.meta["problem_id"]) == ("perturb", f"{problem.id}-perturb", problem.id)


def test_natalia_carried_through():
    pair = perturb_problem(NATALIA, random.Random(0))
    check_pair(pair, NATALIA)
    new = int(pair.meta["new_value"])
    assert pair.meta["old_value"] == "24" and new != 24
    assert pair.prefix == [] and pair.rejected == [
        f"Natalia sold 48/2 = <<48/2={new}>>{new} clips in May.",
        f"Natalia sold 48+{new} = <<48+{new}={48 + new}>>{48 + new} clips altogether in April and May.",
        f"#### {48 + new}"]


def test_can_corrupt_the_last_step():
    for seed in range(30):  # some seeds pick the last annotation: 72 -> x directly
        pair = perturb_problem(NATALIA, random.Random(seed))
        if pair.meta["corrupted_step"] == 1:
            assert pair.prefix == NATALIA.steps[:1] and pair.rejected[1] == f"#### {pair.meta['new_value']}"
            break
    else:
        pytest.fail("never corrupted the last arithmetic step")


@pytest.mark.parametrize("steps,question,answer,why", [
    (["He has 3*4 = <<3*4=12>>12 apples.", "He then eats 12 * 2 = 24.", "#### 24"], "Q?", "24",
     "the second step computes with 12 outside an annotation"),
    (["He has 3*4 = <<3*4=12>>12 apples.", "#### 12"], "There are 12 boxes of 3 and 4 apples.", "12",
     "12 is also a number of the question"),
    (["He has 3*4 = <<3*4=12>>12 apples.", "#### 13"], "Q?", "12", "the gold answer does not match its '####' line"),
    (["He has 3 * 4 = 12 apples.", "#### 12"], "Q?", "12", "no annotation to corrupt"),
    (["He has 3*4 = <<3*4=13>>13 apples.", "#### 13"], "Q?", "13", "the only annotation is already wrong"),
])
def test_skips_when_not_consistent(steps, question, answer, why):
    p = Problem(id="x", question=question, answer=answer, steps=steps)
    for seed in range(10):
        assert perturb_problem(p, random.Random(seed)) is None, why


def test_error_that_never_reaches_the_answer_is_not_used():
    steps = ["He has 3*4 = <<3*4=12>>12 apples.", "Separately, 5+6 = <<5+6=11>>11 pears.", "#### 11"]
    p = Problem(id="y", question="Q?", answer="11", steps=steps)
    for seed in range(10):
        pair = perturb_problem(p, random.Random(seed))
        assert pair is not None and pair.meta["corrupted_step"] == 1  # corrupting 12 can't change the answer
        check_pair(pair, p)


def test_build_skips_arith_caps_and_is_seeded():
    arith = Problem(id="arith-train-0", question="Start with 2, add 3.", answer="5", steps=["2 + 3 = 5", "The answer is 5"],
                    meta={"kind": "arith", "ops": [["+", 3]]})
    twin = Problem(id="twin", question=NATALIA.question + " ", answer="72", steps=list(NATALIA.steps))
    probs = [arith, NATALIA, twin]
    a, report = build_perturb_pairs(probs, seed=1)
    assert sorted(p.meta["problem_id"] for p in a) == ["gsm8k-train-1", "twin"]
    assert report == {"problems": 2, "pairs_perturb": 2, "skipped_no_corruption": 0}
    assert [p.to_dict() for p in a] == [p.to_dict() for p in build_perturb_pairs(probs, seed=1)[0]]
    assert len(build_perturb_pairs(probs, seed=1, max_pairs=1)[0]) == 1
    assert build_perturb_pairs([arith]) == ([], {"problems": 0, "pairs_perturb": 0, "skipped_no_corruption": 0})
    with pytest.raises(TypeError):  # the contract: a builder takes only what it uses (no model here)
        build_perturb_pairs(probs, seed=1, model=None)
    with pytest.raises(ValueError, match="pairs.max_pairs"):
        build_perturb_pairs(probs, max_pairs=-1)


def test_stripped_annotations_use_the_annotated_copy():
    from stepdpo.calculator import strip_annotation_marks

    p = Problem(id="s", question=NATALIA.question, answer="72", steps=[strip_annotation_marks(s) for s in NATALIA.steps],
                meta={"annotated_steps": list(NATALIA.steps)})
    pair = perturb_problem(p, random.Random(0))
    assert "<<" not in "".join(pair.prefix + pair.chosen + pair.rejected)
    check_pair(pair, p)


def test_score_gsm8k_steps():
    assert score_gsm8k_steps(["a <<2+2=4>>4", "b <<2+2=5>>5", "no annotation", "c <<1/2=0.5>>0.5 <<3*3=9>>9",
                              "d <<1+1=2>>2 <<2*2=5>>5", "e <<7//2=3>>3"]) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert score_gsm8k_steps([]) == []


def test_rule_scorer_flags_the_corrupted_step():
    """The rule reward (reward=rule) finds the first error exactly where the pair says it is."""
    from stepdpo.pairs import request_for
    from stepdpo.rewards.rule import RuleScorer

    pair = perturb_problem(NATALIA, random.Random(0))
    rej, cho = RuleScorer().score([request_for(pair.question, pair.prefix + pair.rejected, pair.answer, {}),
                                   request_for(pair.question, pair.prefix + pair.chosen, pair.answer, {})])
    assert rej.first_error == len(pair.prefix) and cho.first_error is None


@needs_data
def test_gsm8k_perturbed_pairs(gsm8k_train):
    """On the first 1,500 GSM8K training problems: yield, and every pair checked (wrong final
    answer, correct chosen, exactly one wrong annotation, later annotations consistent)."""
    probs = gsm8k_train[:1500]
    by_id = {p.id: p for p in probs}
    pairs, _ = build_perturb_pairs(probs, seed=0)
    print(f"\nperturb: {len(pairs)} pairs from {len(probs)} GSM8K problems")
    assert len(pairs) >= 0.85 * len(probs)  # measured 1,331 (89%); 6,531 (87%) over all 7,473 training problems
    for pair in pairs:
        check_pair(pair, by_id[pair.meta["problem_id"]])
        k_step = pair.rejected[0]
        assert any(not check_annotation(e, c) for e, c in annotations(k_step))
