"""`reward=rollout`: Monte-Carlo step values from the policy itself (Math-Shepherd; Setlur et al. 2024).

For a solution with steps s_1..s_n to a question with reference answer a, the value of the prefix
that ends with step i is estimated by sampling k continuations of it from the *current* policy:

    V_i  = (1/k) * #{continuations of s_1..s_i that reach a}                      (estimate=soft)
    V_i  = 1 if any of the k continuations reaches a, else 0                      (estimate=hard)
    V_0  = the same for the prompt alone (no step yet): the problem's value under the policy
    V_n  = 1 if the solution's own final answer matches a, else 0 (exact: nothing left to sample)

where a continuation counts only when prefix + continuation is a whole solution within `max_new_tokens`
(eval's limit, `data.continuation_fits`: a prefix's tokens leave that much less room), "reach a" is
`stepdpo.outcome.solved` (the final answer matches a; on countdown, whose question states the target, every
line must also be valid), and step i's score is V_i; its advantage is A_i = V_i - V_{i-1} (`advantages`).
A step that keeps the target reachable keeps V; a step that dooms the solution drops it (the critical step); a step
that fixes a mistake raises it. `ScoreResult.scores` are V_1..V_n (in [0, 1]; "wrong" = V_i < 0.5,
so first_error weighting reads them too) and `ScoreResult.prompt_value` is V_0, which the pairs
keep as `meta["value_before"]` (the value of the shared prefix) for `trainer.weighting=advantage`.

Cost and sharing:
- Generation is batched: every missing prefix of every request of one `score()` call goes through
  `chunk` prefixes x k samples per generate call (`stepdpo.generation.generate`, left-padded, seeded),
  prefixes of similar length together; a call generates at most what its shortest prefix leaves.
- Values are cached by content in SQLite (`JudgeCache`: WAL, safe for parallel sweep jobs). A key
  is the sha256 of (model fingerprint or `cache_key`, prompt text incl. the prefix, reference answer,
  k, temperature, top_p, max_new_tokens, seed, the length rule, stop strings). The model fingerprint hashes
  the trainable weights (the LoRA adapter) in full and a strided sample of every frozen tensor, so it changes whenever
  the policy does (each training round) and is shared by sweep arms that start from the same SFT
  warm-up and adapter init. The stored value is the hit count, so soft and hard share entries.
- `summary()` (like the judge's) reports prefixes valued, cache hits, samples drawn and seconds;
  the run's summary.json has the run's total under "judge" (the saved eval samples are valued too) and the pairs'
  own cost under "judge_pairs"; each chunk is logged.

A Monte-Carlo value is an estimate: with k samples it moves in steps of 1/k, and which continuation
was drawn depends on the batch it was drawn in (one seeded RNG stream per generate call). A cached
value is reused whatever batch produced it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..data import continuation_fits, prefix_tokens, response_text
from .base import ScoreRequest, ScoreResult

log = logging.getLogger(__name__)
ESTIMATES = ("soft", "hard")


def reaches(steps: Sequence[str], answer: str, meta: dict | None = None) -> bool:
    """Is the solution `steps` right (`stepdpo.outcome.solved`)? The outcome a rollout is scored by."""
    from ..outcome import solved

    return bool(steps) and solved(response_text(steps), answer, meta)


def advantages(values: Sequence[float], prompt_value: float) -> list[float]:
    """A_i = V_i - V_{i-1} with V_0 = prompt_value: each step's change in the chance of success."""
    prev = [prompt_value] + list(values[:-1])
    return [float(v) - float(p) for v, p in zip(values, prev)]


def model_fingerprint(model) -> str:
    """sha256 over parameter names, shapes, every trainable value and a strided sample (<= 4096 values) of
    every frozen tensor: changes when training changes the policy, cheap on a 7B base."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            t = p.detach().reshape(-1)
            if not p.requires_grad:
                t = t[:: max(1, t.numel() // 4096)]
            h.update(t.float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


@dataclass
class RolloutStats:
    requests: int = 0
    prefixes: int = 0  # prefix values needed (distinct per call)
    cache_hits: int = 0
    generated_prefixes: int = 0
    samples: int = 0  # continuations drawn
    generate_calls: int = 0
    seconds: float = 0.0  # wall time spent generating


class RolloutScorer:
    name = "rollout"
    needs_answers = True  # every value is a rate of reaching the reference answer (run.setup checks pairs files)

    def __init__(self, k: int = 4, estimate: str = "soft", temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 96, chunk: int = 64, batch_size: int = 64, seed: int = 0,
                 cache_path: str | None = None, cache_key: str | None = None, stop: Sequence[str] = ()):
        for key, v in (("k", k), ("chunk", chunk), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                       ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"reward.{key}={v!r}: must be an integer")
        if k < 1:
            raise ValueError(f"reward.k={k}: must be >= 1 (continuations per step prefix)")
        if estimate not in ESTIMATES:
            raise ValueError(f"reward.estimate={estimate!r}: choose one of {ESTIMATES}")
        if temperature <= 0:
            raise ValueError(f"reward.temperature={temperature}: must be > 0 (continuations are sampled)")
        if chunk < 1 or batch_size < 1 or max_new_tokens < 1:
            raise ValueError("reward.chunk, reward.batch_size and reward.max_new_tokens must be >= 1")
        from .judge_cache import JudgeCache

        self.k, self.estimate, self.temperature, self.top_p = k, estimate, temperature, top_p
        self.max_new_tokens, self.chunk, self.batch_size, self.seed = max_new_tokens, chunk, batch_size, seed
        self.cache = JudgeCache(cache_path, key="reward.cache_path").open()  # a bad path fails when the config is built
        self.cache_key = cache_key
        from ..generation import stop_from_config

        self.stop = stop_from_config(stop)  # eval.stop: a continuation ends there, as a sampled solution does
        self.model = self.tokenizer = None
        self.generate_fn: Callable | None = None
        self.stats = RolloutStats()
        self._calls = 0

    def bind(self, model, tokenizer, generate_fn: Callable | None = None) -> None:
        """Sample from `model` (the policy being trained: it is read at every `score()` call, so later
        rounds use the trained weights). `generate_fn(model, tokenizer, prompts, **kw) -> list[list[Completion]]`
        defaults to `stepdpo.generation.generate`."""
        self.model, self.tokenizer, self.generate_fn = model, tokenizer, generate_fn

    def _value(self, hits: int) -> float:
        return hits / self.k if self.estimate == "soft" else float(hits > 0)

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        from ..data import prompt_text

        if self.model is None and self.generate_fn is None:
            raise ValueError("reward=rollout: no policy to sample from; the pipeline binds it after the adapter is "
                             "added (scorer.bind(model, tokenizer)), so it can't score before that")
        self.stats.requests += len(requests)
        fp = self.cache_key or model_fingerprint(self.model)
        key_of: dict[tuple[int, int], str] = {}  # (request, prefix length) -> cache key
        todo: dict[str, tuple[str, ScoreRequest, int, int]] = {}  # key -> (prompt, request, steps, their tokens)
        for r_i, r in enumerate(requests):
            if not r.answer or not r.steps:
                continue
            for i in range(len(r.steps)):  # prefixes s_1..s_i for i < n; V_n is exact
                prompt = prompt_text(r.question, list(r.steps[:i]), self.tokenizer)
                key = hashlib.sha256(json.dumps(
                    [fp, prompt, r.answer, self.k, self.temperature, self.top_p, self.max_new_tokens, self.seed,
                     "whole-solution budget", *(["stop", *self.stop] if self.stop else [])]
                ).encode()).hexdigest()
                key_of[(r_i, i)] = key
                if key not in todo:
                    todo[key] = (prompt, r, i, prefix_tokens(self.tokenizer, r.steps[:i]))
        hits = self.cache.get_many(todo)
        self.stats.prefixes += len(todo)
        self.stats.cache_hits += len(hits)
        missing = sorted((k for k in todo if k not in hits), key=lambda k: todo[k][3])  # similar lengths together
        for s in range(0, len(missing), self.chunk):
            keys = missing[s:s + self.chunk]
            hits.update(self._sample(keys, todo))
            log.info("rollout: %d/%d prefixes sampled (%d cached); run total %d continuations in %.1fs", s + len(keys),
                     len(missing), len(todo) - len(missing), self.stats.samples, self.stats.seconds)
        out = []
        for r_i, r in enumerate(requests):
            if not r.answer:
                out.append(ScoreResult(None, error="reward=rollout needs the reference answer; this problem has none"))
                continue
            if not r.steps:
                out.append(ScoreResult([], "rollout"))
                continue
            n = len(r.steps)
            vals = [self._value(hits[key_of[(r_i, i)]]) for i in range(n)]  # V_0..V_{n-1}
            scores = vals[1:] + [1.0 if reaches(r.steps, r.answer, r.meta_dict()) else 0.0]  # V_1..V_n
            out.append(ScoreResult(scores, f"rollout:{self.estimate}@{self.k}",
                                   prompt_value=vals[0]))
        return out

    def _sample(self, keys: list[str], todo: dict) -> dict[str, int]:
        """Draw k continuations of each prefix in one generate call; store and return the hit counts."""
        from ..generation import generate
        from ..steps import split_steps

        fn = self.generate_fn or generate
        t = time.perf_counter()
        self._calls += 1
        from .. import progress

        room = max(1, self.max_new_tokens - min(todo[k][3] for k in keys))  # longer never fits (continuation_fits)
        # its own generation bar: the continuations advance it, never a bar of the stage that asked for the values
        # (on-policy sampling's bar counts that stage's samples, per problem)
        with progress.bar("rollout", len(keys) * self.k, unit="sample", gen=True):
            outs = fn(self.model, self.tokenizer, [todo[k][0] for k in keys], max_new_tokens=room,
                      batch_size=self.batch_size, do_sample=True, temperature=self.temperature, top_p=self.top_p,
                      num_return_sequences=self.k, seed=self.seed * 1_000_003 + self._calls, stop=self.stop or None)
        self.stats.seconds += time.perf_counter() - t
        self.stats.generate_calls += 1
        res = {}
        for key, conts in zip(keys, outs):
            _, r, i, used = todo[key]
            if len(conts) != self.k:
                raise RuntimeError(f"rollout: asked for {self.k} continuations, got {len(conts)}")
            # a continuation past the whole solution's limit is a miss: its text is never read for an answer
            h = sum(continuation_fits(c, used, self.max_new_tokens)
                    and reaches(list(r.steps[:i]) + split_steps(c.text), r.answer, r.meta_dict()) for c in conts)
            self.cache.put(key, h, model="rollout")
            res[key] = h
        self.stats.generated_prefixes += len(keys)
        self.stats.samples += len(keys) * self.k
        return res

    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {"requests": s.requests, "prefixes": s.prefixes, "cache_hits": s.cache_hits,
                "generated_prefixes": s.generated_prefixes, "samples": s.samples, "generate_calls": s.generate_calls,
                "seconds": round(s.seconds, 3), "k": self.k, "estimate": self.estimate,
                "cache_path": str(self.cache.path) if self.cache.path else None}

    def close(self) -> None:
        self.cache.close()
