"""The LLM judge through the real `openai` client against a fake OpenAI server on 127.0.0.1.

Covers: scores and provenance; plain-text mode; the cache (re-runs pay nothing, a killed run
resumes with only the missing requests, two processes share one cache file); every injected
fault (429 + Retry-After, 5xx, timeouts, dropped connections, invalid JSON, wrong step count)
ends in a valid score or a counted failure; a rejected key stops the run; the key never leaks;
Batch API mode and resuming a pending batch by id; dry-run estimates; calling from a running loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepdpo.rewards.base import ScoreRequest, StepScorer
from stepdpo.rewards.judge_cache import JudgeCache
from stepdpo.rewards.llm_engine import EngineConfig, LLMEngine, ParseError, read_dotenv
from stepdpo.rewards.openai_judge import PROMPT_VERSION, OpenAIJudge, judge_messages, parse_judgement

from fake_openai import FakeOpenAI, judge_steps, steps_of

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(backoff_base=0.01, backoff_max=0.05, timeout=2.0, progress=False)


def make_requests(n: int, start: int = 0) -> list[ScoreRequest]:
    """Deterministic arithmetic solutions; every third one (i % 3 == 0) has a wrong first step."""
    out = []
    for i in range(start, start + n):
        a, b = 10 + i, 3 + i % 7
        c = a + b + (1 if i % 3 == 0 else 0)  # i % 3 == 0: step 2 is wrong
        steps = (f"{a} + {b} = {c}", f"{c} * 2 = {c * 2}", f"The answer is {c * 2}")
        out.append(ScoreRequest(f"Start with {a}, add {b}, double it. (#{i})", steps, str((a + b) * 2),
                                meta=(("problem_id", f"p{i}"),)))
    return out


def expected(req: ScoreRequest) -> list[float]:
    return [0.9 if ok else 0.1 for ok in judge_steps(list(req.steps))]


@pytest.fixture
def fake():
    with FakeOpenAI() as f:
        yield f


JUDGE_KEYS = ("structured", "include_answer", "dry_run")  # the rest of **kw are engine settings


def judge(fake, tmp_path=None, **kw) -> OpenAIJudge:
    engine = dict(FAST, base_url=fake.base_url, model="gpt-4o-mini",
                  cache_path=None if tmp_path is None else tmp_path / "judge.sqlite")
    engine.update({k: v for k, v in kw.items() if k not in JUDGE_KEYS})
    return OpenAIJudge(engine=engine, **{k: v for k, v in kw.items() if k in JUDGE_KEYS})


# ----------------------------------------------------------------------------- basics


@pytest.mark.parametrize("structured", [True, False])
def test_scores_provenance_and_summary(fake, structured):
    reqs = make_requests(9)
    j = judge(fake, structured=structured, concurrency=4)
    assert isinstance(j, StepScorer) and j.name == "openai"
    res = j.score(reqs)
    for r, q in zip(res, reqs):
        assert r.error is None and r.scores == expected(q)
        assert r.provenance == "openai:gpt-4o-mini"
        assert r.first_error == (0 if int(dict(q.meta)["problem_id"][1:]) % 3 == 0 else None)
        assert r.usage["prompt_tokens"] > 0
    s = j.summary()
    assert s["requests"] == 9 and s["succeeded"] == 9 and s["failures"] == 0 and s["cache_hits"] == 0
    assert s["api_calls"] == 9 == fake.counts["chat"]
    assert s["prompt_tokens"] > 0 and s["cost_usd"] > 0 and s["prompt_version"] == PROMPT_VERSION
    assert json.loads(json.dumps(s)) == s  # JSON-able for summary.json


def test_empty_and_duplicate_requests(fake):
    reqs = make_requests(2)
    res = judge(fake).score([reqs[0], ScoreRequest("q", ()), reqs[0], reqs[1]])
    assert res[1].scores == [] and res[0].scores == res[2].scores == expected(reqs[0])
    assert fake.counts["chat"] == 2  # identical requests are sent once


def test_rerun_pays_nothing(fake, tmp_path):
    reqs = make_requests(12)
    first = judge(fake, tmp_path).score(reqs)
    n = fake.counts["chat"]
    j2 = judge(fake, tmp_path)
    again = j2.score(reqs)
    assert fake.counts["chat"] == n == 12
    assert [r.scores for r in again] == [r.scores for r in first]
    assert j2.summary()["cache_hits"] == 12 and j2.summary()["requests"] == 0
    assert all(r.usage == {} for r in again)  # nothing paid this time
    # a different prompt version / model is a different key
    assert judge(fake, tmp_path, model="gpt-4o").key(reqs[0]) != j2.key(reqs[0])


# ----------------------------------------------------------------------------- faults


def test_every_fault_ends_in_a_score_or_a_counted_failure(fake):
    fake.slow_seconds = 1.0
    reqs = make_requests(24)
    always = {"(#5)": "invalid_json", "(#6)": "wrong_count", "(#7)": "429", "(#8)": "500", "(#9)": "400",
              "(#10)": "refusal", "(#22)": "html"}

    # transient faults, once each (on a request's first attempt): all recoverable with retries
    once = {"(#11)": "429", "(#12)": "500", "(#13)": "503", "(#14)": "slow", "(#15)": "disconnect",
            "(#16)": "invalid_json", "(#17)": "wrong_count", "(#18)": "429", "(#19)": "slow", "(#20)": "html",
            "(#21)": "garbled"}
    seen: set[str] = set()

    def fault_for(body):
        user = body["messages"][-1]["content"]
        tag = next((t for t in (*always, *once) if t in user), None)
        if tag in always:
            return always[tag]
        if tag in once and tag not in seen:
            seen.add(tag)
            return once[tag]
        return None

    fake.fault_for = fault_for
    j = judge(fake, concurrency=6, max_retries=3, parse_retries=1, timeout=0.4)
    t = time.perf_counter()
    res = j.score(reqs)
    assert time.perf_counter() - t < 20
    failed = {}
    for r, q in zip(res, reqs):
        if r.scores is None:
            assert r.error and r.error.startswith(dict(q.meta)["problem_id"] + ": ")
            failed[q.question.split()[-1]] = r.error.split(": ")[1]
        else:
            assert r.scores == expected(q) and r.error is None
    assert failed == {"(#5)": "invalid_json", "(#6)": "step_count", "(#7)": "http_429", "(#8)": "http_500",
                      "(#9)": "http_400", "(#10)": "refusal", "(#22)": "invalid_response"}
    s = j.summary()
    assert s["succeeded"] + s["failures"] == len(reqs) and s["failures"] == len(failed)
    assert s["failures_by_reason"] == {"invalid_json": 1, "step_count": 1, "http_429": 1, "http_500": 1,
                                       "http_400": 1, "refusal": 1, "invalid_response": 1}
    assert s["retries"] >= 3 * 2 + 5  # the always-429/500 requests used all retries, plus the transients
    assert {"http_429", "http_500", "timeout", "connection"} <= set(s["retries_by_reason"])
    assert s["parse_retries"] >= 5


def test_failure_message_names_request_reason_and_response():
    with pytest.raises(ParseError) as e:
        parse_judgement("Sure! " + "x" * 500, 2)
    assert e.value.reason == "invalid_json"
    with FakeOpenAI() as fake:
        fake.fault_for = lambda body: "invalid_json"
        r = judge(fake, parse_retries=1).score(make_requests(1, start=4))[0]
    assert r.scores is None and fake.counts["chat"] == 2  # asked twice
    pid, reason, snippet = r.error.split(": ", 2)
    assert (pid, reason) == ("p4", "invalid_json") and snippet.startswith("Step 1 looks fine") and len(snippet) <= 200


def test_retry_after_is_honoured(fake):
    fake.retry_after = 0.5
    fake.inject("429")
    j = judge(fake, backoff_base=0.0)
    t = time.perf_counter()
    assert j.score(make_requests(1))[0].scores is not None
    assert time.perf_counter() - t >= 0.5
    assert j.summary()["retries"] == 1 and fake.counts["chat"] == 2


def test_backoff_is_exponential_with_jitter():
    eng = LLMEngine(EngineConfig(base_url="http://127.0.0.1:9/v1", model="m", backoff_base=1.0, backoff_max=8.0,
                                 cache_path=None))
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)]:
        d = [eng._delay(attempt, None) for _ in range(200)]
        assert cap / 2 <= min(d) and max(d) <= cap and max(d) - min(d) > 0.1 * cap
    assert 3.0 <= eng._delay(5, 3.0) <= 3.3  # Retry-After wins over the exponential schedule


def test_rejected_key_stops_the_run(fake):
    fake.fault_for = lambda body: "401"
    with pytest.raises(ValueError, match=r"401.*OPENAI_API_KEY"):
        judge(fake, concurrency=2).score(make_requests(20))
    assert fake.counts["chat"] <= 3  # stopped at once, not 20 requests


# ----------------------------------------------------------------------------- the cache


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from test_judge import make_requests
from stepdpo.rewards.openai_judge import OpenAIJudge
start, n, conc = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
j = OpenAIJudge(engine=dict(base_url={url!r}, model="gpt-4o-mini", cache_path={cache!r}, concurrency=conc,
                            progress=False, backoff_base=0.01, backoff_max=0.05))
res = j.score(make_requests(n, start=start))
print(json.dumps({{"failed": sum(r.scores is None for r in res), "summary": j.summary()}}))
"""


def _child(fake, cache: Path, start: int, n: int, conc: int) -> subprocess.Popen:
    code = _CHILD.format(tests=str(ROOT / "tests"), url=fake.base_url, cache=str(cache))
    return subprocess.Popen([sys.executable, "-c", code, str(start), str(n), str(conc)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # child processes
def test_killed_run_resumes_with_only_the_missing_requests(tmp_path):
    cache = tmp_path / "judge.sqlite"
    n = 60
    with FakeOpenAI(latency=0.05) as fake:
        proc = _child(fake, cache, 0, n, 3)
        deadline = time.time() + 30
        while fake.counts["chat_ok"] < 20 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        done = len(JudgeCache(cache))
        assert 10 <= done < n  # committed one by one, so the kill kept what had finished
        before = fake.counts["chat"]
        j = judge(fake, tmp_path)
        res = j.score(make_requests(n))
        assert fake.counts["chat"] - before == n - done  # only what was missing
        assert j.summary()["cache_hits"] == done
        assert [r.scores for r in res] == [expected(q) for q in make_requests(n)]


@pytest.mark.slow  # child processes
def test_two_processes_share_one_cache(tmp_path):
    cache = tmp_path / "judge.sqlite"
    with FakeOpenAI(latency=0.01) as fake:
        procs = [_child(fake, cache, 0, 40, 8), _child(fake, cache, 20, 40, 8)]  # overlap: 20..39
        outs = [p.communicate(timeout=60) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-2000:]
            assert json.loads(out.strip().splitlines()[-1])["failed"] == 0
        c = JudgeCache(cache)
        assert c.integrity_check() == "ok"
        assert len(c) == 60
        before = fake.counts["chat"]
        res = judge(fake, tmp_path).score(make_requests(60))
        assert fake.counts["chat"] == before  # everything is there, readable by a third process
        assert [r.scores for r in res] == [expected(q) for q in make_requests(60)]


# ----------------------------------------------------------------------------- secrets


def test_api_key_never_leaks(fake, tmp_path, monkeypatch, caplog):
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    fake.inject("429", "invalid_json")
    fake.fault_for = lambda body: "500" if "(#3)" in body["messages"][-1]["content"] else None
    j = judge(fake, tmp_path, max_retries=1)
    res = j.score(make_requests(4))
    assert fake.auth[f"Bearer {secret}"] > 0  # the key was used...
    texts = [repr(j), str(j.__dict__), repr(j.engine.__dict__), json.dumps(j.summary()),
             json.dumps(j.estimate(make_requests(6))), caplog.text, *(r.error or "" for r in res)]
    for t in texts:  # ...and appears nowhere else
        assert secret not in t
    j.close()
    for f in tmp_path.iterdir():  # judge.sqlite (and -wal/-shm if present)
        assert secret.encode() not in f.read_bytes()


def test_key_from_dotenv_or_placeholder(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    judge(fake).score(make_requests(1))
    assert set(fake.auth) == {"Bearer EMPTY"}  # local servers (vLLM, Ollama) accept any key
    (tmp_path / ".env").write_text("# comment\nexport MY_JUDGE_KEY='from-dotenv'\nOTHER=1 # x\n")
    assert read_dotenv(tmp_path / ".env") == {"MY_JUDGE_KEY": "from-dotenv", "OTHER": "1"}
    j = judge(fake, api_key_env="MY_JUDGE_KEY")
    j.score(make_requests(1, start=1))
    assert fake.auth["Bearer from-dotenv"] == 1 and "from-dotenv" not in repr(j)


# ----------------------------------------------------------------------------- batch mode


def test_batch_mode_resumes_the_pending_batch_by_id(fake, tmp_path):
    reqs = make_requests(8)
    fake.hold_batches = True  # the batch stays in_progress, as if we crashed while waiting
    j1 = judge(fake, tmp_path, mode="batch", poll_interval=0.02, batch_max_wait=0.2)
    res = j1.score(reqs)
    assert all(r.scores is None and "batch_pending" in r.error for r in res)
    assert j1.summary()["failures_by_reason"] == {"batch_pending": 8}
    j1.close()
    pending = JudgeCache(tmp_path / "judge.sqlite").batches()
    assert [b["status"] for b in pending] == ["pending"] and fake.counts["batches_created"] == 1

    fake.hold_batches = False
    j2 = judge(fake, tmp_path, mode="batch", poll_interval=0.02)
    res = j2.score(reqs)
    assert [r.scores for r in res] == [expected(q) for q in reqs]
    s = j2.summary()
    assert fake.counts["batches_created"] == 1 and s["batches_resumed"] == 1 and s["batches_created"] == 0
    assert fake.counts["chat"] == 0  # no online calls
    assert s["prompt_tokens"] > 0 and 0 < s["cost_usd"]
    assert JudgeCache(tmp_path / "judge.sqlite").batches()[0]["status"] == "done"
    j3 = judge(fake, tmp_path, mode="batch", poll_interval=0.02)
    assert [r.scores for r in j3.score(reqs)] == [r.scores for r in res]
    assert fake.counts["batches_created"] == 1 and j3.summary()["cache_hits"] == 8


def test_batch_answers_that_fail_validation_get_another_round(fake, tmp_path):
    seen = set()

    def once(body):  # every request's first answer is broken
        key = body["messages"][-1]["content"]
        if key in seen:
            return None
        seen.add(key)
        return "wrong_count" if "(#1)" in key else "invalid_json" if "(#2)" in key else None

    fake.fault_for = once
    reqs = make_requests(4)
    j = judge(fake, tmp_path, mode="batch", poll_interval=0.01, parse_retries=1)
    res = j.score(reqs)
    assert [r.scores for r in res] == [expected(q) for q in reqs]
    assert fake.counts["batches_created"] == 2 and j.summary()["parse_retries"] == 2


def test_batch_error_lines_are_retried_then_counted(fake, tmp_path):
    seen = set()

    def faults(body):  # (#1): a 500 line once (transient); (#2): 500 every time; (#3): never a valid answer
        user = body["messages"][-1]["content"]
        if "(#1)" in user and "(#1)" not in seen:
            seen.add("(#1)")
            return "500"
        return "500" if "(#2)" in user else "invalid_json" if "(#3)" in user else None

    fake.fault_for = faults
    reqs = make_requests(5)
    j = judge(fake, tmp_path, mode="batch", poll_interval=0.01, parse_retries=2)
    res = j.score(reqs)
    ok = [r.scores is not None for r in res]
    assert ok == [True, True, False, False, True]
    assert res[2].error.startswith("p2: batch_http_500: ") and res[3].error.startswith("p3: invalid_json: ")
    s = j.summary()
    assert s["failures_by_reason"] == {"batch_http_500": 1, "invalid_json": 1} and s["succeeded"] == 3
    assert fake.counts["batches_created"] == 3  # first round, then two retry rounds for what was left


def test_batch_upload_that_keeps_failing_is_counted_not_raised(fake, tmp_path):
    fake.files_status = 503
    j = judge(fake, tmp_path, mode="batch", poll_interval=0.01, max_retries=2)
    res = j.score(make_requests(3))
    assert all(r.scores is None and r.error.split(": ")[1] == "batch_http_503" for r in res)
    assert j.summary()["failures_by_reason"] == {"batch_http_503": 3} and j.summary()["retries"] == 2
    assert fake.counts["POST /v1/files"] == 3 and fake.counts["batches_created"] == 0


# ----------------------------------------------------------------------------- estimate / dry run / misc


def test_estimate_counts_only_what_the_cache_lacks(fake, tmp_path):
    reqs = make_requests(10)
    j = judge(fake, tmp_path, dry_run=True)
    e = j.estimate(reqs + reqs[:3])
    assert e["requests"] == 13 and e["unique_requests"] == 10 and e["calls_needed"] == 10
    chars = sum(len(m["content"]) for m in judge_messages(reqs[0].question, reqs[0].steps, reqs[0].answer))
    assert e["est_prompt_tokens"] >= 10 * chars // 4 and e["est_completion_tokens"] > 0
    assert e["est_cost_usd"] > 0 and e["priced"]
    with pytest.raises(RuntimeError, match="dry_run"):
        j.score(reqs)
    assert fake.counts["chat"] == 0
    judge(fake, tmp_path).score(reqs[:4])
    e2 = judge(fake, tmp_path).estimate(reqs)
    assert e2["calls_needed"] == 6 and e2["cache_hits"] == 4 and e2["est_cost_usd"] < e["est_cost_usd"]
    assert judge(fake, model="my-local-model").estimate(reqs)["est_cost_usd"] is None  # unpriced: unknown, not 0


def test_score_from_inside_a_running_event_loop(fake):
    j = judge(fake)

    async def main():
        return j.score(make_requests(3))

    res = asyncio.run(main())
    assert [r.scores for r in res] == [expected(q) for q in make_requests(3)]


def test_parse_judgement_is_lenient_about_form_strict_about_content():
    good = {"steps": [{"step": 1, "verdict": "correct", "score": 1}, {"step": 2, "verdict": "incorrect", "score": 0.2}],
            "first_wrong_step": 2}
    text = "Here you go:\n```json\n" + json.dumps(good) + "\n```"
    assert parse_judgement(text, 2) == {"scores": [1.0, 0.2], "verdicts": ["correct", "incorrect"], "first_error": 1}
    assert parse_judgement("blah " + json.dumps(good) + " blah", 2)["first_error"] == 1
    nulls = {**good, "first_wrong_step": None}
    assert parse_judgement(json.dumps(nulls), 2)["first_error"] == 1  # from the verdicts
    for bad, reason in [({**good, "first_wrong_step": 3}, "bad_first_wrong_step"),
                        ({"steps": good["steps"][:1], "first_wrong_step": None}, "step_count"),
                        ({"steps": [{**good["steps"][0], "score": 1.5}, good["steps"][1]]}, "bad_score"),
                        ({"steps": [good["steps"][1], good["steps"][0]]}, "bad_step_number"),
                        ({"steps": [{**good["steps"][0], "verdict": "maybe"}, good["steps"][1]]}, "bad_verdict")]:
        with pytest.raises(ParseError) as e:
            parse_judgement(json.dumps(bad), 2)
        assert e.value.reason == reason


def test_prompt_lists_every_step_for_the_judge():
    msgs = judge_messages("Q?", ["1 + 1 = 2", "line one\nline two"], "2")
    assert steps_of(msgs) == ["1 + 1 = 2", "line one\nline two"]
    assert "Reference final answer" in msgs[1]["content"]
    assert "Reference" not in judge_messages("Q?", ["a"], "2", include_answer=False)[1]["content"]


def test_bad_options_name_the_key():
    for kw, key in [(dict(mode="stream"), "reward.engine.mode"), (dict(concurrency=0), "reward.engine.concurrency"),
                    (dict(base_url="localhost:8000"), "reward.engine.base_url"),
                    (dict(prices={"m": {"input": -1}}), "reward.engine.prices.m.input"),
                    (dict(concurency=4), "reward.engine.concurency: unknown engine setting")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            OpenAIJudge(engine=dict(model="m", cache_path=None, **kw))
