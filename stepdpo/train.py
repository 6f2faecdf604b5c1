"""The training loop: one function, nanoGPT/torchtune order. SFT and (stepwise) DPO share it.

seed -> param groups -> optimizer + schedule -> loop:
    micro-batch -> reference forward (no grad) -> policy forward -> loss -> backward
    -> clip -> step -> log -> eval -> save
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from typing import Callable, Sequence

import torch

from .batching import Example, PreferenceBatch, collate, length_grouped_batches
from .config import TrainerConfig
from .loss import sft_loss, token_logps, weighted_dpo_loss


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def batches_forever(examples: Sequence[Example], cfg: TrainerConfig, seed: int):
    """Endless stream of micro-batch index lists, epoch after epoch, deterministic in seed."""
    lengths = [len(e) for e in examples]
    epoch = 0
    while True:
        yield from length_grouped_batches(lengths, cfg.batch_size, seed=seed, epoch=epoch)
        epoch += 1


def reference_logps(model, ref_model, batch: PreferenceBatch) -> torch.Tensor:
    """Reference per-token log-probs: the frozen copy, or the policy with its LoRA adapter off."""
    with torch.no_grad():
        ctx = model.disable_adapter() if ref_model is None else contextlib.nullcontext()
        with ctx:
            net = model if ref_model is None else ref_model
            logits = net(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return token_logps(logits, batch.labels)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train(cfg: TrainerConfig, model, tokenizer, examples: Sequence[Example], tracker, *, ref_model=None,
          seed: int = 0, prefix: str = "train", eval_fn: Callable[[int], dict] | None = None,
          step_offset: int = 0) -> dict[str, float]:
    """Train `model` in place for cfg.max_steps optimizer steps. Returns the last logged metrics.

    examples: tokenized pairs (or SFT examples when cfg.loss == "sft").
    ref_model: frozen reference for full fine-tuning; None means "the policy with its adapter
    disabled" (LoRA). `step_offset` shifts logged steps so that stages share one x-axis.
    """
    if not examples:
        raise ValueError(f"{prefix}: no training examples (did pair building or validation drop everything?)")
    torch.manual_seed(seed)
    device = pick_device(cfg.device)
    sft = cfg.loss == "sft"
    params = [p for g in param_groups(model, cfg.weight_decay) for p in g["params"]]
    opt = make_optimizer(cfg, param_groups(model, cfg.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    stream = batches_forever(examples, cfg, seed)
    model.train()
    last: dict[str, float] = {}
    t0, tokens = time.perf_counter(), 0
    for step in range(1, cfg.max_steps + 1):
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = collate([examples[i] for i in next(stream)], tokenizer.pad_token_id, sft=sft).to(device)
            mask = batch.labels[:, 1:] != -100  # (N, T-1) response tokens
            with autocast:
                ref_lp = None if sft else reference_logps(model, ref_model, batch)  # (2B, T-1)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (N, T, V)
                pol_lp = token_logps(logits, batch.labels)  # (N, T-1)
                del logits  # free the (N, T, V) tensor before the loss graph grows
                if sft:
                    loss, m = sft_loss(pol_lp, mask)
                else:
                    loss, m = weighted_dpo_loss(
                        pol_lp, ref_lp, batch.token_weights[:, 1:], mask, beta=cfg.beta, loss_type=cfg.loss_type,
                        label_smoothing=cfg.label_smoothing, nll_alpha=cfg.nll_alpha,
                        token_reduction=cfg.token_reduction, focus=batch.focus[:, 1:])
            (loss / cfg.grad_accum).backward()
            tokens += int(batch.attention_mask.sum())
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
            sums["loss"] = sums.get("loss", 0.0) + float(loss) / cfg.grad_accum
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            dt = time.perf_counter() - t0
            last = {f"{prefix}/{k}": v for k, v in sums.items()}
            last.update({f"{prefix}/lr": sched.get_last_lr()[0], f"{prefix}/grad_norm": float(gnorm),
                         f"{prefix}/tokens_per_s": tokens / dt, f"{prefix}/peak_rss_mb": peak_rss_mb()})
            if device.type == "cuda":
                last[f"{prefix}/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
            tracker.log(last, step=step_offset + step)
            t0, tokens = time.perf_counter(), 0
        if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            tracker.log(eval_fn(step), step=step_offset + step)
            model.train()
    model.eval()
    return last
