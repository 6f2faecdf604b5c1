"""On-policy pairs on answer-only problems (`pairs.from_split=pool`): the chosen side comes only
from the policy's own correct samples (there is no gold solution to fall back on), and the
rule-based top-up corrupts gold solutions of the SFT problems instead."""

import pytest

import stepdpo.pairs as pairs_mod
from stepdpo.arith import load
from stepdpo.generation import Completion
from stepdpo.rewards.rule import RuleScorer
from stepdpo.steps import split_steps

from conftest import arith_solution


def completions(outs):
    """Stub generator output (lists of strings per prompt) as generate() returns it."""
    return [[Completion(t, (), "stop") for t in o] for o in outs]


def solution(p, wrong_at=None):
    return "\n".join(arith_solution(p, wrong_at))


@pytest.fixture
def bundle():
    return load(n_train=40, n_eval=10, max_operand=9, max_value=30, ops="+-", seed=5, n_pool=12)


def test_pool_pairs_use_correct_samples_only(bundle, monkeypatch):
    pool = bundle.pool
    # problems 0-5: one correct and one wrong (at step 1) sample; 6-11: two wrong samples, no correct one
    order = []
    real_shuffle = pairs_mod.random.Random.shuffle

    def keep_order(self, x):  # record the order build_on_policy_pairs samples problems in
        real_shuffle(self, x)
        order[:] = list(x)

    monkeypatch.setattr(pairs_mod.random.Random, "shuffle", keep_order)
    outs = {}

    def gen(model, tok, prompts, *, num_return_sequences=1, **_):
        res = []
        for p in order[: len(prompts)]:
            i = int(p.id.rsplit("-", 1)[1])
            res.append([solution(p), solution(p, wrong_at=1)] if i < 6 else
                       [solution(p, wrong_at=0), solution(p, wrong_at=1)])
            outs[p.id] = res[-1]
        return completions(res)

    monkeypatch.setattr(pairs_mod, "generate", gen)
    pairs, report = pairs_mod.build_on_policy_pairs(pool, model=None, tokenizer=None, scorer=RuleScorer(), k=2,
                                                    n_problems=12, min_pairs=0, topup_problems=bundle.train)
    assert report["samples"] == 24 and report["correct"] == 6 and report["pairs_on_policy"] == 6
    assert len(pairs) == 6
    for pr in pairs:
        p = next(q for q in pool if q.id == pr.meta["problem_id"])
        assert int(p.id.rsplit("-", 1)[1]) < 6  # only problems with a correct sample give pairs
        correct = split_steps(outs[p.id][0])  # steps keep their line breaks
        assert pr.prefix == correct[:1] and pr.chosen == correct[1:]  # the sample's own steps, not a gold solution
        assert pr.rejected == split_steps(outs[p.id][1])[1:] and pr.rejected_scores[0] == 0.0


def test_pool_top_up_corrupts_the_sft_problems(bundle, monkeypatch):
    monkeypatch.setattr(pairs_mod, "generate", lambda m, t, prompts, num_return_sequences=1, **_:
                        completions([["garbage"] * num_return_sequences for _ in prompts]))
    pairs, report = pairs_mod.build_on_policy_pairs(bundle.pool, model=None, tokenizer=None, scorer=RuleScorer(),
                                                    k=2, n_problems=12, min_pairs=10, topup_problems=bundle.train)
    assert report["pairs_on_policy"] == 0 and report["pairs_perturb_topup"] == 10 == len(pairs)
    train_ids = {p.id for p in bundle.train}
    assert all(pr.source == "perturb" and pr.meta["problem_id"] in train_ids for pr in pairs)
    # without gold problems to corrupt there is nothing to top up with (never a broken pair)
    pairs, report = pairs_mod.build_on_policy_pairs(bundle.pool, model=None, tokenizer=None, scorer=RuleScorer(),
                                                    k=2, n_problems=12, min_pairs=10)
    assert pairs == [] and report["pairs_perturb_topup"] == 0


@pytest.mark.parametrize("reject", ["process", "answer"])
def test_reject_answer_skips_right_answers_with_a_flagged_step(bundle, reject, monkeypatch):
    """pairs.reject=answer (Step-DPO): a sample that reaches the right answer through a wrong step
    is neither chosen nor rejected; reject=process makes it a rejected side."""
    probs = [p for p in bundle.train if not solution(p, wrong_at=1).endswith(f" {p.answer}")][:5]
    by_prompt = {}

    def lucky(p):  # the first step miscopies the start value, the result and the answer are right
        lines = solution(p).split("\n")
        a, rest = lines[0].split(" ", 1)
        return "\n".join([f"{int(a) + 1} {rest}"] + lines[1:])

    def gen(model, tok, prompts, *, num_return_sequences=1, **_):
        return completions([by_prompt[q] for q in prompts])

    for p in probs:
        by_prompt[pairs_mod.format_prompt(p.question, None)] = [solution(p), lucky(p), solution(p, wrong_at=1)]
    monkeypatch.setattr(pairs_mod, "generate", gen)
    pairs, report = pairs_mod.build_on_policy_pairs(probs, model=None, tokenizer=None, scorer=RuleScorer(), k=3,
                                                    n_problems=5, min_pairs=0, reject=reject)
    lucky_rejected = [pr for pr in pairs if pr.prefix == [] and pr.rejected[-1] == pr.chosen[-1]]
    assert report["correct"] == 5
    if reject == "answer":
        assert report["skipped_right_answer"] == 5 and report["pairs_on_policy"] == 5 and not lucky_rejected
        assert all(pr.rejected_scores[0] == 0.0 and pr.rejected[-1] != pr.chosen[-1] for pr in pairs)
    else:
        assert "skipped_right_answer" not in report and report["pairs_on_policy"] == 10 and len(lucky_rejected) == 5
    with pytest.raises(ValueError, match="pairs.reject='outcome'"):
        pairs_mod.build_on_policy_pairs(probs, model=None, tokenizer=None, scorer=RuleScorer(), reject="outcome")


def test_resample_continues_the_correct_prefix_for_a_chosen_side(bundle, monkeypatch):
    """pairs.resample_k (Step-DPO's recipe): every sample of an answer-only problem is wrong, so no
    sample can be the chosen side; the policy continues each rejected sample's correct prefix, and
    the first continuation graded correct step by step is paired against it."""
    pool = bundle.pool[:6]
    calls = []

    def gen(model, tok, prompts, *, num_return_sequences=1, temperature=None, **_):
        calls.append((list(prompts), num_return_sequences, temperature))
        by_q = {pairs_mod.format_prompt(p.question, None): p for p in pool}
        if len(calls) == 1:  # the k samples: wrong at step 1 (prefix = step 0), and wrong at step 0 (no prefix)
            return completions([[solution(by_q[q], wrong_at=1), solution(by_q[q], wrong_at=0)] for q in prompts])
        out = []
        for q in prompts:  # continuations: of prefix step 0, right for problems 0-2; of the empty prefix, wrong
            base = next(b for b in by_q if q.startswith(b))
            p, prefix = by_q[base], q[len(base):]
            i = int(p.id.rsplit("-", 1)[1])
            right = "\n".join(solution(p).split("\n")[1:])
            wrong = "\n".join(solution(p, wrong_at=1).split("\n")[1:])
            out.append([wrong, right, right] if prefix and i < 3 else [wrong, wrong, wrong])
        return completions(out)

    monkeypatch.setattr(pairs_mod, "generate", gen)
    pairs, report = pairs_mod.build_on_policy_pairs(pool, model=None, tokenizer=None, scorer=RuleScorer(), k=2,
                                                    n_problems=6, min_pairs=0, resample_k=3,
                                                    resample_temperature=0.9)
    assert report["correct"] == 0 and report["pairs_on_policy"] == 0
    assert report["resample_prefixes"] == 12 and report["resample_samples"] == 36 and report["pairs_resampled"] == 3
    (prompts, k, temp), = calls[1:]
    assert k == 3 and temp == 0.9 and len(prompts) == 12
    plain = {pairs_mod.format_prompt(p.question, None) for p in pool}
    assert sum(q not in plain for q in prompts) == 6  # six prefixes of one correct step, six empty ones
    assert sorted(int(pr.meta["problem_id"].rsplit("-", 1)[1]) for pr in pairs) == [0, 1, 2]
    for pr in pairs:
        p = next(q for q in pool if q.id == pr.meta["problem_id"])
        gold = split_steps(solution(p))  # sampled text: steps keep their line breaks
        assert pr.source == "on_policy_resampled" and pr.prefix == gold[:1] and pr.chosen == gold[1:]
        assert pr.rejected == split_steps(solution(p, wrong_at=1))[1:]
        assert pr.rejected_scores[0] == 0.0 and all(s == 1.0 for s in pr.chosen_scores)
    # the whole solution's limit (data.continuation_fits): completions carry one token per character; a budget of 40
    # holds the right continuations after a prefix counted as 0 tokens (no tokenizer), not after one of 30 tokens
    def counted(model, tok, prompts, **kw):
        return [[Completion(c.text, (0,) * len(c.text), "stop") for c in row] for row in gen(model, tok, prompts, **kw)]

    monkeypatch.setattr(pairs_mod, "generate", counted)
    for used, made in ((0, 3), (30, 0)):
        calls.clear()
        monkeypatch.setattr(pairs_mod, "prefix_tokens", lambda tok, prefix: used * bool(prefix))
        pairs, report = pairs_mod.build_on_policy_pairs(pool, model=None, tokenizer=None, scorer=RuleScorer(), k=2,
                                                        n_problems=6, min_pairs=0, resample_k=3, max_new_tokens=40)
        assert report["pairs_resampled"] == made, used
    assert min(len("\n".join(solution(p).split("\n")[1:])) for p in pool[:3]) + 30 >= 40  # why none fits at 30
    monkeypatch.setattr(pairs_mod, "generate", gen)
    # off (the default): the same samples give no pairs and nothing is re-sampled
    calls.clear()
    pairs, report = pairs_mod.build_on_policy_pairs(pool, model=None, tokenizer=None, scorer=RuleScorer(), k=2,
                                                    n_problems=6, min_pairs=0)
    assert pairs == [] and len(calls) == 1 and "resample_samples" not in report
    with pytest.raises(ValueError, match="pairs.resample_k=-1"):
        pairs_mod.build_on_policy_pairs(pool, model=None, tokenizer=None, scorer=RuleScorer(), resample_k=-1)
