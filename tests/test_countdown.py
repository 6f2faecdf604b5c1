"""The built-in countdown task: deterministic, disjoint, solver exact, gold solutions pass the rule checker,
and valid lines that doom the target exist (which the rule checker scores 1)."""

import itertools
import random

import pytest

from stepdpo import progress
from stepdpo.countdown import (apply, check_steps, doomed_steps, load, remaining_after, solvable, solve)
from stepdpo.rewards.base import ScoreRequest
from stepdpo.rewards.rule import RuleScorer


def brute_force_targets(numbers, ops):
    """Every value reachable using all numbers exactly once: an independent enumeration over orderings of
    the multiset and every left-to-right pairing tree (no memo, no canonical ordering)."""
    nums = list(numbers)
    if len(nums) == 1:
        return {nums[0]}
    out = set()
    for i, j in itertools.permutations(range(len(nums)), 2):
        rest = [x for k, x in enumerate(nums) if k not in (i, j)]
        for op in ops:
            a, b = nums[i], nums[j]
            if op == "-" and a < b:
                continue
            c = {"+": a + b, "-": a - b, "*": a * b}[op]
            out |= brute_force_targets(rest + [c], ops)
    return out


def test_deterministic_and_disjoint():
    kw = dict(n_train=300, n_eval=50, shuffle=True, ops="+-*", max_number=15, max_target=50)
    a, b = load(n_pool=20, seed=3, **kw), load(n_pool=20, seed=3, **kw)
    assert [p.question for p in a.train] == [p.question for p in b.train]
    assert [p.steps for p in a.eval] == [p.steps for p in b.eval]
    q = lambda ps: {(tuple(sorted(p.meta["numbers"])), p.meta["target"]) for p in ps}
    assert not q(a.train) & q(a.eval) and not q(a.pool) & (q(a.train) | q(a.eval))
    assert all(not p.steps for p in a.pool)
    assert load(seed=4, **kw).train[0].question != a.train[0].question
    # the pool is drawn last: its size never changes train or eval
    assert [p.question for p in load(seed=3, **kw).train] == [p.question for p in a.train]


@pytest.mark.parametrize("ops", ["+-*", "+-", "-", "*"])
def test_solver_agrees_with_brute_force(ops):
    rng = random.Random(0)
    for _ in range(60):
        nums = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
        reach = brute_force_targets(nums, ops)
        for t in range(0, 60):
            sol = solve(nums, t, ops)
            assert (sol is not None) == (t in reach) == solvable(nums, t, ops), (nums, t, ops)
            if sol is not None:  # the solution itself is valid, uses every number, and makes t
                meta = {"numbers": nums, "target": t, "ops": ops}
                assert check_steps(meta, sol) == [1.0] * len(sol)
                assert remaining_after(nums, sol[:-1], ops) == [t]


def test_gold_solutions_pass_the_rule_checker_and_respect_the_knobs():
    b = load(n_train=400, n_eval=50, min_numbers=3, max_numbers=4, max_number=9, max_target=40, ops="+-*")
    rule = RuleScorer()
    for p in b.train + b.eval:
        n = len(p.meta["numbers"])
        assert 3 <= n <= 4 and all(1 <= x <= 9 for x in p.meta["numbers"]) and 1 <= p.meta["target"] <= 40
        assert len(p.steps) == n and p.steps[-1] == f"The answer is {p.answer}" and p.answer == str(p.meta["target"])
        assert check_steps(p.meta, p.steps) == [1.0] * n
        assert solvable(p.meta["numbers"], p.meta["target"], p.meta["ops"])
        assert p.question.startswith(f"Make {p.answer} from ")
        res = rule.score([ScoreRequest(p.question, tuple(p.steps), p.answer, tuple(sorted(p.meta.items())))])[0]
        assert res.scores == [1.0] * n and res.first_error is None and res.provenance == "rule:countdown"
    assert {len(p.meta["numbers"]) for p in b.train} == {3, 4}
    only_sub = load(n_train=100, n_eval=10, ops="+-")
    assert all("*" not in s for p in only_sub.train for s in p.steps)


def test_rule_flags_invalid_lines_but_not_dooming_ones():
    meta = {"kind": "countdown", "numbers": [3, 7, 25], "target": 46, "ops": "+-*"}
    assert check_steps(meta, ["7 * 3 = 21", "21 + 25 = 46", "The answer is 46"]) == [1, 1, 1]
    assert check_steps(meta, ["7 * 3 = 22", "22 + 25 = 47", "The answer is 47"]) == [0, 1, 0]  # wrong product
    assert check_steps(meta, ["7 * 4 = 28", "28 + 25 = 53", "The answer is 53"]) == [0, 1, 0]  # 4 not available
    assert check_steps(meta, ["7 * 7 = 49", "49 - 3 = 46", "The answer is 46"]) == [0, 1, 0]  # 7 used twice
    assert check_steps(meta, ["3 - 7 = -4", "25 + 3 = 28"])[0] == 0  # below zero, then 3 already used
    assert check_steps(meta, ["7 * 3 = 21", "The answer is 21"]) == [1, 0]  # 25 unused
    assert check_steps({**meta, "ops": "+-"}, ["7 * 3 = 21"]) == [0]  # operation not allowed
    # valid arithmetic that makes 46 unreachable: the rule checker passes every line but the answer
    doom = ["25 - 7 = 18", "18 * 3 = 54", "The answer is 54"]
    assert check_steps(meta, doom) == [1, 1, 0]
    assert doomed_steps(meta, doom[:2]) == [True, True]
    assert doomed_steps(meta, ["7 * 3 = 21", "21 + 25 = 46"]) == [False, False]


def test_solver_values_drop_at_the_first_invalid_or_dooming_line():
    """reward=solver: V_i = 1 while the lines so far are valid and the target reachable, then 0 for good; the
    first 0 is the line a perfect critic blames (the rule checker blames the answer line of a doomed solution).
    Checked against an independent brute force over what the lines leave."""
    from stepdpo.arith import load as load_arith
    from stepdpo.countdown import exact_values
    from stepdpo.rewards.solver import SolverScorer

    meta = {"kind": "countdown", "numbers": [3, 7, 25], "target": 46, "ops": "+-*"}
    assert exact_values(meta, ["7 * 3 = 21", "21 + 25 = 46", "The answer is 46"]) == [1, 1, 1]
    assert exact_values(meta, ["25 - 7 = 18", "18 * 3 = 54", "The answer is 54"]) == [0, 0, 0]  # doomed at line 1
    assert exact_values(meta, ["7 * 3 = 21", "21 - 25 = 4"]) == [1, 0]  # below zero: invalid
    assert exact_values(meta, ["7 * 3 = 22", "22 + 25 = 47"]) == [0, 0]  # wrong product
    assert exact_values(meta, ["7 * 3 = 21", "21 + 25 = 46", "The answer is 45"]) == [1, 1, 0]
    assert exact_values(meta, ["25 + 3 = 28", "28 + 7 = 35"]) == [0, 0]  # 28, 7 can't make 46
    assert 46 not in brute_force_targets([28, 7], "+-*") and 46 in brute_force_targets([21, 25], "+-*")
    scorer = SolverScorer()
    (r,) = scorer.score([ScoreRequest("q", ("25 - 7 = 18", "18 * 3 = 54"), "46", tuple(meta.items()))])
    assert r.scores == [0.0, 0.0] and r.prompt_value == 1.0 and r.first_error == 0
    (bad,) = scorer.score([ScoreRequest("q", ("1 - 1 = 0",), "0", (("kind", "arith"),))])
    assert bad.scores is None and "countdown" in bad.error
    with pytest.raises(ValueError, match=r"dataset=x: reward=solver .* countdown problems only.*use dataset=countdown"):
        scorer.check_problems(load_arith(n_train=3, n_eval=1).train, where="dataset=x")
    scorer.check_problems(load(n_train=5, n_eval=1).train, where="dataset=countdown")


def test_generated_problems_have_a_valid_step_that_dooms_them():
    b = load(n_train=100, n_eval=10, seed=5)
    found = 0
    for p in b.train:
        nums, t, ops = p.meta["numbers"], p.meta["target"], p.meta["ops"]
        for (i, a), (j, c) in itertools.permutations(enumerate(nums), 2):
            for op in ops:
                v = apply(a, op, c)
                if v is None:
                    continue
                line = f"{a} {op} {c} = {v}"
                rest = [x for k, x in enumerate(nums) if k not in (i, j)] + [v]
                if not solvable(rest, t, ops):
                    assert check_steps(p.meta, [line]) == [1.0] and doomed_steps(p.meta, [line]) == [True]
                    assert t not in brute_force_targets(rest, ops)  # independent: the target is gone
                    found += 1
                    break
            else:
                continue
            break
    assert found >= 90, found  # nearly every problem has such a first line


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="ops"):
        load(ops="+/")
    with pytest.raises(ValueError, match="min_numbers"):
        load(min_numbers=1)
    with pytest.raises(ValueError, match="distinct"):
        load(n_train=50, n_eval=10, max_number=2, max_numbers=2, min_numbers=2)


def test_unshuffled_questions_list_the_numbers_in_the_gold_order():
    b = load(n_train=200, n_eval=10, shuffle=False, ops="+-*", max_number=9, max_target=40)
    for p in b.train:
        a, op, c, _, v = p.steps[0].split()
        assert sorted((int(a), int(c))) == sorted(p.meta["numbers"][:2])  # the first two listed, in some order
        assert p.question.startswith(f"Make {p.answer} from {', '.join(map(str, p.meta['numbers']))}.")
    q = {p.question for p in b.train}
    assert len(q) == len(b.train) and not q & {p.question for p in b.eval}


def test_a_right_answer_is_not_enough_when_the_question_states_it():
    from stepdpo.outcome import solved

    meta = {"kind": "countdown", "numbers": [3, 7, 25], "target": 46, "ops": "+-*"}
    assert solved("7 * 3 = 21\n21 + 25 = 46\nThe answer is 46", "46", meta)
    assert not solved("7 * 3 = 22\n22 + 25 = 46\nThe answer is 46", "46", meta)  # copied the target
    assert not solved("The answer is 46", "46", meta)
    assert not solved("7 * 3 = 21\n21 + 25 = 46", "46", meta)  # no answer line
    assert solved("12 - 5 = 7\nThe answer is 7", "7", {"kind": "arith"})  # other tasks: the answer decides


def test_on_policy_pairs_grade_a_copied_target_as_wrong(monkeypatch):
    """pairs=on_policy grades with outcome.solved, as eval does: a sample that copies the target after an invalid
    line is a rejected side, never a "right answer" that pairs.reject=answer would skip."""
    import stepdpo.pairs as pairs_mod
    from stepdpo.data import Problem
    from stepdpo.generation import Completion

    meta = {"kind": "countdown", "numbers": [3, 7, 25], "target": 46, "ops": "+-*"}
    right = ["7 * 3 = 21", "21 + 25 = 46", "The answer is 46"]
    cheat = ["7 * 7 = 49", "49 - 3 = 46", "The answer is 46"]  # 7 used twice, the target copied
    p = Problem(id="c0", question="Make 46 from 3, 7, 25.", answer="46", steps=list(right), meta=meta)
    outs = [Completion("\n".join(s), (), "stop") for s in (right, cheat)]
    monkeypatch.setattr(pairs_mod, "generate", lambda m, t, prompts, num_return_sequences, **_: [outs for _ in prompts])
    pairs, report = pairs_mod.build_on_policy_pairs([p], model=None, tokenizer=None, scorer=RuleScorer(), k=2,
                                                    n_problems=1, min_pairs=0, reject="answer")
    assert report["correct"] == 1 and "skipped_right_answer" not in report
    assert len(pairs) == 1 and [x.strip() for x in pairs[0].prefix + pairs[0].rejected] == cheat


def test_eval_accuracy_on_countdown_needs_valid_lines():
    from stepdpo.evaluate import math_accuracy
    import stepdpo.evaluate as ev
    from stepdpo.generation import Completion

    b = load(n_train=10, n_eval=2, seed=0)
    p, q = b.eval
    outs = {p.question: p.steps, q.question: ["1 + 1 = 2", "2 + 2 = 4", f"The answer is {q.answer}"]}

    bar_acc = []

    def fake(model, tok, prompts, **kw):
        res = [[Completion("\n".join(next(v for k, v in outs.items() if k in pr)), (), "stop")] for pr in prompts]
        progress.advance(len(res), dict(enumerate(res)))  # what generation.generate reports to the open bar
        bar_acc.append(progress._stack[-1].fields.get("acc"))
        return res

    orig, ev.generate = ev.generate, fake
    try:
        metrics, records = math_accuracy(None, None, b.eval)
    finally:
        ev.generate = orig
    assert [r["correct"] for r in records] == [True, False] and metrics["acc"] == 0.5
    assert bar_acc == [0.5]  # the progress bar's running accuracy applies the same rule (it showed 1.0)
    assert records[1]["pred"] == q.answer  # the copied target is extracted, and still not counted


def test_error_mix_script_finds_the_critical_line():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("countdown_errors", ROOT / "scripts" / "countdown_errors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    meta = {"kind": "countdown", "numbers": [3, 7, 25], "target": 46, "ops": "+-*"}
    assert mod.classify(meta, ["7 * 3 = 21", "21 + 25 = 46", "The answer is 46"]) == ("correct", None)
    assert mod.classify(meta, ["7 * 3 = 22", "22 + 25 = 47", "The answer is 47"]) == ("invalid", 0)
    # a valid line dooms 46, then a fudged line "reaches" it: rule flags line 1, the critical line is 0
    assert mod.classify(meta, ["25 - 7 = 18", "18 * 3 = 46", "The answer is 46"]) == ("doomed", 0)
    assert mod.classify(meta, ["25 - 7 = 18", "18 * 3 = 54", "The answer is 54"]) == ("doomed", 0)


def test_error_mix_script_rollout_critical_line_needs_a_drop(tmp_path):
    # the rollout's critical step is where the value drops most; with no drop at all (V = 0 throughout, the
    # policy never reaches the target) there is none, and the script must not credit the first line (it did:
    # max() over all-zero drops picked step 0, which is usually the dooming line too)
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("countdown_errors", ROOT / "scripts" / "countdown_errors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.rollout_critical(0.0, [0.0, 0.0, 0.0]) is None
    assert mod.rollout_critical(0.5, [0.5, 0.5]) is None
    assert mod.rollout_critical(0.5, [0.75, 0.0, 0.0]) == 1  # hand-worked: drops -0.25, 0.75, 0
    assert mod.rollout_critical(0.5, [0.0, 0.5, 0.0]) == 0  # drops 0.5, -0.5, 0.5: the first of the tie
    # end to end on a pairs file: a doomed rejected side whose values never move counts as no drop
    import json

    meta = {"kind": "countdown", "numbers": [3, 7, 25], "target": 46, "ops": "+-*"}
    rows = [{"prefix": [], "chosen": ["7 * 3 = 21", "21 + 25 = 46", "The answer is 46"],
             "rejected": ["25 - 7 = 18", "18 * 3 = 54", "The answer is 54"], "meta": {**meta, "value_before": v},
             "rejected_scores": rs} for v, rs in [(0.0, [0.0, 0.0, 0.0]), (0.5, [0.0, 0.0, 0.0])]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = mod.main(str(path))
    assert out["doomed"] == 2 and out["doomed/rollout_no_drop"] == 1 and out["doomed/rollout_critical_at_that_line"] == 1


def test_maj_at_k_on_countdown_needs_a_valid_solution_behind_the_majority(monkeypatch):
    """maj@k applies the task's rule too: the majority answer counts when a sample that gives it is solved;
    k samples that all copy the target are not a right majority."""
    import stepdpo.evaluate as ev
    from stepdpo.generation import Completion

    b = load(n_train=10, n_eval=2, seed=0)
    p, q = b.eval
    copy = lambda x: f"1 + 1 = 2\nThe answer is {x.answer}"  # noqa: E731  (invalid line, the target copied)
    sampled = {p.question: [copy(p), copy(p), "\n".join(p.steps)], q.question: [copy(q)] * 3}

    def fake(model, tok, prompts, *, num_return_sequences=1, **kw):
        pick = lambda pr: next(v for k, v in sampled.items() if k in pr)  # noqa: E731
        return [[Completion(t, (), "stop") for t in pick(pr)[:num_return_sequences]] for pr in prompts]

    monkeypatch.setattr(ev, "generate", fake)
    metrics, records = ev.math_accuracy(None, None, b.eval, maj_k=3)
    assert [r["maj_pred"] for r in records] == [p.answer, q.answer]
    assert [r["maj_correct"] for r in records] == [True, False] and metrics["maj@3"] == 0.5


@pytest.mark.slow
def test_solver_reward_is_refused_on_another_task_before_any_work(tmp_path):
    from conftest import run_cli

    proc, run_dir = run_cli(tmp_path, "reward=solver", "trainer=stepdpo", check=False, timeout=120)
    assert proc.returncode != 0
    assert "reward=solver knows exact step values for countdown problems only" in proc.stderr
    assert not (run_dir / "base_model").exists() and not (run_dir / "eval_before.json").exists()
