"""A persistent on-disk cache of LLM answers (SQLite), shared safely by parallel sweep jobs.

One file holds two tables:

    results(key, value, model, usage, created)   one validated answer per request key
    batches(job_key, batch_id, status, n, created, updated)   Batch API jobs, for resuming

Why SQLite and how it stays safe with several processes writing at once:
- WAL journal mode: readers never block the writer, and a crashed writer leaves no torn pages.
- a busy timeout (seconds, default 60): a process that finds the database locked waits instead
  of failing with "database is locked".
- `INSERT OR IGNORE`: two jobs that judged the same request race harmlessly; the first answer
  stays (both are valid answers to the same prompt).
- autocommit, one transaction per result: a run killed half-way keeps everything it finished,
  and the re-run only asks for what is missing.

Keep the file on a local disk or a filesystem with working POSIX locks: WAL needs shared
memory between the processes, which NFS does not give (on a cluster, point STEPDPO_CACHE_DIR at
node-local or Lustre/GPFS storage, or give each node its own cache).

Only *validated* answers are stored; failures are not, so a re-run retries them. Keys are
opaque (see `stepdpo.rewards.llm_engine.cache_key`); values are JSON. Nothing secret is stored:
no API key, no request headers.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    usage TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    job_key TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    status TEXT NOT NULL,
    n INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
"""

_CHUNK = 500  # keys per SELECT ... IN (...), well under SQLite's variable limit


class JudgeCache:
    """Key -> JSON value store. `path=None` keeps it in memory (tests, `cache_path: null`)."""

    def __init__(self, path: str | os.PathLike | None, *, busy_timeout: float = 60.0,
                 key: str = "reward.engine.cache_path"):
        self.path = None if path is None else Path(os.path.expanduser(str(path)))
        self.key = key  # the config key that sets `path`, for error messages
        self.busy_timeout = float(busy_timeout)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def open(self) -> "JudgeCache":
        """Connect now (creating the file), so that a bad path fails where the cache is set up."""
        self._connect()
        return self

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path) if self.path else ':memory:'})"

    # ------------------------------------------------------------------ connection
    def _connect(self) -> sqlite3.Connection:
        # A connection must not cross a fork: reopen in a child process.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self.path is None:
            target = ":memory:"
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cache_path {self.path}: can't create its directory ({e}); "
                                 f"set {self.key} or STEPDPO_CACHE_DIR to a writable place") from None
            target = str(self.path)
        try:
            conn = sqlite3.connect(target, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            if self.path is not None:
                self._retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
                conn.execute("PRAGMA synchronous=NORMAL")  # durable at each commit in WAL mode, minus power loss
            self._retry_locked(lambda: conn.executescript(_SCHEMA))
        except sqlite3.DatabaseError as e:
            raise ValueError(f"cache_path {self.path}: not a usable SQLite database ({e}); "
                             f"point {self.key} somewhere else or delete the file") from None
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _retry_locked(self, fn, tries: int = 50):
        """Switching to WAL and creating tables need a write lock that busy_timeout doesn't always
        wait for (SQLITE_BUSY on schema changes); retry those for a while."""
        for i in range(tries):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or i == tries - 1:
                    raise
                time.sleep(0.05 * (i + 1))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ results
    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """{key: value} for the keys that are cached."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, Any] = {}
        with self._lock:
            conn = self._connect()
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                q = f"SELECT key, value FROM results WHERE key IN ({','.join('?' * len(chunk))})"
                for k, v in conn.execute(q, chunk):
                    out[k] = json.loads(v)
        return out

    def get(self, key: str) -> Any | None:
        return self.get_many([key]).get(key)

    def put(self, key: str, value: Any, *, model: str = "", usage: dict | None = None) -> None:
        """Store one validated answer and commit at once (autocommit)."""
        row = (key, json.dumps(value, ensure_ascii=False), model, json.dumps(usage or {}), time.time())
        with self._lock:
            self._retry_locked(lambda: self._connect().execute(
                "INSERT OR IGNORE INTO results (key, value, model, usage, created) VALUES (?, ?, ?, ?, ?)", row))

    def __len__(self) -> int:
        with self._lock:
            return self._connect().execute("SELECT COUNT(*) FROM results").fetchone()[0]

    # ------------------------------------------------------------------ Batch API jobs
    def pending_batch(self, job_key: str) -> str | None:
        """The batch id of an unfinished Batch API job for this exact set of requests, if any."""
        with self._lock:
            row = self._connect().execute("SELECT batch_id FROM batches WHERE job_key = ? AND status = 'pending'",
                                          (job_key,)).fetchone()
        return row[0] if row else None

    def add_batch(self, job_key: str, batch_id: str, n: int) -> None:
        now = time.time()
        with self._lock:
            self._retry_locked(lambda: self._connect().execute(
                "INSERT OR REPLACE INTO batches (job_key, batch_id, status, n, created, updated) "
                "VALUES (?, ?, 'pending', ?, ?, ?)", (job_key, batch_id, n, now, now)))

    def finish_batch(self, job_key: str, status: str = "done") -> None:
        with self._lock:
            self._retry_locked(lambda: self._connect().execute(
                "UPDATE batches SET status = ?, updated = ? WHERE job_key = ?", (status, time.time(), job_key)))

    def batches(self) -> list[dict]:
        with self._lock:
            cur = self._connect().execute("SELECT job_key, batch_id, status, n, created, updated FROM batches")
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def integrity_check(self) -> str:
        with self._lock:
            return self._connect().execute("PRAGMA integrity_check").fetchone()[0]
