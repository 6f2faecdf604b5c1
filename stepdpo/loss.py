"""The token-weighted preference losses and the SFT loss. Pure tensor functions of per-token
log-probs (computed in `stepdpo.logprobs`).

For a pair (x, y^c, y^r) with token weights w^c, w^r (0 on prompt and padding), define the
weighted implicit rewards

    R^c = sum_t w^c_t * (log pi_theta(y^c_t | x, y^c_<t) - log pi_ref(y^c_t | x, y^c_<t))
    R^r = sum_t w^r_t * (log pi_theta(y^r_t | ...)       - log pi_ref(y^r_t | ...))
    h   = R^c - R^r

and the per-pair losses (`loss_type`):

    sigmoid  (DPO, Rafailov et al. 2023):        -log sigma(beta * h)
    robust   (label-noise robust DPO, Chowdhury et al. 2024, eps = label_smoothing):
             (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps)
    hinge    (SLiC-HF, Zhao et al. 2023):         max(0, 1 - beta * h)
    ipo      (IPO, Azar et al. 2023):             (h - 1 / (2 beta))^2

With every w_t = 1 on response tokens this is exactly standard DPO (resp. IPO, SLiC, rDPO).
`token_reduction="mean"` divides each R by the sum of that response's weights (length-
normalised rewards, as the IPO paper's implementation does); "sum" is DPO's definition.

Optional anchor (RPO, Pang et al. 2024): `+ nll_alpha * NLL(y^c)`, the mean negative
log-likelihood per chosen response token (unweighted), which keeps the chosen log-probability
from falling; with `nll_mask` it averages over other tokens (e.g. the shared prefix steps too).
The batch loss is the mean over pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions that predict nothing (prompt, padding); batching writes it
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def weighted_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, weights: torch.Tensor,
                      mask: torch.Tensor, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                      nll_alpha: float = 0.0, token_reduction: str = "sum",
                      focus: torch.Tensor | None = None,
                      nll_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-weighted preference loss over a batch whose first half rows are chosen, second rejected.

    policy_logps, ref_logps: (2B, L) per-token log-probs (0 off-response); weights: (2B, L) w_t;
    mask: (2B, L) bool, True on response tokens; focus: optional (2B, L), 1 on the first-error
    step (for the `rewards/first_error_margin` metric only); nll_mask: optional (2B, L) bool, the
    tokens the NLL anchor averages over on the chosen rows (default `mask`: the chosen
    continuation; `nll_on=solution` adds the prefix steps, whose log-probs the caller computed).
    Returns (loss, metrics): scalar
    metrics, plus two (B,) tensors for histograms, `margins/pair` (beta * h per pair) and, with
    `focus`, `margins/first_error_step` (beta * the margin of the first-error step alone).
    """
    if not (policy_logps.shape == ref_logps.shape == weights.shape == mask.shape) or policy_logps.shape[0] % 2:
        raise ValueError("weighted_dpo_loss: policy_logps, ref_logps, weights, mask must share an even-rowed (2B, L) shape; "
                         f"got {tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(weights.shape)}, {tuple(mask.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"trainer.loss_type: unknown {loss_type!r}; choose one of {LOSS_TYPES}")
    if token_reduction not in ("sum", "mean"):
        raise ValueError(f"trainer.token_reduction: unknown {token_reduction!r}; choose sum or mean")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"trainer.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    B = policy_logps.shape[0] // 2
    w = weights * mask
    ratio = policy_logps - ref_logps.detach()  # (2B, L)
    R = (w * ratio).sum(-1)  # (2B,)
    if token_reduction == "mean":
        R = R / w.sum(-1).clamp_min(1e-8)
    h = R[:B] - R[B:]  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    nm = (mask if nll_mask is None else nll_mask)[:B]
    nll = -(policy_logps[:B] * nm).sum(-1) / nm.sum(-1).clamp_min(1)  # (B,) mean NLL per chosen token
    if nll_alpha:
        loss = loss + nll_alpha * nll.mean()
    with torch.no_grad():
        rc, rr = beta * R[:B], beta * R[B:]
        m = {
            "loss/preference": losses.mean(), "loss/nll_chosen": nll.mean(),
            "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margin": (rc - rr).mean(),
            "rewards/accuracy": (h > 0).float().mean(),
            "logps/chosen": (policy_logps[:B] * mask[:B]).sum(-1).mean(),
            "logps/rejected": (policy_logps[B:] * mask[B:]).sum(-1).mean(),
            "logps/chosen_drift": (ratio[:B] * mask[:B]).sum(-1).mean(),  # log pi - log pi_ref on chosen
            "tokens/weighted_chosen": w[:B].sum(), "tokens/weighted_rejected": w[B:].sum(),
            "tokens/reversed_weight": (-w).clamp_min(0).sum(),  # negative weights (signed advantages): pull reversed
            "tokens/response": mask.sum(),
            "margins/pair": (rc - rr).detach(),  # (B,): histogram, not a scalar
        }
        if focus is not None:
            f = focus * mask
            fr = (f * ratio).sum(-1)
            m["margins/first_error_step"] = beta * (fr[:B] - fr[B:])  # (B,)
            m["rewards/first_error_margin"] = m["margins/first_error_step"].mean()
    return loss, m


def sft_loss(policy_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean negative log-likelihood per response token. policy_logps, mask: (N, L)."""
    n = mask.sum().clamp_min(1)
    loss = -(policy_logps * mask).sum() / n
    return loss, {"loss/nll": loss.detach(), "tokens/response": mask.sum()}
