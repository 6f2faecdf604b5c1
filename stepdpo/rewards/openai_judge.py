"""`reward=openai`: an LLM judge grades every step of a solution, through any OpenAI-compatible API
(OpenAI, vLLM, Ollama, llama.cpp server...).

    judge = OpenAIJudge(engine={"base_url": "http://localhost:8000/v1", "model": "Qwen/Qwen2.5-7B-Instruct"})
    results = judge.score(requests)        # one ScoreResult per request, in order
    judge.summary()                        # requests, cache hits, failures by reason, tokens, cost

The judge sees the question, the reference answer (when known) and the numbered steps, and
answers with JSON: a verdict and a score in [0, 1] per step, and the number of the first wrong
step (see `SYSTEM_PROMPT`, `USER_TEMPLATE`, `JSON_SCHEMA`). Each step is judged on its own
logic given the steps before it. The answer is validated (valid JSON, one entry per step,
scores in [0, 1], step numbers in order); a bad answer is asked again (`parse_retries`), then the
request fails with "<problem id or hash>: <reason>: <first 200 chars of the answer>" and the
pipeline drops and counts that pair.

Network, retries, concurrency, caching, batch mode and cost accounting live in
`llm_engine.LLMEngine` (shared with `stepdpo.pairs_llm`). Answers are cached in SQLite under
sha256(model, PROMPT_VERSION, prompt templates, question, steps, reference answer): change the
prompt and bump PROMPT_VERSION, and old answers are no longer used.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .base import ScoreRequest, ScoreResult
from ..weights import is_wrong
from .llm_engine import DEFAULT_PRICES, EngineConfig, LLMEngine, LLMJob, ParseError, cache_key, extract_json

PROMPT_VERSION = "judge-v1"

SYSTEM_PROMPT = """\
You are a meticulous grader of step-by-step math solutions.
Check every step of the solution on its own logic, given the question and the steps before it:
is each calculation exactly right, is each claim true, does it follow from what came before?
A step that correctly continues from an earlier mistake is judged on its own reasoning, but a
step that repeats or relies on a false claim as if it were true is incorrect.
Be strict about arithmetic: recompute every number.
For each step give a verdict ("correct" or "incorrect") and a score: your probability, between
0 and 1, that the step is correct. Then give first_wrong_step: the number of the first incorrect
step, or null if every step is correct."""

SYSTEM_PROMPT_PLAIN = SYSTEM_PROMPT + """
Reply with one JSON object and nothing else, in exactly this form:
{"steps": [{"step": 1, "verdict": "correct", "score": 0.97}, ...], "first_wrong_step": null}"""

USER_TEMPLATE = """\
Question:
{question}
{reference}
Solution ({n} steps):
{steps}

Grade all {n} steps."""

REFERENCE_TEMPLATE = "\nReference final answer (for your information): {answer}\n"
STEP_TEMPLATE = "Step {i}: {text}"

JSON_SCHEMA = {
    "name": "step_judgement",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "step": {"type": "integer"},
                        "verdict": {"type": "string", "enum": ["correct", "incorrect"]},
                        "score": {"type": "number"},
                    },
                    "required": ["step", "verdict", "score"],
                    "additionalProperties": False,
                },
            },
            "first_wrong_step": {"type": ["integer", "null"]},
        },
        "required": ["steps", "first_wrong_step"],
        "additionalProperties": False,
    },
}

_TEMPLATE_ID = cache_key(SYSTEM_PROMPT, SYSTEM_PROMPT_PLAIN, USER_TEMPLATE, REFERENCE_TEMPLATE, STEP_TEMPLATE,
                         JSON_SCHEMA)
_TOL = 1e-6  # scores this far outside [0, 1] are clipped, further is invalid


def render_steps(steps: Sequence[str]) -> str:
    # A step with line breaks stays one numbered item (continuation lines indented).
    return "\n".join(STEP_TEMPLATE.format(i=i, text=str(s).strip().replace("\n", "\n    "))
                     for i, s in enumerate(steps, 1))


def judge_messages(question: str, steps: Sequence[str], answer: str = "", *, structured: bool = True,
                   include_answer: bool = True) -> list[dict[str, str]]:
    """The chat messages sent to the judge for one solution."""
    ref = REFERENCE_TEMPLATE.format(answer=answer.strip()) if include_answer and answer.strip() else ""
    user = USER_TEMPLATE.format(question=question.strip(), reference=ref, n=len(steps), steps=render_steps(steps))
    return [{"role": "system", "content": SYSTEM_PROMPT if structured else SYSTEM_PROMPT_PLAIN},
            {"role": "user", "content": user}]


def parse_judgement(text: str, n_steps: int) -> dict[str, Any]:
    """Validate a judge answer for `n_steps` steps -> {"scores", "verdicts", "first_error"}.

    Raises ParseError(reason) with reason one of invalid_json, step_count, bad_step_number,
    bad_verdict, bad_score, bad_first_wrong_step. `first_error` is 0-based (None: all correct).
    """
    obj = extract_json(text)
    if not isinstance(obj, dict):
        raise ParseError("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
    items = obj.get("steps")
    if not isinstance(items, list):
        raise ParseError("invalid_json", "field 'steps' must be a list")
    if len(items) != n_steps:
        raise ParseError("step_count", f"{len(items)} verdicts for {n_steps} steps")
    scores, verdicts = [], []
    for i, it in enumerate(items, 1):
        if not isinstance(it, dict):
            raise ParseError("invalid_json", f"steps[{i - 1}] must be an object")
        num = it.get("step", i)
        if isinstance(num, bool) or not isinstance(num, (int, float)) or int(num) != i:
            raise ParseError("bad_step_number", f"entry {i} is numbered {num!r}")
        verdict = str(it.get("verdict", "")).strip().lower()
        if verdict not in ("correct", "incorrect", ""):
            raise ParseError("bad_verdict", f"step {i}: verdict {it.get('verdict')!r}")
        s = it.get("score")
        if s is None:
            if not verdict:
                raise ParseError("bad_score", f"step {i}: neither score nor verdict")
            s = 1.0 if verdict == "correct" else 0.0
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) \
                or not -_TOL <= s <= 1 + _TOL:
            raise ParseError("bad_score", f"step {i}: score {s!r} is not a number in [0, 1]")
        s = min(1.0, max(0.0, float(s)))
        scores.append(s)
        verdicts.append(verdict or ("incorrect" if is_wrong(s) else "correct"))
    fw = obj.get("first_wrong_step")
    if fw is None:
        first = next((i for i, v in enumerate(verdicts) if v == "incorrect"), None)
    else:
        if isinstance(fw, bool) or not isinstance(fw, (int, float)) or int(fw) != fw or not 1 <= fw <= n_steps:
            raise ParseError("bad_first_wrong_step", f"first_wrong_step {fw!r} is not null or 1..{n_steps}")
        first = int(fw) - 1
    return {"scores": scores, "verdicts": verdicts, "first_error": first}


def request_label(req: ScoreRequest, key: str) -> str:
    meta = req.meta_dict()
    for k in ("problem_id", "id", "unique_id"):
        if meta.get(k) not in (None, ""):
            return str(meta[k])
    return f"req-{key[:12]}"


class OpenAIJudge:
    """A `StepScorer` backed by an LLM behind an OpenAI-compatible API. Every option is documented
    in conf/reward/openai.yaml."""

    name = "openai"

    def __init__(self, *, engine: EngineConfig | dict | None = None, structured: bool = True,
                 include_answer: bool = True, dry_run: bool = False):
        self.engine = LLMEngine(engine, desc="judge", where="reward.engine")
        model = self.model = self.engine.model
        self.structured = bool(structured)
        self.include_answer = bool(include_answer)
        self.dry_run = bool(dry_run)
        self.provenance = f"openai:{model}"

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.engine!r}, prompt={PROMPT_VERSION}, structured={self.structured})"

    def close(self) -> None:
        self.engine.close()

    # ------------------------------------------------------------------ requests -> jobs
    def key(self, req: ScoreRequest) -> str:
        answer = req.answer if self.include_answer else ""
        return cache_key("judge", self.model, PROMPT_VERSION, _TEMPLATE_ID, self.structured, req.question,
                         list(req.steps), answer)

    def _job(self, req: ScoreRequest) -> LLMJob:
        key = self.key(req)
        n = len(req.steps)
        return LLMJob(key=key, label=request_label(req, key),
                      messages=judge_messages(req.question, req.steps, req.answer, structured=self.structured,
                                              include_answer=self.include_answer),
                      parse=lambda text: parse_judgement(text, n),
                      response_format={"type": "json_schema", "json_schema": JSON_SCHEMA} if self.structured
                      else None)

    @staticmethod
    def _check(requests: Sequence[ScoreRequest]) -> None:
        for i, r in enumerate(requests):
            if not isinstance(r, ScoreRequest):
                raise TypeError(f"judge: requests[{i}] must be a ScoreRequest, got {type(r).__name__}")

    # ------------------------------------------------------------------ StepScorer
    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        self._check(requests)
        if self.dry_run:
            raise RuntimeError("reward.dry_run=true: the judge only estimates (call estimate()); "
                               "set reward.dry_run=false to score")
        live = [r for r in requests if r.steps]  # a solution with no steps has nothing to judge
        outcomes = iter(self.engine.run([self._job(r) for r in live]))
        out = []
        for r in requests:
            if not r.steps:
                out.append(ScoreResult([], self.provenance))
                continue
            o = next(outcomes)
            if o.value is None:
                out.append(ScoreResult(None, self.provenance, error=o.error, usage=o.usage))
            else:
                out.append(ScoreResult(list(o.value["scores"]), self.provenance,
                                       usage=o.usage))
        return out

    def summary(self) -> dict[str, Any]:
        """Requests sent, cache hits, failures by reason, retries, tokens, cost (no secrets)."""
        return {**self.engine.summary(), "prompt_version": PROMPT_VERSION, "structured": self.structured}

    def estimate(self, requests: Sequence[ScoreRequest]) -> dict[str, Any]:
        """What scoring `requests` would cost, without calling the API (for reward.dry_run=true).

        Tokens use a chars/4 heuristic: the prompt as rendered, and a typical answer (one
        verdict object per step). Cached answers cost nothing.
        """
        self._check(requests)
        live = [r for r in requests if r.steps]
        by_key = {}
        for r in live:
            by_key.setdefault(self.key(r), r)
        missing = self.engine.missing(list(by_key))
        p_chars = c_chars = 0
        for k in missing:
            r = by_key[k]
            msgs = judge_messages(r.question, r.steps, r.answer, structured=self.structured,
                                  include_answer=self.include_answer)
            p_chars += sum(len(m["content"]) + 16 for m in msgs)  # + role/format overhead
            c_chars += 40 + 52 * len(r.steps)  # {"step": 12, "verdict": "incorrect", "score": 0.05}
        p_tok, c_tok = math.ceil(p_chars / 4), math.ceil(c_chars / 4)
        cost = self.engine.cost(p_tok, c_tok, batch=self.engine.mode == "batch")
        return {
            "model": self.model,
            "mode": self.engine.mode,
            "prompt_version": PROMPT_VERSION,
            "requests": len(requests),
            "unique_requests": len(by_key),
            "cache_hits": len(by_key) - len(missing),
            "calls_needed": len(missing),
            "est_prompt_tokens": p_tok,
            "est_completion_tokens": c_tok,
            "est_cost_usd": None if cost is None else round(cost, 4),
            "priced": cost is not None,
            "note": "tokens estimated as characters/4; cost from reward.engine.prices (USD per 1M tokens)"
                    + ("; batch discount applied" if self.engine.mode == "batch" else ""),
        }


__all__ = ["OpenAIJudge", "PROMPT_VERSION", "SYSTEM_PROMPT", "USER_TEMPLATE", "JSON_SCHEMA", "DEFAULT_PRICES",
           "judge_messages", "parse_judgement"]
