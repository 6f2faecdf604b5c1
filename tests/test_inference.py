"""generation=openai_server and generation=vllm (stepdpo.inference).

The server path runs through the real `openai` client against a small OpenAI-compatible server
started here on 127.0.0.1 that loads LoRA adapters by path (as vLLM's /v1/load_lora_adapter does),
records every request and can fail. vLLM cannot run on this machine: its backend must say so clearly.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from stepdpo import generation
from stepdpo.data import Problem, format_prompt, prompt_ids
from stepdpo.generation import Completion, eos_ids
from stepdpo.inference import NEUTRAL_SAMPLING, ServerBackend, VLLMBackend, prompt_seed
from stepdpo.model import tiny_llama


class FakeLoraServer:
    """/v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/completions. A completion is made up from the
    prompt: choice i is "<i> 7\\n#### 7\\n\\nQuestion: next" cut at max_tokens characters (the char
    tokenizer: one token per character) or before a stop string, with the token ids of what was
    generated (EOS appended when it "ended"). `faults`: HTTP statuses answered to the next completions."""

    def __init__(self, tok, eos: int, token_ids: bool = True):
        self.tok, self.eos, self.token_ids = tok, eos, token_ids
        self.loads, self.unloads, self.completions, self.faults = [], [], [], []
        self.adapters: dict[str, dict] = {}  # name -> the adapter files' content when it was loaded

    def __enter__(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, body, ctype="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/load_lora_adapter":
                    fake.loads.append(body)
                    path = Path(body["lora_path"])
                    fake.adapters[body["lora_name"]] = {
                        "config": json.loads((path / "adapter_config.json").read_text()),
                        "weights": (path / "adapter_model.safetensors").read_bytes()}
                    return self._send(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.", "text/plain")
                if self.path == "/v1/unload_lora_adapter":
                    fake.unloads.append(body)
                    return self._send(200, "Success", "text/plain")
                if self.path != "/v1/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                fake.completions.append(body)
                if fake.faults:
                    return self._send(fake.faults.pop(0), {"error": {"message": "injected fault"}})
                if body["model"] not in fake.adapters:
                    return self._send(404, {"error": {"message": f"model {body['model']} not loaded"}})
                return self._send(200, {"object": "text_completion", "choices": [fake.choice(body, i)
                                                                                  for i in range(body["n"])]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def choice(self, body, i):
        full = f"{i} {len(body['prompt'])}\n#### 7\n\nQuestion: next"
        text, reason = full[:body["max_tokens"]], "length" if body["max_tokens"] < len(full) else "stop"
        cuts = [text.find(s) for s in body.get("stop") or [] if s in text]
        if cuts:  # like vLLM: the text stops before the stop string; the ids cover what was generated
            ids, text, reason = self.tok(text[:min(cuts) + 3], add_special_tokens=False)["input_ids"], text[:min(cuts)], "stop"
        else:
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + ([self.eos] if reason == "stop" else [])
        out = {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
        if self.token_ids:
            out["token_ids"] = ids
        return out


@pytest.fixture
def policy():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, tok = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("#")]  # a second EOS id
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)), tok


PROMPTS = ["Question: 3 + 4?\nAnswer:\n", "Question: a longer one, 10 - 3?\nAnswer:\n"]


def test_server_loads_the_adapter_and_samples_with_the_requested_parameters(policy):
    from safetensors.torch import load

    model, tok = policy
    with FakeLoraServer(tok, tok.eos_token_id) as fake:
        backend = ServerBackend(base_url=fake.base_url, backoff_base=0.0)
        outs = backend.generate(model, tok, PROMPTS, max_new_tokens=64, batch_size=8, do_sample=True,
                                temperature=0.7, top_p=0.9, num_return_sequences=3, seed=11, stop=["\n\nQuestion:"])
        (load_body,) = fake.loads
        name = load_body["lora_name"]
        # the adapter the server loaded is the policy's current one, weights and all
        saved = load(fake.adapters[name]["weights"])
        live = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert len(saved) == len(live) > 0
        for k, v in saved.items():
            match = [lk for lk in live if lk.replace(".default", "") == k]
            assert len(match) == 1 and torch.equal(v, live[match[0]]), k
        assert fake.adapters[name]["config"]["r"] == 4
        assert len(fake.completions) == 2  # one request per prompt, n samples each
        for i, (p, body) in enumerate(zip(PROMPTS, sorted(fake.completions, key=lambda b: len(b["prompt"])))):
            assert body["model"] == name and body["n"] == 3 and body["max_tokens"] == 64
            assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["stop"] == ["\n\nQuestion:"]
            assert body["logprobs"] is None and body["stop_token_ids"] == eos_ids(model, tok)
            assert body["prompt"] == prompt_ids(tok, p)  # token ids, exactly as in training (one BOS)
            assert all(body[k] == v for k, v in NEUTRAL_SAMPLING.items())  # not the model's generation_config
        # a seed per prompt, each prompt's n samples (vLLM: seed + j) clear of the other's
        seeds = sorted(b["seed"] for b in fake.completions)
        assert seeds == sorted(prompt_seed(11, i, 3) for i in range(2)) and seeds[0] + 3 <= seeds[1]
        for p, o in zip(PROMPTS, outs):
            n = len(prompt_ids(tok, p))
            assert o == [Completion(f"{i} {n}\n#### 7", tuple(tok(f"{i} {n}\n#### 7", add_special_tokens=False)["input_ids"]),
                                    "stop") for i in range(3)]

        # greedy, a length limit, and the server's 500 then success; a new adapter version replaces the old
        fake.faults.append(500)
        with torch.no_grad():
            next(p for n_, p in model.named_parameters() if "lora_B" in n_).add_(1.0)  # the policy trained on
        outs = backend.generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=8)
        assert [b["lora_name"] for b in fake.loads] == ["stepdpo-v1", "stepdpo-v2"] and fake.unloads == [{"lora_name": "stepdpo-v1"}]
        assert fake.adapters["stepdpo-v1"]["weights"] != fake.adapters["stepdpo-v2"]["weights"]
        assert len(fake.completions) == 5 and backend.engine.stats.retries == 1
        assert all(b["temperature"] == 0.0 and b["n"] == 1 and b["model"] == "stepdpo-v2" for b in fake.completions[2:])
        assert [[c.finish_reason for c in o] for o in outs] == [["length"], ["length"]]
        assert [len(o[0].token_ids) for o in outs] == [4, 4] and outs[0][0].text == "0 " + str(len(prompt_ids(tok, PROMPTS[0])))[:2]
        # v1 is gone once v2 is served; unchanged weights keep v2: no new version, no reload
        assert sorted(p.name for p in backend.adapters.root.iterdir()) == ["v2"]
        backend.generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=8)
        assert len(fake.loads) == 2 and len(fake.completions) == 7 and fake.completions[-1]["model"] == "stepdpo-v2"


def test_server_that_restarted_gets_the_adapter_again(policy):
    """A server restarted mid-run has forgotten the adapter version the backend loaded (its weights unchanged, so the
    backend would not load it again): its 404 for that model loads it once more, for all the requests that found
    it gone, and they are answered. A model still unknown after the reload is fatal, as any 404."""
    from stepdpo.rewards.llm_engine import FatalAPIError

    model, tok = policy
    with FakeLoraServer(tok, tok.eos_token_id) as fake:
        backend = ServerBackend(base_url=fake.base_url, backoff_base=0.0, concurrency=1)
        first = backend.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=8)
        fake.adapters.clear()  # the restart
        again = backend.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=8)
        assert again == first and [b["lora_name"] for b in fake.loads] == ["stepdpo-v1", "stepdpo-v1"]
        # 2, then 2 answered after one 404 (or two, when the second request got in before the reload)
        assert len(fake.completions) in (5, 6) and {b["model"] for b in fake.completions} == {"stepdpo-v1"}
        fake.faults += [404, 404]  # the model is unknown even after loading it again
        with pytest.raises(FatalAPIError, match="HTTP 404"):
            backend.generate(model, tok, PROMPTS[:1], max_new_tokens=8, batch_size=8)
        assert len(fake.loads) == 3


def test_prompt_seeds_keep_every_sample_stream_apart():
    """vLLM seeds sample j of a request seeded s with s + j: across the prompts of one call, and across calls whose
    seeds differ by 1 (the rollout scorer's), no two requests' [s, s + n) overlap."""
    for n in (1, 4, 16):
        starts = sorted(prompt_seed(seed, i, n) for seed in range(40) for i in range(64))
        assert all(0 <= a and a + n <= b for a, b in zip(starts, starts[1:])) and starts[-1] + n <= 2**31
    assert prompt_seed(3, 5, 4) == prompt_seed(3, 5, 4)  # deterministic


def test_server_without_token_ids_and_a_final_failure(policy):
    model, tok = policy
    with FakeLoraServer(tok, tok.eos_token_id, token_ids=False) as fake:
        backend = ServerBackend(base_url=fake.base_url, backoff_base=0.0, max_retries=1)
        ((c,),) = backend.generate(model, tok, PROMPTS[:1], max_new_tokens=64, batch_size=8)
        assert c.text.endswith("#### 7\n\nQuestion: next") and c.finish_reason == "stop"
        assert tok.decode(list(c.token_ids)) == c.text  # re-encoded from the text when the server sends no ids
        fake.faults += [503, 503]
        with pytest.raises(RuntimeError, match=r"127\.0\.0\.1.*failed after 1 retries: http_503"):
            backend.generate(model, tok, PROMPTS[:1], max_new_tokens=64, batch_size=8)


def test_set_backend_routes_eval_through_the_server(policy):
    from stepdpo.evaluate import math_accuracy

    model, tok = policy
    probs = [Problem(id="a", question="3 + 4?", answer="7", steps=[]), Problem(id="b", question="10 - 2?", answer="8", steps=[])]
    with FakeLoraServer(tok, tok.eos_token_id) as fake:
        generation.set_backend(ServerBackend(base_url=fake.base_url, backoff_base=0.0))
        try:
            metrics, records = math_accuracy(model, tok, probs, max_new_tokens=64, batch_size=8)
        finally:
            generation.set_backend(None)
        assert len(fake.completions) == 2 and {tuple(b["prompt"]) for b in fake.completions} == \
            {tuple(prompt_ids(tok, format_prompt(p.question, tok))) for p in probs}
    assert metrics["acc"] == 0.5 and [r["pred"] for r in records] == ["7", "7"]
    # back on the local loop: no server involved
    assert len(generation.generate(model, tok, PROMPTS[:1], max_new_tokens=3, batch_size=1)[0][0].token_ids) <= 3


def test_engines_refuse_what_they_cannot_serve(policy):
    model, tok = policy
    with pytest.raises(ValueError, match="lora=none trains every weight"):
        ServerBackend(base_url="http://127.0.0.1:9/v1").generate(tiny_llama(hidden_size=32, num_hidden_layers=1)[0],
                                                                  tok, PROMPTS, max_new_tokens=4, batch_size=2)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install vllm"):
            VLLMBackend()


def test_adapter_versions_in_a_temporary_dir_are_removed_with_their_owner(policy, tmp_path):
    import gc

    from stepdpo.inference import AdapterVersions

    model, _ = policy
    versions = AdapterVersions(None, "generation")
    name, v, path = versions.save(model)
    root = versions.root
    assert (path / "adapter_config.json").exists() and name == "stepdpo-v1"
    del versions
    gc.collect()
    assert not root.exists()  # no stepdpo-adapters-* left in /tmp
    kept = AdapterVersions(str(tmp_path / "adapters"), "generation")  # a dir the user named stays
    kept.save(model)
    del kept
    gc.collect()
    assert (tmp_path / "adapters" / "v1" / "adapter_config.json").exists()


def test_vllm_backend_seeds_serves_and_prunes_adapter_versions(policy, monkeypatch, tmp_path):
    """generation=vllm's calls into vLLM's offline API, against a stand-in `vllm` module that records them: one
    SamplingParams per prompt with prompt_seed's seeds, the model's EOS ids, the current adapter by path (a new
    LoRARequest id only when the weights changed), and older adapter versions deleted once a newer one is served."""
    import sys
    import types
    from types import SimpleNamespace as NS

    calls = []

    class FakeLLM:
        def __init__(self, model, seed, **kw):
            calls.append(("init", model, kw))
            self.asleep = False

        def generate(self, prompts, params, lora_request, use_tqdm):
            assert Path(lora_request.lora_path, "adapter_config.json").exists()  # readable when served
            assert not self.asleep, "generate() on a sleeping engine"
            calls.append(("generate", [p["prompt_token_ids"] for p in prompts], params, lora_request))
            return [NS(outputs=[NS(text=f"s{j}", token_ids=[], finish_reason="stop") for j in range(prm.n)])
                    for prm in params]

        def sleep(self, level):
            assert not self.asleep and level == 1  # level 2 would drop the weights (and the LoRA slots)
            calls.append(("sleep",))
            self.asleep = True

        def wake_up(self):
            assert self.asleep
            calls.append(("wake_up",))
            self.asleep = False

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, lambda **kw: NS(**kw)
    lora_req = types.ModuleType("vllm.lora.request")
    lora_req.LoRARequest = lambda name, id_, path: NS(lora_name=name, lora_int_id=id_, lora_path=path)
    for name, mod in (("vllm", vllm), ("vllm.lora", types.ModuleType("vllm.lora")), ("vllm.lora.request", lora_req)):
        monkeypatch.setitem(sys.modules, name, mod)

    model, tok = policy
    backend = VLLMBackend(base_model="base-dir", adapter_dir=str(tmp_path / "ad"))
    outs = backend.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=4, do_sample=True, temperature=0.7,
                            num_return_sequences=3, seed=5, stop=["\n\nQuestion:"])
    assert [[c.text for c in o] for o in outs] == [["s0", "s1", "s2"]] * 2
    (_, base, kw), (_, ids, params, req) = calls
    assert base == "base-dir" and kw["enable_lora"] and kw["gpu_memory_utilization"] == 0.4
    assert ids == [prompt_ids(tok, p) for p in PROMPTS]
    assert [p.seed for p in params] == [prompt_seed(5, i, 3) for i in range(2)]
    assert all(p.n == 3 and p.temperature == 0.7 and p.stop_token_ids == eos_ids(model, tok) for p in params)
    assert (req.lora_name, req.lora_int_id) == ("stepdpo-v1", 1)
    backend.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=4)  # same weights: the same version
    assert calls[-1][3].lora_int_id == 1 and calls[-1][2][0].temperature == 0.0
    with torch.no_grad():
        next(p for n_, p in model.named_parameters() if "lora_B" in n_).add_(1.0)
    backend.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=4)
    assert calls[-1][3].lora_int_id == 2 and sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["v2"]
    assert not kw["enable_sleep_mode"] and not [c for c in calls if c[0] in ("sleep", "wake_up")]

    # generation.sleep=true: the engine sleeps after every call and wakes before the next (training in between)
    calls.clear()
    backend = VLLMBackend(base_model="base-dir", adapter_dir=str(tmp_path / "ad2"), sleep=True)
    for _ in range(3):
        assert backend.generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=4)[0][0].text == "s0"
    assert calls[0][2]["enable_sleep_mode"] is True
    assert [c[0] for c in calls[1:]] == ["generate", "sleep"] + ["wake_up", "generate", "sleep"] * 2
