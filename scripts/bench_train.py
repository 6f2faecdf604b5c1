#!/usr/bin/env python
"""Benchmark stepdpo's training loop against TRL's DPOTrainer: same model, data, batch, LoRA.

Offline setup, once (a small Llama from a config saved with save_pretrained, a byte-level BPE
tokenizer trained locally on GSM8K, and GSM8K pairs: gold solution chosen, a perturbed one
rejected, with per-step scores):

    python scripts/bench_train.py --make-model /tmp/bench/model [--vocab 128256] \
        --make-pairs /tmp/bench/pairs.jsonl

Throughput and memory (one JSON line; with --impl both each implementation runs in its own
subprocess, so peak RSS is per implementation, and the ratios stepdpo/trl are printed):

    python scripts/bench_train.py --model-dir /tmp/bench/model --pairs /tmp/bench/pairs.jsonl \
        --steps 10 --batch-size 4 --max-length 512 --impl both [--precompute-ref]

Log-prob memory (extra memory of the log-prob step relative to the logits tensor, at vocab 128k):

    python scripts/bench_train.py --mode logp-memory [--vocab 128256]

tokens/s counts non-padding tokens of the chosen and rejected sequences (prompt included) over
the steps after the first (warm-up), so data preparation and reference precomputation are not
in it (reported as setup_s). TRL runs with its own defaults (DPOConfig: bf16 autocast, gradient
checkpointing, fused LM head, logging every 10 steps); only batch size, max_length, steps, lr,
beta and the LoRA config are set, to the same values stepdpo uses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- setup helpers


def make_model(out: str, *, vocab: int = 32000, hidden: int = 512, layers: int = 4, heads: int = 8,
               intermediate: int | None = None, tokenizer_vocab: int = 8000, seed: int = 0) -> Path:
    """A random-init Llama saved with save_pretrained, plus a byte-level BPE tokenizer trained on
    GSM8K train text (no download). The model's vocab may exceed the tokenizer's (e.g. 128256, to
    give the LM head a Llama-3-sized cost)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    with open(GSM8K / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(tokenizer_vocab, vocab), special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
    ])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or int(hidden * 2.6875),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    out_p = Path(out)
    model.save_pretrained(out_p)
    tok.save_pretrained(out_p)
    return out_p


def make_pairs(out: str, *, n: int = 512, seed: int = 0) -> Path:
    """GSM8K pairs: prompt = the question, chosen = the gold solution, rejected = the same solution
    with one arithmetic step corrupted and the error carried through (stepdpo.perturb).
    Per-step scores: chosen all 1; rejected 1 before the corrupted step, 0 from it on."""
    from stepdpo.data import format_prompt, response_text, write_jsonl
    from stepdpo.datasets.gsm8k import load
    from stepdpo.perturb import build_perturb_pairs

    bundle = load(path=str(GSM8K), n_train=None, n_eval=0, seed=seed, strip_annotations=True)
    pairs, _ = build_perturb_pairs(bundle.train, seed=seed, max_pairs=n)
    rows = []
    for p in pairs:
        rej_steps = p.prefix + p.rejected
        rows.append({"prompt": format_prompt(p.question), "chosen": response_text(p.prefix + p.chosen),
                     "rejected": response_text(rej_steps), "chosen_scores": [1.0] * (len(p.prefix) + len(p.chosen)),
                     "rejected_scores": [1.0] * len(p.prefix) + list(p.rejected_scores)})
    write_jsonl(out, rows)
    return Path(out)


def read_pairs(path: str, tok, max_length: int, limit: int | None = None) -> list[dict]:
    """Rows whose prompt + longer response (+ EOS) fit max_length: both implementations train on
    exactly these, untruncated."""
    from stepdpo.data import read_jsonl

    rows = []
    for where, row in read_jsonl(path):
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(k), str) or not row[k]:
                raise ValueError(f"{path}:{where}: field {k!r} must be a non-empty string")
        n_p = len(tok(row["prompt"])["input_ids"])
        n_r = max(len(tok(row[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected")) + 1
        if n_p + n_r <= max_length:
            rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no pair fits --max-length {max_length}")
    return rows


def encode_rows(rows: list[dict], tok, weighting: str):
    """Rows -> stepdpo Examples, tokenized as TRL does (prompt with the tokenizer's BOS template;
    responses without special tokens, EOS appended); step weights through the token offsets."""
    from stepdpo.batching import Example
    from stepdpo.data import step_spans
    from stepdpo.weights import first_error, get_scheme, step_token_weights

    def side(text: str, step_w: list[float]):
        steps = text.split("\n")
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"]) + [tok.eos_token_id]
        offsets = list(enc["offset_mapping"]) + [(len(text), len(text))]
        return ids, offsets, steps, step_token_weights(offsets, step_spans(steps), step_w)

    out = []
    for r in rows:
        n_c, n_r = len(r["chosen"].split("\n")), len(r["rejected"].split("\n"))
        cs = r.get("chosen_scores") or [1.0] * n_c
        rs = r.get("rejected_scores") or [0.0] * n_r
        cw, rw = get_scheme(weighting)(cs, rs)
        cf, rf = first_error(cs, rs)
        c_ids, c_off, c_steps, c_w = side(r["chosen"], cw)
        r_ids, r_off, r_steps, r_w = side(r["rejected"], rw)
        out.append(Example(list(tok(r["prompt"])["input_ids"]), c_ids, r_ids, c_w, r_w,
                           step_token_weights(c_off, step_spans(c_steps), cf),
                           step_token_weights(r_off, step_spans(r_steps), rf)))
    return out


def _throughput(times: list[float], tokens: list[int]) -> float:
    """Tokens per second over steps 2..N (step 1 is warm-up)."""
    if len(times) < 2:
        return float("nan")
    return sum(tokens[1:]) / (times[-1] - times[0])


# ----------------------------------------------------------------------------- implementations


def run_stepdpo(a) -> dict:
    import torch

    from stepdpo.config import TrainerConfig
    from stepdpo.model import LoraSpec, ModelSpec, add_lora, load_base
    from stepdpo.train import train

    t_setup = time.perf_counter()
    torch.manual_seed(a.seed)
    model, tok = load_base(ModelSpec(name="bench", path=a.model_dir, local_files_only=True))
    examples = encode_rows(read_pairs(a.pairs, tok, a.max_length, a.limit), tok, a.weighting)
    policy, ref = add_lora(model, LoraSpec(name="lora", r=a.lora_r, alpha=a.lora_alpha, dropout=0.0,
                                           target_modules="all-linear"),
                           gradient_checkpointing=a.gradient_checkpointing)
    cache = tempfile.mkdtemp(prefix="bench-refcache-")  # fresh: the precompute is really computed
    cfg = TrainerConfig(loss="dpo", weighting=a.weighting, beta=a.beta, lr=a.lr, schedule="linear", warmup_steps=0,
                        min_lr_ratio=0.0, max_steps=a.steps, batch_size=a.batch_size, max_length=a.max_length,
                        precision=a.precision, device="cpu", log_every=1, precompute_ref=a.precompute_ref,
                        ref_cache_dir=cache, gradient_checkpointing=a.gradient_checkpointing)

    class Recorder:  # the loop logs every step; keep the time and the numbers
        def __init__(self):
            self.times, self.tokens, self.losses = [], [], []

        def log(self, m, step):
            self.times.append(time.perf_counter())
            self.tokens.append(int(m["train/tokens/nonpad"]))
            self.losses.append(float(m["train/loss"]))

    rec = Recorder()
    t0 = time.perf_counter()
    train(cfg, policy, tok, examples, rec, ref_model=ref, seed=a.seed, prefix="train")
    t1 = time.perf_counter()
    first_step = rec.times[0] - t0  # includes the reference precompute, when on
    return {"impl": "stepdpo", "tokens_per_s": _throughput(rec.times, rec.tokens), "peak_rss_mb": peak_rss_mb(),
            "final_loss": rec.losses[-1], "losses": rec.losses, "tokens": sum(rec.tokens), "pairs": len(examples),
            "setup_s": round(t0 - t_setup + first_step, 3), "train_s": round(t1 - t0, 3),
            "precision": a.precision, "gradient_checkpointing": a.gradient_checkpointing}


def run_trl(a) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    t_setup = time.perf_counter()
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    rows = read_pairs(a.pairs, tok, a.max_length, a.limit)
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    out = tempfile.mkdtemp(prefix="bench-trl-")
    args = DPOConfig(output_dir=out, per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                     max_length=a.max_length, learning_rate=a.lr, beta=a.beta, report_to="none", save_strategy="no",
                     seed=a.seed, precompute_ref_log_probs=a.precompute_ref, disable_tqdm=True,
                     use_cpu=not torch.cuda.is_available(), **a.trl_args)  # bf16 on CPU needs use_cpu
    lora = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM", bias="none")
    times: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    class Recording(DPOTrainer):  # read the loss the trainer computes anyway (no extra work)
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            res = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            losses.append(float((res[0] if return_outputs else res).detach()))
            return res

    trainer = Recording(model=a.model_dir, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                        callbacks=[Steps()])
    collate = trainer.data_collator

    def counting(examples):  # non-padding tokens of every training batch, in order
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    t0 = time.perf_counter()
    trainer.train()
    t1 = time.perf_counter()
    return {"impl": "trl", "trl_version": trl.__version__, "tokens_per_s": _throughput(times, tokens[:len(times)]),
            "peak_rss_mb": peak_rss_mb(), "final_loss": losses[-1] if losses else None, "losses": losses,
            "tokens": sum(tokens[:len(times)]), "pairs": len(rows), "setup_s": round(t0 - t_setup + (times[0] - t0), 3),
            "train_s": round(t1 - t0, 3), "bf16": bool(args.bf16),
            "gradient_checkpointing": bool(args.gradient_checkpointing)}


# ----------------------------------------------------------------------------- log-prob memory


def _peak_alloc(fn) -> tuple[int, object]:
    """Peak bytes allocated (above the start) while fn runs, from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        res = fn()
    events = []

    def walk(n):
        if n.typed[0] == _EventType.Allocation:
            events.append((n.start_time_ns, n.typed[1].alloc_size))
        for c in n.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    cur = peak = 0
    for _, size in sorted(events):
        cur += size
        peak = max(peak, cur)
    return peak, res


def logp_memory(a) -> dict:
    """Extra memory of the log-prob step relative to the logits it works on, forward and backward.

    - stepdpo_head: the loop's step (train._HeadLogps): LM-head GEMM + gather + chunked fp32
      logsumexp over M response positions; relative to its own (M, V) logits buffer.
    - token_logps: loss.token_logps on full (N, T, V) model logits; relative to those logits.
    - naive: log_softmax(logits.float()).gather(...), for contrast.
    `*_fwd` is the peak of a forward that keeps what backward needs; `*_bwd` the peak of the
    backward, not counting the gradient w.r.t. the logits (a tensor the size of the logits that any
    method outside a fused head has to produce).
    """
    import torch

    from stepdpo.loss import token_logps
    from stepdpo.train import _HeadLogps

    torch.manual_seed(0)
    V, H, N, T = a.vocab, a.hidden, a.rows, a.seq
    res: dict = {"vocab": V, "hidden": H, "rows": N, "seq": T}
    for dt in (torch.float32, torch.bfloat16):
        name = "fp32" if dt == torch.float32 else "bf16"
        labels = torch.randint(0, V, (N, T))
        labels[:, : T // 4] = -100
        logits = torch.randn(N, T, V, dtype=dt, requires_grad=True)
        size = logits.numel() * logits.element_size()
        for what, fn in (("token_logps", lambda: token_logps(logits, labels)),
                         ("naive", lambda: torch.log_softmax(logits[:, :-1].float(), -1).gather(
                             2, labels[:, 1:].clamp_min(0)[..., None]).squeeze(-1))):
            with torch.no_grad():
                peak_ng, _ = _peak_alloc(fn)
            peak_f, out = _peak_alloc(fn)
            g = torch.randn_like(out)
            peak_b, _ = _peak_alloc(lambda: torch.autograd.grad(out, logits, g))
            res[f"{what}_{name}"] = {"logits_mb": round(size / 2**20, 1), "nograd": round(1 + peak_ng / size, 3),
                                     "fwd": round(1 + peak_f / size, 3), "bwd": round(1 + (peak_b - size) / size, 3)}
            del out, g
        del logits
        M = N * (T - 1) - N * (T // 4 - 1)  # the same response positions
        h = torch.randn(M, H, dtype=torch.float32, requires_grad=True)
        W = torch.randn(V, H, dtype=dt) * 0.02
        tgt = torch.randint(0, V, (M,))
        size = M * V * (2 if dt == torch.bfloat16 else 4)

        def head():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
                return _HeadLogps.apply(h, W, None, tgt)

        with torch.no_grad():
            peak_ng, _ = _peak_alloc(head)
        peak_f, out = _peak_alloc(head)
        g = torch.randn_like(out)
        peak_b, _ = _peak_alloc(lambda: torch.autograd.grad(out, h, g))
        # the forward's (M, V) buffer is the logits tensor; bwd: no logits-gradient tensor exists
        res[f"stepdpo_head_{name}"] = {"logits_mb": round(size / 2**20, 1), "nograd": round(peak_ng / size, 3),
                                       "fwd": round(peak_f / size, 3), "bwd": round(1 + peak_b / size, 3)}
    res["target"] = 1.25
    return res


# ----------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make-model", metavar="DIR", help="write a benchmark model + tokenizer to DIR and exit")
    p.add_argument("--make-pairs", metavar="FILE", help="write GSM8K benchmark pairs to FILE and exit")
    p.add_argument("--n-pairs", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000, help="model vocab (128256 = Llama-3-sized head)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--mode", choices=("train", "logp-memory"), default="train")
    p.add_argument("--rows", type=int, default=8, help="logp-memory: sequences")
    p.add_argument("--seq", type=int, default=256, help="logp-memory: tokens per sequence")
    p.add_argument("--model-dir")
    p.add_argument("--pairs")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (2x sequences)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="use at most this many pairs")
    p.add_argument("--impl", choices=("stepdpo", "trl", "both"), default="stepdpo")
    p.add_argument("--precompute-ref", action="store_true")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="stepdpo autocast precision (TRL's default on this hardware is bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="stepdpo: recompute activations")
    p.add_argument("--weighting", default="uniform", help="stepdpo token weighting (uniform = standard DPO)")
    p.add_argument("--trl-arg", action="append", default=[], metavar="KEY=JSON",
                   help="override a DPOConfig field (default: none; TRL's defaults are the baseline)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads for both implementations (default: torch's). On a shared machine "
                        "1 avoids OpenMP threads waiting on descheduled siblings, which swamps the measurement")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.trl_args = {}
    for kv in a.trl_arg:
        k, _, v = kv.partition("=")
        a.trl_args[k] = json.loads(v)
    return p, a


def main(argv=None) -> int:
    p, a = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
        torch.set_num_threads(a.threads)
    if a.make_model or a.make_pairs:
        done = {}
        if a.make_model:
            done["model_dir"] = str(make_model(a.make_model, vocab=a.vocab, hidden=a.hidden, layers=a.layers))
        if a.make_pairs:
            done["pairs"] = str(make_pairs(a.make_pairs, n=a.n_pairs, seed=a.seed))
        print(json.dumps(done))
        return 0
    if a.mode == "logp-memory":
        print(json.dumps(logp_memory(a)))
        return 0
    if not (a.model_dir and a.pairs):
        p.error("--model-dir and --pairs are required (make them with --make-model / --make-pairs)")
    if a.impl != "both":
        res = run_stepdpo(a) if a.impl == "stepdpo" else run_trl(a)
        import torch

        res.update(steps=a.steps, batch_size=a.batch_size, max_length=a.max_length, precompute_ref=a.precompute_ref,
                   threads=torch.get_num_threads())
        print(json.dumps(res), flush=True)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    results = {}
    for impl in ("stepdpo", "trl"):
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--impl", impl, "--child"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"bench: the {impl} run failed (exit {proc.returncode})")
        results[impl] = json.loads(lines[-1])
    s, t = results["stepdpo"], results["trl"]
    for r in (s, t):
        r.pop("losses", None)
    print(json.dumps({**results, "ratio": {"tokens_per_s": round(s["tokens_per_s"] / t["tokens_per_s"], 3),
                                           "peak_rss": round(s["peak_rss_mb"] / t["peak_rss_mb"], 3)},
                      "targets": {"tokens_per_s": 1.2 if a.precompute_ref else 1.5, "peak_rss": 0.8}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
