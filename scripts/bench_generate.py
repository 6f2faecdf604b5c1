#!/usr/bin/env python
"""Benchmark stepdpo's generation (`stepdpo.generation.generate`) against plain `model.generate`.

    python scripts/bench_generate.py [--threads 2] [--repeats 3] [--n-problems 64] [--n-eval N]
                                     [--sft-steps 300] [--model-dir DIR] [--lora] [--k K] [--batch-size N]

Two workloads, at the settings the experiment uses (read from the conf/ files, printed in "settings"):
(a) on-policy sampling: conf/experiment/stepwise_vs_dpo.yaml's pairs.k / pairs.temperature over
    conf/pairs/on_policy.yaml (top_p, max_new_tokens, batch_size), on `--n-problems` arith train problems;
(b) greedy evaluation: conf/eval/default.yaml (max_new_tokens, batch_size) on `--n-eval` arith eval problems
(default: conf/dataset/arith.yaml's n_eval, the run's own evaluation: 500 problems, 8 batches of 64).
The model is conf/model/tiny.yaml's Llama, random init then `--sft-steps` steps of SFT on the arith
gold solutions (so that samples end at EOS as a trained policy's do), or `--model-dir` (e.g. an
SFT cache entry) loaded with from_pretrained. `--lora` wraps it in conf/lora/lora.yaml's adapter (peft, as the
experiment's policy is during training; the adapter's B is random, not zero, so that it acts); `--k` and
`--batch-size` override the sampling workload's k and batch (e.g. `--k 16` for reward=rollout reward.k=16).

The baseline is what stepdpo ran before: prompts sorted longest first, batch_size // k prompts per
`model.generate(..., num_return_sequences=k, do_sample, temperature, top_p, top_k=0)` call, with the
same EOS list. Both run in the same process, alternating, `--repeats` times; tokens/s counts the
generated tokens (EOS and padding excluded) over wall time, samples/s the completions; peak_rss_mb is
the largest resident set seen while that method ran (sampled every 5 ms). greedy_identical: every eval
problem's greedy ids equal. greedy_forward_share: the share of stepdpo's greedy time spent inside the model's
forwards (its forward calls, `generation._prefill_in_chunks` and `generation._decode_step`'s replays of them);
greedy_speedup_bound: generate's greedy time over the time of those forwards, the speedup if everything around
them cost nothing (token identity pins their arithmetic: the same kernels and padding as generate's).
Prints ONE JSON line: medians, [min, max] ranges, speedups of the medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class PeakRSS:
    """Largest resident set size (MB) of this process while the `with` block runs."""

    def __enter__(self):
        self.peak, self._stop = self._now(), threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _now(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._now())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._now())


def settings() -> dict:
    from omegaconf import OmegaConf

    conf = ROOT / "conf"
    ev = OmegaConf.load(conf / "eval/default.yaml")
    pairs = OmegaConf.merge(OmegaConf.load(conf / "pairs/on_policy.yaml"),
                            OmegaConf.load(conf / "experiment/stepwise_vs_dpo.yaml").pairs)
    pairs = OmegaConf.create({"eval": ev, "pairs": pairs}).pairs  # resolves pairs.max_new_tokens: ${eval.max_new_tokens}
    data = OmegaConf.load(conf / "dataset/arith.yaml")
    return {"sampling": {k: pairs[k] for k in ("k", "temperature", "top_p", "max_new_tokens", "batch_size")},
            "greedy": {"max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size},
            "model": dict(OmegaConf.to_container(OmegaConf.load(conf / "model/tiny.yaml").tiny)),
            "dataset": {k: data[k] for k in ("min_ops", "max_ops", "max_operand", "max_multiplier", "max_value", "ops")},
            "n_eval": data.n_eval}


def short_sft(model, tok, problems, steps: int, seed: int) -> float:
    """`steps` AdamW steps (batch 16, lr 3e-3) of next-token loss on gold solutions; returns the last loss."""
    import random

    import torch

    from stepdpo.batching import encode_sft

    exs = [encode_sft(p.question, p.steps, tok) for p in problems if p.steps]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = rng.sample(exs, 16)
        T = max(len(e.prompt_ids) + len(e.chosen_ids) for e in batch)
        ids = torch.full((16, T), tok.pad_token_id)
        labels = torch.full((16, T), -100)
        for r, e in enumerate(batch):
            seq = e.prompt_ids + e.chosen_ids
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, len(e.prompt_ids):len(seq)] = torch.tensor(e.chosen_ids)
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tok.pad_token_id), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def hf_generate(model, tok, prompts, *, k, max_new_tokens, batch_size, do_sample, temperature=1.0, top_p=1.0,
                seed=0) -> list[list[tuple[int, ...]]]:
    """The baseline: stepdpo's generation before this benchmark (model.generate per batch), ids cut at the first EOS."""
    import torch

    from stepdpo.data import prompt_ids
    from stepdpo.generation import eos_ids

    eos = eos_ids(model, tok)
    torch.manual_seed(seed)
    enc = [prompt_ids(tok, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    out: dict[int, list] = {}
    per = max(1, batch_size // k)
    for s in range(0, len(order), per):
        idx = order[s:s + per]
        T = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), T), tok.pad_token_id)
        attn = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, T - len(enc[i]):], attn[r, T - len(enc[i]):] = torch.tensor(enc[i]), 1
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                             top_k=0 if do_sample else None, num_return_sequences=k, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos)
        rows = [r[:next((j for j, t in enumerate(r) if t in eos), len(r))] for r in gen[:, T:].tolist()]
        for r, i in enumerate(idx):
            out[i] = [tuple(x) for x in rows[r * k:(r + 1) * k]]
    return [out[i] for i in range(len(prompts))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-problems", type=int, default=64, help="problems sampled in workload (a), k samples each")
    ap.add_argument("--n-eval", type=int,
                    help="problems decoded greedily in workload (b) (default: the dataset's n_eval)")
    ap.add_argument("--sft-steps", type=int, default=300, help="SFT steps on the random-init tiny model")
    ap.add_argument("--model-dir", help="a saved model + tokenizer (from_pretrained) instead of tiny + short SFT; "
                                        "if DIR does not exist, the SFT'd tiny model is saved there for the next run")
    ap.add_argument("--lora", action="store_true", help="sample and decode through conf/lora/lora.yaml's adapter")
    ap.add_argument("--k", type=int, help="samples per problem in workload (a) (default: the experiment's pairs.k)")
    ap.add_argument("--batch-size", type=int, help="sequences per batch in workload (a) (default: the experiment's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from stepdpo.arith import load
    from stepdpo.data import format_prompt
    from stepdpo.generation import generate
    from stepdpo.model import tiny_llama

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = settings()
    if args.n_eval is None:
        args.n_eval = cfg["n_eval"]
    bundle = load(n_train=2000, n_eval=max(args.n_eval, 1), seed=args.seed, **cfg["dataset"])
    t0 = time.perf_counter()
    if args.model_dir and Path(args.model_dir).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tok = AutoModelForCausalLM.from_pretrained(args.model_dir), AutoTokenizer.from_pretrained(args.model_dir)
        model_desc, sft_loss = f"from_pretrained({args.model_dir})", None
    else:
        model, tok = tiny_llama(**cfg["model"])
        sft_loss = short_sft(model, tok, bundle.train, args.sft_steps, args.seed)
        model_desc = f"conf/model/tiny.yaml, random init + {args.sft_steps} SFT steps (batch 16, lr 3e-3)"
        if args.model_dir:
            model.save_pretrained(args.model_dir)
            tok.save_pretrained(args.model_dir)
    setup_s = time.perf_counter() - t0
    if args.lora:
        from omegaconf import OmegaConf

        from stepdpo.model import LoraSpec, add_lora

        spec = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/lora/lora.yaml"))
        spec.pop("_target_")
        model, _ = add_lora(model, LoraSpec(**spec))
        torch.manual_seed(args.seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        model_desc += f" + LoRA {spec}"
    for key, val in (("k", args.k), ("batch_size", args.batch_size)):
        if val is not None:
            cfg["sampling"][key] = val
    model.eval()
    sample_prompts = [format_prompt(p.question, tok) for p in bundle.train[:args.n_problems]]
    eval_prompts = [format_prompt(p.question, tok) for p in bundle.eval[:args.n_eval]]
    s, g = cfg["sampling"], cfg["greedy"]

    def ours_sampling(rep):
        outs = generate(model, tok, sample_prompts, max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"],
                        do_sample=True, temperature=s["temperature"], top_p=s["top_p"], num_return_sequences=s["k"],
                        seed=args.seed + rep)
        return [[c.token_ids for c in o] for o in outs]

    def hf_sampling(rep):
        return hf_generate(model, tok, sample_prompts, k=s["k"], max_new_tokens=s["max_new_tokens"],
                           batch_size=s["batch_size"], do_sample=True, temperature=s["temperature"], top_p=s["top_p"],
                           seed=args.seed + rep)

    def ours_greedy(rep):
        return [[c.token_ids for c in o] for o in generate(model, tok, eval_prompts, max_new_tokens=g["max_new_tokens"],
                                                            batch_size=g["batch_size"])]

    def hf_greedy(rep):
        return hf_generate(model, tok, eval_prompts, k=1, max_new_tokens=g["max_new_tokens"], batch_size=g["batch_size"],
                           do_sample=False)

    from stepdpo import generation

    class ForwardClock:
        """Wall time inside the model's forwards during a `with`: its top-level forward calls (prefills, and decode
        steps of models `generation._decode_step` does not cover), `_prefill_in_chunks` calls (CPU prefills of large
        batches, through the decoder) and `_decode_step` calls (decode steps replaying the decoder layers, which never
        enter the top-level forward)."""

        def __init__(self):
            self.seconds, self._t = 0.0, None

        def __enter__(self):
            self._saved = {name: getattr(generation, name) for name in ("_decode_step", "_prefill_in_chunks")}

            def timed(fn):
                @functools.wraps(fn)  # keeps the signature that generation reads (`cache`, `logits_to_keep`)
                def call(*a, **kw):
                    t = time.perf_counter()
                    try:
                        return fn(*a, **kw)
                    finally:
                        self.seconds += time.perf_counter() - t
                return call

            for name, fn in self._saved.items():
                setattr(generation, name, timed(fn))
            # the forward wrapped per instance, not hooked: hooks on a causal LM turn stepdpo's decoder replay off
            model.forward = timed(model.forward)
            return self

        def __exit__(self, *exc):
            for name, fn in self._saved.items():
                setattr(generation, name, fn)
            del model.forward

    runs: dict[str, list[dict]] = {name: [] for name in ("sampling_ours", "sampling_hf", "greedy_ours", "greedy_hf")}
    fns = {"sampling_ours": ours_sampling, "sampling_hf": hf_sampling, "greedy_ours": ours_greedy, "greedy_hf": hf_greedy}
    identical = True
    for rep in range(args.repeats):
        greedy_out = {}
        for name, fn in fns.items():
            with PeakRSS() as rss, ForwardClock() as fwd:
                t = time.perf_counter()
                outs = fn(rep)
                dt = time.perf_counter() - t
            n_tok = sum(len(x) for o in outs for x in o)
            n_samples = sum(len(o) for o in outs)
            hit_limit = sum(len(x) >= (s if name.startswith("sampling") else g)["max_new_tokens"] for o in outs for x in o)
            runs[name].append({"tokens_per_s": n_tok / dt, "samples_per_s": n_samples / dt, "seconds": dt,
                               "peak_rss_mb": rss.peak, "tokens": n_tok, "samples": n_samples, "hit_limit": hit_limit,
                               "forward_s": fwd.seconds})
            if name.startswith("greedy"):
                greedy_out[name] = outs
        identical &= greedy_out["greedy_ours"] == greedy_out["greedy_hf"]

    def summary(rs):
        keys = ("tokens_per_s", "samples_per_s", "seconds", "peak_rss_mb")
        out = {k: round(statistics.median(r[k] for r in rs), 2) for k in keys}
        out.update({f"{k}_range": [round(min(r[k] for r in rs), 2), round(max(r[k] for r in rs), 2)] for k in keys[:2]})
        out.update(tokens=rs[0]["tokens"], samples=rs[0]["samples"], hit_limit=rs[0]["hit_limit"])
        return out

    res = {name: summary(rs) for name, rs in runs.items()}
    speed = lambda a, b: round(res[a]["tokens_per_s"] / res[b]["tokens_per_s"], 2)  # noqa: E731
    ratios = lambda a, b: [round(x["tokens_per_s"] / y["tokens_per_s"], 2) for x, y in zip(runs[a], runs[b])]  # noqa: E731
    print(json.dumps({
        "sampling_speedup": speed("sampling_ours", "sampling_hf"), "greedy_speedup": speed("greedy_ours", "greedy_hf"),
        "greedy_identical": identical, "sampling_speedup_per_repeat": ratios("sampling_ours", "sampling_hf"),
        "greedy_speedup_per_repeat": ratios("greedy_ours", "greedy_hf"),
        # greedy runs generate's arithmetic (same kernels, same rows and padding; only ended rows dropped): the loop
        # around those forwards could gain at most generate's time over the time of the forwards
        "greedy_forward_share": round(statistics.median(r["forward_s"] / r["seconds"] for r in runs["greedy_ours"]), 3),
        "greedy_speedup_bound": round(statistics.median(bounds := [
            h["seconds"] / o["forward_s"] for o, h in zip(runs["greedy_ours"], runs["greedy_hf"])]), 2),
        "greedy_speedup_bound_per_repeat": [round(b, 2) for b in bounds], **res,
        "settings": {**cfg, "n_problems": args.n_problems, "n_eval": args.n_eval, "threads": args.threads,
                     "repeats": args.repeats, "model_used": model_desc, "sft_last_loss": sft_loss, "setup_s": round(setup_s, 1),
                     "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
