"""The pair cache (`pairs_cache_dir`): the arms of an experiment build their pairs once and train on the very same.

    cached = path(cfg, builder, train, pool, policy, tok, seed)   # pairs_cache_dir/<hash>, or None (no cache)
    with lock(cached):                    # a parallel job building the same pairs: wait for it
        if is_ready(cached): pairs, report = load(cached)
        else: build them, then save(cached, pairs, report)

What is cached is the builder's output before scoring: arms that score the pairs differently (reward=rule,
reward=rollout) or train on them differently (trainer=dpo, stepdpo, sft_control) share it. The key hashes
everything the built pairs depend on: the pairs, dataset, model and generation configs, the reward config when
the builder grades with the scorer (pairs=on_policy), the problems (questions, answers, gold steps, meta), the seed, and
the policy that samples them (its weights, the LoRA init included, and its tokenizer). A later round's policy has
trained, so its key differs: only pairs from the same policy are ever shared. Without a cache, seeded sampling gives
the arms the same pairs on one machine; with vLLM (whose batched kernels need not be bitwise reproducible) or across
machines only the cache guarantees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from pathlib import Path
from typing import Iterator, Sequence

from omegaconf import DictConfig

from . import checkpoint
from .config import to_container
from .locks import exclusive_lock


def path(cfg: DictConfig, builder, problems: Sequence, pool: Sequence, policy, tokenizer, seed: int) -> Path | None:
    """`pairs_cache_dir/<hash>` of what `builder`'s pairs depend on, or None without `pairs_cache_dir`."""
    if not cfg.get("pairs_cache_dir"):
        return None
    from .refcache import tokenizer_fingerprint
    from .rewards.rollout import model_fingerprint

    params = inspect.signature(builder).parameters
    key = {k: to_container(cfg[k]) for k in ("pairs", "dataset", "model", "generation")}
    if "scorer" in params:  # the builder grades with the reward (pairs=on_policy): its pairs depend on it
        key["reward"] = to_container(cfg.reward)
    key["data_sha256"] = hashlib.sha256(json.dumps(
        [[[p.id, p.question, p.answer, p.steps, p.meta] for p in split] for split in (problems, pool)],
        default=str).encode()).hexdigest()
    if "model" in params and policy is not None:
        key["policy"] = model_fingerprint(policy)
    if "tokenizer" in params and tokenizer is not None:
        key["tokenizer"] = tokenizer_fingerprint(tokenizer)
    key["seed"] = seed
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.pairs_cache_dir).expanduser() / digest


@contextlib.contextmanager
def lock(cached: Path | None) -> Iterator[None]:
    """Hold the cache entry's lock while its pairs are built or read (no-op without a cache)."""
    if cached is None:
        yield
        return
    with exclusive_lock(cached.parent / f".{cached.name}.lock", "pair building"):
        yield


def is_ready(cached: Path | None) -> bool:
    return cached is not None and (cached / "report.json").exists()


def save(cached: Path, pairs: Sequence, report: dict) -> None:
    """pairs.jsonl + report.json through `checkpoint.atomic_dir`: a parallel job never reads half an entry."""
    from .data import write_jsonl

    with checkpoint.atomic_dir(cached) as tmp:
        write_jsonl(Path(tmp) / "pairs.jsonl", (p.to_dict() for p in pairs))
        (Path(tmp) / "report.json").write_text(json.dumps(report, sort_keys=True, default=str))


def load(cached: Path) -> tuple[list, dict]:
    from .data import StepPair, read_jsonl

    pairs = [StepPair.from_dict(row) for _, row in read_jsonl(cached / "pairs.jsonl")]
    return pairs, json.loads((cached / "report.json").read_text())
