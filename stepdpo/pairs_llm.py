"""`pairs=llm`: an LLM writes a flawed version of each gold solution; gold vs flawed is a step pair.

For every problem with a gold solution (`Problem.steps`), the LLM is shown the numbered steps and
asked to make step t (drawn per problem from `seed`) the first wrong one: copy the steps before
it exactly, put a plausible mistake in it, and continue naturally from the mistake. It answers
with JSON `{"wrong_step": k, "steps": [...]}` (k 1-based). The answer is validated: the steps
before k must equal the gold steps (whitespace aside), step k must differ from gold step k, and
gold must have a step k. A bad answer is asked again (`parse_retries`), then the problem is
skipped and counted. The pair is

    prefix   = gold[:k-1]                      (shared, weight 0)
    chosen   = gold[k-1:]    scores 1.0 each
    rejected = flawed[k-1:]  scores 0.0 each   source="llm"

The network side (concurrency, backoff with Retry-After, the SQLite cache that makes re-runs
free, the Batch API, cost) is the judge's engine, `stepdpo.rewards.llm_engine.LLMEngine`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any, Sequence

from .data import Problem, StepPair
from .rewards.llm_engine import EngineConfig, LLMEngine, LLMJob, ParseError, cache_key, extract_json
from .rewards.openai_judge import render_steps

log = logging.getLogger(__name__)

FLAW_PROMPT_VERSION = "flaw-v1"

FLAW_SYSTEM_PROMPT = """\
You write realistic flawed solutions to math problems, to train a step-by-step verifier.
You are given a correct solution as numbered steps and the number of the step that must become
the first wrong step. Write a flawed solution:
- copy every step before that one exactly, character for character;
- in that step, make one plausible mistake a student could make (a wrong calculation, a misread
  number, a wrong operation, a wrong formula), stated confidently;
- continue the remaining steps naturally from the mistake, as a student who did not notice it
  would, so the final answer is wrong too;
- keep the style of the original, one step per entry, no commentary about the mistake."""

FLAW_SYSTEM_PROMPT_PLAIN = FLAW_SYSTEM_PROMPT + """
Reply with one JSON object and nothing else, in exactly this form:
{"wrong_step": <number of the first wrong step>, "steps": ["<step 1>", "<step 2>", ...]}"""

FLAW_USER_TEMPLATE = """\
Question:
{question}

Correct solution ({n} steps):
{steps}

Make step {target} the first wrong step."""

FLAW_SCHEMA = {
    "name": "flawed_solution",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {
            "wrong_step": {"type": "integer"},
            "steps": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["wrong_step", "steps"],
        "additionalProperties": False,
    },
}

FLAW_ENGINE = EngineConfig(temperature=0.7)  # the defaults: some variety in the mistakes
_TEMPLATE_ID = cache_key(FLAW_SYSTEM_PROMPT, FLAW_SYSTEM_PROMPT_PLAIN, FLAW_USER_TEMPLATE, FLAW_SCHEMA)


def flaw_messages(question: str, steps: Sequence[str], target: int, *, structured: bool = True) -> list[dict]:
    user = FLAW_USER_TEMPLATE.format(question=question.strip(), n=len(steps), steps=render_steps(steps),
                                     target=target)
    return [{"role": "system", "content": FLAW_SYSTEM_PROMPT if structured else FLAW_SYSTEM_PROMPT_PLAIN},
            {"role": "user", "content": user}]


def _norm(s: str) -> str:
    return " ".join(str(s).split())


def parse_flawed(text: str, gold: Sequence[str]) -> dict[str, Any]:
    """Validate an LLM-written flawed solution against `gold` -> {"wrong_step": k0 (0-based), "steps"}.

    Raises ParseError with reason invalid_json, bad_steps, bad_wrong_step or bad_prefix.
    """
    obj = extract_json(text)
    if not isinstance(obj, dict):
        raise ParseError("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
    steps = obj.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise ParseError("bad_steps", "field 'steps' must be a non-empty list of non-empty strings")
    k = obj.get("wrong_step")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or int(k) != k:
        raise ParseError("bad_wrong_step", f"wrong_step {k!r} is not an integer")
    k0 = int(k) - 1
    if not 0 <= k0 < min(len(steps), len(gold)):
        raise ParseError("bad_wrong_step", f"wrong_step {k} is outside 1..{min(len(steps), len(gold))}")
    for i in range(k0):
        if _norm(steps[i]) != _norm(gold[i]):
            raise ParseError("bad_prefix", f"step {i + 1} before the wrong step differs from the original")
    if _norm(steps[k0]) == _norm(gold[k0]):
        raise ParseError("bad_wrong_step", f"step {k} is identical to the original step {k}")
    return {"wrong_step": k0, "steps": [s.strip() for s in steps]}


def build_llm_pairs(problems: Sequence[Problem], *, engine: EngineConfig | dict | None = None, seed: int = 0,
                    n_problems: int | None = None, avoid_last: bool = True,
                    structured: bool = True) -> tuple[list[StepPair], dict]:
    """One (gold, LLM-flawed) step pair per problem; see the module docstring.

    `problems` without gold steps are skipped. The target step t is drawn per problem from
    `seed` (uniform over the steps, or all but the last with `avoid_last` when there are two or
    more). `engine`: the LLM endpoint (`EngineConfig`; pairs.engine.* in conf/pairs/llm.yaml).
    Returns (pairs, report): counts of problems, skips, failures by reason, pairs, and the engine
    summary (requests, cache hits, tokens, cost).
    """
    if n_problems is not None and (isinstance(n_problems, bool) or not isinstance(n_problems, int)
                                   or n_problems < 1):
        raise ValueError(f"pairs.n_problems: must be a positive integer or null (all), got {n_problems!r}")
    engine = LLMEngine(EngineConfig.of(engine, "pairs.engine", base=FLAW_ENGINE), desc="flawed pairs",
                       where="pairs.engine")
    llm_model, temperature = engine.model, engine.temperature
    try:
        rng = random.Random(seed)
        pool = list(problems)
        rng.shuffle(pool)
        report: Counter = Counter(problems=len(pool))
        chosen_probs: list[tuple[Problem, int]] = []
        for p in pool:
            if n_problems is not None and len(chosen_probs) >= n_problems:
                break
            gold = [s for s in p.steps if str(s).strip()]
            if not gold:
                report["skipped_no_steps"] += 1
                continue
            hi = len(gold) - 1 if avoid_last and len(gold) >= 2 else len(gold)
            chosen_probs.append((p, rng.randint(1, hi)))
        jobs = []
        for p, target in chosen_probs:
            gold = [str(s).strip() for s in p.steps if str(s).strip()]
            key = cache_key("flaw", llm_model, FLAW_PROMPT_VERSION, _TEMPLATE_ID, structured, temperature, p.question,
                            gold, target)
            jobs.append(LLMJob(key=key, label=p.id, messages=flaw_messages(p.question, gold, target,
                                                                           structured=structured),
                               parse=lambda text, g=gold: parse_flawed(text, g),
                               response_format={"type": "json_schema", "json_schema": FLAW_SCHEMA} if structured
                               else None))
        pairs: list[StepPair] = []
        for (p, target), o in zip(chosen_probs, engine.run(jobs)):
            if o.value is None:
                report["failed"] += 1
                report[f"failed/{o.reason}"] += 1
                log.warning("pairs=llm: %s", o.error)
                continue
            gold = [str(s).strip() for s in p.steps if str(s).strip()]
            k0, flawed = o.value["wrong_step"], o.value["steps"]
            pairs.append(StepPair(
                id=f"{p.id}-llm", question=p.question, answer=p.answer, prefix=gold[:k0], chosen=gold[k0:],
                rejected=flawed[k0:], chosen_scores=[1.0] * len(gold[k0:]), rejected_scores=[0.0] * len(flawed[k0:]),
                source="llm", meta={"problem_id": p.id, "wrong_step": k0, "target_step": target - 1,
                                    "generated_by": f"openai:{llm_model}", "prompt_version": FLAW_PROMPT_VERSION}))
        report["pairs"] = len(pairs)
        summary = engine.summary()
        log.info("pairs=llm: %s; requests %d, cache hits %d, cost %s USD", dict(report), summary["requests"],
                 summary["cache_hits"], summary["cost_usd"])
        return pairs, {**dict(report), "llm": summary}
    finally:
        engine.close()
