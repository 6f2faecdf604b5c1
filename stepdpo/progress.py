"""Live progress for the long stages: a tqdm bar on a terminal, a log line every N units otherwise.

One owner for how a run shows that it is working. Call sites stay one or two lines:

    with progress.bar("sft", total=cfg.max_steps, unit="step", every=cfg.log_every) as bar:
        for step in ...:
            bar.update(loss=loss, tokens=n_tokens)          # step, loss, tokens/s, ETA

    with progress.bar("sampling", total=n * k, unit="sample", on_outputs=count_right):
        generate(...)                                       # generate() calls progress.advance(n, outputs)

`advance` feeds the innermost open bar that was opened for generation (`on_outputs` or
`gen=True`); generation outside such a bar (e.g. `python -m stepdpo.generate`) costs nothing.

Where the output goes:
- stderr is a terminal: a tqdm bar (elapsed, ETA, rate, and the stage's own fields); log
  records printed while it runs go through `tqdm.write`, so they don't break the bar;
- otherwise (CI, `> log.txt`, a sweep job): one INFO line on the `stepdpo.progress` logger every
  `every` units and one when the stage ends, e.g.
  `sft: step 400/800 (50%) loss 0.4120 tokens/s 5210 | 1m02s elapsed, ETA 1m02s`.
`STEPDPO_PROGRESS=bar|log|off` forces one mode (default `auto`: bar if stderr is a terminal).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

log = logging.getLogger("stepdpo.progress")

MODES = ("auto", "bar", "log", "off")
LOG_LINES = 10  # log mode without an explicit `every`: about this many lines per stage

_stack: list["Bar"] = []  # open bars, innermost last


def mode() -> str:
    m = os.environ.get("STEPDPO_PROGRESS", "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"STEPDPO_PROGRESS={m!r}: choose one of {', '.join(MODES)}")
    if m == "auto":
        return "bar" if _isatty(sys.stderr) else "log"
    return m


def quiet_library_bars() -> None:
    """Outside a terminal (log mode, or off), turn off transformers' own tqdm bars (loading and writing weights):
    each would leave a stray carriage-return line in the log. On a terminal they stay, useful for a large model."""
    if mode() != "bar":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def fmt_time(seconds: float) -> str:
    """`1h02m03s`, `4m05s`, `7s`."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


class Bar:
    """One stage's progress. `update(n, **fields)` moves it; fields are shown as `name value`.

    `tokens=` is special: it is summed and shown as tokens/s over the stage so far. `on_outputs`
    (generation bars): called with {prompt index: [texts]} for each finished generate batch; it
    returns fields to show (e.g. accuracy so far).
    """

    def __init__(self, desc: str, total: int | None, *, unit: str = "step", every: int | None = None,
                 initial: int = 0, enabled: bool = True, gen: bool = False,
                 on_outputs: Callable[[dict[int, Sequence[str]]], dict] | None = None, stream=None):
        self.desc, self.total, self.unit, self.n = desc, total, unit, initial
        self.gen = gen or on_outputs is not None
        self.on_outputs = on_outputs
        self.fields: dict = {}
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.paused = 0.0  # seconds spent inside nested bars (sampling, eval in a training stage)
        self.parent = _stack[-1] if _stack else None
        self.start_n = initial
        self.mode = mode() if enabled else "off"
        self.every = max(1, every or math.ceil((total or LOG_LINES) / LOG_LINES))
        self.next_log = (initial // self.every + 1) * self.every
        self._tqdm = self._redirect = None
        if self.mode == "bar":
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._tqdm = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                              file=stream or sys.stderr, leave=True, smoothing=0.1)
            if not _stack:  # log records print above the bar, not through it
                self._redirect = logging_redirect_tqdm([logging.getLogger()])
                self._redirect.__enter__()
        self.closed = False
        _stack.append(self)

    # ------------------------------------------------------------------ updates
    def update(self, n: int = 1, *, tokens: int | float | None = None, **fields) -> None:
        if self.closed:
            return
        self.n += n
        if tokens is not None:
            self.tokens += tokens
            fields["tokens/s"] = self.tokens / max(1e-9, self.elapsed() - self.paused)  # own work only
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        if self.mode == "bar":
            self._tqdm.set_postfix_str(self._fields_str("=", ", "), refresh=False)
            self._tqdm.update(n)
        elif self.mode == "log" and self.n >= self.next_log and (self.total is None or self.n < self.total):
            log.info("%s", self.line())
            self.next_log = (self.n // self.every + 1) * self.every

    def set(self, **fields) -> None:
        """Show fields without moving the bar (e.g. pairs found once the samples are graded)."""
        self.update(0, **fields)

    def outputs(self, n: int, outputs: dict[int, Sequence[str]] | None) -> None:
        fields = self.on_outputs(outputs) if self.on_outputs is not None and outputs is not None else {}
        self.update(n, **(fields or {}))

    # ------------------------------------------------------------------ text
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _fields_str(self, sep: str = " ", join: str = " ") -> str:
        return join.join(f"{k}{sep}{fmt_value(v)}" for k, v in self.fields.items())

    def line(self, done: bool = False) -> str:
        """The log-mode line: `desc: unit n/total (p%) fields | elapsed, ETA` (`done in` at the end)."""
        el = self.elapsed()
        count = f"{self.unit} {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")
        busy = el - self.paused  # without nested stages (a round's sampling inside training)
        rate = (self.n - self.start_n) / busy if busy > 0 else 0.0
        parts = [f"{self.desc}: {count}"]
        if self.unit != "step" and rate:
            parts.append(f"{self.unit}s/s {rate:.1f}")
        if self.fields:
            parts.append(self._fields_str())
        if done:
            tail = f"done in {fmt_time(el)}"
        else:
            eta = (self.total - self.n) / rate if self.total and rate else float("nan")
            tail = f"{fmt_time(el)} elapsed, ETA {fmt_time(eta)}"
        return " ".join(parts) + " | " + tail

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self in _stack:
            _stack.remove(self)
        if self.parent is not None:
            self.parent.paused += self.elapsed()
        if self._tqdm is not None:
            self._tqdm.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        if self.mode == "log":
            log.info("%s", self.line(done=True))

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(desc: str, total: int | None = None, **kw) -> Bar:
    """A progress bar for one stage (see `Bar`); use as a context manager or call `close()`."""
    return Bar(desc, total, **kw)


def advance(n: int, outputs: dict[int, Sequence] | None = None) -> None:
    """Called by generation after each batch: `n` sequences done, `outputs` {prompt index: its
    completions (str, or objects with `.text`)}. Moves the innermost open generation bar; a no-op
    when there is none (training bars are skipped: they count optimizer steps, not sequences)."""
    for b in reversed(_stack):
        if b.gen:
            b.outputs(n, outputs)
            return


def _text(o) -> str:
    return getattr(o, "text", o)


def accuracy_so_far(golds: Sequence, right: Callable[[Any, Any], bool]):
    """An `on_outputs` for evaluation: {"acc": share of the completions so far that are right}.
    golds[i]: what prompt i is checked against; right(output, golds[i]) decides, with the output as
    generated (a Completion, so the caller can apply its metric's own rule, truncation included)."""
    seen = hits = 0

    def cb(outputs: dict[int, Sequence]) -> dict:
        nonlocal seen, hits
        for i, outs in outputs.items():
            for o in outs:
                seen, hits = seen + 1, hits + bool(right(o, golds[i]))
        return {"acc": hits / max(1, seen)}

    return cb


def samples_so_far(golds: Sequence, right: Callable[[str, Any], bool], cap: int):
    """An `on_outputs` for on-policy sampling: {"right": share of samples with the right answer,
    "wrong": distinct wrong-answer samples, at most `cap` per problem}: the rejected sides found so
    far before step grading (grading adds right answers reached through a wrong step)."""
    seen = hits = wrong = 0

    def cb(outputs: dict[int, Sequence]) -> dict:
        nonlocal seen, hits, wrong
        for i, outs in outputs.items():
            bad = set()
            for o in outs:
                ok = bool(right(_text(o), golds[i]))
                seen, hits = seen + 1, hits + ok
                if not ok:
                    bad.add(_text(o))
            wrong += min(cap, len(bad))
        return {"right": hits / max(1, seen), "wrong": wrong}

    return cb
