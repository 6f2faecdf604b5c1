"""A small OpenAI-compatible HTTP server for tests and benchmarks (127.0.0.1 only, a free port).

    with FakeOpenAI(latency=0.1) as fake:
        judge = OpenAIJudge(base_url=fake.base_url, model="fake", cache_path=None)
        fake.inject("429", "500", "invalid_json")   # the next three chat requests misbehave
        ...
        fake.counts["chat"]                          # chat requests received

Endpoints: POST /v1/chat/completions, POST /v1/files (multipart), GET /v1/files/{id}/content,
POST /v1/batches, GET /v1/batches/{id}.

What it "thinks": it reads the numbered steps ("Step 3: 12 + 7 = 19") from the last user message.
- judge requests (json_schema "step_judgement", or any other request): a step containing
  "a op b = c" is correct iff the arithmetic holds; "The answer is x" is correct iff x is the
  previous step's result; other steps are correct. Answer: the judge JSON of
  `stepdpo.rewards.openai_judge` (verdict + score per step, first_wrong_step).
- flaw requests (json_schema "flawed_solution", or a system prompt mentioning a flawed
  solution): copies the steps before "Make step k the first wrong step.", adds 1 to the result
  of the first arithmetic step from k on and carries the wrong value through later steps.

Faults, one per chat request, taken in arrival order from `inject(...)` or chosen by
`fault_for(body) -> str | None`:
    "429"           HTTP 429 with Retry-After: `retry_after` seconds
    "500", "503"    HTTP 5xx
    "400", "401"    a bad request / a rejected API key
    "slow"          answer after `slow_seconds` (longer than a short client timeout)
    "disconnect"    close the connection without answering
    "invalid_json"  200, but the message content isn't JSON
    "wrong_count"   200, judge JSON with one step too few
    "bad_prefix"    200, flaw JSON whose steps before the wrong step differ from the original
    "refusal"       200, a refusal message and no content
    "html"          200 with an HTML page (a proxy error page)
    "garbled"       200, Content-Type JSON, a truncated body

`python tests/fake_openai.py --latency 0.1` serves from a separate process and prints
one JSON line with its base_url (the benchmark uses this so the server doesn't share a GIL with
the client).
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

STEP_LINE = re.compile(r"^Step (\d+): ?(.*)$")
ARITH = re.compile(r"(-?\d+(?:\.\d+)?)\s*([+\-*/x×])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")
ANSWER = re.compile(r"answer is\s*\$?(-?\d+(?:\.\d+)?)", re.IGNORECASE)
TARGET = re.compile(r"Make step (\d+) the first wrong step", re.IGNORECASE)


def _num(s: str) -> float:
    return float(s)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _apply(a: float, op: str, b: float) -> float | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in "*x×":
        return a * b
    return a / b if b else None


def steps_of(messages: list[dict]) -> list[str]:
    user = next((m for m in reversed(messages) if m.get("role") == "user"), {"content": ""})
    out: list[str] = []
    for line in str(user.get("content", "")).splitlines():
        m = STEP_LINE.match(line)
        if m and int(m[1]) == len(out) + 1:
            out.append(m[2])
        elif out and line.startswith("    "):  # continuation of a multi-line step
            out[-1] += "\n" + line[4:]
    return out


def judge_steps(steps: list[str]) -> list[bool]:
    """True per step whose arithmetic holds (see the module docstring)."""
    ok, prev = [], None
    for s in steps:
        m = ARITH.search(s)
        if m:
            a, op, b, c = _num(m[1]), m[2], _num(m[3]), _num(m[4])
            r = _apply(a, op, b)
            ok.append(r is not None and abs(r - c) < 1e-9)
            prev = c
            continue
        m = ANSWER.search(s)
        ok.append(prev is None or m is None or abs(_num(m[1]) - prev) < 1e-9)
    return ok


def flaw_steps(steps: list[str], target: int) -> tuple[list[str], int]:
    """(flawed steps, 1-based first wrong step), corrupting from step `target` on."""
    out = list(steps[: target - 1])
    wrong = None
    old_new: tuple[float, float] | None = None
    for i in range(target - 1, len(steps)):
        s = steps[i]
        m = ARITH.search(s)
        if m:
            a, op, b, c = _num(m[1]), m[2], _num(m[3]), _num(m[4])
            if wrong is None:
                new_c = c + 1
                wrong = i + 1
            elif old_new is not None and a == old_new[0]:
                a = old_new[1]
                new_c = _apply(a, op, b) or 0.0
            else:
                out.append(s)
                continue
            s = s[: m.start()] + f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(new_c)}" + s[m.end():]
            old_new = (c, new_c)
        else:
            m = ANSWER.search(s)
            if m and (wrong is None or old_new is not None):
                val = _num(m[1]) + 1 if wrong is None else old_new[1]
                if wrong is None:
                    wrong = i + 1
                s = s[: m.start(1)] + _fmt(val) + s[m.end(1):]
            elif wrong is None:
                s = s + " (so this is clearly right)"  # a non-numeric step: make it differ
                wrong = i + 1
        out.append(s)
    return out, wrong or target


class FakeOpenAI:
    """See the module docstring. Thread-safe counters; `stop()` (or the context manager) ends it."""

    def __init__(self, *, latency: float = 0.0, slow_seconds: float = 2.0, retry_after: float | str = 0.05,
                 batch_polls: int = 1, host: str = "127.0.0.1", port: int = 0):
        if host != "127.0.0.1":
            raise ValueError("FakeOpenAI listens on 127.0.0.1 only")
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.batch_polls = batch_polls  # GETs of a batch before it completes
        self.hold_batches = False  # True: batches stay in_progress (to test resuming)
        self.files_status: int | None = None  # e.g. 500: POST /v1/files answers with this error
        self.faults: deque[str] = deque()
        self.fault_for: Callable[[dict], str | None] | None = None
        self.counts: Counter = Counter()
        self.auth: Counter = Counter()  # Authorization header values seen
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.lock = threading.Lock()
        self._host, self._port = host, port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://{self._host}:{self._httpd.server_address[1]}/v1"

    def start(self) -> "FakeOpenAI":
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256
            allow_reuse_address = True

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self._httpd = Server((self._host, self._port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ programming
    def inject(self, *faults: str) -> None:
        with self.lock:
            self.faults.extend(faults)

    def next_fault(self, body: dict) -> str | None:
        with self.lock:
            if self.faults:
                return self.faults.popleft()
        return self.fault_for(body) if self.fault_for else None

    def bump(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    # ------------------------------------------------------------------ the "model"
    def complete(self, body: dict, fault: str | None = None) -> dict:
        """A chat.completion object for `body` (with a content fault applied, if any)."""
        messages = body.get("messages") or []
        rf = body.get("response_format") or {}
        schema_name = (rf.get("json_schema") or {}).get("name", "") if isinstance(rf, dict) else ""
        system = " ".join(str(m.get("content", "")) for m in messages if m.get("role") == "system").lower()
        steps = steps_of(messages)
        refusal = None
        if schema_name == "flawed_solution" or (not schema_name and "flawed solution" in system):
            user = str(messages[-1].get("content", "")) if messages else ""
            m = TARGET.search(user)
            target = min(max(1, int(m[1]) if m else 1), max(1, len(steps)))
            flawed, wrong = flaw_steps(steps, target)
            if fault == "bad_prefix" and wrong > 1:
                flawed[0] = flawed[0] + " (restated)"
            content = json.dumps({"wrong_step": wrong, "steps": flawed})
        else:
            ok = judge_steps(steps)
            items = [{"step": i, "verdict": "correct" if g else "incorrect", "score": 0.9 if g else 0.1}
                     for i, g in enumerate(ok, 1)]
            first = next((i for i, g in enumerate(ok, 1) if not g), None)
            if fault == "wrong_count":
                items = items[:-1]
            content = json.dumps({"steps": items, "first_wrong_step": first})
            if not rf:  # plain-text mode: answer like a chatty model
                content = f"Here is my grading.\n```json\n{content}\n```\nHope this helps!"
        if fault == "invalid_json":
            content = "Step 1 looks fine, but {steps: [oops, this is not JSON"
        if fault == "refusal":
            content, refusal = None, "I can't help with that."
        prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
        usage = {"prompt_tokens": prompt_chars // 4 + 8, "completion_tokens": len(content or "") // 4 + 1}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": content, "refusal": refusal}}],
                "usage": usage}

    def run_batch(self, batch: dict) -> None:
        """Answer every line of the input file: 200s go to the output file, errors to the error file."""
        lines = self.files[batch["input_file_id"]]["data"].decode("utf-8").splitlines()
        ok, errors = [], []
        for line in lines:
            if not line.strip():
                continue
            req = json.loads(line)
            fault = self.fault_for(req["body"]) if self.fault_for else None
            if fault in ("429", "500", "503"):
                resp = {"status_code": int(fault), "request_id": uuid.uuid4().hex,
                        "body": {"error": {"message": f"injected {fault}", "type": "server_error"}}}
            else:
                resp = {"status_code": 200, "request_id": uuid.uuid4().hex, "body": self.complete(req["body"], fault)}
            row = json.dumps({"id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": req["custom_id"],
                              "response": resp, "error": None})
            (ok if resp["status_code"] == 200 else errors).append(row)
        out_id = self.add_file(("\n".join(ok) + "\n").encode(), "batch_output.jsonl", "batch_output") if ok else None
        err_id = self.add_file(("\n".join(errors) + "\n").encode(), "batch_errors.jsonl", "batch_output") \
            if errors else None
        batch.update(status="completed", output_file_id=out_id, error_file_id=err_id, completed_at=int(time.time()),
                     request_counts={"total": len(ok) + len(errors), "completed": len(ok), "failed": len(errors)})

    def add_file(self, data: bytes, filename: str, purpose: str) -> str:
        fid = f"file-{uuid.uuid4().hex[:16]}"
        with self.lock:
            self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "status": "processed", "data": data}
        return fid


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real API server
    fake: FakeOpenAI

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # No Nagle: a response must not wait ~40 ms for the client's delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, obj: Any = None, *, raw: bytes | None = None, headers: dict | None = None,
              ctype: str | None = None) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        try:
            self.send_response(status)
            ctype = ctype or ("application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self._headers_buffer.append(b"\r\n")  # end_headers() without its flush: one write below
            self.wfile.write(b"".join(self._headers_buffer) + data)
            self._headers_buffer = []
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": "fake_error", "code": str(status)}},
                   headers=headers)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self) -> None:
        f = self.fake
        path = self.path.split("?")[0]
        f.bump(f"GET {re.sub(r'/(file-|batch_)[0-9a-f]+', '/{id}', path)}")
        m = re.fullmatch(r"/v1/files/([^/]+)/content", path)
        if m:
            rec = f.files.get(m[1])
            return self._send(200, raw=rec["data"]) if rec else self._error(404, f"no file {m[1]}")
        m = re.fullmatch(r"/v1/batches/([^/]+)", path)
        if m:
            b = f.batches.get(m[1])
            if b is None:
                return self._error(404, f"no batch {m[1]}")
            with f.lock:
                b["_polls"] += 1
                ready = not f.hold_batches and b["_polls"] >= f.batch_polls and b["status"] != "completed"
                if b["status"] == "validating":
                    b["status"] = "in_progress"
            if ready:
                f.run_batch(b)
            return self._send(200, {k: v for k, v in b.items() if not k.startswith("_")})
        self._error(404, f"no route GET {path}")

    def do_POST(self) -> None:
        f = self.fake
        path = self.path.split("?")[0]
        raw = self._body()
        f.bump(f"POST {path}")
        auth = self.headers.get("Authorization", "")
        with f.lock:
            f.auth[auth] += 1
        if path == "/v1/chat/completions":
            return self._chat(raw)
        if path == "/v1/files":
            if f.files_status:
                return self._error(f.files_status, f"upload failed (injected {f.files_status})")
            ctype = self.headers.get("Content-Type", "")
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
            fields, data, filename = {}, b"", "upload.jsonl"
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if name == "file":
                    data = part.get_payload(decode=True) or b""
                    filename = part.get_filename() or filename
                else:
                    fields[name] = part.get_content().strip() if part.get_content_type().startswith("text") \
                        else (part.get_payload(decode=True) or b"").decode()
            fid = f.add_file(data, filename, fields.get("purpose", "batch"))
            return self._send(200, {k: v for k, v in f.files[fid].items() if k != "data"})
        if path == "/v1/batches":
            req = json.loads(raw or b"{}")
            if req.get("input_file_id") not in f.files:
                return self._error(400, f"input_file_id {req.get('input_file_id')!r} not found")
            bid = f"batch_{uuid.uuid4().hex[:16]}"
            b = {"id": bid, "object": "batch", "endpoint": req.get("endpoint"), "errors": None,
                 "input_file_id": req["input_file_id"], "completion_window": req.get("completion_window", "24h"),
                 "status": "validating", "output_file_id": None, "error_file_id": None,
                 "created_at": int(time.time()), "metadata": req.get("metadata"),
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "_polls": 0}
            with f.lock:
                f.batches[bid] = b
                f.counts["batches_created"] += 1
            return self._send(200, {k: v for k, v in b.items() if not k.startswith("_")})
        self._error(404, f"no route POST {path}")

    def _chat(self, raw: bytes) -> None:
        f = self.fake
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            return self._error(400, "request body is not JSON")
        f.bump("chat")
        fault = f.next_fault(body)
        if fault:
            f.bump(f"fault:{fault}")
        if f.latency:
            time.sleep(f.latency)
        if fault == "429":
            return self._error(429, "rate limited (injected)", headers={"Retry-After": f.retry_after})
        if fault in ("400", "401"):
            return self._error(int(fault), f"injected {fault}")
        if fault in ("500", "502", "503"):
            return self._error(int(fault), f"server error (injected {fault})")
        if fault == "disconnect":
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        if fault == "html":
            return self._send(200, raw=b"<html><body>502 Bad Gateway</body></html>", ctype="text/html")
        if fault == "garbled":
            data = b'{"id": "chatcmpl-x", "choices": [{"message": '
            return self._send(200, raw=data, ctype="application/json")
        if fault == "slow":
            time.sleep(f.slow_seconds)
        self._send(200, f.complete(body, fault))
        f.bump("chat_ok")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve the fake OpenAI API on 127.0.0.1 until stdin closes")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per chat request")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    fake = FakeOpenAI(latency=args.latency, port=args.port).start()
    print(json.dumps({"base_url": fake.base_url}), flush=True)
    try:
        for line in sys.stdin:  # "counts" prints the counters; EOF stops the server
            if line.strip() == "counts":
                with fake.lock:
                    print(json.dumps(dict(fake.counts)), flush=True)
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
