"""The loss against hand-worked numbers; all-ones weights are exactly standard DPO."""

import math

import pytest
import torch
import torch.nn.functional as F

from stepdpo.logprobs import logps_from_logits
from stepdpo.loss import sft_loss, weighted_dpo_loss


def _inputs():
    # one pair, 3 response positions; rows: chosen, rejected
    pol = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]])
    ref = torch.tensor([[-1.2, -2.5, -0.5], [-1.0, -1.0, -2.0]])
    mask = torch.tensor([[True, True, True], [True, True, True]])
    return pol, ref, mask


def test_sigmoid_hand_worked():
    pol, ref, mask = _inputs()
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    # R_c = 1*(0.2) + 0*(0.5) + 1*(0) = 0.2 ; R_r = 0*(-0.5) + 1*0 + 1*(-1.0) = -1.0 ; h = 1.2
    loss, m = weighted_dpo_loss(pol, ref, w, mask, beta=0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.6))), rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margin"].item() == pytest.approx(0.6)
    assert m["rewards/accuracy"].item() == 1.0


@pytest.mark.parametrize("loss_type,expected", [
    ("hinge", max(0.0, 1 - 0.5 * 1.2)),
    ("ipo", (1.2 - 1 / (2 * 0.5)) ** 2),
    ("robust", (-(0.9) * math.log(1 / (1 + math.exp(-0.6))) + 0.1 * math.log(1 / (1 + math.exp(0.6)))) / 0.8),
])
def test_other_losses_hand_worked(loss_type, expected):
    pol, ref, mask = _inputs()
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    loss, _ = weighted_dpo_loss(pol, ref, w, mask, beta=0.5, loss_type=loss_type, label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_nll_anchor_and_mean_reduction():
    pol, ref, mask = _inputs()
    w = torch.ones_like(pol)
    base, _ = weighted_dpo_loss(pol, ref, w, mask, beta=0.1)
    anchored, m = weighted_dpo_loss(pol, ref, w, mask, beta=0.1, nll_alpha=2.0)
    assert anchored.item() == pytest.approx(base.item() + 2.0 * (3.5 / 3), rel=1e-6)
    assert m["loss/nll_chosen"].item() == pytest.approx(3.5 / 3)
    # mean reduction: R_c = 0.7/3, R_r = -1.5/3
    mean, _ = weighted_dpo_loss(pol, ref, w, mask, beta=1.0, token_reduction="mean")
    assert mean.item() == pytest.approx(-F.logsigmoid(torch.tensor(2.2 / 3)).item(), rel=1e-6)


def test_all_ones_equals_standard_dpo_loss_and_grads():
    torch.manual_seed(0)
    B, L = 3, 7
    pol = torch.randn(2 * B, L, requires_grad=True)
    ref = torch.randn(2 * B, L)
    mask = torch.rand(2 * B, L) > 0.3
    loss, _ = weighted_dpo_loss(pol, ref, torch.ones(2 * B, L), mask, beta=0.3)
    (g,) = torch.autograd.grad(loss, pol)
    # textbook DPO on sequence log-probs
    pol2 = pol.detach().clone().requires_grad_(True)
    seq = (pol2 * mask).sum(-1)
    rseq = (ref * mask).sum(-1)
    ref_loss = -F.logsigmoid(0.3 * ((seq[:B] - rseq[:B]) - (seq[B:] - rseq[B:]))).mean()
    (g2,) = torch.autograd.grad(ref_loss, pol2)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)  # same math, different summation order
    assert torch.allclose(g, g2, atol=1e-6)


def test_token_logps_matches_log_softmax_and_masks():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    lp = logps_from_logits(logits, labels)
    full = torch.log_softmax(logits[:, :-1], -1)
    assert lp.shape == (2, 4)
    assert lp[0, 1].item() == pytest.approx(full[0, 1, 3].item(), abs=1e-6)
    assert lp[1, 0].item() == pytest.approx(full[1, 0, 1].item(), abs=1e-6)
    assert lp[0, 0].item() == 0.0 and lp[1, 2].item() == 0.0


def test_bad_shapes_name_what_they_got():
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        weighted_dpo_loss(torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool), beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        weighted_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), beta=0.1, loss_type="kto")


def test_sft_loss():
    lp = torch.tensor([[-1.0, -3.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    loss, _ = sft_loss(lp, mask)
    assert loss.item() == pytest.approx(2.0)
