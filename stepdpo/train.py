"""The training loop: one function, nanoGPT/torchtune order. SFT and (stepwise) DPO share it.

seed -> param groups -> optimizer + schedule -> [reference log-probs cache] -> [resume] -> loop:
    global batch -> this rank's micro-batches -> reference log-probs (cache, or a no-grad forward)
    -> policy forward -> loss -> backward (DDP no_sync until the last micro-batch) -> clip -> step
    -> log (rank 0) -> eval -> save (atomic)

Batch arithmetic: one optimizer step consumes one *global batch* of batch_size * grad_accum *
world_size pairs from a stream that is deterministic in (seed, epoch). Micro-batch a of rank r is
global[(a * world + r) * batch_size :][:batch_size]. Each micro-batch's loss is weighted by its share
of the global batch (its pairs for DPO, its response tokens for SFT), so the step minimises the mean
over the global batch however it is split: N processes, or grad_accum micro-batches, trace the loss
curve of one process with the same global batch (up to float summation order). The stream
position is all a checkpoint needs to continue the data exactly (stepdpo/checkpoint.py).

Log-probs: the backbone runs over every token, the LM head only at response positions (labels !=
-100), so no (N, T, V) logits tensor is ever built; see `TokenLogps`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import checkpoint, distributed, progress
from .batching import Example, PreferenceBatch, collate, length_grouped_batches
from .config import TrainerConfig
from .loss import IGNORE, sft_loss, token_logps, weighted_dpo_loss

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    return distributed.local_device(name)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices (dim >= 2), not biases/norms. Only parameters that require grad."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("train: the model has no trainable parameters (check the lora group)")
    return [
        {"params": [p for n, p in named if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(cfg: TrainerConfig, groups: list[dict]) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=1e-8)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kw)
    if cfg.optimizer == "paged_adamw_8bit":  # GPU only: bitsandbytes paged 8-bit AdamW
        if not torch.cuda.is_available():
            raise ValueError("trainer.optimizer=paged_adamw_8bit needs a CUDA GPU; use trainer.optimizer=adamw on CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, **kw)
    raise ValueError(f"trainer.optimizer: unknown {cfg.optimizer!r}; choose adamw or paged_adamw_8bit")


def lr_lambda(cfg: TrainerConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine or linear decay to min_lr_ratio * lr (or constant)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        t = min(1.0, t)
        decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


class BatchStream:
    """Endless stream of global batches (lists of example indices), epoch after epoch.

    Length-grouped (little padding) and deterministic in (seed, epoch); the last incomplete global
    batch of an epoch is dropped so every rank always gets a full micro-batch. `state_dict()` is
    the position (epoch, index): all a checkpoint needs to continue the stream exactly.
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int):
        if len(lengths) < global_batch:
            raise ValueError(f"train: {len(lengths)} examples are fewer than one global batch of {global_batch} "
                             "(batch_size x grad_accum x processes); lower trainer.batch_size or grad_accum")
        self.lengths, self.global_batch, self.seed = list(lengths), global_batch, seed
        self.epoch, self.index, self._batches = 0, 0, None

    def next(self) -> list[int]:
        if self._batches is None:
            self._batches = length_grouped_batches(self.lengths, self.global_batch, seed=self.seed,
                                                   epoch=self.epoch, drop_last=True)
        if self.index == len(self._batches):
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
            return self.next()
        self.index += 1
        return self._batches[self.index - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._batches = int(state["epoch"]), int(state["index"]), None


# ----------------------------------------------------------------------------- log-probs

# Architectures whose logits are exactly lm_head(decoder(...).last_hidden_state): no logit scaling
# or soft-capping. Others (Gemma 2/3, Cohere, Granite...) take the generic full-logits path.
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3", "gpt_neox"}


class _HeadLogps(torch.autograd.Function):
    """log softmax(h @ W^T + b)[target] for M response positions. h: (M, H), W: (V, H) -> (M,).

    Forward: the GEMM into an (M, V) buffer in the compute dtype (bf16 under autocast; in row chunks
    on CPU, `_gemm_rows`), then a gather and a fp32 logsumexp over row chunks (one fp32 temporary
    of 1/16 of the rows). Backward turns the buffer, chunk by chunk and in place, into
    dlogits = g * (onehot - softmax), then one GEMM per input gradient: neither an fp32 copy of
    the logits nor a separate logits-gradient tensor is ever materialised, and nothing is
    recomputed. The chunk loops are many small
    memory-bound ops, so they run on one thread (`_one_thread`).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets):
        dev = h.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            logits = _project(h.to(cd), weight, bias, cd)  # (M, V)
            picked = logits.gather(1, targets[:, None]).squeeze(1).float()  # (M,)
            lse = torch.empty_like(picked)
            with _one_thread():
                for s, e in _row_chunks(logits):
                    x = logits[s:e].to(torch.float32, copy=True)  # the one temporary
                    m = x.amax(-1, keepdim=True)
                    lse[s:e] = x.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(1))
                    del x  # before the next chunk's temporary exists
        if any(ctx.needs_input_grad[:3]):
            ctx.logits = logits
            ctx.save_for_backward(h, weight, bias, targets, lse)
        return picked - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # g: (M,) fp32
        h, weight, bias, targets, lse = ctx.saved_tensors
        d, ctx.logits = ctx.logits, None  # (M, V): overwritten with dlogits below
        cd = d.dtype
        with _one_thread():
            for s, e in _row_chunks(d):
                p = d[s:e].float()  # fp32 logits: the buffer itself, updated in place
                p.sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None]).scatter_add_(1, targets[s:e, None], g[s:e, None])
                if p.data_ptr() != d[s:e].data_ptr():
                    d[s:e].copy_(p)
                del p
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
            for s, e in _vocab_chunks(weight, cd):
                grad_h += (d[:, s:e] @ weight[s:e].to(cd)).float()
            grad_h = grad_h.to(h.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (d.t() @ h.to(cd)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = d.float().sum(0).to(bias.dtype)
        return grad_h, grad_w, grad_b, None


def _row_chunks(x: torch.Tensor):
    M, V = x.shape
    c = max(1, min(math.ceil(M / 16), (1 << 24) // max(V, 1)))
    return ((s, min(s + c, M)) for s in range(0, M, c))


@contextlib.contextmanager
def _one_thread():
    """Run a loop of small, memory-bound ops on one thread. Every op is an OpenMP parallel region
    whose threads wait for each other; on a machine whose cores are shared, a descheduled thread
    makes each region cost a scheduler time slice (measured: 2 threads 10x slower than 1 on a busy
    2-core box), and one thread loses little on bandwidth-bound work anyway."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _vocab_chunks(weight: torch.Tensor, cd: torch.dtype):
    """One chunk when the weight is already in the compute dtype; else cast ~32k rows at a time."""
    V = weight.shape[0]
    c = V if weight.dtype == cd else 32768
    return ((s, min(s + c, V)) for s in range(0, V, c))


def _gemm_rows(h: torch.Tensor, V: int, cd: torch.dtype) -> int:
    """Rows per LM-head GEMM. On CPUs a bf16/fp16 GEMM may compute into an fp32 buffer of its whole
    output and then convert (measured: bf16 logits + an fp32 copy, 3.0x the logits, on an AVX-512
    Xeon without AVX512-BF16), so on CPU a low-precision GEMM runs 1/16 of the rows at a time (at
    least 8 rows, at most ~16M outputs); fp32 and accelerators run one GEMM."""
    M = h.shape[0]
    if h.device.type != "cpu" or cd == torch.float32:
        return max(M, 1)
    return max(1, min(M, max(8, math.ceil(M / 16)), (1 << 24) // max(V, 1)))


def _project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cd: torch.dtype) -> torch.Tensor:
    chunks = list(_vocab_chunks(weight, cd))
    M, V = h.shape[0], weight.shape[0]
    rows = _gemm_rows(h, V, cd)
    if len(chunks) == 1 and rows >= M:
        return F.linear(h, weight.to(cd), None if bias is None else bias.to(cd))
    out = torch.empty((M, V), dtype=cd, device=h.device)
    for s, e in chunks:
        w, b = weight[s:e].to(cd), None if bias is None else bias[s:e].to(cd)
        for r in range(0, M, rows):
            out[r:r + rows, s:e] = F.linear(h[r:r + rows], w, b)
    return out


def flat_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for (M, V) logits with plain autograd (any head module)."""
    picked = logits.gather(1, targets[:, None]).squeeze(1).float()
    lse = torch.cat([torch.logsumexp(logits[s:e].float(), -1) for s, e in _row_chunks(logits)])
    return picked - lse


def response_logps(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """hidden: (N, T, H) last hidden states; labels: (N, T), -100 off-response. -> (N, T-1) fp32."""
    sel = labels[:, 1:] != IGNORE  # (N, T-1) positions that predict a response token
    h = hidden[:, :-1][sel]  # (M, H)
    tgt = labels[:, 1:][sel]  # (M,)
    if type(head) is torch.nn.Linear:
        lp = _HeadLogps.apply(h, head.weight, head.bias, tgt)
    else:  # e.g. a LoRA-wrapped or quantized head
        lp = flat_token_logps(head(h), tgt)
    return torch.zeros(sel.shape, dtype=lp.dtype, device=lp.device).masked_scatter(sel, lp)


class TokenLogps(torch.nn.Module):
    """A causal LM as (input_ids, attention_mask, labels) -> (N, T-1) per-token log-probs.

    For plain-head architectures (PLAIN_HEAD) the LM head runs only at response positions;
    otherwise the model's logits go through `loss.token_logps`. DDP wraps this module, so the
    policy forward goes through DDP (gradient hooks) while the reference forward calls the
    unwrapped module directly (`model.disable_adapter()` acts on the underlying model).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
        cfg = getattr(base, "config", None)
        self.parts = None
        if getattr(cfg, "model_type", None) in PLAIN_HEAD and getattr(cfg, "final_logit_softcapping", None) is None:
            decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
            head = base.get_output_embeddings()
            if isinstance(decoder, torch.nn.Module) and isinstance(head, torch.nn.Module):
                self.parts = (decoder, head)  # a tuple: not registered twice as submodules

    def forward(self, input_ids, attention_mask, labels, row_src=None):
        """row_src: optional (N,) long; row i's log-probs are read from the hidden states of row
        row_src[i] (a rejected side read off its chosen row, `batching.collate`): the model runs only
        on the rows with row_src[i] == i."""
        keep = inv = None
        if row_src is not None:
            own = row_src == torch.arange(len(row_src), device=row_src.device)
            if not bool(own.all()):
                keep = own.nonzero().squeeze(1)
                pos = torch.full_like(row_src, -1)
                pos[keep] = torch.arange(len(keep), device=row_src.device)
                inv = pos[row_src]  # each row -> its computed row (collate points only at computed rows)
                input_ids, attention_mask = input_ids[keep], attention_mask[keep]
        if self.parts is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (n, T, V)
            return token_logps(logits if inv is None else logits[inv], labels)
        decoder, head = self.parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return response_logps(hidden if inv is None else hidden[inv], head, labels)  # (N, T-1)


def reference_logps(policy: TokenLogps, reference: TokenLogps | None, batch: PreferenceBatch) -> torch.Tensor:
    """Reference per-token log-probs: the frozen copy, or the policy with its LoRA adapter off."""
    with torch.no_grad(), (policy.model.disable_adapter() if reference is None else contextlib.nullcontext()):
        return (reference or policy)(batch.input_ids, batch.attention_mask, batch.labels, batch.row_src)


def precomputed_reference(cfg: TrainerConfig, policy: TokenLogps, reference: TokenLogps | None, ref_weights,
                          tokenizer, examples: Sequence[Example], *, device, autocast, prefix: str):
    """RefLogps for every example: loaded from cfg.ref_cache_dir by content hash, or computed and cached."""
    from . import refcache

    def compute() -> refcache.RefLogps:
        with autocast:
            return refcache.compute(lambda b: reference_logps(policy, reference, b), examples,
                                    tokenizer.pad_token_id, batch_size=cfg.batch_size, device=device)

    t = time.perf_counter()
    key = refcache.cache_key(ref_weights, tokenizer, examples, precision=cfg.precision)
    table, hit = refcache.load_or_compute(cfg.ref_cache_dir, key, len(examples), compute)
    log.info("%s: reference log-probs %s (%s, %.1fs)", prefix, "loaded" if hit else "computed", key,
             time.perf_counter() - t)
    return table


def policy_reference(cfg: TrainerConfig, policy: TokenLogps, tokenizer, examples: Sequence[Example], *, device,
                     autocast):
    """RefLogps of the policy as it is now (eval mode, adapter on): `trainer.ref_update=round`.
    Kept in memory only: it depends on the adapter weights of this very run."""
    from . import refcache

    t = time.perf_counter()
    with torch.no_grad(), autocast:
        table = refcache.compute(lambda b: policy(b.input_ids, b.attention_mask, b.labels), examples,
                                 tokenizer.pad_token_id, batch_size=cfg.batch_size, device=device)
    log.info("reference := current policy on %d examples (%.1fs)", len(examples), time.perf_counter() - t)
    return table


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _to_device(model, device: torch.device) -> None:
    p = next(model.parameters(), None)
    if p is not None and p.device != device and getattr(getattr(model, "config", None), "quantization_config", None) is None:
        model.to(device)


def _gather_hists(hists: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-rank lists of per-pair values -> one list per key over all ranks (rank 0 logs it)."""
    out: dict[str, list[float]] = {}
    for part in distributed.all_gather(hists):
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    return out


def train(cfg: TrainerConfig, model, tokenizer, examples: Sequence[Example], tracker, *, ref_model=None,
          seed: int = 0, prefix: str = "train", eval_fn: Callable[[int], dict] | None = None,
          step_offset: int = 0, ckpt_dir=None, resume_from=None,
          refresh: Callable[[int, int], Sequence[Example]] | None = None) -> dict[str, float]:
    """Train `model` in place up to cfg.max_steps optimizer steps. Returns the last logged metrics.

    examples: tokenized pairs (or SFT examples when cfg.loss == "sft").
    ref_model: frozen reference for full fine-tuning; None means "the policy with its adapter
    disabled" (LoRA). `step_offset` shifts logged steps so that stages share one x-axis.
    ckpt_dir: where `cfg.save_every` checkpoints go; resume_from: a checkpoint to continue from.
    refresh(round, step): with cfg.rounds > 1, called (model in eval mode) before step
    max_steps * round / rounds + 1 for round = 1..rounds-1; returns the examples for the next round
    (on-policy pairs sampled from the current policy). Optimizer and schedule carry on; the data
    stream restarts on the new examples. The reference stays the same (cfg.ref_update="fixed") or
    becomes the policy at the round's start (cfg.ref_update="round", iterative DPO). SFT re-samples
    only when given a refresh: run.py passes none to SFT on gold solutions (nothing to re-sample, so
    one sweep can share trainer.rounds across sft_control,dpo,stepdpo) and one with sft_data=chosen.
    Under torchrun every rank calls this; rank 0 alone logs and writes.
    """
    if not examples:
        raise ValueError(f"{prefix}: no training examples (did pair building or validation drop everything?)")
    sft = cfg.loss == "sft"
    if not sft and ref_model is None and not hasattr(model, "disable_adapter"):
        raise ValueError(f"{prefix}: no reference model: pass ref_model= (a frozen copy, lora=none) or a peft "
                         "model, whose disabled adapter is the reference")
    rank, world = distributed.rank(), distributed.world_size()
    device = pick_device(cfg.device)
    torch.manual_seed(seed)
    _to_device(model, device)
    if ref_model is not None:
        _to_device(ref_model, device)
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    opt = make_optimizer(cfg, groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    stream = BatchStream([len(e) for e in examples], cfg.batch_size * cfg.grad_accum * world, seed)
    policy = TokenLogps(model)  # (N, T-1) log-probs; LM head only at response tokens
    reference = TokenLogps(ref_model) if ref_model is not None else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    pad = tokenizer.pad_token_id
    nll_prefix = not sft and cfg.nll_alpha > 0 and cfg.nll_on == "solution"  # anchor the prefix steps too
    ref_table = None  # trainer.precompute_ref: reference log-probs once, from the on-disk cache if there
    if cfg.precompute_ref and not sft:
        ref_table = precomputed_reference(cfg, policy, reference, model if ref_model is None else ref_model,
                                          tokenizer, examples, device=device, autocast=autocast, prefix=prefix)
    meta = {"stage": prefix, "seed": seed, "n_examples": len(examples), "global_batch": stream.global_batch,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "world_size": world}
    start = 0
    if resume_from is not None:  # parameters, optimizer, schedule, data position, RNG: exactly where it stopped
        state = checkpoint.load(resume_from)
        for k in ("stage", "seed", "n_examples", "global_batch"):
            if state["meta"][k] != meta[k]:
                raise ValueError(f"trainer.resume: {resume_from} was written with {k}={state['meta'][k]!r}, this run "
                                 f"has {meta[k]!r}; exact resume needs the same data, seed and global batch")
        checkpoint.load_trainable_state(model, state["model"], str(resume_from))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
        rngs = state["rng"]
        checkpoint.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        start = int(state["step"])
        log.info("%s: resumed at step %d from %s", prefix, start, resume_from)
    ddp = distributed.wrap(policy, device)
    model.train()
    last: dict[str, float] = {}
    t0, tokens = time.perf_counter(), 0
    hists: dict[str, list[float]] = {}  # per-pair margins since the last log step
    rounds = cfg.rounds if refresh is not None else 1
    if rounds > 1 and resume_from is not None:
        raise ValueError(f"{prefix}: trainer.rounds={cfg.rounds} can't resume from a checkpoint yet; use rounds=1")
    boundaries = {round(cfg.max_steps * r / rounds): r for r in range(1, rounds)}  # step -> round starting after it
    prog = progress.bar(prefix, total=cfg.max_steps, initial=start, unit="step", every=cfg.log_every, enabled=rank == 0)
    for step in range(start + 1, cfg.max_steps + 1):
        if step - 1 in boundaries:  # a new on-policy round: fresh pairs from the current policy
            r = boundaries[step - 1]
            model.eval()
            examples = list(refresh(r, step_offset + step - 1))
            if not examples:
                raise ValueError(f"{prefix}: round {r} produced no training examples")
            stream = BatchStream([len(e) for e in examples], stream.global_batch, seed + r)
            meta["n_examples"] = len(examples)
            if cfg.ref_update == "round" and not sft:  # iterative DPO: the policy this round starts from is its reference
                ref_table = policy_reference(cfg, policy, tokenizer, examples, device=device, autocast=autocast)
            elif ref_table is not None:
                ref_table = precomputed_reference(cfg, policy, reference, model if ref_model is None else ref_model,
                                                  tokenizer, examples, device=device, autocast=autocast, prefix=prefix)
            model.train()
        sums: dict[str, float] = {}
        global_idx = stream.next()
        if sft:  # SFT is a mean over the global batch's response tokens, however it is split
            n_global = sum(len(examples[i].chosen_ids) - (not examples[i].prompt_ids) for i in global_idx)
        for a in range(cfg.grad_accum):
            lo = (a * world + rank) * cfg.batch_size
            idx = global_idx[lo:lo + cfg.batch_size]  # this rank's disjoint shard of the global batch
            batch = collate([examples[i] for i in idx], pad, sft=sft, nll_prefix=nll_prefix).to(device)
            labelled = batch.labels[:, 1:] != IGNORE  # (N, T-1): the LM head runs here
            mask = labelled & ~batch.nll_only[:, 1:]  # response tokens
            share = int(mask.sum()) / n_global if sft else len(idx) / len(global_idx)  # of the global mean
            sync = a == cfg.grad_accum - 1 or ddp is policy  # all-reduce gradients on the last micro-batch only
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with autocast:
                    if sft:
                        ref_lp = None
                    elif ref_table is not None:
                        ref_lp = ref_table.for_batch(examples, idx, batch)  # (2B, T-1) from the cache
                    else:
                        ref_lp = reference_logps(policy, reference, batch)  # (2B, T-1)
                    pol_lp = ddp(batch.input_ids, batch.attention_mask, batch.labels, batch.row_src)  # (N, T-1)
                    if sft:
                        loss, m = sft_loss(pol_lp, mask)
                    else:
                        loss, m = weighted_dpo_loss(
                            pol_lp, ref_lp, batch.token_weights[:, 1:], mask, beta=cfg.beta, loss_type=cfg.loss_type,
                            label_smoothing=cfg.label_smoothing, nll_alpha=cfg.nll_alpha,
                            token_reduction=cfg.token_reduction, focus=batch.focus[:, 1:],
                            nll_mask=labelled if nll_prefix else None)
                (loss * share * world).backward()  # DDP averages gradients over ranks; * world makes it a sum
            run_rows = batch.attention_mask[batch.computed_rows]  # the rows the model ran on
            n_real = int(run_rows.sum())
            tokens += n_real
            m = {**m, "tokens/nonpad": n_real, "tokens/padded": run_rows.numel(), "tokens/rows": run_rows.shape[0]}
            for k, v in m.items():  # counts add up; everything else is a mean over the global batch
                if isinstance(v, torch.Tensor) and v.dim():  # per-pair values: histogram over the log window
                    hists.setdefault(k, []).extend(v.float().cpu().tolist())
                    continue
                sums[k] = sums.get(k, 0.0) + (float(v) if k.startswith("tokens/") else float(v) * share)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * share
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        prog.update(loss=sums["loss"], tokens=sums["tokens/nonpad"])  # this rank's tokens
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            red = distributed.reduce_metrics({**sums, "tokens/window": tokens}, device)  # summed over ranks
            window, dt = red.pop("tokens/window"), time.perf_counter() - t0
            last = {f"{prefix}/{k}": v for k, v in red.items()}
            for k, parts in _gather_hists(hists).items():  # every pair of the window, from every rank
                last[f"{prefix}/{k}"] = parts
            hists = {}
            last.update({f"{prefix}/lr": sched.get_last_lr()[0], f"{prefix}/grad_norm": float(gnorm),
                         f"{prefix}/tokens_per_s": window / dt, f"{prefix}/peak_rss_mb": peak_rss_mb()})
            if device.type == "cuda":
                last[f"{prefix}/peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            tracker.log(last, step=step_offset + step)
            t0, tokens = time.perf_counter(), 0
        if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            tracker.log(eval_fn(step), step=step_offset + step)
            model.train()
        if ckpt_dir is not None and cfg.save_every and step % cfg.save_every == 0:
            rngs = distributed.all_gather(checkpoint.rng_state())
            if rank == 0:
                checkpoint.save(ckpt_dir, step, {
                    "step": step, "meta": meta, "model": checkpoint.trainable_state(model),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "stream": stream.state_dict(), "rng": rngs}, keep=cfg.keep_checkpoints)
    prog.close()
    model.eval()
    return last
