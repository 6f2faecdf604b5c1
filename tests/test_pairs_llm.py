"""pairs=llm: flawed solutions written by an LLM (the fake server), validated, turned into step pairs."""

from __future__ import annotations

import json

import pytest

from stepdpo.config import build
from stepdpo.data import Problem, StepPair
from stepdpo.pairs_llm import build_llm_pairs, flaw_messages, parse_flawed
from stepdpo.rewards.llm_engine import ParseError

from conftest import compose_config
from fake_openai import FakeOpenAI, judge_steps, steps_of

FAST = dict(backoff_base=0.01, backoff_max=0.05, timeout=2.0, progress=False, model="gpt-4o-mini")  # engine settings


def make_problems(n: int) -> list[Problem]:
    out = []
    for i in range(n):
        a, b, m, c = 10 + i, 3 + i % 5, 2 + i % 3, 1 + i % 4
        v1, v2, v3 = a + b, (a + b) * m, (a + b) * m - c
        steps = [f"{a} + {b} = {v1}", f"{v1} * {m} = {v2}", f"{v2} - {c} = {v3}", f"The answer is {v3}"]
        out.append(Problem(id=f"p{i}", question=f"Start with {a}, add {b}, multiply by {m}, subtract {c}.",
                           answer=str(v3), steps=steps))
    return out


@pytest.fixture
def fake():
    with FakeOpenAI() as f:
        yield f


def test_pairs_share_the_gold_prefix_and_diverge_at_the_wrong_step(fake):
    probs = make_problems(12)
    pairs, _ = build_llm_pairs(probs, engine=dict(FAST, base_url=fake.base_url, cache_path=None), seed=0)
    assert len(pairs) == 12 and fake.counts["chat"] == 12
    by_id = {p.id: p for p in probs}
    targets = set()
    for pr in pairs:
        assert isinstance(pr, StepPair) and pr.source == "llm"
        gold = by_id[pr.meta["problem_id"]].steps
        k = pr.meta["wrong_step"]
        targets.add(k)
        assert pr.prefix == gold[:k] and pr.chosen == gold[k:]
        assert pr.rejected[0] != pr.chosen[0]
        assert pr.chosen_scores == [1.0] * len(pr.chosen) and pr.rejected_scores == [0.0] * len(pr.rejected)
        assert judge_steps(pr.prefix + pr.rejected)[k] is False  # the first rejected step really is wrong
        assert pr.rejected[-1] != pr.chosen[-1]  # the mistake carried through to the answer
        assert k == pr.meta["target_step"] and k < len(gold) - 1  # avoid_last
        json.dumps(pr.to_dict())
    assert len(targets) > 1  # the seed spreads the mistakes over the steps


def test_seeded_and_limited(fake):
    probs = make_problems(10)
    a, _ = build_llm_pairs(probs, engine=dict(FAST, base_url=fake.base_url, cache_path=None), seed=1, n_problems=4)
    b, _ = build_llm_pairs(probs, engine=dict(FAST, base_url=fake.base_url, cache_path=None), seed=1, n_problems=4)
    c, _ = build_llm_pairs(probs, engine=dict(FAST, base_url=fake.base_url, cache_path=None), seed=2, n_problems=4)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b] and len(a) == 4
    assert [(p.id, p.meta["wrong_step"]) for p in a] != [(p.id, p.meta["wrong_step"]) for p in c]


def test_bad_prefix_is_retried_then_counted(fake):
    probs = make_problems(6)
    always_bad = {"p1"}
    retried = set()

    def fault_for(body):
        user = body["messages"][-1]["content"]
        pid = next(p.id for p in probs if p.question in user)
        if pid in always_bad:
            return "bad_prefix"
        if pid == "p2" and pid not in retried:
            retried.add(pid)
            return "bad_prefix"
        return "invalid_json" if pid == "p3" else None

    fake.fault_for = fault_for
    pairs, report = build_llm_pairs(probs, engine=dict(FAST, base_url=fake.base_url, cache_path=None,
                                                                   parse_retries=1))
    got = {p.meta["problem_id"] for p in pairs}
    assert got == {"p0", "p2", "p4", "p5"}
    assert report["failed"] == 2 and report["pairs"] == 4  # (with seed 0, p1's target step is > 1)
    assert report["failed/invalid_json"] == 1 and report["failed/bad_prefix"] == 1
    assert report["llm"]["parse_retries"] >= 2 and report["llm"]["failures"] == 2


def test_rerun_is_free_and_identical(fake, tmp_path):
    probs = make_problems(8)
    kw = dict(engine=dict(FAST, base_url=fake.base_url, cache_path=tmp_path / "c.sqlite"))
    first, _ = build_llm_pairs(probs, **kw)
    n = fake.counts["chat"]
    again, _ = build_llm_pairs(probs, **kw)
    assert fake.counts["chat"] == n == 8
    assert [p.to_dict() for p in again] == [p.to_dict() for p in first]


def test_parse_flawed_rules():
    gold = ["1 + 1 = 2", "2 * 3 = 6", "The answer is 6"]
    ok = {"wrong_step": 2, "steps": ["1 + 1 = 2", "2 * 3 = 7", "The answer is 7"]}
    assert parse_flawed(json.dumps(ok), gold) == {"wrong_step": 1, "steps": ok["steps"]}
    assert parse_flawed("sure:\n```json\n" + json.dumps(ok) + "\n```", gold)["wrong_step"] == 1
    for bad, reason in [({**ok, "steps": ["1 + 1 = 3", *ok["steps"][1:]]}, "bad_prefix"),
                        ({**ok, "wrong_step": 0}, "bad_wrong_step"),
                        ({**ok, "wrong_step": 1}, "bad_wrong_step"),  # step 1 is the original
                        ({**ok, "steps": []}, "bad_steps"),
                        ({"wrong_step": "two", "steps": ok["steps"]}, "bad_wrong_step")]:
        with pytest.raises(ParseError) as e:
            parse_flawed(json.dumps(bad), gold)
        assert e.value.reason == reason
    with pytest.raises(ParseError, match="invalid_json"):
        parse_flawed("no json here", gold)
    assert steps_of(flaw_messages("Q", gold, 2)) == gold


def test_built_from_config_and_called_like_the_pipeline(fake, tmp_path):
    cfg = compose_config("pairs=llm", f"pairs.engine.base_url={fake.base_url}",
                         f"pairs.engine.cache_path={tmp_path / 'c.sqlite'}", "pairs.n_problems=3",
                         "pairs.engine.progress=false")
    from stepdpo.pairs import call_builder

    fn = build(cfg.pairs, "pairs")
    pairs, report = call_builder(fn, make_problems(5), pool=[], model=object(), tokenizer=None, scorer=None, seed=0)
    assert len(pairs) == 3 and report["pairs"] == 3 and report["llm"]["requests"] == 3
    assert fake.counts["chat"] == 3
