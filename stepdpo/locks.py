"""Exclusive file locks, so that parallel sweep jobs that would compute the same cached file take turns.

Used for the SFT warm-up cache, the pair cache and the reference log-prob cache. POSIX `flock`: the kernel drops the
lock when its process dies, so a killed job never leaves a stale one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the `with` block: parallel jobs
    that would compute the same cached file take turns, and the later ones find it written. The
    kernel drops the lock when its process dies, so a killed job never leaves a stale one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t = time.perf_counter()
            log.info("waiting for another job's %s (%s)", what or "work", path)
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("lock %s released after %.1fs", path, time.perf_counter() - t)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
