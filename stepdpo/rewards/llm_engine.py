"""The one async request engine behind every LLM call in stepdpo (the judge and LLM-written pairs).

    engine = LLMEngine(EngineConfig(base_url=..., model="gpt-4o-mini", concurrency=16, cache_path="judge.sqlite"))
    outcomes = engine.run([LLMJob(key, label, messages, parse, response_format), ...])

What it does for each job, so that callers only write a prompt and a parser:
1. cache: a job whose key is in the SQLite cache (`judge_cache.JudgeCache`) costs nothing;
   identical keys in one call are sent once.
2. online mode: `concurrency` asyncio workers share one `openai.AsyncOpenAI` client. The
   client's own retries are off (`max_retries=0`): the policy is ours and counted. 429, 408,
   409, 5xx, timeouts and connection errors are retried up to `max_retries` times with
   exponential backoff and jitter, sleeping exactly `Retry-After` (or `retry-after-ms`) seconds
   when the server sends it. Other 4xx fail that job; 401/403/404 stop the run (wrong key, URL
   or model: every other request would fail the same way).
3. parse: `job.parse(text)` returns a JSON-able value or raises `ParseError(reason)`; the
   request is then sent again, up to `parse_retries` times, before the job fails with
   "<label>: <reason>: <first 200 chars of the response>".
4. each validated value is committed to the cache as soon as it arrives.
5. batch mode (`mode="batch"`): the missing jobs go to the OpenAI Batch API as one JSONL file;
   the batch id is stored in the cache database before polling, so a re-run after a crash polls
   the same batch instead of paying for a new one.
6. usage: prompt/completion tokens and the cost from a price table (USD per 1M tokens).

The API key is read from the environment (or a `.env` file in the working directory) and kept
only inside the client: it is not an attribute, not in `repr`, not in `summary()`, not cached.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .judge_cache import JudgeCache

log = logging.getLogger(__name__)

SNIPPET = 200  # characters of a bad response quoted in an error
RETRY_STATUS = {408, 409, 429}  # plus every 5xx
FATAL_STATUS = {401: "the API key was rejected", 403: "the API key may not use this model/endpoint",
                404: "the endpoint or model does not exist"}
MAX_RETRY_AFTER = 600.0  # never sleep longer than this for one Retry-After
TERMINAL_BATCH = {"completed", "failed", "expired", "cancelled"}

# USD per 1M tokens (input, output). Overridable per run via the `prices` option.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4o": {"input": 2.50, "output": 10.00},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
    "gpt-4.1": {"input": 2.00, "output": 8.00},
}


class ParseError(ValueError):
    """A response that isn't a valid answer. `reason` is a short tag (invalid_json, step_count...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class FatalAPIError(ValueError):
    """A configuration error every request would hit (bad key, URL or model): stop the run."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status (401, 403, 404)


@dataclass
class LLMJob:
    key: str  # cache key (see `cache_key`)
    label: str  # names the job in errors: problem id or a short hash
    messages: list[dict[str, str]]
    parse: Callable[[str], Any]  # response text -> JSON-able value, or raise ParseError
    response_format: dict | None = None  # e.g. {"type": "json_schema", "json_schema": {...}}


@dataclass
class LLMOutcome:
    value: Any = None  # parsed value; None on failure
    error: str | None = None  # "<label>: <reason>: <response snippet>"
    reason: str | None = None  # short failure tag, counted in summary()["failures_by_reason"]
    usage: dict[str, int] = field(default_factory=dict)  # tokens paid for this job in this run
    cached: bool = False
    retry_later: bool = False  # didn't validate, or a transient error in a batch line: batch mode tries again


@dataclass
class _Stats:
    requests: int = 0  # jobs that needed the API (cache misses, deduplicated)
    api_calls: int = 0  # HTTP calls to chat completions (incl. retries), or batch lines submitted
    cache_hits: int = 0
    succeeded: int = 0
    retries: int = 0  # backoff retries (429/5xx/timeouts/connection)
    parse_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_tokens_prompt: int = 0  # the part of the tokens above billed at the batch discount
    batch_tokens_completion: int = 0
    batches_created: int = 0
    batches_resumed: int = 0
    failures: Counter = field(default_factory=Counter)
    retry_reasons: Counter = field(default_factory=Counter)


def cache_key(*parts: Any) -> str:
    """sha256 over a canonical JSON encoding of `parts` (model, prompt version, template, inputs)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=list)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_dotenv(path: str | os.PathLike = ".env") -> dict[str, str]:
    """KEY=VALUE lines of a .env file (`export`, quotes and # comments allowed); {} if absent."""
    p = Path(path)
    if not p.is_file():
        return {}
    out = {}
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        k, _, v = line.partition("=")
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        elif " #" in v:
            v = v.split(" #", 1)[0].rstrip()
        out[k.strip()] = v
    return out


def resolve_api_key(api_key_env: str) -> tuple[str, str]:
    """(key, where it came from). Env var first, then ./.env, else "EMPTY" for local servers."""
    v = os.environ.get(api_key_env)
    if v:
        return v, "env"
    v = read_dotenv(Path.cwd() / ".env").get(api_key_env)
    if v:
        return v, ".env"
    return "EMPTY", "placeholder"


def extract_json(text: str) -> Any:
    """The JSON object in a response: the whole text, a ```json fence, or the first {...} that decodes."""
    s = text.strip()
    try:
        return json.loads(s)
    except (json.JSONDecodeError, ValueError):
        pass
    if "```" in s:
        for block in s.split("```")[1::2]:
            block = block.strip()
            if block[:4].lower() == "json":
                block = block[4:]
            try:
                return json.loads(block)
            except (json.JSONDecodeError, ValueError):
                continue
    dec = json.JSONDecoder()
    i = s.find("{")
    while i >= 0:
        try:
            obj, _ = dec.raw_decode(s, i)
            if isinstance(obj, dict):
                return obj
        except (json.JSONDecodeError, ValueError):
            pass
        i = s.find("{", i + 1)
    raise ParseError("invalid_json", "no JSON object in the response")


def price_for(model: str, prices: dict[str, dict[str, float]]) -> dict[str, float] | None:
    """Exact model name, else the longest table entry the name starts with (dated snapshots)."""
    if model in prices:
        return prices[model]
    best = max((m for m in prices if model.startswith(m)), key=len, default=None)
    return prices[best] if best else None


def check_prices(prices: Any, where: str = "reward.engine.prices") -> dict[str, dict[str, float]]:
    if not isinstance(prices, dict):
        raise TypeError(f"{where}: expected a mapping model -> {{input: usd_per_1M, output: usd_per_1M}}, "
                        f"got {type(prices).__name__}")
    out = {}
    for m, p in prices.items():
        if not isinstance(p, dict) or set(p) - {"input", "output"} or not p:
            raise ValueError(f"{where}.{m}: expected {{input: <usd per 1M>, output: <usd per 1M>}}, got {p!r}")
        for side, v in p.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{where}.{m}.{side}: must be a price >= 0 (USD per 1M tokens), got {v!r}")
        out[str(m)] = {"input": float(p.get("input", 0.0)), "output": float(p.get("output", 0.0))}
    return out


def run_sync(make_coro: Callable[[], Any]) -> Any:
    """Run a coroutine to completion from synchronous code, whether or not a loop is running here
    (inside a running loop, e.g. Jupyter, it runs on a fresh loop in a worker thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    box: dict[str, Any] = {}

    def target():
        try:
            box["v"] = asyncio.run(make_coro())
        except BaseException as e:  # re-raised in the caller's thread
            box["e"] = e

    t = threading.Thread(target=target, name="stepdpo-llm")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


def _snippet(text: Any) -> str:
    return str(text)[:SNIPPET]


def _retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None if absent."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        t = email.utils.parsedate_tz(ra)
        return max(0.0, email.utils.mktime_tz(t) - time.time()) if t else None


class _Failure(Exception):
    def __init__(self, reason: str, snippet: str):
        super().__init__(reason)
        self.reason, self.snippet = reason, snippet


def default_cache() -> str:
    """The judge cache outside a config (conf/engine/openai.yaml names the same file): stepdpo/cache.py's root."""
    from ..cache import cache_dir

    return cache_dir("judge.sqlite")


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one LLM endpoint: the `engine:` sub-config of reward=openai and pairs=llm
    (conf/engine/openai.yaml documents every key; `reward.engine.base_url=...` overrides one)."""

    model: str = "gpt-4o-mini"  # model name as the endpoint knows it
    base_url: str | None = None  # None = api.openai.com; any OpenAI-compatible /v1 URL
    api_key_env: str = "OPENAI_API_KEY"  # env var holding the key (also read from ./.env)
    temperature: float | None = 0.0  # None = the server's default
    max_tokens: int | None = None  # cap on the answer length; None = server default
    concurrency: int = 16  # requests in flight at once
    timeout: float = 60.0  # seconds per request
    max_retries: int = 6  # retries on 429, 408/409, 5xx, timeouts, connection errors
    parse_retries: int = 2  # re-asks when `job.parse` rejects the answer
    backoff_base: float = 1.0  # seconds; the n-th retry waits ~backoff_base * 2^n
    backoff_max: float = 60.0  # seconds; cap on one wait
    cache_path: str | os.PathLike | None = dataclasses.field(default_factory=default_cache)  # None = in memory only
    mode: str = "online"  # online | batch (OpenAI Batch API)
    poll_interval: float = 30.0  # batch mode: seconds between status checks
    batch_max_wait: float | None = None  # batch mode: give up waiting after this many seconds; None = until done
    batch_discount: float = 0.5  # batch mode: price multiplier for the cost estimate
    prices: dict | None = None  # USD per 1M tokens {model: {input, output}}, merged over DEFAULT_PRICES
    progress: bool = True  # tqdm bar on a terminal

    @classmethod
    def of(cls, cfg: "EngineConfig | dict | None", where: str, base: "EngineConfig | None" = None) -> "EngineConfig":
        """An EngineConfig from itself, a dict of settings over `base` (the YAML sub-config), or None (`base`)."""
        base = base or cls()
        if cfg is None or isinstance(cfg, EngineConfig):
            return cfg or base
        if not isinstance(cfg, dict):
            raise TypeError(f"{where}: must be a mapping of engine settings, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown engine setting; allowed: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        return dataclasses.replace(base, **cfg)

    def check(self, where: str) -> None:
        """ValueError naming `where`.<key> for a bad setting."""
        w = where
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"{w}.model: must be a model name, got {self.model!r}")
        if self.base_url is not None and not str(self.base_url).startswith(("http://", "https://")):
            raise ValueError(f"{w}.base_url: must start with http:// or https://, got {self.base_url!r}")
        if self.mode not in ("online", "batch"):
            raise ValueError(f"{w}.mode: {self.mode!r} is not one of ('online', 'batch')")
        for name, lo in (("concurrency", 1), ("max_retries", 0), ("parse_retries", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{w}.{name}: must be an integer >= {lo}, got {v!r}")
        for name in ("timeout", "poll_interval", "backoff_max"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"{w}.{name}: must be a number of seconds > 0, got {v!r}")
        if not isinstance(self.backoff_base, (int, float)) or self.backoff_base < 0:
            raise ValueError(f"{w}.backoff_base: must be >= 0 seconds, got {self.backoff_base!r}")
        d = self.batch_discount
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"{w}.batch_discount: must be in [0, 1] (0.5 = half price), got {d!r}")
        m = self.batch_max_wait
        if m is not None and (not isinstance(m, (int, float)) or m <= 0):
            raise ValueError(f"{w}.batch_max_wait: must be seconds > 0 or null (wait until done), got {m!r}")
        t = self.max_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"{w}.max_tokens: must be a positive integer or null, got {t!r}")
        t = self.temperature
        if t is not None and (not isinstance(t, (int, float)) or t < 0):
            raise ValueError(f"{w}.temperature: must be a number >= 0 or null (server default), got {t!r}")
        if not isinstance(self.api_key_env, str) or not self.api_key_env:
            raise ValueError(f"{w}.api_key_env: must name an environment variable, got {self.api_key_env!r}")


class LLMEngine:
    """Cached, concurrent, retrying chat-completions calls to any OpenAI-compatible endpoint."""

    def __init__(self, config: EngineConfig | dict | None = None, *, desc: str = "llm", where: str = "reward.engine"):
        import openai  # late import: only the LLM-backed options need the client

        self._openai = openai
        c = EngineConfig.of(config, where)
        c.check(where)
        self.config = c
        self.base_url = c.base_url
        self.model = c.model
        self.api_key_env = c.api_key_env
        self.concurrency = c.concurrency
        self.timeout = float(c.timeout)
        self.max_retries = c.max_retries
        self.parse_retries = c.parse_retries
        self.backoff_base = float(c.backoff_base)
        self.backoff_max = float(c.backoff_max)
        self.temperature = c.temperature
        self.max_tokens = c.max_tokens
        self.mode = c.mode
        self.poll_interval = float(c.poll_interval)
        self.batch_max_wait = c.batch_max_wait
        self.batch_discount = float(c.batch_discount)
        self.prices = {**DEFAULT_PRICES, **check_prices(c.prices or {}, f"{where}.prices")}
        self.progress = c.progress
        self.desc = desc
        self.cache = JudgeCache(c.cache_path)
        self.stats = _Stats()
        self._key_source = resolve_api_key(c.api_key_env)[1]  # where, never the key itself
        self._rng = random.Random()
        if c.base_url is None and self._key_source == "placeholder":
            log.warning("%s: no API key in $%s or ./.env; api.openai.com will refuse requests (set %s.base_url "
                        "for a local server)", desc, c.api_key_env, where)

    def __repr__(self) -> str:
        return (f"LLMEngine(model={self.model!r}, base_url={self.base_url!r}, mode={self.mode!r}, "
                f"concurrency={self.concurrency}, cache={self.cache!r}, api_key=<from {self._key_source}>)")

    def close(self) -> None:
        self.cache.close()

    # ------------------------------------------------------------------ public API
    def run(self, jobs: Sequence[LLMJob]) -> list[LLMOutcome]:
        """One outcome per job, in order. Cached jobs cost nothing; identical keys are sent once."""
        if not jobs:
            return []
        cached = self.cache.get_many(j.key for j in jobs)
        unique: dict[str, LLMJob] = {}
        for j in jobs:
            if j.key not in cached and j.key not in unique:
                unique[j.key] = j
        n_hits = sum(1 for j in jobs if j.key in cached)
        self.stats.cache_hits += n_hits
        self.stats.requests += len(unique)
        fresh: dict[str, LLMOutcome] = {}
        if unique:
            log.info("%s: %d requests, %d cached, %d to send (%s mode)", self.desc, len(jobs), n_hits,
                     len(unique), self.mode)
            todo = list(unique.values())
            runner = self._run_batch if self.mode == "batch" else self._run_online
            fresh = run_sync(lambda: runner(todo))
            for o in fresh.values():
                if o.value is not None:
                    self.stats.succeeded += 1
                else:
                    self.stats.failures[o.reason or "unknown"] += 1
        out = []
        for j in jobs:
            if j.key in cached:
                out.append(LLMOutcome(value=cached[j.key], cached=True))
            else:
                out.append(fresh[j.key])
        return out

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The distinct keys not in the cache (what a run would have to pay for)."""
        have = self.cache.get_many(keys)
        return [k for k in dict.fromkeys(keys) if k not in have]

    def cost(self, prompt_tokens: float, completion_tokens: float, *, batch: bool = False) -> float | None:
        p = price_for(self.model, self.prices)
        if p is None:
            return None
        usd = (prompt_tokens * p["input"] + completion_tokens * p["output"]) / 1e6
        return usd * (self.batch_discount if batch else 1.0)

    def summary(self) -> dict[str, Any]:
        s = self.stats
        online_p = s.prompt_tokens - s.batch_tokens_prompt
        online_c = s.completion_tokens - s.batch_tokens_completion
        c1 = self.cost(online_p, online_c)
        c2 = self.cost(s.batch_tokens_prompt, s.batch_tokens_completion, batch=True)
        return {
            "model": self.model,
            "mode": self.mode,
            "requests": s.requests,
            "api_calls": s.api_calls,
            "cache_hits": s.cache_hits,
            "succeeded": s.succeeded,
            "failures": sum(s.failures.values()),
            "failures_by_reason": dict(s.failures),
            "retries": s.retries,
            "retries_by_reason": dict(s.retry_reasons),
            "parse_retries": s.parse_retries,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "cost_usd": None if c1 is None else round(c1 + (c2 or 0.0), 6),
            "batches_created": s.batches_created,
            "batches_resumed": s.batches_resumed,
            "cache_path": str(self.cache.path) if self.cache.path else None,
        }

    # ------------------------------------------------------------------ plumbing
    def _client(self):
        # Built inside the running loop (connections belong to a loop); closed by the caller.
        key = resolve_api_key(self.api_key_env)[0]
        return self._openai.AsyncOpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=0)

    def _body(self, job: LLMJob) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": job.messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if job.response_format is not None:
            body["response_format"] = job.response_format
        return body

    def _bar(self, total: int):
        from .. import progress  # a bar on a terminal, a log line every ~10% otherwise

        return progress.bar(self.desc, total, unit="req", enabled=self.progress)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server said when: wait that long (plus a little jitter)
            return min(retry_after, MAX_RETRY_AFTER) * (1.0 + 0.1 * self._rng.random())
        d = min(self.backoff_max, self.backoff_base * (2.0 ** attempt))
        return d / 2.0 + self._rng.uniform(0.0, d / 2.0)  # "equal jitter": spread, but never ~0

    async def _retrying(self, call: Callable[[], Any], count_calls: bool = True) -> Any:
        """Run one API call with our backoff policy. Raises _Failure or FatalAPIError."""
        oa = self._openai
        for attempt in range(self.max_retries + 1):
            if count_calls:
                self.stats.api_calls += 1
            retry_after = None
            try:
                return await call()
            except oa.APIStatusError as e:
                status = e.status_code
                if status in FATAL_STATUS:
                    raise FatalAPIError(
                        f"{self.base_url or 'api.openai.com'} answered HTTP {status} for model {self.model!r}: "
                        f"{FATAL_STATUS[status]} (key from {self._key_source}, variable {self.api_key_env}); "
                        f"server said: {_snippet(e.message)}", status) from None
                reason = f"http_{status}"
                if status not in RETRY_STATUS and status < 500:
                    raise _Failure(reason, _snippet(e.message)) from None
                retry_after = _retry_after(e.response.headers)
                msg = e.message
            except oa.APITimeoutError as e:
                reason, msg = "timeout", f"no answer within {self.timeout}s ({e})"
            except oa.APIConnectionError as e:
                reason, msg = "connection", f"{e} ({e.__cause__!r})"
            if attempt == self.max_retries:
                raise _Failure(reason, _snippet(msg))
            self.stats.retries += 1
            self.stats.retry_reasons[reason] += 1
            await asyncio.sleep(self._delay(attempt, retry_after))
        raise AssertionError("unreachable")

    def _add_usage(self, usage: Any, batch: bool = False) -> dict[str, int]:
        if usage is None:
            return {}
        get = usage.get if isinstance(usage, dict) else (lambda k, d=0: getattr(usage, k, d))
        u = {"prompt_tokens": int(get("prompt_tokens", 0) or 0),
             "completion_tokens": int(get("completion_tokens", 0) or 0)}
        self.stats.prompt_tokens += u["prompt_tokens"]
        self.stats.completion_tokens += u["completion_tokens"]
        if batch:
            self.stats.batch_tokens_prompt += u["prompt_tokens"]
            self.stats.batch_tokens_completion += u["completion_tokens"]
        return u

    def _parse(self, job: LLMJob, text: str) -> Any:
        try:
            return job.parse(text)
        except ParseError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:  # a parser bug on odd input
            raise ParseError("invalid_answer", f"{type(e).__name__}: {e}") from None

    def _success(self, job: LLMJob, value: Any, usage: dict) -> LLMOutcome:
        self.cache.put(job.key, value, model=self.model, usage=usage)  # committed now: survives a kill
        return LLMOutcome(value=value, usage=usage)

    @staticmethod
    def _failure(job: LLMJob, reason: str, snippet: str, usage: dict | None = None, retry: bool = False) -> LLMOutcome:
        return LLMOutcome(error=f"{job.label}: {reason}: {_snippet(snippet)}", reason=reason, usage=usage or {},
                          retry_later=retry)

    @staticmethod
    def _message_text(choice_message: Any) -> tuple[str, str | None]:
        """(content, refusal) of a chat message object or dict."""
        get = choice_message.get if isinstance(choice_message, dict) else (
            lambda k, d=None: getattr(choice_message, k, d))
        return get("content") or "", get("refusal")

    # ------------------------------------------------------------------ online mode
    async def _one(self, client, job: LLMJob) -> LLMOutcome:
        usage: dict[str, int] = {}
        body = self._body(job)
        last = ("no_answer", "")
        for attempt in range(self.parse_retries + 1):
            try:
                # client.post (the SDK's documented raw-request method) with the same body that
                # chat.completions.create would send: same transport, errors and timeouts, but it
                # skips the SDK's per-call TypedDict transform and pydantic models (~40% of the
                # client's CPU per request at high concurrency).
                resp = await self._retrying(lambda: client.post("/chat/completions", body=body, cast_to=dict))
            except _Failure as f:
                return self._failure(job, f.reason, f.snippet, usage)
            except FatalAPIError:
                raise
            except ValueError as e:  # a 200 whose body claims JSON but isn't (a proxy, a crashed server)
                resp = f"{type(e).__name__}: {e}"
            if not isinstance(resp, dict):  # a non-JSON 200 body comes back as text
                last = ("invalid_response", str(resp))
                if attempt < self.parse_retries:
                    self.stats.parse_retries += 1
                continue
            for k, v in self._add_usage(resp.get("usage")).items():
                usage[k] = usage.get(k, 0) + v
            choices = resp.get("choices") or []
            if not choices:
                last = ("no_choices", json.dumps(resp)[:SNIPPET])
            else:
                text, refusal = self._message_text(choices[0].get("message") or {})
                if refusal:
                    last = ("refusal", refusal)
                else:
                    try:
                        return self._success(job, self._parse(job, text), usage)
                    except ParseError as e:
                        last = (e.reason, text)
            if attempt < self.parse_retries:
                self.stats.parse_retries += 1
        return self._failure(job, *last, usage, retry=True)

    async def _run_online(self, jobs: list[LLMJob]) -> dict[str, LLMOutcome]:
        out: dict[str, LLMOutcome] = {}
        it = iter(jobs)
        fatal: list[BaseException] = []
        bar = self._bar(len(jobs))
        async with self._client() as client:

            async def worker():
                for job in it:  # workers share one iterator: at most `concurrency` requests in flight
                    if fatal:
                        return
                    try:
                        out[job.key] = await self._one(client, job)
                    except FatalAPIError as e:
                        fatal.append(e)
                        return
                    bar.update(1)

            try:
                await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(jobs)))))
            finally:
                bar.close()
        if fatal:
            raise fatal[0]
        return out

    # ------------------------------------------------------------------ batch mode
    async def _run_batch(self, jobs: list[LLMJob]) -> dict[str, LLMOutcome]:
        out: dict[str, LLMOutcome] = {}
        by_key = {j.key: j for j in jobs}
        async with self._client() as client:
            for rnd in range(self.parse_retries + 1):
                todo = jobs
                if rnd > 0:  # answers that didn't validate get another round (a new, smaller batch)
                    todo = [j for j in jobs if out[j.key].retry_later]
                    self.stats.parse_retries += len(todo)
                if not todo:
                    break
                try:
                    got = await self._one_batch(client, todo, by_key)
                except _Failure as f:  # files/batches endpoints kept failing: these jobs fail, counted
                    out.update({j.key: self._failure(j, f"batch_{f.reason}", f.snippet) for j in todo})
                    break
                out.update(got)
                if any(o.reason == "batch_pending" for o in got.values()):
                    break  # gave up waiting: a re-run resumes this batch
        return out

    async def _one_batch(self, client, jobs: list[LLMJob], by_key: dict[str, LLMJob]) -> dict[str, LLMOutcome]:
        job_key = cache_key("batch", self.model, sorted(j.key for j in jobs))
        batch_id = self.cache.pending_batch(job_key)
        if batch_id is not None:
            self.stats.batches_resumed += 1
            log.info("%s: resuming batch %s (%d requests)", self.desc, batch_id, len(jobs))
        else:
            lines = [json.dumps({"custom_id": j.key, "method": "POST", "url": "/v1/chat/completions",
                                 "body": self._body(j)}, ensure_ascii=False) for j in jobs]
            data = ("\n".join(lines) + "\n").encode("utf-8")
            f = await self._retrying(lambda: client.files.create(
                file=("stepdpo-batch.jsonl", data, "application/jsonl"), purpose="batch"), count_calls=False)
            b = await self._retrying(lambda: client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                metadata={"source": "stepdpo", "desc": self.desc}), count_calls=False)
            batch_id = b.id
            self.cache.add_batch(job_key, batch_id, len(jobs))  # before polling: a crash now resumes this id
            self.stats.batches_created += 1
            self.stats.api_calls += len(jobs)
            log.info("%s: created batch %s (%d requests)", self.desc, batch_id, len(jobs))
        deadline = None if self.batch_max_wait is None else time.monotonic() + float(self.batch_max_wait)
        bar = self._bar(len(jobs))
        try:
            while True:
                b = await self._retrying(lambda: client.batches.retrieve(batch_id), count_calls=False)
                rc = getattr(b, "request_counts", None)
                if rc is not None:
                    bar.update(int((rc.completed or 0) + (rc.failed or 0)) - bar.n)  # the batch's count so far
                if b.status in TERMINAL_BATCH:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    msg = (f"batch {batch_id} still {b.status} after {self.batch_max_wait}s; "
                           "re-run with the same cache to resume it")
                    log.warning("%s: %s", self.desc, msg)
                    return {j.key: self._failure(j, "batch_pending", msg) for j in jobs}
                await asyncio.sleep(self.poll_interval)
        finally:
            bar.close()
        out: dict[str, LLMOutcome] = {}
        for fid in (b.output_file_id, b.error_file_id):  # answers, then per-request errors
            if not fid:
                continue
            content = await self._retrying(lambda: client.files.content(fid), count_calls=False)
            for line in content.content.decode("utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    row = None  # a damaged line: its job ends as batch_missing below
                if not isinstance(row, dict):
                    continue
                job = by_key.get(row.get("custom_id"))
                if job is None or job.key in out:
                    continue
                out[job.key] = self._batch_line(job, row)
        self.cache.finish_batch(job_key, "done" if b.status == "completed" else b.status)
        for j in jobs:
            if j.key not in out:
                detail = "; ".join(f"{e.code}: {e.message}" for e in (getattr(b.errors, "data", None) or []))
                out[j.key] = self._failure(j, f"batch_{b.status}" if b.status != "completed" else "batch_missing",
                                           detail or f"batch {batch_id} returned no line for this request")
        return out

    def _batch_line(self, job: LLMJob, row: dict) -> LLMOutcome:
        resp = row.get("response") or {}
        body = resp.get("body") or {}
        if row.get("error") or resp.get("status_code") != 200:
            status = resp.get("status_code")
            err = row.get("error") or body.get("error") or body
            transient = status in RETRY_STATUS or (isinstance(status, int) and status >= 500)
            return self._failure(job, f"batch_http_{status or 'error'}", json.dumps(err), retry=transient)
        usage = self._add_usage(body.get("usage"), batch=True)
        choices = body.get("choices") or []
        if not choices:
            return self._failure(job, "no_choices", json.dumps(body), usage, retry=True)
        text, refusal = self._message_text(choices[0].get("message") or {})
        if refusal:
            return self._failure(job, "refusal", refusal, usage, retry=True)
        try:
            return self._success(job, self._parse(job, text), usage)
        except ParseError as e:
            return self._failure(job, e.reason, text, usage, retry=True)
