"""Inference engines for GPU users: `generation=vllm` and `generation=openai_server` (docs/inference.md).

Both serve the policy as its base model plus its current LoRA adapter: before each `generate()` call
the adapter is saved to `adapter_dir/v<N>` (a new version each call, so no engine serves a stale one)
and passed to the engine by path. Prompts go as token ids (`data.prompt_ids`, exactly as in training),
the EOS ids are the model's list (`generation.eos_ids`), and the answers come back as the same
`generation.Completion` objects the local loop returns. `generation=hf` (the default) runs the local loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Sequence

from .data import prompt_ids
from .generation import Completion, eos_ids, ids_before


def prompt_seed(seed: int, i: int, n: int) -> int:
    """The engine seed of prompt i of a generate call seeded `seed` that asks n samples per prompt. vLLM seeds
    sample j of a request seeded s with s + j, so plain `seed + i` would give prompt i's sample j + 1 the stream of
    prompt i + 1's sample j (the same text when the prompts are equal, as a resampled problem's twin prefixes are).
    A hash of (seed, i) spreads the requests over [0, 2^31) with room for their n samples; callers' seeds that
    differ by 1 (rollout calls) get unrelated streams too."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big")
    return h % (2**31 - max(n, 1))


# what a sampling request sets besides temperature and top_p: vLLM's server otherwise fills these from the model's
# generation_config.json (top_k, min_p, repetition_penalty...), which the local loop and vLLM's offline LLM do not
# apply: every backend samples the policy's own distribution at the configured temperature and top_p
NEUTRAL_SAMPLING = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0}


class AdapterVersions:
    """Saves the policy's LoRA adapter as `root/v1`, `root/v2`, ... (each written to a temp dir, then renamed):
    a new version only when the adapter's weights changed since the last one, and the one before it is removed
    once a newer one is served (`prune`). Without a `root` they go to a temporary dir, removed with this object
    (or at exit)."""

    def __init__(self, root: str | None, where: str):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="stepdpo-adapters-"))
        if not root:
            weakref.finalize(self, shutil.rmtree, self.root, True)
        self.where, self.version, self.digest = where, 0, None

    def save(self, model) -> tuple[str, int, Path]:
        """(name, version, path) of an adapter version holding the policy's current LoRA weights."""
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise ValueError(f"{self.where}: the engine serves the base model plus the policy's LoRA adapter, and this "
                             "policy has none (lora=none trains every weight); use lora=lora|qlora or generation=hf")
        digest = adapter_digest(model)
        if digest != self.digest or not self.path(self.version).exists():  # unchanged weights: the same version
            self.version += 1
            tmp = self.root / f".v{self.version}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))  # peft: the adapter weights and adapter_config.json only
            tmp.rename(self.path(self.version))
            self.digest = digest
        return f"stepdpo-v{self.version}", self.version, self.path(self.version)

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def prune(self) -> None:
        """Remove every version older than the current one (call once the engine serves the current one)."""
        for old in self.root.glob("v*"):
            if old.name[1:].isdigit() and int(old.name[1:]) < self.version:
                shutil.rmtree(old, ignore_errors=True)


def adapter_digest(model) -> str:
    """A hash of the policy's LoRA weights (what a saved version holds): equal digests, the same adapter."""
    h = hashlib.sha256()
    for name, t in sorted((n, p) for n, p in model.named_parameters() if "lora_" in n):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def base_model_of(model, base_model: str | None, where: str) -> str:
    """The base model directory or hub name the engine loads: `base_model`, else the adapter's base."""
    if base_model:
        return base_model
    cfg = next(iter(getattr(model, "peft_config", {}).values()), None)
    name = getattr(cfg, "base_model_name_or_path", None)
    if not name:
        raise ValueError(f"{where}.base_model: can't tell which base model the adapter belongs to; set it to the "
                         "base model's directory (the run's base_model/ after an SFT warm-up) or hub name")
    return name


def completion_from(tokenizer, text: str, ids: Sequence[int] | None, finish_reason: str, eos: set[int],
                    stop: Sequence[str]) -> Completion:
    """An engine's answer as a Completion: the EOS id dropped from the ids; ids re-encoded from the text
    when the engine does not return them; after a stop string, the ids whose text precedes it."""
    if ids is None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = list(ids)
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    if stop and finish_reason == "stop":
        ids = ids_before(tokenizer, ids, text)
    return Completion(text, tuple(ids), "length" if finish_reason == "length" else "stop")


class VLLMBackend:
    """generation=vllm: vLLM's offline `LLM` with LoRA enabled, one engine per process (built on first use)."""

    def __init__(self, *, base_model: str | None = None, adapter_dir: str | None = None, max_lora_rank: int = 64,
                 gpu_memory_utilization: float = 0.4, dtype: str = "auto", max_model_len: int | None = None,
                 enforce_eager: bool = False, tensor_parallel_size: int = 1, sleep: bool = False):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ImportError("generation=vllm needs vLLM on a CUDA machine: pip install vllm "
                              "(or use generation=hf, or generation=openai_server with a running server)") from None
        self.base_model = base_model
        self.adapters = AdapterVersions(adapter_dir, "generation")
        self.engine_kwargs = dict(enable_lora=True, max_lora_rank=max_lora_rank, dtype=dtype,
                                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                  enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                                  enable_sleep_mode=sleep)
        self.sleep = sleep  # between calls the engine sleeps (level 1): training gets the GPU memory it held
        self.llm = None

    def generate(self, model, tokenizer, prompts, *, max_new_tokens, batch_size, do_sample=False, temperature=1.0,
                 top_p=1.0, num_return_sequences=1, seed=0, stop=None) -> list[list[Completion]]:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        if self.llm is None:
            self.llm = LLM(model=base_model_of(model, self.base_model, "generation"), seed=seed, **self.engine_kwargs)
        elif self.sleep:  # asleep since the last call: its weights come back from CPU RAM, its KV cache is re-made
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # blocks training freed but torch's allocator still holds
            self.llm.wake_up()
        name, version, path = self.adapters.save(model)
        eos, stop = eos_ids(model, tokenizer), [s for s in (stop or []) if s]
        params = [SamplingParams(n=num_return_sequences, temperature=temperature if do_sample else 0.0,
                                 top_p=top_p if do_sample else 1.0, max_tokens=max_new_tokens, stop=stop or None,
                                 stop_token_ids=eos, seed=prompt_seed(seed, i, num_return_sequences))
                  for i in range(len(prompts))]
        try:
            outs = self.llm.generate([{"prompt_token_ids": prompt_ids(tokenizer, p)} for p in prompts], params,
                                     lora_request=LoRARequest(name, version, str(path)), use_tqdm=False)
        finally:
            if self.sleep:  # level 1: weights (LoRA slots too, allocated with them) to CPU RAM, the KV cache dropped
                self.llm.sleep(level=1)
        self.adapters.prune()  # served (vLLM keeps a loaded adapter in memory by its id)
        return [[completion_from(tokenizer, c.text, c.token_ids, c.finish_reason, set(eos), stop) for c in o.outputs]
                for o in outs]


class ServerBackend:
    """generation=openai_server: any OpenAI-compatible server that loads LoRA adapters at runtime
    (`POST /v1/load_lora_adapter`; vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, SGLang). Requests go
    through `rewards.llm_engine.LLMEngine`'s client and retry policy (429/5xx/timeouts with backoff and
    Retry-After), `concurrency` at a time, never cached: samples must be fresh."""

    def __init__(self, *, base_url: str, api_key_env: str = "OPENAI_API_KEY", adapter_dir: str | None = None,
                 concurrency: int = 64, timeout: float = 600.0, max_retries: int = 6, backoff_base: float = 1.0):
        from .rewards.llm_engine import EngineConfig, LLMEngine

        # the engine's model name is the adapter's, set per call; cache_path=None: nothing is cached
        self.engine = LLMEngine(EngineConfig(base_url=base_url, model="stepdpo-adapter", api_key_env=api_key_env,
                                             concurrency=concurrency, timeout=timeout, max_retries=max_retries,
                                             backoff_base=backoff_base, cache_path=None, progress=False),
                                desc="generation", where="generation")
        self.adapters = AdapterVersions(adapter_dir, "generation")
        self.loaded: str | None = None

    def generate(self, model, tokenizer, prompts, *, max_new_tokens, batch_size, do_sample=False, temperature=1.0,
                 top_p=1.0, num_return_sequences=1, seed=0, stop=None) -> list[list[Completion]]:
        from .rewards.llm_engine import run_sync

        name, _, path = self.adapters.save(model)
        eos, stop = eos_ids(model, tokenizer), [s for s in (stop or []) if s]
        bodies = [{"model": name, "prompt": prompt_ids(tokenizer, p), "n": num_return_sequences,
                   "max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0,
                   "top_p": top_p if do_sample else 1.0, "seed": prompt_seed(seed, i, num_return_sequences),
                   "logprobs": None, "stop": stop or None, "stop_token_ids": eos, "return_token_ids": True,
                   **NEUTRAL_SAMPLING}
                  for i, p in enumerate(prompts)]
        try:
            resps = run_sync(lambda: self._run(name, str(path), bodies))
        except Exception as e:  # the engine's final failure after its retries: name the server and the reason
            if type(e).__name__ != "_Failure":
                raise
            raise RuntimeError(f"generation: {self.engine.base_url} failed after {self.engine.max_retries} retries: "
                               f"{e.reason}: {e.snippet}") from None
        out = []
        for body, resp in zip(bodies, resps):
            choices = sorted(resp.get("choices") or [], key=lambda c: c.get("index", 0))
            if len(choices) != num_return_sequences:
                raise ValueError(f"generation: {self.engine.base_url} returned {len(choices)} choices for n="
                                 f"{num_return_sequences}: {str(resp)[:200]}")
            out.append([completion_from(tokenizer, c.get("text") or "", c.get("token_ids"), c.get("finish_reason"),
                                        set(eos), stop) for c in choices])
        return out

    async def _run(self, name: str, path: str, bodies: list[dict]) -> list[dict]:
        from .rewards.llm_engine import FatalAPIError

        eng = self.engine
        async with eng._client() as client:  # the engine's client: its key handling, timeout, no SDK retries
            post = lambda route, body, cast=dict: eng._retrying(  # noqa: E731  (the engine's backoff policy)
                lambda: client.post(route, body=body, cast_to=cast))
            if name != self.loaded:  # unchanged weights keep their version, loaded already
                await post("/load_lora_adapter", {"lora_name": name, "lora_path": path}, str)
                if self.loaded:  # the previous version is no longer needed; a server that can't unload is no error
                    try:
                        await post("/unload_lora_adapter", {"lora_name": self.loaded}, str)
                    except Exception:
                        pass
                self.loaded = name
                self.adapters.prune()
            gate, reload = asyncio.Semaphore(eng.concurrency), asyncio.Lock()
            reloaded = False

            async def one(body):
                nonlocal reloaded
                async with gate:
                    try:
                        return await post("/completions", body)
                    except FatalAPIError as e:  # 404: the server forgot the adapter (restarted since it loaded it)
                        if e.status != 404:
                            raise
                async with reload:  # load it again, once for every request that found it gone
                    if not reloaded:
                        await post("/load_lora_adapter", {"lora_name": name, "lora_path": path}, str)
                        reloaded = True
                async with gate:
                    return await post("/completions", body)  # a second 404 is the server's answer: fatal

            return await asyncio.gather(*(one(b) for b in bodies))
