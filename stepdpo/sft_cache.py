"""The SFT warm-up cache (`sft_cache_dir`): jobs of a sweep that differ only after the warm-up share one.

    cached = path(cfg, bundle.train)        # sft_cache_dir/<hash>, or None (no cache, or no warm-up)
    with lock(cached):                      # a parallel job training the same warm-up: wait for it
        if is_ready(cached): load it
        else: train, then save(model, tok, cached)

The key hashes everything the warm-up's weights depend on (model, dataset config, SFT config, seed,
and the training problems' questions and gold steps) and nothing else (how it is logged or saved).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from . import checkpoint
from .locks import exclusive_lock
from .config import to_container

# sft.* keys that change how the warm-up is logged, saved or resumed, not its weights
# (pack: SFT batches have no rejected side to pack)
KEY_IGNORES = ("sft_data", "log_every", "eval_every", "save_every", "keep_checkpoints", "resume", "rounds",
               "ref_update", "precompute_ref", "ref_cache_dir", "pack")


def path(cfg: DictConfig, train: list) -> Path | None:
    """`sft_cache_dir/<hash>` of everything the warm-up depends on (model, data, SFT config, seed),
    so the jobs of a sweep that differ only after the warm-up share one SFT run. The key hashes the
    config and `train` (the problems the warm-up trains on: their questions and gold steps), so a
    warm-up is never reused for other data under the same config (a generator fix, an edited file)."""
    if not cfg.sft_cache_dir or cfg.sft.max_steps == 0:
        return None
    key = {k: to_container(cfg[k]) for k in ("model", "dataset", "sft")}
    data = json.dumps([[p.question, p.steps] for p in train if p.steps]).encode()
    key["data_sha256"] = hashlib.sha256(data).hexdigest()
    key["dataset"].pop("n_pool", None)  # answer-only problems, drawn after train: the warm-up never sees them
    for k in KEY_IGNORES:
        key["sft"].pop(k, None)
    key["seed"] = cfg.seed
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.sft_cache_dir).expanduser() / digest


def lock_path(cached: Path) -> Path:
    """The flock that parallel jobs needing the warm-up `cached` share: hidden, beside it in the cache."""
    return cached.parent / f".{cached.name}.lock"


@contextlib.contextmanager
def lock(cached: Path | None) -> Iterator[None]:
    """Hold the warm-up's lock while it is trained or read (no-op without a cache)."""
    if cached is None:
        yield
        return
    with exclusive_lock(lock_path(cached), "SFT warm-up"):
        yield


def is_ready(cached: Path | None) -> bool:
    return cached is not None and (cached / "config.json").exists()


def save(model, tok, cached: Path) -> None:
    """save_pretrained through `checkpoint.atomic_dir`: parallel jobs never see half a model."""
    with checkpoint.atomic_dir(cached) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
