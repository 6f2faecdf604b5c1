#!/usr/bin/env python
"""Benchmark stepdpo's training loop against TRL's DPOTrainer: same model, data, batch, LoRA.

Offline setup, once (a small Llama from a config saved with save_pretrained, a byte-level BPE
tokenizer trained locally on GSM8K, and GSM8K pairs: gold solution chosen, a perturbed one
rejected, with per-step scores):

    python scripts/bench_train.py --make-model /tmp/bench/model [--vocab 128256] \
        --make-pairs /tmp/bench/pairs.jsonl

Throughput and memory (one JSON line): every run is its own subprocess, so peak RSS is per
run; the variants run interleaved, --repeats times each (so load on a shared machine hits them
alike), and each reports the median, min and max over its repeats; ratios are of medians:

    python scripts/bench_train.py --model-dir /tmp/bench/model --pairs /tmp/bench/pairs.jsonl \
        --steps 10 --batch-size 4 --max-length 512 --impl all --repeats 3 [--precompute-ref] [--threads 1]

Variants (--impl, comma-separated, or `both` = stepdpo,trl, `all` = stepdpo,trl,trl_grouped):
- stepdpo: `stepdpo.train.train`; its batches are length-grouped (`batching.length_grouped_batches`)
  and packed (trainer.pack: one sequence per pair, the prompt and the sides' shared tokens once).
- stepdpo_unpacked: the same with trainer.pack=false (each side its own row, as TRL runs them).
- trl: TRL's DPOTrainer with its defaults (random sampler: batches of unrelated lengths, padded).
- trl_grouped: the same with `train_sampling_strategy="group_by_length"` (transformers'
  LengthGroupedSampler over a `length` column = prompt + longer response tokens; TRL 1.16's
  `padding_free` is disabled in DPO, so this is its best batching). `remove_unused_columns=False`
  keeps the length column up to the sampler (TRL's collator reads only its own keys).
`ratio` compares stepdpo with every TRL variant run, and with `trl_best`, the TRL variant of
highest median tokens/s. pad_fraction = padded positions / all positions the model ran on.

Log-prob memory (extra memory of the log-prob step relative to the logits tensor, at vocab 128k):

    python scripts/bench_train.py --mode logp-memory [--vocab 128256]

tokens/s counts non-padding tokens of the chosen and rejected sequences (prompt included, on each
side, however many of them the model actually runs on: `run_fraction` says that share) over
the steps after the first (warm-up), so data preparation and reference precomputation are not
in it (reported as setup_s). TRL runs with its own defaults (DPOConfig: gradient checkpointing,
fused LM head, logging every 10 steps); only batch size, max_length, steps, lr, beta, the LoRA
config and the precision are set, to the same values stepdpo uses. The precision is `--precision`
(auto: bf16 only where bf16 matmuls are native; TRL's own default, bf16 everywhere, runs ~100x
slower than fp32 on an AVX2-only CPU, which would make a meaningless baseline); --trl-arg KEY=JSON overrides
any DPOConfig field (including those, e.g. precompute_ref_log_probs or gradient_checkpointing).
The `bench` extra pins the TRL version these numbers are quoted for (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
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
            rows.append({**row, "length": n_p + n_r})  # the longer side's tokens: a padded row's length
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no pair fits --max-length {max_length}")
    return rows


def encode_rows(rows: list[dict], tok, weighting: str):
    """Rows -> stepdpo Examples, tokenized as TRL does (prompt with the tokenizer's BOS template;
    responses without special tokens, EOS appended); token weights from `weights.token_weights`."""
    from stepdpo.batching import Example
    from stepdpo.data import StepPair
    from stepdpo.weights import token_weights

    def side(text: str):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]) + [tok.eos_token_id], list(enc["offset_mapping"]) + [(len(text), len(text))]

    out = []
    for i, r in enumerate(rows):
        pair = StepPair(id=str(i), question="", answer="", prefix=[], chosen=r["chosen"].split("\n"),
                        rejected=r["rejected"].split("\n"), chosen_scores=r.get("chosen_scores"),
                        rejected_scores=r.get("rejected_scores"))
        (c_ids, c_off), (r_ids, r_off) = side(r["chosen"]), side(r["rejected"])
        w = token_weights(pair, (c_off, r_off), weighting)
        out.append(Example(list(tok(r["prompt"])["input_ids"]), c_ids, r_ids, w.chosen, w.rejected,
                           w.chosen_focus, w.rejected_focus))
    return out


def _throughput(times: list[float], tokens: list[int]) -> float:
    """Tokens per second over steps 2..N (step 1 is warm-up)."""
    if len(times) < 2:
        return float("nan")
    return sum(tokens[1:]) / (times[-1] - times[0])


# ----------------------------------------------------------------------------- implementations


def run_stepdpo(a, pack: bool = True) -> dict:
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
                        ref_cache_dir=cache, gradient_checkpointing=a.gradient_checkpointing, pack=pack,
                        cpu_primitive_cache=a.cpu_primitive_cache, cpu_mmap_threshold_mb=a.cpu_mmap_threshold_mb,
                        pad_to_multiple_of=a.pad_to_multiple_of)

    class Recorder:  # the loop logs every step; keep the time and the numbers
        def __init__(self):
            self.times, self.tokens, self.run, self.padded, self.losses = [], [], [], [], []

        def log(self, m, step):
            self.times.append(time.perf_counter())
            self.tokens.append(int(m["train/tokens/pairs"]))  # the pairs' tokens, as TRL counts them
            self.run.append(int(m["train/tokens/nonpad"]))  # the positions the model ran on (fewer, packed)
            self.padded.append(int(m["train/tokens/padded"]))
            self.losses.append(float(m["train/loss"]))

    rec = Recorder()
    t0 = time.perf_counter()
    try:
        train(cfg, policy, tok, examples, rec, ref_model=ref, seed=a.seed, prefix="train")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    t1 = time.perf_counter()
    first_step = rec.times[0] - t0  # includes the reference precompute, when on
    return {"impl": "stepdpo" if pack else "stepdpo_unpacked", "tokens_per_s": _throughput(rec.times, rec.tokens),
            "peak_rss_mb": peak_rss_mb(), "final_loss": rec.losses[-1], "losses": rec.losses, "tokens": sum(rec.tokens),
            "run_fraction": round(sum(rec.run) / sum(rec.tokens), 4), "pairs": len(examples),
            "pad_fraction": round(1 - sum(rec.run) / sum(rec.padded), 4),
            "setup_s": round(t0 - t_setup + first_step, 3), "train_s": round(t1 - t0, 3),
            "precision": a.precision, "gradient_checkpointing": a.gradient_checkpointing}


def run_trl(a, grouped: bool = False) -> dict:
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
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected", "length")} for r in rows])
    out = tempfile.mkdtemp(prefix="bench-trl-")
    kw = dict(output_dir=out, per_device_train_batch_size=a.batch_size, max_steps=a.steps, max_length=a.max_length,
              learning_rate=a.lr, beta=a.beta, report_to="none", save_strategy="no", seed=a.seed,
              precompute_ref_log_probs=a.precompute_ref, disable_tqdm=True,
              use_cpu=not torch.cuda.is_available())  # bf16 on CPU needs use_cpu
    if grouped:  # transformers' LengthGroupedSampler reads the `length` column, which must reach it
        kw.update(train_sampling_strategy="group_by_length", length_column_name="length", remove_unused_columns=False)
    args = DPOConfig(**{**kw, **a.trl_args})  # --trl-arg overrides any of these (no duplicate keyword)
    lora = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM", bias="none")
    times: list[float] = []
    tokens: list[int] = []
    padded: list[int] = []
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
        padded.append(batch["attention_mask"].numel())
        return batch

    trainer.data_collator = counting
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    t1 = time.perf_counter()
    n = len(times)
    return {"impl": "trl_grouped" if grouped else "trl", "trl_version": trl.__version__,
            "tokens_per_s": _throughput(times, tokens[:n]),
            "pad_fraction": round(1 - sum(tokens[:n]) / sum(padded[:n]), 4),
            "peak_rss_mb": peak_rss_mb(), "final_loss": losses[-1] if losses else None, "losses": losses,
            "tokens": sum(tokens[:len(times)]), "pairs": len(rows), "setup_s": round(t0 - t_setup + (times[0] - t0), 3),
            "train_s": round(t1 - t0, 3), "bf16": bool(args.bf16),
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "train_sampling_strategy": str(args.train_sampling_strategy)}


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

    - stepdpo_head: the loop's step (logprobs.flat_logps_from_head): LM-head GEMM + gather + chunked
      fp32 logsumexp over M response positions; relative to its own (M, V) logits buffer.
    - token_logps: logprobs.logps_from_logits on full (N, T, V) model logits; relative to those logits.
    - naive: log_softmax(logits.float()).gather(...), for contrast.
    `*_fwd` is the peak of a forward that keeps what backward needs; `*_bwd` the peak of the
    backward, not counting the gradient w.r.t. the logits (a tensor the size of the logits that any
    method outside a fused head has to produce).
    """
    import torch

    from stepdpo.logprobs import flat_logps_from_head, logps_from_logits

    torch.manual_seed(0)
    V, H, N, T = a.vocab, a.hidden, a.rows, a.seq
    res: dict = {"vocab": V, "hidden": H, "rows": N, "seq": T}
    for dt in (torch.float32, torch.bfloat16):
        name = "fp32" if dt == torch.float32 else "bf16"
        labels = torch.randint(0, V, (N, T))
        labels[:, : T // 4] = -100
        logits = torch.randn(N, T, V, dtype=dt, requires_grad=True)
        size = logits.numel() * logits.element_size()
        for what, fn in (("token_logps", lambda: logps_from_logits(logits, labels)),
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
                return flat_logps_from_head(h, W, None, tgt)

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


VARIANTS = {"stepdpo": run_stepdpo, "stepdpo_unpacked": lambda a: run_stepdpo(a, pack=False), "trl": run_trl,
            "trl_grouped": lambda a: run_trl(a, grouped=True)}


def summarize(runs: list[dict]) -> dict:
    """The repeats of one variant -> their fields (from the first run) with tokens_per_s,
    peak_rss_mb, setup_s, train_s as medians, plus `<field>_range` = [min, max] and each run's value."""
    out = {k: v for k, v in runs[0].items() if k != "losses"}
    out["repeats"] = len(runs)
    for k in ("tokens_per_s", "peak_rss_mb", "setup_s", "train_s"):
        vals = [r[k] for r in runs]
        out[k] = round(statistics.median(vals), 3)
        out[f"{k}_range"] = [round(min(vals), 3), round(max(vals), 3)]
        out[f"{k}_runs"] = [round(v, 3) for v in vals]
    return out


def parse(argv=None):
    from stepdpo.config import TrainerConfig

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
    p.add_argument("--impl", default="stepdpo",
                   help="comma-separated variants among stepdpo, stepdpo_unpacked, trl, trl_grouped; "
                        "both = stepdpo,trl; all = stepdpo,trl,trl_grouped")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant (interleaved); medians reported")
    p.add_argument("--precompute-ref", action="store_true")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast precision of both trainers (TRL's `bf16` field too, unless --trl-arg bf16=... "
                        "sets it): auto = bf16 where bf16 matmuls are native (a GPU, or a CPU with "
                        "AVX512-BF16/AMX), else fp32 (on an AVX2 CPU bf16 matmuls run ~100x slower)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="stepdpo: recompute activations")
    p.add_argument("--weighting", default="uniform", help="stepdpo token weighting (uniform = standard DPO)")
    p.add_argument("--cpu-primitive-cache", type=int, default=TrainerConfig.cpu_primitive_cache,
                   help="stepdpo: trainer.cpu_primitive_cache (0 = oneDNN's default)")
    p.add_argument("--cpu-mmap-threshold-mb", type=float, default=TrainerConfig.cpu_mmap_threshold_mb,
                   help="stepdpo: trainer.cpu_mmap_threshold_mb (0 = glibc's default)")
    p.add_argument("--pad-to-multiple-of", type=int, default=None,
                   help="stepdpo: trainer.pad_to_multiple_of (default: 32 for bf16 on CPU, else 1)")
    p.add_argument("--bound-trl", action="store_true",
                   help="run TRL with the same CPU memory bounds (through ONEDNN_PRIMITIVE_CACHE_CAPACITY and "
                        "MALLOC_MMAP_THRESHOLD_), to see what they do for it")
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
    a.impls = {"both": ["stepdpo", "trl"], "all": ["stepdpo", "trl", "trl_grouped"]}.get(a.impl, a.impl.split(","))
    unknown = [v for v in a.impls if v not in VARIANTS]
    if unknown:
        p.error(f"--impl: unknown {unknown}; choose among {list(VARIANTS)}, both, all")
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.precision == "auto":
        import torch

        from stepdpo.train import native_bf16

        a.precision = "bf16" if native_bf16(torch.device("cuda" if torch.cuda.is_available() else "cpu")) else "fp32"
    a.trl_args = {"bf16": a.precision == "bf16"}  # the same precision for both trainers, unless overridden
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
    if a.child or (len(a.impls) == 1 and a.repeats == 1):  # one run of one variant, in this process
        import torch

        res = VARIANTS[a.impls[0]](a)
        res.update(steps=a.steps, batch_size=a.batch_size, max_length=a.max_length, precompute_ref=a.precompute_ref,
                   threads=torch.get_num_threads())
        print(json.dumps(res), flush=True)
        return 0
    argv = [x for x in (sys.argv[1:] if argv is None else argv)]
    runs: dict[str, list[dict]] = {v: [] for v in a.impls}
    for _ in range(a.repeats):  # interleaved: a burst of load from other jobs hits every variant alike
        for impl in a.impls:
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--impl", impl, "--child"]
            env = dict(os.environ)
            if a.bound_trl and impl.startswith("trl"):
                if a.cpu_primitive_cache > 0:
                    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(a.cpu_primitive_cache)
                if a.cpu_mmap_threshold_mb > 0:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(int(a.cpu_mmap_threshold_mb * 2**20))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"bench: the {impl} run failed (exit {proc.returncode})")
            runs[impl].append(json.loads(lines[-1]))
            print(f"bench: {impl} run {len(runs[impl])}/{a.repeats}: {lines[-1]}", file=sys.stderr, flush=True)
    res = {impl: summarize(rs) for impl, rs in runs.items()}
    if len(a.impls) == 1:  # one variant: its summary, plus its last run's losses
        print(json.dumps({**res[a.impls[0]], "losses": runs[a.impls[0]][-1]["losses"]}))
        return 0
    trls = [v for v in a.impls if v.startswith("trl")]
    if "stepdpo" in res and trls:
        s = res["stepdpo"]
        best = max(trls, key=lambda v: res[v]["tokens_per_s"])
        ratio = {v: {"tokens_per_s": round(s["tokens_per_s"] / res[v]["tokens_per_s"], 3),
                     "peak_rss": round(s["peak_rss_mb"] / res[v]["peak_rss_mb"], 3)} for v in trls}
        res.update(ratio={**ratio, "trl_best": {"variant": best, **ratio[best]}},
                   targets={"tokens_per_s": 5.0, "peak_rss": 0.35})
    if "stepdpo" in res and "stepdpo_unpacked" in res:  # what packing gains, in the same run
        res.setdefault("ratio", {})["packed_over_unpacked"] = round(
            res["stepdpo"]["tokens_per_s"] / res["stepdpo_unpacked"]["tokens_per_s"], 3)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
