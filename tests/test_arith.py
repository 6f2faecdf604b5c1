"""The built-in arith task: deterministic, disjoint splits, exact step checks, corruption carried through."""

import random

import pytest

from stepdpo.arith import check_steps, corrupt, load, true_values
from stepdpo.rewards.base import ScoreRequest
from stepdpo.rewards.rule import RuleScorer

from conftest import arith_solution


def test_deterministic_and_disjoint():
    a, b = load(n_train=300, n_eval=50, seed=3), load(n_train=300, n_eval=50, seed=3)
    assert [p.question for p in a.train] == [p.question for p in b.train]
    assert not {p.question for p in a.train} & {p.question for p in a.eval}
    assert load(n_train=300, n_eval=50, seed=4).train[0].question != a.train[0].question


def test_gold_solutions_check_and_values_stay_in_range():
    b = load(n_train=500, n_eval=10, max_operand=9, max_value=30, ops="+-")
    for p in b.train:
        assert check_steps(p.meta, p.steps) == [1.0] * len(p.steps)
        assert 0 <= int(p.answer) <= 30 and p.steps[-1] == f"The answer is {p.answer}"
        assert all(op in "+-" for op, _ in p.meta["ops"])


@pytest.mark.parametrize("ops,max_value", [("+-*", 300), ("+-", 30), ("-", 30), ("+", 30)])
def test_ops_choose_the_operations_that_appear(ops, max_value):
    # dataset.ops once had no effect (every task was subtraction chains): each listed operation must
    # appear in a fair share of steps; an unlisted one only where no listed one fits the value range
    # (subtract at max_value, add at 1).
    b = load(n_train=1000, n_eval=10, max_operand=9, max_value=max_value, ops=ops)
    steps = [(op, v) for p in b.train  # (operation, the value it applies to)
             for (op, _), v in zip(p.meta["ops"], [p.meta["start"]] + true_values(p.meta)[:-1])]
    seen = {op: sum(o == op for o, _ in steps) / len(steps) for op in "+-*"}
    for op in ops:
        assert seen[op] > 0.5 / len(ops), seen  # at least half an even share
    for op, v in steps:
        if op not in ops:
            assert (op == "-" and v >= max_value) or (op == "+" and v <= 1), (op, v)
    if "*" not in ops:
        assert seen["*"] == 0


def test_check_steps_flags_the_first_wrong_step_and_what_follows():
    p = load(n_train=50, n_eval=1, min_ops=3, max_ops=3, seed=1).train[0]
    steps = list(p.steps)
    a, op, b, _, c = steps[1].split()
    steps[1] = f"{a} {op} {b} = {int(c) + 1}"
    scores = check_steps(p.meta, steps)
    assert scores[0] == 1.0 and scores[1] == 0.0 and scores[-1] == 1.0  # answer line itself still right
    assert check_steps(p.meta, steps[:1] + ["garbage"] + steps[2:])[1] == 0.0
    assert check_steps(p.meta, p.steps + ["extra"])[-1] == 0.0


def test_corruption_carries_the_error_to_a_wrong_answer():
    rng = random.Random(0)
    b = load(n_train=200, n_eval=1)
    made = 0
    for p in b.train:
        res = corrupt(p, rng)
        if res is None:
            continue
        steps, k = res
        made += 1
        scores = check_steps(p.meta, steps)
        assert scores[:k] == [1.0] * k and scores[k] == 0.0
        assert steps[-1] != p.steps[-1]
        assert steps[:k] == p.steps[:k]
    assert made > 150


def test_rule_scorer_on_arith_and_bad_option():
    p = load(n_train=5, n_eval=1).train[0]
    req = ScoreRequest(p.question, tuple(p.steps), p.answer, tuple(sorted(p.meta.items())))
    (res,) = RuleScorer().score([req])
    assert res.scores == [1.0] * len(p.steps) and res.first_error is None and res.provenance == "rule:arith"
    with pytest.raises(ValueError, match="unknown_score"):
        RuleScorer(unknown_score=2)


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="min_ops"):
        load(min_ops=3, max_ops=2)
    with pytest.raises(ValueError, match="dataset.ops"):
        load(ops="/")


def test_answer_only_pool_is_disjoint_and_leaves_train_and_eval_alone():
    plain = load(n_train=200, n_eval=50, max_operand=9, max_value=30, ops="+-", seed=2)
    b = load(n_train=200, n_eval=50, max_operand=9, max_value=30, ops="+-", seed=2, n_pool=300)
    assert [p.question for p in b.train] == [p.question for p in plain.train]  # the warm-up data is unchanged
    assert [p.question for p in b.eval] == [p.question for p in plain.eval] and plain.pool == []
    assert len(b.pool) == 300 and len({p.question for p in b.pool}) == 300
    assert not {p.question for p in b.pool} & ({p.question for p in b.train} | {p.question for p in b.eval})
    for p in b.pool:  # answer-only: no gold steps, but the meta the rule checker grades samples with
        assert p.steps == [] and p.id.startswith("arith-pool-")
        gold = arith_solution(p)
        assert check_steps(p.meta, gold) == [1.0] * len(gold) and gold[-1] == f"The answer is {p.answer}"
    one_op = dict(min_ops=1, max_ops=1, max_operand=9, max_value=30, ops="+-")  # ~225 distinct questions
    assert len(load(n_train=100, n_eval=50, n_pool=60, **one_op).pool) == 60
    with pytest.raises(ValueError, match="can't generate 100 distinct pool problems.*lower dataset.n_pool"):
        load(n_train=100, n_eval=50, n_pool=100, **one_op)  # a small space: the error comes after ~5k tries, not 5M
    with pytest.raises(ValueError, match="n_pool=-1"):
        load(n_pool=-1)
