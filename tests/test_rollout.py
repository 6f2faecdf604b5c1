"""reward=rollout (Monte-Carlo step values) and trainer.weighting=advantage, on hand-worked numbers.

The "policy" is a stub generate function whose continuations are a fixed table per prompt, so every
value is a count worked out by hand; one test runs the real generate path on a tiny random model to
check the plumbing (sample counts, value grid), not accuracy.
"""

import pytest
import torch

from stepdpo.batching import encode_pair
from stepdpo.data import StepPair, prompt_text, response_text
from stepdpo.generation import Completion
from stepdpo.model import char_tokenizer, tiny_llama
from stepdpo.pairs import request_for, score_pairs
from stepdpo.rewards.base import ScoreResult, value_before
from stepdpo.rewards.rollout import RolloutScorer, advantages, model_fingerprint
from stepdpo.weights import advantage, get_scheme

Q, ANSWER = "Make 5 from 2, 3.", "5"
STEPS = ("2 * 3 = 6", "6 - 1 = 5", "The answer is 5")  # a wrong middle line that happens to reach 5
RIGHT, WRONG = "The answer is 5", "The answer is 6"
# continuations per prompt (k = 4): hits counted by hand
TABLE = {
    prompt_text(Q, []): [RIGHT, WRONG, RIGHT, "no answer"],  # V_0 = 2/4
    prompt_text(Q, list(STEPS[:1])): [WRONG, RIGHT, WRONG, WRONG],  # V_1 = 1/4
    prompt_text(Q, list(STEPS[:2])): [WRONG, WRONG, WRONG, WRONG],  # V_2 = 0/4
    prompt_text(Q, ["2 + 3 = 5"]): [RIGHT, RIGHT, RIGHT, RIGHT],  # V = 4/4
}


class StubPolicy:
    """generate_fn with known outcomes; records every call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, model, tokenizer, prompts, *, num_return_sequences, do_sample, **kw):
        assert do_sample and kw["temperature"] == 0.7
        self.calls.append(list(prompts))
        return [[Completion(t, (), "stop") for t in TABLE[p][:num_return_sequences]] for p in prompts]


def scorer(tmp_path=None, **kw):
    s = RolloutScorer(k=4, temperature=0.7, cache_path=str(tmp_path / "r.sqlite") if tmp_path else None,
                      cache_key="stub", **kw)
    stub = StubPolicy()
    s.bind(None, None, generate_fn=stub)
    return s, stub


def req(steps):
    return request_for(Q, steps, ANSWER, {})  # outcome = the final answer (countdown's stricter check: below)


def test_soft_and_hard_values_and_advantages_by_hand():
    s, stub = scorer()
    (r,) = s.score([req(STEPS)])
    # V_0 = 2/4, V_1 = 1/4, V_2 = 0/4, V_3 = 1 (the solution's own answer is right: exact, not sampled)
    assert r.prompt_value == 0.5 and r.scores == [0.25, 0.0, 1.0]
    assert advantages(r.scores, r.prompt_value) == [-0.25, -0.25, 1.0]
    assert r.first_error == 0 and r.provenance == "rollout:soft@4"
    assert len(stub.calls) == 1 and len(stub.calls[0]) == 3  # three prefixes (0, 1, 2 steps), one generate call
    h, _ = scorer(estimate="hard")
    (rh,) = h.score([req(STEPS)])
    assert rh.prompt_value == 1.0 and rh.scores == [1.0, 0.0, 1.0]  # any hit counts
    assert advantages(rh.scores, rh.prompt_value) == [0.0, -1.0, 1.0]
    assert s.summary()["samples"] == 12 and s.summary()["generated_prefixes"] == 3


def test_one_generate_call_for_all_prefixes_and_the_cache_serves_the_second_call(tmp_path):
    s, stub = scorer(tmp_path, chunk=64)
    other = ("2 + 3 = 5", "The answer is 5")
    res = s.score([req(STEPS), req(other), req(STEPS)])  # shared prefixes (the prompt; STEPS twice) valued once
    assert len(stub.calls) == 1 and sorted(stub.calls[0]) == sorted(TABLE)  # 4 distinct prefixes, 1 call
    assert res[1].prompt_value == 0.5 and res[1].scores == [1.0, 1.0] and res[2].scores == res[0].scores
    again = s.score([req(STEPS), req(other)])
    assert len(stub.calls) == 1 and [r.scores for r in again] == [res[0].scores, res[1].scores]
    assert s.summary()["cache_hits"] == 4 and s.summary()["samples"] == 16
    # another job (a new scorer on the same cache file) draws nothing either
    s2, stub2 = scorer(tmp_path)
    assert [r.scores for r in s2.score([req(STEPS)])] == [res[0].scores] and stub2.calls == []
    # a different k is a different estimate: not served from k=4's entries
    s3 = RolloutScorer(k=2, temperature=0.7, cache_path=str(tmp_path / "r.sqlite"), cache_key="stub")
    stub3 = StubPolicy()
    s3.bind(None, None, generate_fn=stub3)
    (r3,) = s3.score([req(STEPS)])
    assert len(stub3.calls) == 1 and r3.prompt_value == 0.5 and r3.scores == [0.5, 0.0, 1.0]  # first 2 of each row


def test_continuations_stop_where_eval_stops():
    seen = []

    def policy(model, tokenizer, prompts, *, num_return_sequences, stop=None, **kw):
        seen.append(stop)
        return [[Completion(RIGHT, (), "stop")] * num_return_sequences for _ in prompts]

    for stop in (["\\n\\nQuestion:"], []):
        s = RolloutScorer(k=2, temperature=0.7, cache_key="stub", stop=stop)
        s.bind(None, None, generate_fn=policy)
        s.score([req(STEPS)])
    assert seen == [["\n\nQuestion:"], None]


def test_chunks_split_generation_and_no_answer_fails_the_request():
    s, stub = scorer(chunk=2)
    s.score([req(STEPS)])
    assert [len(c) for c in stub.calls] == [2, 1]
    (bad,) = s.score([request_for(Q, STEPS, "", {})])
    assert bad.scores is None and "reference answer" in bad.error
    with pytest.raises(ValueError, match="no policy"):
        RolloutScorer().score([req(STEPS)])


def test_a_continuation_counts_only_within_the_whole_solutions_limit():
    """max_new_tokens is a whole solution's limit (eval's): after a prefix of u tokens a continuation of n tokens
    counts only if u + n < max_new_tokens (room for its end-of-sequence token). Hand-worked with a tokenizer that
    makes one token per character; the stub policy cuts at the call's max_new_tokens as generate does."""
    from stepdpo.data import continuation_fits, prefix_text, prefix_tokens

    class CharTok:
        def __call__(self, text, add_special_tokens=False, split_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    tok = CharTok()
    assert prefix_tokens(tok, [STEPS[0]]) == len(prefix_text([STEPS[0]])) == 10 and prefix_tokens(tok, []) == 0
    assert prefix_tokens(tok, STEPS[:2]) == 20 and prefix_tokens(None, STEPS[:2]) == 0
    assert continuation_fits(Completion("x", (1,) * 5, "stop"), 0, 6)  # 5 + EOS = 6
    assert not continuation_fits(Completion("x", (1,) * 6, "stop"), 0, 6)
    assert continuation_fits(Completion("x", (1,) * 5, "stop"), 3, 9) and not continuation_fits(
        Completion("x", (1,) * 5, "stop"), 4, 9)
    assert not continuation_fits(Completion("x", (), "length"), 0, 6)  # cut off by its own call

    calls = []

    def policy(model, tokenizer, prompts, *, num_return_sequences, max_new_tokens, **kw):
        calls.append(max_new_tokens)  # RIGHT (15 tokens) from every prefix, cut at the call's limit
        c = (Completion(RIGHT, (0,) * 15, "stop") if 15 < max_new_tokens else
             Completion(RIGHT[:max_new_tokens], (0,) * max_new_tokens, "length"))
        return [[c] * num_return_sequences for _ in prompts]

    def values(limit, **kw):
        calls.clear()
        s = RolloutScorer(k=2, temperature=0.7, max_new_tokens=limit, cache_key="stub", **kw)
        s.bind(None, tok, generate_fn=policy)
        (r,) = s.score([req(STEPS)])
        return [r.prompt_value] + r.scores

    # prefixes of 0, 10 and 20 tokens, then 15: fits at 24 after the prompt only; at 30 after one step too
    assert values(24) == [1.0, 0.0, 0.0, 1.0] and calls == [24]  # one call: what the prompt alone leaves
    assert values(30, chunk=1) == [1.0, 1.0, 0.0, 1.0] and calls == [30, 20, 10]  # shortest prefix first
    assert values(36) == [1.0, 1.0, 1.0, 1.0]  # 20 + 15 < 36


def test_fingerprint_follows_the_trainable_weights():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    a = model_fingerprint(model)
    with torch.no_grad():
        model[1].weight[0, 0] += 1e-3  # a trainable (adapter) weight moves: a new policy
    b = model_fingerprint(model)
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0  # the first element of a frozen tensor is in its sample
    assert len({a, b, model_fingerprint(model)}) == 3


def test_tiny_model_through_the_real_generate_path(tmp_path):
    import torch

    torch.manual_seed(0)
    model, tok = tiny_llama(hidden_size=32, intermediate_size=64)
    s = RolloutScorer(k=3, max_new_tokens=8, batch_size=16, cache_path=str(tmp_path / "c.sqlite"))
    s.bind(model, tok)
    res = s.score([req(STEPS), req(("2 + 3 = 6", "The answer is 6"))])
    assert s.summary()["samples"] == (3 + 1) * 3  # prefixes: prompt, 1 step, 2 steps (shared prompt), k=3
    assert res[0].scores[-1] == 1.0 and res[1].scores[-1] == 0.0  # the final value is the outcome itself
    assert all(v in (0, 1 / 3, 2 / 3, 1) for r in res for v in r.scores[:-1] + [r.prompt_value])
    s.score([req(STEPS)])
    assert s.summary()["samples"] == 12  # same weights: cached
    with torch.no_grad():
        next(p for p in model.parameters()).add_(0.01)  # trained policy: every value is drawn again
    s.score([req(STEPS)])
    assert s.summary()["samples"] == 12 + 3 * 3


def test_advantage_weights_by_hand():
    # values: prefix 0.75; chosen 1, 1; rejected 0.25 (drop 0.5: critical), 0 (drop 0.25), 0
    cw, rw = advantage([1.0, 1.0], [0.25, 0.0, 0.0], value_before=0.75)
    assert cw == [0.25, 0.0] and rw == [0.5, 0.0, 0.0]
    assert advantage([1.0, 1.0], [0.25, 0.0, 0.0], value_before=0.75, all_drops=True)[1] == [0.5, 0.25, 0.0]
    # the largest drop need not be the first: a valid-looking step 0, then the dooming step 1
    assert advantage([0.5], [0.5, 0.0, 0.0], value_before=0.5)[1] == [0.0, 0.5, 0.0]
    assert advantage([0.2, 1.0], [0.5, 0.0], value_before=0.5)[0] == [0.0, 0.8]  # gains only; losses weigh 0
    # ties: the first largest drop; no value_before (rule scores): the prefix counts as 1
    assert advantage([1.0], [0.5, 0.0], value_before=1.0)[1] == [0.5, 0.0]
    assert advantage([1.0], [1.0, 0.0])[1] == [0.0, 1.0]
    assert advantage([], [])[1] == [] and get_scheme("advantage") is advantage
    # signed: every step by its advantage, both signs. Rejected values 0.75 -> 1.0 -> 0.25 -> 0.0 (a good first
    # step, then the critical one): the first step is pushed up (weight -0.25), the drops down (0.75, 0.25)
    assert advantage([1.0], [1.0, 0.25, 0.0], value_before=0.75, signed=True) == ([0.25], [-0.25, 0.75, 0.25])
    # a chosen step that lowered the value is pushed down (negative weight), the one that recovered it up
    assert advantage([0.5, 1.0], [0.0], value_before=0.75, signed=True) == ([-0.25, 0.5], [0.75])
    with pytest.raises(ValueError, match="all_drops"):
        advantage([1.0], [0.0], signed=True, all_drops=True)


def test_value_before_reaches_the_token_weights():
    tok = char_tokenizer()
    pair = StepPair(id="x", question=Q, answer=ANSWER, prefix=[], chosen=["2 + 3 = 5", "The answer is 5"],
                    rejected=list(STEPS), chosen_scores=[1.0, 1.0], rejected_scores=[0.25, 0.0, 1.0],
                    meta={"value_before": 0.5})
    ex = encode_pair(pair, tok, weighting="advantage")
    n0 = len(STEPS[0]) + 1  # a step's characters and the newline after it (data.step_spans), one token each
    # rejected: A = [-0.25, -0.25, +1]: the first largest drop (step 0) weighs 0.25, the rest 0
    assert ex.rejected_w[:n0] == [0.25] * n0 and set(ex.rejected_w[n0:]) == {0.0}
    # chosen: A = [+0.5, 0]: step 0 weighs 0.5, the answer line (and EOS) 0
    assert ex.chosen_w[:10] == [0.5] * 10 and set(ex.chosen_w[10:]) == {0.0}
    assert len(ex.rejected_w) == len(response_text(STEPS)) + 1  # + EOS


def test_score_pairs_keeps_the_prefix_value():
    s, _ = scorer()
    pairs = [StepPair(id="a", question=Q, answer=ANSWER, prefix=[], chosen=["2 + 3 = 5", RIGHT], rejected=list(STEPS)),
             StepPair(id="b", question=Q, answer=ANSWER, prefix=[STEPS[0]], chosen=["6 - 1 = 5", RIGHT],
                      rejected=["6 - 1 = 5", WRONG])]
    out, report = score_pairs(pairs, s)
    assert report["scored"] == 2
    assert out[0].meta["value_before"] == 0.5  # the prompt's value V_0
    assert out[1].meta["value_before"] == 0.25  # V_1: after the shared prefix step
    assert out[1].chosen_scores == [0.0, 1.0] and out[1].rejected_scores == [0.0, 0.0]
    assert value_before(ScoreResult([1.0], "rule"), 0) == {}  # rule scores carry no values


@pytest.mark.slow
def test_cli_countdown_outcome_pairs_with_rollout_advantages(tmp_path):
    import json

    from conftest import FAST, run_cli

    fast = [o for o in FAST if not o.startswith("pairs.min_pairs")]  # pairs=outcome never tops up
    proc, run = run_cli(tmp_path, *fast, "dataset=countdown", "pairs=outcome", "reward=rollout", "reward.k=2",
                        "reward.max_new_tokens=48", f"reward.cache_path={tmp_path / 'rollout.sqlite'}",
                        "trainer=stepdpo", "trainer.weighting=advantage", "threads=1", fast=False)
    summary = json.loads((run / "summary.json").read_text())
    j, jp = summary["judge"], summary["judge_pairs"]
    assert j["samples"] == 2 * j["generated_prefixes"] > 0 and j["seconds"] > 0
    # the pairs' own cost: part of the run's total, which also values the saved eval samples (before and after)
    assert 0 < jp["samples"] == 2 * jp["generated_prefixes"] <= j["samples"] and jp["requests"] == 2 * len(
        (run / "pairs.jsonl").read_text().splitlines())  # a chosen and a rejected request per pair
    pairs = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["meta"]["provenance"] == "rollout:soft@2" and "value_before" in p["meta"] for p in pairs)
    assert all(v in (0, 0.5, 1) for p in pairs for v in p["rejected_scores"] + [p["meta"]["value_before"]])


def test_signed_advantage_weights_push_a_failed_solutions_good_step_up():
    """A negative weight on a rejected token reverses its pull: the loss gradient on that token's log-prob is
    negative (descent raises it), where the same token with weight +1 (plain DPO) is pushed down. By hand: with
    margin h = 0 the sigmoid loss's derivative is -beta/2 per unit of h, h = sum w^c r^c - sum w^r r^r, so
    dL/dlogp = -beta/2 * w for a chosen token and +beta/2 * w for a rejected one."""
    from stepdpo.loss import weighted_dpo_loss

    beta = 0.1
    for w_rej, want in ((1.0, beta / 2), (-0.25, -0.25 * beta / 2)):
        logps = torch.zeros(2, 3, requires_grad=True)
        weights = torch.tensor([[0.0, 0.25, 0.0], [w_rej, 0.75, 0.25]])
        loss, m = weighted_dpo_loss(logps, torch.zeros(2, 3), weights, torch.ones(2, 3, dtype=torch.bool), beta=beta)
        loss.backward()
        assert m["tokens/reversed_weight"].item() == pytest.approx(max(0.0, -w_rej))
        assert logps.grad[1, 0].item() == pytest.approx(want)
        assert logps.grad[0, 1].item() == pytest.approx(-0.25 * beta / 2)  # a chosen gain: pushed up


def test_signed_advantage_refuses_the_mean_reduction():
    from conftest import compose_config
    from stepdpo.config import validate_trainer

    cfg = compose_config("trainer=stepdpo", "trainer.weighting=advantage", "trainer.weighting_kwargs.signed=true",
                         "trainer.token_reduction=mean")
    with pytest.raises(ValueError, match=r"trainer.weighting_kwargs.signed=true needs trainer.token_reduction=sum"):
        validate_trainer(cfg.trainer, "trainer")
    cfg.trainer.token_reduction = "sum"
    validate_trainer(cfg.trainer, "trainer")


def test_credit_agreement_script_hand_worked(tmp_path):
    # scripts/credit_agreement.py: the step weighting=advantage weighs on each rejected side against the rule's
    # first flagged line, on the same pairs scored twice. Four hand-worked pairs (value before, rollout values):
    #   (0.75, [0.25, 0, 0])  drops 0.5, 0.25, 0    -> largest at step 0 = the rule's first error
    #   (0.0,  [0, 0.5, 0])   drops 0, -0.5, 0.5    -> largest at step 2, after the first error (step 0)
    #   (0.0,  [0, 0, 0])     no drop: no weight    (and the value before is 0)
    #   (1.0,  [0.5, 0.5, 0]) drops 0.5, 0, 0.5     -> the first of the tie, step 0, before the error (step 1)
    import importlib.util
    import json

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("credit_agreement", ROOT / "scripts" / "credit_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cases = [(0.75, [0.25, 0.0, 0.0], [0.0, 0.0, 0.0]), (0.0, [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]),
             (0.0, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]), (1.0, [0.5, 0.5, 0.0], [1.0, 0.0, 0.0])]
    rule, roll = tmp_path / "rule", tmp_path / "roll"
    rule.mkdir(), roll.mkdir()
    base = {"prefix": [], "chosen": ["a", "b", "c"], "chosen_scores": [1.0, 1.0, 1.0], "rejected": ["x", "y", "z"]}
    rows_rule = [{**base, "id": f"p{i}", "rejected_scores": rs, "meta": {}} for i, (_, _, rs) in enumerate(cases)]
    rows_roll = [{**base, "id": f"p{i}", "rejected_scores": vs, "meta": {"value_before": vb}}
                 for i, (vb, vs, _) in enumerate(cases)]
    (rule / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_rule))
    (roll / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_roll))
    out = mod.main(str(rule), str(roll))
    assert out == {"pairs": 4, "value_before_0": 0.5, "no_drop": 0.25, "at_first_error": 0.25, "before_it": 0.25,
                   "after_it": 0.25, "mean_rejected_weight": round((0.5 + 0.5 + 0.0 + 0.5) / 4, 3)}
    (roll / "pairs.jsonl").write_text(json.dumps({**rows_roll[0], "id": "other"}) + "\n")
    with pytest.raises(SystemExit, match="not in"):
        mod.main(str(rule), str(roll))


def test_rollouts_advance_their_own_bar_not_the_stage_that_asked():
    """Rollout generation inside an open generation bar (on-policy sampling's, whose callback indexes its own
    problems) advances a bar of its own: the outer count stays the stage's samples, and its callback never sees
    the rollout prompts."""
    from stepdpo import progress

    seen = []

    def policy(model, tokenizer, prompts, *, num_return_sequences, **kw):
        outs = [[Completion(RIGHT, (), "stop")] * num_return_sequences for _ in prompts]
        progress.advance(len(prompts) * num_return_sequences, dict(enumerate(outs)))  # as generation.generate does
        return outs

    def outer_cb(outputs):
        seen.append(sorted(outputs))
        assert max(outputs) < 1, "the sampling bar's callback got the rollout batch"  # it has one problem
        return {}

    s = RolloutScorer(k=2, temperature=0.7, cache_key="stub")
    s.bind(None, None, generate_fn=policy)
    with progress.bar("sampling", 2, unit="sample", on_outputs=outer_cb) as outer:
        s.score([req(STEPS)])  # three prefixes
        assert outer.n == 0 and seen == []


def test_a_bad_cache_path_fails_when_the_scorer_is_built(tmp_path):
    bad = tmp_path / "not_a_db.sqlite"
    bad.write_text("this is not SQLite " * 100)
    with pytest.raises(ValueError, match=r"not a usable SQLite database .*point reward\.cache_path somewhere else"):
        RolloutScorer(cache_path=str(bad))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"can't create its directory .*set reward\.cache_path"):
        RolloutScorer(cache_path=str(tmp_path / "file" / "sub" / "r.sqlite"))


@pytest.mark.parametrize("key,value", [("k", 2.5), ("chunk", "8"), ("seed", True)])
def test_rollout_counts_must_be_integers(key, value):
    with pytest.raises(ValueError, match=rf"reward\.{key}=.*: must be an integer"):
        RolloutScorer(**{key: value})
