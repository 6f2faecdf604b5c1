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

Log-probs come from `stepdpo.logprobs` (`ModelLogps`: the backbone over every token, the LM head
only at response positions, so no (N, T, V) logits tensor is ever built).

The loop in `train()` calls one named function per phase: `setup_optimizer`, `TrainState.load`
(resume), `start_round` (a new on-policy round), `optimizer_step`, `window_metrics` (logging), and
`TrainState.save` (saving).
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import checkpoint, cpu_memory, distributed, progress
from .batching import IGNORE, Example, collate, length_grouped_batches
from .config import TrainerConfig
from .logprobs import ModelLogps, reference_logps
from .loss import sft_loss, weighted_dpo_loss

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    return distributed.local_device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU of compute capability 8.0 or later (Ampere; a T4 or V100
    emulates them), a CPU with AVX512-BF16 / AMX (oneDNN's check). On other CPUs (e.g. AVX2 only) oneDNN emulates
    them: measured 0.5 against 82 GFLOP/s in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_for(precision: str, device: torch.device, prefix: str = "train"):
    """The autocast context of `trainer.precision` (bf16: autocast; fp32: off), with a warning when
    bf16 would be emulated on this CPU."""
    if precision == "bf16" and not native_bf16(device):
        if device.type == "cuda":
            log.warning("%s: trainer.precision=bf16 on a GPU without native bf16 (compute capability < 8.0, e.g. T4, "
                        "V100): it is emulated, slowly; set trainer.precision=fp32", prefix)
        else:
            log.warning("%s: trainer.precision=bf16 on a CPU without native bf16 matmuls (no AVX512-BF16/AMX): "
                        "they run in emulation, about 100x slower than fp32 here; set trainer.precision=fp32", prefix)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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


def run_multiple(cfg: TrainerConfig, device: torch.device) -> int:
    """What the run rows' length is rounded up to (`batching.collate(run_multiple=)`): trainer.pad_to_multiple_of,
    or by default 32 where the step's matmuls are bf16 on a CPU (oneDNN compiles a kernel per GEMM shape, ~3.5 ms
    each, ~26 new shapes a step when every batch has its own length), else 1 (fp32 on CPU goes to BLAS; GPUs
    compile nothing per shape). docs/experiments/benchmarks.md, session 9."""
    if cfg.pad_to_multiple_of is not None:
        return max(1, int(cfg.pad_to_multiple_of))
    return 32 if device.type == "cpu" and cfg.precision == "bf16" else 1


def packs(cfg: TrainerConfig, policy: ModelLogps, reference: ModelLogps | None) -> bool:
    """Whether batches are packed (`batching.collate(pack=True)`): asked for, and every model that runs
    them takes a tree mask."""
    return cfg.pack and policy.packs and (reference is None or reference.packs)


def precomputed_reference(cfg: TrainerConfig, policy: ModelLogps, reference: ModelLogps | None, ref_weights,
                          tokenizer, examples: Sequence[Example], *, device, autocast, prefix: str):
    """RefLogps for every example: loaded from cfg.ref_cache_dir by content hash, or computed and cached."""
    from . import refcache

    def compute() -> refcache.RefLogps:
        with autocast:
            return refcache.compute(lambda b: reference_logps(policy, reference, b), examples,
                                    tokenizer.pad_token_id, batch_size=cfg.batch_size, device=device,
                                    pack=packs(cfg, policy, reference), run_multiple=run_multiple(cfg, device))

    t = time.perf_counter()
    key = refcache.cache_key(ref_weights, tokenizer, examples, precision=cfg.precision,
                             pack=packs(cfg, policy, reference), run_multiple=run_multiple(cfg, device))
    table, hit = refcache.load_or_compute(cfg.ref_cache_dir, key, len(examples), compute)
    log.info("%s: reference log-probs %s (%s, %.1fs)", prefix, "loaded" if hit else "computed", key,
             time.perf_counter() - t)
    return table


def policy_reference(cfg: TrainerConfig, policy: ModelLogps, tokenizer, examples: Sequence[Example], *, device,
                     autocast):
    """RefLogps of the policy as it is now (eval mode, adapter on): `trainer.ref_update=round`.
    Kept in memory only: it depends on the adapter weights of this very run."""
    from . import refcache

    t = time.perf_counter()
    with torch.no_grad(), autocast:
        table = refcache.compute(lambda b: policy(b.input_ids, b.attention_mask, b.labels, b.run), examples,
                                 tokenizer.pad_token_id, batch_size=cfg.batch_size, device=device,
                                 pack=packs(cfg, policy, None), run_multiple=run_multiple(cfg, device))
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




# ----------------------------------------------------------------------------- the loop's phases


def setup_optimizer(cfg: TrainerConfig, model):
    """AdamW (or paged 8-bit AdamW) over the trainable parameters, and the warmup/decay schedule.
    Returns (optimizer, scheduler, params): params are what the gradient norm is clipped over."""
    groups = param_groups(model, cfg.weight_decay)
    opt = make_optimizer(cfg, groups)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)), [p for g in groups for p in g["params"]]


@dataclass
class TrainState:
    """What a checkpoint holds and a resume restores: trainable weights, optimizer, schedule, data
    position, RNG, and the step reached. `meta` says which run wrote it (checked on resume)."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    stream: BatchStream
    meta: dict
    step: int = 0

    def state_dict(self, rngs: list) -> dict:
        """rngs: every rank's RNG state (`checkpoint.rng_state()`, gathered)."""
        return {"step": self.step, "meta": self.meta, "model": checkpoint.trainable_state(self.model),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "stream": self.stream.state_dict(), "rng": rngs}

    def save(self, ckpt_dir, rank: int, keep: int) -> None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes, atomically."""
        rngs = distributed.all_gather(checkpoint.rng_state())
        if rank == 0:
            checkpoint.save(ckpt_dir, self.step, self.state_dict(rngs), keep=keep)

    def load(self, path, rank: int) -> None:
        """Continue exactly where the checkpoint at `path` stopped (same data, seed and global batch)."""
        state = checkpoint.load(path)
        for k in ("stage", "seed", "n_examples", "global_batch"):
            if state["meta"][k] != self.meta[k]:
                raise ValueError(f"trainer.resume: {path} was written with {k}={state['meta'][k]!r}, this run "
                                 f"has {self.meta[k]!r}; exact resume needs the same data, seed and global batch")
        checkpoint.load_trainable_state(self.model, state["model"], str(path))
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        rngs = state["rng"]
        checkpoint.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        self.step = int(state["step"])


@dataclass(frozen=True)
class Setup:
    """What stays fixed for one call of `train()`: the models as log-prob modules, where and how
    they run, and this process's place among the ranks."""

    cfg: TrainerConfig
    policy: ModelLogps  # (N, T-1) log-probs; LM head only at response tokens
    ddp: torch.nn.Module  # `policy`, wrapped in DistributedDataParallel under torchrun
    reference: ModelLogps | None  # a frozen copy; None: the policy with its adapter disabled
    params: list  # the trainable parameters (gradient clipping)
    device: torch.device
    autocast: torch.autocast
    pad: int
    rank: int
    world: int

    @property
    def sft(self) -> bool:
        return self.cfg.loss == "sft"

    @property
    def pack(self) -> bool:
        return packs(self.cfg, self.policy, self.reference)

    @property
    def nll_prefix(self) -> bool:  # anchor the prefix steps too
        return not self.sft and self.cfg.nll_alpha > 0 and self.cfg.nll_on == "solution"


@dataclass
class LogWindow:
    """What accumulates between two log steps: tokens seen (for tokens/s) and per-pair values."""

    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    hists: dict[str, list[float]] = field(default_factory=dict)  # per-pair margins since the last log step


def start_round(s: Setup, state: TrainState, r: int, examples: Sequence[Example], ref_table, tokenizer, ref_weights,
                *, seed: int, prefix: str):
    """A new on-policy round: the refreshed examples get a fresh data stream; the reference stays
    (its table recomputed on the new examples) or becomes the current policy (ref_update=round).
    Returns (examples, ref_table); state.stream and state.meta follow the new examples."""
    if not examples:
        raise ValueError(f"{prefix}: round {r} produced no training examples")
    state.stream = BatchStream([e.run_len(s.pack) for e in examples], state.stream.global_batch, seed + r)
    state.meta["n_examples"] = len(examples)
    if s.cfg.ref_update == "round" and not s.sft:  # iterative DPO: the policy this round starts from is its reference
        ref_table = policy_reference(s.cfg, s.policy, tokenizer, examples, device=s.device, autocast=s.autocast)
    elif ref_table is not None:
        ref_table = precomputed_reference(s.cfg, s.policy, s.reference, ref_weights, tokenizer, examples,
                                          device=s.device, autocast=s.autocast, prefix=prefix)
    return examples, ref_table


def optimizer_step(s: Setup, state: TrainState, examples: Sequence[Example], ref_table, window: LogWindow):
    """One optimizer step over one global batch: this rank's micro-batches (forward, loss, backward;
    DDP all-reduces on the last one), then clip, step, schedule. Returns (metrics summed over the
    micro-batches, gradient norm); tokens and per-pair values go into `window`."""
    cfg, sft = s.cfg, s.sft
    sums: dict[str, float] = {}
    global_idx = state.stream.next()
    if sft:  # SFT is a mean over the global batch's response tokens, however it is split
        n_global = sum(len(examples[i].chosen_ids) - (not examples[i].prompt_ids) for i in global_idx)
    for a in range(cfg.grad_accum):
        lo = (a * s.world + s.rank) * cfg.batch_size
        idx = global_idx[lo:lo + cfg.batch_size]  # this rank's disjoint shard of the global batch
        batch = collate([examples[i] for i in idx], s.pad, sft=sft, nll_prefix=s.nll_prefix, pack=s.pack,
                        run_multiple=run_multiple(cfg, s.device)).to(s.device)
        labelled = batch.labels[:, 1:] != IGNORE  # (N, T-1): the LM head runs here
        mask = labelled & ~batch.nll_only[:, 1:]  # response tokens
        share = int(mask.sum()) / n_global if sft else len(idx) / len(global_idx)  # of the global mean
        sync = a == cfg.grad_accum - 1 or s.ddp is s.policy  # all-reduce gradients on the last micro-batch only
        with contextlib.nullcontext() if sync else s.ddp.no_sync():
            with s.autocast:
                if sft:
                    ref_lp = None
                elif ref_table is not None:
                    ref_lp = ref_table.for_batch(examples, idx, batch)  # (2B, T-1) from the cache
                else:
                    ref_lp = reference_logps(s.policy, s.reference, batch)  # (2B, T-1)
                pol_lp = s.ddp(batch.input_ids, batch.attention_mask, batch.labels, batch.run)  # (N, T-1)
                if sft:
                    loss, m = sft_loss(pol_lp, mask)
                else:
                    loss, m = weighted_dpo_loss(
                        pol_lp, ref_lp, batch.token_weights[:, 1:], mask, beta=cfg.beta, loss_type=cfg.loss_type,
                        label_smoothing=cfg.label_smoothing, nll_alpha=cfg.nll_alpha,
                        token_reduction=cfg.token_reduction, focus=batch.focus[:, 1:],
                        nll_mask=labelled if s.nll_prefix else None)
            (loss * share * s.world).backward()  # DDP averages gradients over ranks; * world makes it a sum
        window.tokens += batch.n_tokens
        m = {**m, "tokens/pairs": batch.n_tokens, "tokens/nonpad": int((batch.run_seg >= 0).sum()),
             "tokens/padded": batch.run_seg.numel(), "tokens/rows": batch.run_seg.shape[0]}
        for k, v in m.items():  # counts add up; everything else is a mean over the global batch
            if isinstance(v, torch.Tensor) and v.dim():  # per-pair values: histogram over the log window
                window.hists.setdefault(k, []).extend(v.float().cpu().tolist())
                continue
            sums[k] = sums.get(k, 0.0) + (float(v) if k.startswith("tokens/") else float(v) * share)
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * share
    gnorm = torch.nn.utils.clip_grad_norm_(s.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    state.opt.step()
    state.sched.step()
    state.opt.zero_grad(set_to_none=True)
    return sums, gnorm


def window_metrics(s: Setup, state: TrainState, sums: dict[str, float], gnorm, window: LogWindow, *,
               prefix: str) -> dict:
    """The metrics of this log step: the last step's sums (reduced over ranks), every pair's values
    since the last log step (gathered), lr, grad norm, tokens/s over the window, peak memory."""
    red = distributed.reduce_metrics({**sums, "tokens/window": window.tokens}, s.device)  # summed over ranks
    tokens, dt = red.pop("tokens/window"), time.perf_counter() - window.t0
    out = {f"{prefix}/{k}": v for k, v in red.items()}
    for k, parts in _gather_hists(window.hists).items():  # every pair of the window, from every rank
        out[f"{prefix}/{k}"] = parts
    out.update({f"{prefix}/lr": state.sched.get_last_lr()[0], f"{prefix}/grad_norm": float(gnorm),
                f"{prefix}/tokens_per_s": tokens / dt, f"{prefix}/peak_rss_mb": peak_rss_mb()})
    if s.device.type == "cuda":
        out[f"{prefix}/peak_gpu_mb"] = torch.cuda.max_memory_allocated(s.device) / 2**20
    return out


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainerConfig, model, tokenizer, examples: Sequence[Example], tracker, *, ref_model=None,
          seed: int = 0, prefix: str = "train", eval_fn: Callable[[int], None] | None = None,
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
    rounds = cfg.rounds if refresh is not None else 1
    if rounds > 1 and resume_from is not None:
        raise ValueError(f"{prefix}: trainer.rounds={cfg.rounds} can't resume from a checkpoint yet; use rounds=1")
    rank, world = distributed.rank(), distributed.world_size()
    device = pick_device(cfg.device)
    if device.type == "cpu":  # before the first bf16 matmul: oneDNN reads its cache capacity once
        cpu_memory.bound(cfg.cpu_primitive_cache, cfg.cpu_mmap_threshold_mb)
    torch.manual_seed(seed)
    _to_device(model, device)
    if ref_model is not None:
        _to_device(ref_model, device)
    ref_weights = model if ref_model is None else ref_model  # what the reference's log-probs depend on

    opt, sched, params = setup_optimizer(cfg, model)
    policy = ModelLogps(model)  # (N, T-1) log-probs; LM head only at response tokens
    reference = ModelLogps(ref_model) if ref_model is not None else None
    stream = BatchStream([e.run_len(packs(cfg, policy, reference)) for e in examples],
                         cfg.batch_size * cfg.grad_accum * world, seed)
    autocast = autocast_for(cfg.precision, device, prefix)
    ref_table = None  # trainer.precompute_ref: reference log-probs once, from the on-disk cache if there
    if cfg.precompute_ref and not sft:
        ref_table = precomputed_reference(cfg, policy, reference, ref_weights, tokenizer, examples, device=device,
                                          autocast=autocast, prefix=prefix)
    state = TrainState(model, opt, sched, stream, meta={
        "stage": prefix, "seed": seed, "n_examples": len(examples), "global_batch": stream.global_batch,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "world_size": world})
    if resume_from is not None:  # parameters, optimizer, schedule, data position, RNG: exactly where it stopped
        state.load(resume_from, rank)
        log.info("%s: resumed at step %d from %s", prefix, state.step, resume_from)
    s = Setup(cfg=cfg, policy=policy, ddp=distributed.wrap(policy, device), reference=reference, params=params,
              device=device, autocast=autocast, pad=tokenizer.pad_token_id, rank=rank, world=world)

    model.train()
    last: dict[str, float] = {}
    window = LogWindow()
    boundaries = {round(cfg.max_steps * r / rounds): r for r in range(1, rounds)}  # step -> round starting after it
    prog = progress.bar(prefix, total=cfg.max_steps, initial=state.step, unit="step", every=cfg.log_every,
                        enabled=rank == 0)
    for step in range(state.step + 1, cfg.max_steps + 1):
        if step - 1 in boundaries:  # a new on-policy round: fresh pairs from the current policy
            r = boundaries[step - 1]
            model.eval()
            examples, ref_table = start_round(s, state, r, list(refresh(r, step_offset + step - 1)), ref_table,
                                              tokenizer, ref_weights, seed=seed, prefix=prefix)
            model.train()
        sums, gnorm = optimizer_step(s, state, examples, ref_table, window)
        state.step = step
        prog.update(loss=sums["loss"], tokens=sums["tokens/pairs"])  # this rank's pairs' tokens
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # logged at the run's step (stages share one axis), with the stage's own step beside it (W&B plots a
            # stage against it: runs with different warm-up lengths line up)
            last = {**window_metrics(s, state, sums, gnorm, window, prefix=prefix), f"{prefix}/step": step}
            tracker.log(last, step=step_offset + step)
            window = LogWindow()
        if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            eval_fn(step)  # evaluates and logs (run.py: eval/during/*)
            model.train()
        if ckpt_dir is not None and cfg.save_every and step % cfg.save_every == 0:
            state.save(ckpt_dir, rank, keep=cfg.keep_checkpoints)
    prog.close()
    model.eval()
    return last
