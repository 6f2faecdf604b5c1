"""Evaluation plumbing: batched generation, stop strings, answer voting, GSM8K / MATH-500 accuracy.

The model is `tiny_llama` (random weights), so these tests check plumbing, not accuracy: output
order with mixed prompt lengths, left padding against unbatched generation, stop strings,
maj@k voting (with a stub generator) and the MATH per-level / per-subject breakdown.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED_DATA
from stepdpo import evaluate
from stepdpo.data import Problem
from stepdpo.evaluate import majority_vote, math_accuracy, stop_from_config
from stepdpo.generation import Completion, generate, truncate_at_stop
from stepdpo.model import tiny_llama

PROMPTS = [
    "Question: Start with 3, add 4. What is the result?\nAnswer:\n",
    "x",
    "Question: a much longer prompt, so that it needs a lot of left padding in the batch it lands in\nAnswer:\n",
    "Question: 7 * 6?\nAnswer:\n",
    "ab",
]


def completions(outs):
    """Stub generator output (lists of strings per prompt) as generate() returns it."""
    return [[Completion(t, (), "stop") for t in o] for o in outs]




def test_generate_order_and_left_padding_match_unbatched(tiny):
    model, tok = tiny
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=2)  # 3 batches, sorted by length
    single = [generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert [len(o) for o in batched] == [1] * len(PROMPTS)
    assert batched == single  # same text per prompt, in the order of PROMPTS
    assert len({o[0] for o in single}) > 1  # the prompts do lead to different outputs, so order is tested


def test_generate_samples_per_prompt(tiny):
    model, tok = tiny
    outs = generate(model, tok, PROMPTS[:3], max_new_tokens=6, batch_size=4, do_sample=True, num_return_sequences=3, seed=1)
    assert [len(o) for o in outs] == [3, 3, 3]
    assert all(isinstance(c.text, str) and len(c.token_ids) <= 6 for o in outs for c in o)
    again = generate(model, tok, PROMPTS[:3], max_new_tokens=6, batch_size=4, do_sample=True, num_return_sequences=3, seed=1)
    assert outs == again  # seeded


def test_stop_string_ends_generation_and_is_cut(tiny):
    model, tok = tiny
    max_new = 24
    (text,) = [c.text for c in generate(model, tok, [PROMPTS[0]], max_new_tokens=max_new, batch_size=1)[0]]
    assert len(text) >= 8, text
    stop = text[4:6]
    cut = text.find(stop)  # may occur even earlier
    (stopped,) = generate(model, tok, [PROMPTS[0]], max_new_tokens=max_new, batch_size=1, stop=[stop, "never-there"])
    assert [c.text for c in stopped] == [text[:cut]] and stopped[0].finish_reason == "stop"
    assert len(stopped[0].token_ids) < max_new  # generation itself ended early, not just the decoded text

    # in a batch, each row is cut at its own stop; rows without the stop string are unchanged
    free_all = generate(model, tok, PROMPTS, max_new_tokens=max_new, batch_size=8)
    stopped_all = generate(model, tok, PROMPTS, max_new_tokens=max_new, batch_size=8, stop=[stop])
    assert [[c.text for c in o] for o in stopped_all] == [[truncate_at_stop(o[0].text, [stop])] for o in free_all]


def test_truncate_and_stop_config():
    text = "Step 1\n#### 5\n\nQuestion: next one\nAnswer:"
    assert truncate_at_stop(text, ["\n\nQuestion:"]) == "Step 1\n#### 5"
    assert truncate_at_stop(text, ["zzz"]) == text
    assert truncate_at_stop(text, ["Answer", "#### "]) == "Step 1\n"  # earliest of several
    assert truncate_at_stop(text, []) == text
    # Hydra keeps `\n` from the command line as two characters; the config edge turns them into a newline
    assert stop_from_config(["\\n\\nQuestion:", "\n\nQ:", ""]) == ["\n\nQuestion:", "\n\nQ:"]
    assert stop_from_config("Question:") == ["Question:"]  # a plain string (an untyped group's key): one stop string


def test_majority_vote_pools_equivalent_answers():
    assert majority_vote(["5", "0.5", "\\frac{1}{2}", "\\dfrac{1}{2}", "5", None, None, None]) == "0.5"
    assert majority_vote(["1,000", "1000", "7"]) == "1,000"
    assert majority_vote(["3", "4", "4", "3"]) == "3"  # tie: the answer seen first
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def _problems() -> list[Problem]:
    return [Problem(id=f"p{i}", question=f"q{i}", answer=a, steps=[]) for i, a in enumerate(["5", "\\frac{1}{2}", "12"])]


def test_maj_at_k_with_stub_generator(monkeypatch):
    samples = {  # per question: k sampled outputs
        "q0": ["#### 5", "#### 5", "#### 4"],  # majority right
        "q1": ["\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{2}"],  # right via math-verify pooling
        "q2": ["The answer is 11", "no answer", "The answer is 11"],  # majority wrong
    }
    greedy = {"q0": "#### 4", "q1": "\\boxed{\\frac{1}{2}}", "q2": "#### 12"}
    calls = []

    def stub(model, tokenizer, prompts, *, do_sample=False, num_return_sequences=1, stop=None, **kw):
        calls.append((do_sample, num_return_sequences, stop))
        qs = [p.split("Question: ")[1].split("\n")[0] for p in prompts]
        return completions([samples[q] if do_sample else [greedy[q]] for q in qs])

    monkeypatch.setattr(evaluate, "generate", stub)
    metrics, records = math_accuracy(None, None, _problems(), maj_k=3, stop=["\n\nQuestion:"])
    assert calls == [(False, 1, ["\n\nQuestion:"]), (True, 3, ["\n\nQuestion:"])]
    assert metrics["acc"] == pytest.approx(2 / 3) and metrics["n"] == 3 and metrics["no_answer"] == 0
    assert metrics["maj@3"] == pytest.approx(2 / 3)
    assert [r["maj_pred"] for r in records] == ["5", "0.5", "11"]
    assert [r["maj_correct"] for r in records] == [True, True, False]
    assert [r["correct"] for r in records] == [False, True, True]


def _rows(path, n):
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_gsm8k_answers(monkeypatch):
    rows = _rows(SHARED_DATA / "gsm8k" / "test.jsonl", 4)
    probs = [Problem(id=str(i), question=r["question"], answer=r["answer"].split("####")[-1].strip(),
                     steps=r["answer"].split("\n")[:-1]) for i, r in enumerate(rows)]
    outs = {p.question: r["answer"] for p, r in zip(probs, rows)}  # gold solutions, ending in '#### x'
    outs[probs[1].question] = "I think it is 4.\n#### 4"
    outs[probs[2].question] = outs[probs[2].question].replace("#### ", "The answer is $") + ".00"  # '$70000.00'
    monkeypatch.setattr(evaluate, "generate", lambda m, t, prompts, **kw: completions([[outs[p.split(
        "Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]]] for p in prompts]))
    metrics, records = math_accuracy(None, None, probs)
    assert [r["correct"] for r in records] == [True, False, True, True]
    assert metrics["acc"] == 0.75
    assert not any(k.startswith("acc/") for k in metrics)  # no level/subject in GSM8K


def test_math500_breakdown_by_level_and_subject(monkeypatch):
    rows = _rows(SHARED_DATA / "math500" / "test.jsonl", 12)
    probs = [Problem(id=r["unique_id"], question=r["problem"], answer=r["answer"], steps=[],
                     meta={"level": r["level"], "subject": r["subject"]}) for r in rows]
    wrong = {probs[0].id, probs[3].id, probs[4].id}
    by_q = {p.question: ("\\boxed{WRONG}" if p.id in wrong else r["solution"]) for p, r in zip(probs, rows)}
    monkeypatch.setattr(evaluate, "generate", lambda m, t, prompts, **kw: completions([[by_q[p.split(
        "Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]]] for p in prompts]))
    metrics, records = math_accuracy(None, None, probs)
    assert metrics["acc"] == pytest.approx(9 / 12)
    for key in ("level", "subject"):
        groups: dict[str, list[bool]] = {}
        for p in probs:
            groups.setdefault(str(p.meta[key]), []).append(p.id not in wrong)
        got = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith(f"acc/{key}/")}
        assert got == {g: pytest.approx(sum(v) / len(v)) for g, v in groups.items()}
    assert [r["id"] for r in records] == [p.id for p in probs]


def test_math_accuracy_end_to_end_tiny(tiny):
    model, tok = tiny
    probs = [Problem(id=f"p{i}", question=q, answer="7", steps=[], meta={"level": i % 2 + 1})
             for i, q in enumerate(["Start with 3, add 4.", "x", "Start with 1, multiply by 7, then add nothing at all."])]
    metrics, records = math_accuracy(model, tok, probs, max_new_tokens=8, batch_size=2, maj_k=2, stop=["\n\n"])
    assert set(metrics) >= {"acc", "n", "no_answer", "maj@2", "acc/level/1", "acc/level/2"}
    assert metrics["n"] == 3 and 0 <= metrics["acc"] <= 1
    assert [r["id"] for r in records] == ["p0", "p1", "p2"]
    assert all("\n\n" not in r["output"] and "maj_pred" in r for r in records)


def test_no_held_out_problem_is_not_zero_accuracy(monkeypatch):
    import math

    import stepdpo.evaluate as ev

    monkeypatch.setattr(ev, "generate", lambda model, tok, prompts, **kw: [[] for _ in prompts])
    metrics, records = ev.math_accuracy(None, None, [], maj_k=2)
    assert records == [] and metrics["n"] == 0
    assert all(math.isnan(metrics[k]) for k in ("acc", "no_answer", "truncated", "maj@2"))
