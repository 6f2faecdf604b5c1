"""Per-token log-probabilities of the labels: the one place they are computed.

Vocabulary (one name per idea):

- **logps**: log p(label_t | tokens <t) = log_softmax(logits_{t-1})[label_t], always in fp32.
- **aligned** logps, shape (N, T-1): position t-1 holds the log-prob of labels[:, t], so they line
  up with `labels[:, 1:]`; 0 where the label is IGNORE (prompt, padding). What the losses take.
- **flat** logps, shape (M,): only the M labelled positions, in row-major order; `targets` (M,)
  are their labels. What the kernels compute.

The functions are named by what they start from and which layout they return:

    logps_from_logits(logits (N, T, V), labels)        -> aligned   full-logits path (any model)
    flat_logps_from_head(h (M, H), W, b, targets)      -> flat      the fused LM-head kernel
    flat_logps_from_logits(logits (M, V), targets)     -> flat      plain autograd (a LoRA/quantized head)
    ModelLogps(model)(input_ids, attention_mask, labels[, run]) -> aligned  a causal LM as a log-prob module
    reference_logps(policy, reference, batch)          -> aligned   the frozen copy, or the adapter off

None of them builds a fp32 (N, T, V) tensor: logsumexp runs over chunks, and the backward writes
the logits gradient chunk by chunk. For plain-head architectures (`PLAIN_HEAD`) `ModelLogps` runs
the backbone over the batch's run rows (a packed pair's prompt and shared tokens once) and the LM
head only at labelled positions, so no (N, T, V) logits tensor exists at all.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .batching import IGNORE, PreferenceBatch, tree_mask

# Architectures whose logits are exactly lm_head(decoder(...).last_hidden_state): no logit scaling
# or soft-capping. Others (Gemma 2/3, Cohere, Granite...) take the generic full-logits path.
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3", "gpt_neox"}


# ----------------------------------------------------------------------------- from full logits


def logps_from_logits(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1) -> torch.Tensor:
    """Aligned logps from a causal LM's full logits.

    logits: (N, T, V); labels: (N, T) with IGNORE on prompt/pad. Returns (N, T-1) fp32, aligned to
    labels[:, 1:], 0 where the label is IGNORE. Never materialises a full fp32 log-softmax: gather
    the label logit, subtract a chunked fp32 logsumexp (chunks of at most `chunk_rows` sequences
    and ~1/32 of the positions, so the extra memory stays ~1/16 of the logits even for bf16
    logits). The backward writes the logits gradient chunk by chunk and keeps no fp32 copy of the
    logits alive between forward and backward.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logps_from_logits: logits (N, T, V) and labels (N, T) expected, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    return _LogitsLogps.apply(logits, labels, chunk_rows)


def _position_chunks(N: int, T: int, V: int, chunk_rows: int):
    """(row slice, position slice) chunks over (N, T-1) positions: ~1/32 of them, <= 4M elements."""
    rows = max(1, min(chunk_rows, N))
    cols = max(1, min(T - 1, -(-N * (T - 1) // (32 * rows)), (1 << 22) // max(1, V * rows)))
    for i in range(0, N, rows):
        for j in range(0, T - 1, cols):
            yield slice(i, i + rows), slice(j, min(j + cols, T - 1))


class _LogitsLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, chunk_rows):
        N, T, V = logits.shape
        mask = labels[:, 1:] != IGNORE  # (N, T-1)
        safe = labels[:, 1:].masked_fill(~mask, 0)
        picked = logits[:, :-1].gather(2, safe.unsqueeze(-1)).squeeze(-1).float()  # (N, T-1)
        lse = torch.empty_like(picked)
        for r, c in _position_chunks(N, T, V, chunk_rows):
            lse[r, c] = torch.logsumexp(logits[r, c].float(), dim=-1)
        ctx.save_for_backward(logits, safe, mask, lse)
        ctx.chunk_rows = chunk_rows
        return (picked - lse) * mask

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # g: (N, T-1)
        logits, safe, mask, lse = ctx.saved_tensors
        N, T, V = logits.shape
        g = (g * mask).float()
        grad = torch.empty_like(logits)  # (N, T, V): d/dlogits = g * (onehot(label) - softmax)
        grad[:, -1] = 0
        for r, c in _position_chunks(N, T, V, ctx.chunk_rows):
            p = (logits[r, c].float() - lse[r, c, None]).exp_()
            p.mul_(-g[r, c, None]).scatter_add_(2, safe[r, c, None], g[r, c, None])
            grad[r, c] = p
        return grad, None, None


# ----------------------------------------------------------------------------- flat: M labelled positions


def flat_logps_from_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """Flat logps log_softmax(h @ W^T + b)[target] for M positions. h: (M, H), W: (V, H) -> (M,) fp32.
    A fused kernel (`_FusedHeadLogps`): no fp32 copy of the (M, V) logits and no separate
    logits-gradient tensor."""
    return _FusedHeadLogps.apply(h, weight, bias, targets)


def flat_logps_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Flat logps for (M, V) logits with plain autograd (any head module). -> (M,) fp32."""
    picked = logits.gather(1, targets[:, None]).squeeze(1).float()
    lse = torch.cat([torch.logsumexp(logits[s:e].float(), -1) for s, e in _row_chunks(logits)])
    return picked - lse


class _FusedHeadLogps(torch.autograd.Function):
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
            logits = _head_logits(h.to(cd), weight, bias, cd)  # (M, V)
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
            w = _frozen_cast(weight, cd)
            grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
            for s, e in _vocab_chunks(w, cd):
                grad_h += (d[:, s:e] @ w[s:e].to(cd)).float()
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


def _frozen_cast(weight: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """The weight in the compute dtype. A frozen weight (no grad: the LM head under LoRA) is cast once
    and the copy kept on the tensor until the weight changes (its version counter moves): autocast
    caches only casts of weights that require grad, so a bf16 step on fp32 weights would otherwise
    cast the whole head three times (policy, reference, backward). The copy costs the memory of the head
    in the compute dtype. A trained weight is returned as is and cast chunk by chunk (`_vocab_chunks`)."""
    if weight.dtype == cd or weight.requires_grad:
        return weight
    key = (weight._version, weight.data_ptr(), cd)
    cached = getattr(weight, "_stepdpo_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(cd))
        weight._stepdpo_cast = cached
    return cached[1]


def _vocab_chunks(weight: torch.Tensor, cd: torch.dtype):
    """One chunk when the weight is already in the compute dtype; else cast ~32k rows at a time."""
    V = weight.shape[0]
    c = V if weight.dtype == cd else 32768
    return ((s, min(s + c, V)) for s in range(0, V, c))


_GEMM_MIN_OUT = 1 << 23  # outputs (32 MB of fp32) below which a head GEMM is not split further


def _gemm_rows(h: torch.Tensor, V: int, cd: torch.dtype) -> int:
    """Rows per LM-head GEMM. On CPUs a bf16/fp16 GEMM may compute into an fp32 buffer of its whole
    output and then convert (measured: bf16 logits + an fp32 copy, 3.0x the logits, on an AVX-512
    Xeon without AVX512-BF16), so on CPU a low-precision GEMM runs 1/16 of the rows at a time, but
    never fewer rows than `_GEMM_MIN_OUT` outputs (a 27-row GEMM at vocab 32k runs at half the
    FLOP rate of a 256-row one) and never more than ~16M outputs; fp32 and accelerators run one GEMM."""
    M = h.shape[0]
    if h.device.type != "cpu" or cd == torch.float32:
        return max(M, 1)
    V = max(V, 1)
    return max(1, min(M, max(8, math.ceil(M / 16), _GEMM_MIN_OUT // V), (1 << 24) // V))


def _head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cd: torch.dtype) -> torch.Tensor:
    """h (M, H) @ weight (V, H)^T + bias -> (M, V) logits in dtype cd, in GEMM chunks (`_gemm_rows`)."""
    weight = _frozen_cast(weight, cd)
    chunks = list(_vocab_chunks(weight, cd))
    M, V = h.shape[0], weight.shape[0]
    rows = _gemm_rows(h, V, cd)
    if len(chunks) == 1 and rows >= M:
        return F.linear(h, weight.to(cd), None if bias is None else bias.to(cd))
    out = torch.empty((M, V), dtype=cd, device=h.device)
    for s, e in chunks:
        w, b = weight[s:e].to(cd), None if bias is None else bias[s:e].to(cd)
        for r in range(0, M, rows):
            if len(chunks) > 1:  # a block of columns: computed, then copied in
                out[r:r + rows, s:e] = F.linear(h[r:r + rows], w, b)
            elif b is None:  # whole rows, a contiguous slice: the GEMM writes it (no copy)
                torch.mm(h[r:r + rows], w.t(), out=out[r:r + rows])
            else:
                torch.addmm(b, h[r:r + rows], w.t(), out=out[r:r + rows])
    return out


# ----------------------------------------------------------------------------- from hidden states / a model


class ModelLogps(torch.nn.Module):
    """A causal LM as (input_ids, attention_mask, labels[, run]) -> (N, T-1) aligned logps.

    For plain-head architectures (PLAIN_HEAD) the LM head runs only at labelled positions, once per
    distinct (position, label); otherwise the model's logits are gathered there. `run` (a
    `PreferenceBatch.run`: run_ids, run_seg, run_pos, src) gives the rows the model runs on and
    where each label is predicted; without it the sides themselves run. A packed run (run_pos set)
    attends through `batching.tree_mask`, which only attention implementations that take a custom
    4D mask honour: `packs` says whether this model does. DDP wraps this module, so the policy forward
    goes through DDP (gradient hooks) while the reference forward calls the unwrapped module directly
    (`model.disable_adapter()` acts on the underlying model).
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
        # A packed pair needs a tree mask: sdpa and eager take a 4D mask as given; flash-attention and
        # flex do not, and sliding-window layers would need the window in the mask too.
        sliding = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
        self.packs = (self.parts is not None and not sliding
                      and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager"))

    def forward(self, input_ids, attention_mask, labels, run=None):
        if run is None:  # the sides are the run rows
            n, T = input_ids.shape
            src = torch.arange(n * T, device=labels.device).view(n, T)[:, :-1]
            run = (input_ids, torch.where(attention_mask.bool(), 0, -1), None, src.masked_fill(labels[:, 1:] == IGNORE, -1))
        ids, seg, pos, src = run
        if pos is None:
            mask = (seg >= 0).long()
        else:
            mask = tree_mask(seg)
            if getattr(self.model.config, "_attn_implementation", None) == "eager":  # additive
                dtype = next(self.model.parameters()).dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        sel = src >= 0  # (N, T-1): labelled positions, row-major
        at, tgt = src[sel], labels[:, 1:][sel]  # (M,) run position, label
        key = at * (int(tgt.max()) + 1 if len(tgt) else 1) + tgt  # a shared position's label is read by both sides
        uniq, inv = torch.unique(key, return_inverse=True)
        u_at, u_tgt = at.new_empty(len(uniq)), tgt.new_empty(len(uniq))
        u_at[inv], u_tgt[inv] = at, tgt
        if self.parts is None:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            lp = flat_logps_from_logits(logits.flatten(0, 1)[u_at], u_tgt)
        else:
            decoder, head = self.parts
            hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
            h = hidden.flatten(0, 1)[u_at]  # (U, H)
            if type(head) is torch.nn.Linear:
                lp = flat_logps_from_head(h, head.weight, head.bias, u_tgt)
            else:  # e.g. a LoRA-wrapped or quantized head
                lp = flat_logps_from_logits(head(h), u_tgt)
        return torch.zeros(sel.shape, dtype=lp.dtype, device=lp.device).masked_scatter(sel, lp[inv])  # (N, T-1)


def reference_logps(policy: ModelLogps, reference: ModelLogps | None, batch: PreferenceBatch) -> torch.Tensor:
    """Aligned reference logps (no grad): the frozen copy, or the policy with its adapter off."""
    with torch.no_grad(), (policy.model.disable_adapter() if reference is None else contextlib.nullcontext()):
        return (reference or policy)(batch.input_ids, batch.attention_mask, batch.labels, batch.run)
