"""pairs=outcome: pairs picked by outcome (answer + rule-valid lines) alone, cut at the longest shared prefix;
a valid-but-doomed countdown sample is kept (rule flags only its answer line)."""

import pytest

import stepdpo.pairs_outcome as mod
from stepdpo.data import Problem
from stepdpo.generation import Completion
from stepdpo.pairs import score_pairs
from stepdpo.rewards.rule import RuleScorer

META = {"kind": "countdown", "numbers": [3, 7, 25], "target": 46, "ops": "+-*"}

RIGHT = ["7 * 3 = 21", "21 + 25 = 46", "The answer is 46"]
SLIP = ["7 * 3 = 21", "21 + 25 = 47", "The answer is 47"]  # invalid second line
DOOM = ["25 - 7 = 18", "18 * 3 = 54", "The answer is 54"]  # every line valid; the first dooms the target
CHEAT = ["7 * 7 = 49", "49 - 3 = 46", "The answer is 46"]  # right answer, 7 used twice


def test_outcome_pairs_keep_doomed_samples_and_cut_at_the_shared_prefix(monkeypatch):
    p = Problem(id="c0", question="Make 46 from 3, 7, 25. Use each number once with + - *.", answer="46",
                steps=list(RIGHT), meta=META)
    outs = [Completion("\n".join(s), (), "stop") for s in (SLIP, RIGHT, DOOM, DOOM, CHEAT)]
    monkeypatch.setattr(mod, "generate", lambda m, t, prompts, num_return_sequences, **_: [outs for _ in prompts])
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=5, max_pairs_per_problem=3)
    assert report["correct"] == 1 and report["pairs_outcome"] == 3 and report["samples"] == 5
    slip, doom, cheat = ([[x.strip() for x in side] for side in (q.prefix, q.chosen, q.rejected)] for q in pairs)
    assert slip == [RIGHT[:1], RIGHT[1:], SLIP[1:]]  # sampled steps keep their line breaks (steps.split_steps)
    assert doom == [[], RIGHT, DOOM]  # the duplicate DOOM: once
    assert cheat == [[], RIGHT, CHEAT] and pairs[2].meta["chosen_from"] == "sample"
    assert all(q.chosen_scores is None for q in pairs)  # unscored: the reward group scores them
    scored, _ = score_pairs(pairs, RuleScorer())
    # rule sees the slip and the cheat at their bad line, but only the answer line of the doomed sample
    # (the cheat's answer line is wrong too: 25 was never used)
    assert [q.rejected_scores for q in scored] == [[0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


def test_gold_is_the_chosen_side_when_no_sample_is_right(monkeypatch):
    p = Problem(id="c1", question="q", answer="46", steps=list(RIGHT), meta=META)
    doom = Completion("\n".join(DOOM), (), "stop")
    monkeypatch.setattr(mod, "generate", lambda m, t, prompts, num_return_sequences, **_: [[doom]])
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=1)
    assert len(pairs) == 1 and pairs[0].chosen == RIGHT and pairs[0].meta["chosen_from"] == "gold"  # gold as is
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=1, use_gold=False)
    assert pairs == [] and report["no_chosen"] == 1


def test_align_none_keeps_both_solutions_whole(monkeypatch):
    """align=none: a random correct solution (seeded), prefix empty, both sides whole; the slip's right first
    line stays on its rejected side instead of going into the prompt."""
    p = Problem(id="c2", question="q", answer="46", steps=list(RIGHT), meta=META)
    outs = [Completion("\n".join(s), (), "stop") for s in (SLIP, RIGHT, DOOM)]
    monkeypatch.setattr(mod, "generate", lambda m, t, prompts, num_return_sequences, **_: [outs for _ in prompts])
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=3, align="none", seed=3)
    assert report["pairs_outcome"] == 2 and report["pairs_prefix_steps"] == 0
    assert [[x.strip() for x in q.rejected] for q in pairs] == [SLIP, DOOM]
    assert all([x.strip() for x in q.chosen] == RIGHT and q.prefix == [] for q in pairs)  # sample or gold: both RIGHT
    again, _ = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=3, align="none", seed=3)
    assert [q.meta["chosen_from"] for q in again] == [q.meta["chosen_from"] for q in pairs]  # seeded
    with pytest.raises(ValueError, match="pairs.align=.longest.: choose one of shared, none"):
        mod.build_outcome_pairs([p], model=None, tokenizer=None, k=3, align="longest")


def test_reject_answer_skips_right_answers_with_a_flagged_line(monkeypatch):
    """reject=answer (as pairs=on_policy's): on a task graded by its answer, a sample that states the right answer
    after a wrong line is neither side; reject=process (the default) makes it a rejected side."""
    meta = {"kind": "arith", "start": 15, "ops": [["-", 6], ["-", 3], ["-", 3]]}
    gold = ["15 - 6 = 9", "9 - 3 = 6", "6 - 3 = 3", "The answer is 3"]
    lucky = ["15 - 6 = 8", "8 - 3 = 6", "6 - 3 = 3", "The answer is 3"]  # a wrong first line, the right answer
    wrong = ["15 - 6 = 8", "8 - 3 = 5", "5 - 3 = 2", "The answer is 2"]
    p = Problem(id="a0", question="Start with 15, subtract 6, subtract 3, subtract 3. What is the result?",
                answer="3", steps=list(gold), meta=meta)
    outs = [Completion("\n".join(s), (), "stop") for s in (lucky, wrong)]
    monkeypatch.setattr(mod, "generate", lambda m, t, prompts, num_return_sequences, **_: [outs for _ in prompts])
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=2)
    assert [[x.strip() for x in q.rejected] for q in pairs] == [lucky, wrong] and report["correct"] == 0
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=2, reject="answer")
    assert [[x.strip() for x in q.rejected] for q in pairs] == [wrong] and report["skipped_right_answer"] == 1
    assert [x.strip() for x in pairs[0].chosen] == gold and report["correct"] == 0  # the lucky one is not chosen
    outs[:] = [Completion("\n".join(s), (), "stop") for s in (wrong, lucky, lucky)]
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=3, reject="answer",
                                            max_pairs_per_problem=1)
    assert len(pairs) == 1 and report["skipped_right_answer"] == 2  # every one counted, after the cap too
    with pytest.raises(ValueError, match="pairs.reject"):
        mod.build_outcome_pairs([p], model=None, tokenizer=None, k=2, reject="lines")


def test_chosen_answer_grades_by_the_answer_alone(monkeypatch):
    """chosen=answer (outcome supervision, no checker): a right answer after a wrong line is a correct sample, the
    chosen side of the wrong one it shares its first line with; it is counted as a flagged positive."""
    meta = {"kind": "arith", "start": 15, "ops": [["-", 6], ["-", 3], ["-", 3]]}
    lucky = ["15 - 6 = 8", "8 - 3 = 6", "6 - 3 = 3", "The answer is 3"]  # a wrong first line, the right answer
    wrong = ["15 - 6 = 8", "8 - 3 = 5", "5 - 3 = 2", "The answer is 2"]
    p = Problem(id="a1", question="Start with 15, subtract 6, subtract 3, subtract 3. What is the result?",
                answer="3", steps=[], meta=meta)
    outs = [Completion("\n".join(s), (), "stop") for s in (lucky, wrong)]
    monkeypatch.setattr(mod, "generate", lambda m, t, prompts, num_return_sequences, **_: [outs for _ in prompts])
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=2, chosen="answer", use_gold=False)
    assert report["correct"] == 1 and report["correct_flagged"] == 1 and len(pairs) == 1
    q = pairs[0]
    assert ([x.strip() for x in q.prefix], [x.strip() for x in q.chosen], [x.strip() for x in q.rejected]) == (
        lucky[:1], lucky[1:], wrong[1:])
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=2, use_gold=False)  # process: no positive
    assert pairs == [] and report["correct"] == 0 and report["no_chosen"] == 2
    with pytest.raises(ValueError, match="pairs.chosen"):
        mod.build_outcome_pairs([p], model=None, tokenizer=None, k=2, chosen="lines")


def test_sampling_stops_where_eval_stops(monkeypatch):
    """pairs.stop (= eval.stop) reaches generate, with the config's backslash escapes read as eval reads them."""
    seen = []

    def gen(m, t, prompts, num_return_sequences, stop=None, **_):
        seen.append(stop)
        return [[Completion("\n".join(RIGHT), (), "stop")] * num_return_sequences for _ in prompts]

    monkeypatch.setattr(mod, "generate", gen)
    p = Problem(id="c3", question="q", answer="46", steps=list(RIGHT), meta=META)
    mod.build_outcome_pairs([p], model=None, tokenizer=None, k=1, stop=["\\n\\nQuestion:"])
    mod.build_outcome_pairs([p], model=None, tokenizer=None, k=1)
    assert seen == [["\n\nQuestion:"], None]


def test_gsm8k_annotations_are_graded_as_reward_rule_grades_them(monkeypatch):
    """A GSM8K sample with the right answer after a <<a=b>> annotation that does not recompute: a rejected side while
    the rule checks annotations (the default), a correct sample (the chosen side) with check_annotations=false; the
    config ties pairs.check_annotations to reward.check_annotations when reward=rule."""
    from conftest import compose_config

    gold = ["She has 3 + 4 = <<3+4=7>>7 apples.", "Then 7 * 2 = <<7*2=14>>14.", "The answer is 14"]
    slip = ["She has 3 + 4 = <<3+4=8>>8 apples.", "Then 7 * 2 = <<7*2=14>>14.", "The answer is 14"]
    wrong = ["She has 3 + 4 = <<3+4=7>>7 apples.", "Then 7 * 2 = <<7*2=15>>15.", "The answer is 15"]
    p = Problem(id="g0", question="q", answer="14", steps=list(gold), meta={})
    outs = [Completion("\n".join(s), (), "stop") for s in (slip, wrong)]
    monkeypatch.setattr(mod, "generate", lambda m, t, prompts, num_return_sequences, **_: [outs for _ in prompts])
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=2, use_gold=False)
    assert report["correct"] == 0 and pairs == []  # both flagged, nothing to pair with
    pairs, report = mod.build_outcome_pairs([p], model=None, tokenizer=None, k=2, use_gold=False,
                                            check_annotations=False)
    assert report["correct"] == 1 and len(pairs) == 1
    assert [x.strip() for x in pairs[0].chosen] == slip and [x.strip() for x in pairs[0].rejected] == wrong
    with pytest.raises(ValueError, match="pairs.check_annotations='no': must be true or false"):
        mod.build_outcome_pairs([p], model=None, tokenizer=None, k=2, check_annotations="no")
    assert compose_config("pairs=outcome", "reward.check_annotations=false").pairs.check_annotations is False
    assert compose_config("pairs=outcome", "reward=rollout").pairs.check_annotations is True
