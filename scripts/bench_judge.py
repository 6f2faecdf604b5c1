"""Throughput of the LLM judge against the fake OpenAI server with a fixed latency.

    python scripts/bench_judge.py                      # 2000 requests, concurrency 32, 100 ms per request
    python scripts/bench_judge.py --n 500 --concurrency 8 --latency 0.05

With latency L and concurrency C no client can beat C / L requests per second (the bound);
the judge should reach >= 0.8 of it. The server runs in its own process (so it doesn't share
the client's GIL), on 127.0.0.1. Then the same requests are scored again with the same cache:
that re-run must send 0 requests. Prints ONE JSON line:

    {"requests": ..., "seconds": ..., "requests_per_s": ..., "concurrency_bound": ...,
     "fraction_of_bound": ..., "rerun_requests": 0, ...}
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stepdpo.rewards.base import ScoreRequest  # noqa: E402
from stepdpo.rewards.openai_judge import OpenAIJudge  # noqa: E402


def requests(n: int, n_steps: int) -> list[ScoreRequest]:
    out = []
    for i in range(n):
        v, steps = 10 + i, []
        for k in range(n_steps):
            steps.append(f"{v} + {k + 2} = {v + k + 2}")
            v += k + 2
        out.append(ScoreRequest(f"Start with {10 + i} and keep adding. (#{i})", tuple(steps), str(v)))
    return out


class Server:
    """The fake server in a child process; `counts()` asks it for its request counters."""

    def __init__(self, latency: float):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--latency", str(latency)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.base_url = json.loads(self.proc.stdout.readline())["base_url"]

    def counts(self) -> dict:
        self.proc.stdin.write("counts\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()  # EOF stops the server
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="requests to score")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.1, help="server seconds per request")
    ap.add_argument("--steps", type=int, default=3, help="steps per solution")
    args = ap.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.latency <= 0:
        ap.error("--n and --concurrency must be >= 1 and --latency > 0")
    logging.basicConfig(level=logging.WARNING)
    reqs = requests(args.n, args.steps)
    server = Server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "judge.sqlite"
            kw = dict(base_url=server.base_url, model="gpt-4o-mini", cache_path=cache, concurrency=args.concurrency,
                      progress=False, timeout=30.0)
            judge = OpenAIJudge(engine=kw)
            t = time.perf_counter()
            res = judge.score(reqs)
            seconds = time.perf_counter() - t
            summary = judge.summary()
            judge.close()
            before = server.counts().get("chat", 0)
            rerun = OpenAIJudge(engine=kw)
            res2 = rerun.score(reqs)
            rerun.close()
            rerun_requests = server.counts().get("chat", 0) - before
    finally:
        server.close()
    rps = args.n / seconds
    bound = args.concurrency / args.latency
    out = {
        "requests": args.n, "concurrency": args.concurrency, "latency_s": args.latency,
        "seconds": round(seconds, 3), "requests_per_s": round(rps, 1), "concurrency_bound": round(bound, 1),
        "fraction_of_bound": round(rps / bound, 3), "rerun_requests": rerun_requests,
        "failures": summary["failures"], "retries": summary["retries"],
        "rerun_identical": [r.scores for r in res] == [r.scores for r in res2],
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
