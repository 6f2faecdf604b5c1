"""The training loop: selective log-probs, batch arithmetic, metrics, LoRA vs base, errors."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from stepdpo import logprobs
from stepdpo.batching import Example, collate
from stepdpo.config import TrainerConfig
from stepdpo.logprobs import (ModelLogps, _gemm_rows, flat_logps_from_head, flat_logps_from_logits, logps_from_logits,
                              reference_logps)
from stepdpo.model import LoraSpec, add_lora, tiny_llama
from stepdpo.train import BatchStream, native_bf16, train

from conftest import TINY, Recorder, cfg, lora_model, make_examples, token_span_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_selective_logps_equal_full_logits_values_and_grads():
    torch.manual_seed(0)
    model, tok = tiny_llama(**TINY)
    batch = collate(make_examples(3), tok.pad_token_id)
    lp = ModelLogps(model)
    assert lp.parts is not None  # llama: the LM head runs only at response positions
    fast = lp(batch.input_ids, batch.attention_mask, batch.labels)
    full = logps_from_logits(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
    assert fast.shape == full.shape == (6, batch.input_ids.shape[1] - 1)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-6)
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), list(model.parameters()))
    full = logps_from_logits(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
    g_full = torch.autograd.grad((full * w).sum(), list(model.parameters()))
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 logits, fp32 log-softmax statistics
        fast16 = lp(batch.input_ids, batch.attention_mask, batch.labels)
    assert fast16.dtype == torch.float32 and (fast16 - full).abs().max() < 0.05


def test_head_logps_backward_matches_autograd_with_bias():
    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    W = torch.randn(13, 5, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    t = torch.randint(0, 13, (7,))
    g = torch.randn(7)
    got = torch.autograd.grad((flat_logps_from_head(h, W, b, t) * g).sum(), (h, W, b))
    want = torch.autograd.grad((flat_logps_from_logits(h @ W.t() + b, t) * g).sum(), (h, W, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the reference pass keeps nothing for backward
        torch.testing.assert_close(flat_logps_from_head(h, W, b, t), flat_logps_from_logits(h @ W.t() + b, t))


def test_head_logps_bf16_in_row_chunks_matches_one_gemm(monkeypatch):
    # on CPU a bf16 head GEMM runs 1/16 of the rows at a time (no fp32 buffer of all the logits),
    # but no GEMM smaller than _GEMM_MIN_OUT outputs: at this toy size that would be one GEMM
    assert _gemm_rows(torch.zeros(300, 16), 50, torch.bfloat16) == 300
    assert _gemm_rows(torch.zeros(4096, 16), 32000, torch.bfloat16) == 262  # 8M outputs at vocab 32k
    assert _gemm_rows(torch.zeros(1600, 16), 128256, torch.bfloat16) == 100  # 1/16 of the rows
    assert _gemm_rows(torch.zeros(4096, 16), 128256, torch.bfloat16) == 130  # at most ~16M outputs
    monkeypatch.setattr(logprobs, "_GEMM_MIN_OUT", 0)
    torch.manual_seed(0)
    h = torch.randn(300, 16, requires_grad=True)
    W = (torch.randn(50, 16) * 0.3).requires_grad_()
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    g = torch.randn(300)
    assert _gemm_rows(h, 50, torch.bfloat16) == 19 and _gemm_rows(h, 50, torch.float32) == 300
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_lp = flat_logps_from_head(h, W, b, t)
        got = torch.autograd.grad((got_lp * g).sum(), (h, W, b))
    logits = F.linear(h.bfloat16(), W.bfloat16(), b.bfloat16())  # one bf16 GEMM
    want_lp = flat_logps_from_logits(logits, t)
    want = torch.autograd.grad((want_lp * g).sum(), (h, W, b))
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-6)  # same bf16 logits row by row
    for x, y in zip(got, want):  # the backward keeps dlogits in bf16: compare as a whole, to bf16 precision
        assert ((x.float() - y.float()).norm() / y.float().norm()).item() < 1e-2


def test_frozen_head_is_cast_once_and_recast_when_it_changes():
    # a bf16 step on an fp32 frozen head: the cast is kept on the weight and follows in-place updates
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    W = torch.randn(50, 16) * 0.3  # frozen, fp32
    t = torch.randint(0, 50, (40,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = flat_logps_from_head(h, W, None, t)
        return lp, torch.autograd.grad(lp.sum(), h)[0]

    def want():  # the same bf16 GEMM with a fresh cast, through plain autograd
        lp = flat_logps_from_logits(F.linear(h.bfloat16(), W.bfloat16()), t)
        return lp, torch.autograd.grad(lp.sum(), h)[0]

    lp, g = step()
    copy = W._stepdpo_cast[1]
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, W.bfloat16())
    step()
    assert W._stepdpo_cast[1] is copy  # not cast again
    with torch.no_grad():
        W.mul_(-2.0)  # e.g. a loaded state dict: the version counter moves
    lp2, g2 = step()
    assert W._stepdpo_cast[1] is not copy
    for x, y in zip((lp2, g2), want()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    assert (lp2 - lp).abs().max() > 0.1


def test_reference_is_the_adapter_disabled_policy():
    policy, ref, tok = lora_model()
    assert ref is None
    with torch.no_grad():  # make the adapter matter
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    batch = collate(make_examples(2), tok.pad_token_id)
    lp = ModelLogps(policy)
    r = reference_logps(lp, None, batch)
    with policy.disable_adapter(), torch.no_grad():
        want = logps_from_logits(policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
    torch.testing.assert_close(r, want, rtol=0, atol=1e-6)
    assert not r.requires_grad
    assert (lp(batch.input_ids, batch.attention_mask, batch.labels) - r).abs().max() > 1e-4


def test_batch_stream_is_deterministic_resumable_and_sharded():
    lengths = [random.Random(i).randrange(5, 50) for i in range(22)]
    s = BatchStream(lengths, 4, seed=3)
    seq = [s.next() for _ in range(12)]  # 5 full batches per epoch (22 // 4): crosses two epochs
    assert all(len(b) == 4 for b in seq)
    assert len(set(sum(seq[:5], []))) == 20  # within an epoch, disjoint
    s2 = BatchStream(lengths, 4, seed=3)
    for _ in range(7):
        s2.next()
    state = s2.state_dict()
    assert state == {"epoch": 1, "index": 2}
    s3 = BatchStream(lengths, 4, seed=3)
    s3.load_state_dict(state)
    assert [s3.next() for _ in range(5)] == seq[7:12]
    other = BatchStream(lengths, 4, seed=4)
    other_epoch = [other.next() for _ in range(5)]
    assert len(set(sum(other_epoch, []))) == 20  # another seed: again 5 disjoint batches...
    assert other_epoch != seq[:5]  # ...in another order
    assert seq[5:10] != seq[:5] and len(set(sum(seq[5:10], []))) == 20  # the next epoch: reshuffled, disjoint
    with pytest.raises(ValueError, match="fewer than one global batch of 32"):
        BatchStream(lengths, 32, seed=0)


def test_two_steps_change_the_adapter_not_the_base_and_log_every_metric():
    policy, ref, tok = lora_model()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    rec = Recorder()
    last = train(cfg(max_steps=2), policy, tok, make_examples(16), rec, ref_model=ref, prefix="dpo")
    for n, p in policy.named_parameters():
        changed = not torch.equal(p, before[n])
        if "lora_B" in n:  # lora_A alone may stay put at step 1 (B = 0), B must move
            assert changed, n
        if "lora_" not in n:
            assert not changed, f"base weight {n} changed"
    assert [s for s, _ in rec.rows] == [1, 2]
    issue_metrics = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                     "tokens/weighted_chosen", "tokens/weighted_rejected", "rewards/first_error_margin",
                     "logps/chosen_drift", "lr", "grad_norm", "tokens_per_s", "peak_rss_mb", "tokens/nonpad"]
    for _, m in rec.rows:
        for k in issue_metrics:
            assert f"dpo/{k}" in m, k
    assert last == rec.rows[-1][1]
    for _, m in rec.rows:  # per-pair margins of every pair in the window (batch 4 per step here), for histograms
        assert len(m["dpo/margins/pair"]) == len(m["dpo/margins/first_error_step"]) == cfg().batch_size
        assert sum(m["dpo/margins/pair"]) / len(m["dpo/margins/pair"]) == pytest.approx(m["dpo/rewards/margin"], abs=1e-6)
        assert (sum(m["dpo/margins/first_error_step"]) / len(m["dpo/margins/first_error_step"])
                == pytest.approx(m["dpo/rewards/first_error_margin"], abs=1e-6))
    m1 = rec.rows[0][1]
    assert m1["dpo/loss"] == pytest.approx(0.6931471, abs=1e-6)  # policy == reference at step 1
    assert m1["dpo/logps/chosen_drift"] == 0.0 and m1["dpo/tokens_per_s"] > 0


def test_grad_accum_and_micro_batch_split_give_the_same_step():
    """global batch 8 as 1 x 8, or 2 micro-batches of 4: same data, loss and update."""
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        policy, ref, tok = lora_model()
        rec = Recorder()
        train(cfg(max_steps=2, batch_size=bs, grad_accum=ga), policy, tok, make_examples(24), rec, ref_model=ref)
        results.append((rec.rows, {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}))
    (r1, p1), (r2, p2) = results
    for (_, a), (_, b) in zip(r1, r2):
        for k in ("train/loss", "train/rewards/margin", "train/grad_norm", "train/tokens/nonpad",
                  "train/tokens/weighted_chosen"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-5, atol=1e-6)


def test_full_finetune_with_frozen_reference_copy_and_bf16():
    torch.manual_seed(0)
    model, tok = tiny_llama(**TINY)
    policy, ref = add_lora(model, LoraSpec(name="none"))
    w0 = ref.lm_head.weight.detach().clone()
    rec = Recorder()
    train(cfg(max_steps=2, precision="bf16"), policy, tok, make_examples(8), rec, ref_model=ref)
    assert torch.equal(ref.lm_head.weight, w0)
    assert not torch.equal(policy.lm_head.weight, w0)
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for _, m in rec.rows)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog, native):
    """trainer.precision=bf16 where oneDNN emulates bf16 matmuls (an AVX2-only CPU: 0.5 against 82 GFLOP/s
    in fp32) trains, with one warning that names the fix; with native bf16 there is no warning."""
    import logging

    import stepdpo.train as train_mod

    monkeypatch.setattr(train_mod, "native_bf16", lambda device: native)
    torch.manual_seed(0)
    policy, ref, tok = lora_model()
    with caplog.at_level(logging.WARNING, logger="stepdpo.train"):
        train(cfg(max_steps=1, precision="bf16"), policy, tok, make_examples(4), Recorder(), ref_model=ref)
    warned = [r.getMessage() for r in caplog.records if "native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    if warned:
        assert "trainer.precision=fp32" in warned[0]


def test_native_bf16_is_onednns_check_on_cpu():
    assert native_bf16(torch.device("cpu")) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert native_bf16(torch.device("meta")) is True  # not a CPU: autocast's own business


@pytest.mark.parametrize("ampere", [True, False])
def test_native_bf16_on_cuda_is_torchs_check_without_emulation(monkeypatch, ampere):
    """A T4 or V100 runs bf16 in emulation: precision=auto takes fp32 there, bf16 warns (no GPU here: torch's own
    check, as asked, stands in)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or ampere)
    assert native_bf16(torch.device("cuda", 0)) is ampere and asked == [False]


def test_sft_stage_runs_on_the_same_loop():
    torch.manual_seed(0)
    model, tok = tiny_llama(**TINY)
    rec = Recorder()
    train(cfg(loss="sft", max_steps=3, lr=1e-2), model, tok, make_examples(12), rec, prefix="sft")
    losses = [m["sft/loss"] for _, m in rec.rows]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_errors_name_the_problem():
    torch.manual_seed(0)
    model, tok = tiny_llama(**TINY)
    with pytest.raises(ValueError, match="no training examples"):
        train(cfg(), model, tok, [], Recorder())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        policy, ref, tok = lora_model()
        train(cfg(batch_size=4, grad_accum=2), policy, tok, make_examples(5), Recorder(), ref_model=ref)
    with pytest.raises(ValueError, match="no reference"):
        train(cfg(), model, tok, make_examples(8), Recorder())


def test_sft_loss_is_the_token_mean_of_the_global_batch_however_split():
    results = []
    for bs, ga in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        model, tok = tiny_llama(**TINY)
        rec = Recorder()
        train(cfg(loss="sft", max_steps=2, batch_size=bs, grad_accum=ga), model, tok, make_examples(16), rec)
        results.append(([m["train/loss"] for _, m in rec.rows], model.lm_head.weight.detach().clone()))
    (l1, w1), (l2, w2) = results
    assert l1 == pytest.approx(l2, rel=1e-5)
    torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_values_and_grads_match_log_softmax(dtype):
    """logprobs.logps_from_logits (the full-logits path, e.g. Gemma) has a chunked custom backward: check it."""
    torch.manual_seed(0)
    x = torch.randn(3, 9, 17, dtype=dtype, requires_grad=True)
    lab = torch.randint(0, 17, (3, 9))
    lab[:, :3] = -100
    lab[2, 6:] = -100
    g = torch.randn(3, 8)
    got = logps_from_logits(x, lab)
    want = torch.log_softmax(x[:, :-1].float(), -1).gather(2, lab[:, 1:].clamp_min(0)[..., None]).squeeze(-1)
    want = want * (lab[:, 1:] != -100)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (ga,) = torch.autograd.grad((got * g).sum(), x)
    (gb,) = torch.autograd.grad((want * g).sum(), x)
    assert ga.dtype == dtype
    torch.testing.assert_close(ga.float(), gb.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_nll_on_solution_anchors_prefix_steps_and_leaves_dpo_alone():
    """trainer.nll_on=solution: the NLL anchor averages over the prefix steps + chosen continuation
    (computed here from full logits), while the preference term and its metrics are unchanged."""
    from stepdpo.batching import encode_pair
    from stepdpo.data import StepPair

    torch.manual_seed(0)
    model, tok = tiny_llama(**TINY)
    pairs = [StepPair(id=str(i), question=f"Start with {i}, add 2, add 3. What is the result?", answer=str(i + 5),
                      prefix=[f"{i} + 2 = {i + 2}"] * (i % 2 + 1), chosen=[f"{i + 2} + 3 = {i + 5}", f"The answer is {i + 5}"],
                      rejected=[f"{i + 2} + 3 = {i + 6}", f"The answer is {i + 6}"]) for i in range(4)]
    pairs.append(StepPair(id="np", question="q", answer="1", prefix=[], chosen=["1"], rejected=["2"]))  # no prefix
    ex = [encode_pair(p, tok, weighting="first_error") for p in pairs]
    assert [e.n_prefix for e in ex] == [len("0 + 2 = 2\n"), 2 * len("1 + 2 = 3\n"), len("2 + 2 = 4\n"),
                                        2 * len("3 + 2 = 5\n"), 0]  # char tokenizer: one token per character
    plain, full = collate(ex, tok.pad_token_id), collate(ex, tok.pad_token_id, nll_prefix=True)
    B = len(ex)
    for f in ("input_ids", "attention_mask", "token_weights", "focus"):
        assert torch.equal(getattr(plain, f), getattr(full, f)), f
    assert not plain.nll_only.any() and torch.equal(plain.labels[B:], full.labels[B:])  # rejected rows untouched
    for i, e in enumerate(ex):
        p = len(e.prompt_ids)
        assert full.nll_only[i].nonzero().flatten().tolist() == list(range(p - e.n_prefix, p))
        assert full.labels[i, p - e.n_prefix:p].tolist() == e.prompt_ids[p - e.n_prefix:]
        assert tok.decode(e.prompt_ids[p - e.n_prefix:]) == "".join(s + "\n" for s in pairs[i].prefix)

    # one training step: the logged anchor is the mean NLL over prefix + continuation tokens
    from stepdpo.batching import IGNORE

    with torch.no_grad():
        logits = model(input_ids=full.input_ids, attention_mask=full.attention_mask).logits
    lp = logps_from_logits(logits, full.labels)[:B]
    m = full.labels[:B, 1:] != IGNORE
    want_nll = float((-(lp * m).sum(-1) / m.sum(-1)).mean())
    cont = plain.labels[:B, 1:] != IGNORE
    want_cont = float((-(logps_from_logits(logits, plain.labels)[:B] * cont).sum(-1) / cont.sum(-1)).mean())
    assert want_nll != pytest.approx(want_cont)  # the two anchors really differ on this data
    logged = {}
    for on in ("continuation", "solution"):
        torch.manual_seed(0)
        m0, _ = tiny_llama(**TINY)
        policy, ref = add_lora(m0, LoraSpec(name="lora", r=4, alpha=8))
        rec = Recorder()
        train(cfg(max_steps=1, batch_size=B, nll_alpha=1.0, nll_on=on, weighting="first_error"), policy, tok, ex, rec,
              seed=0, prefix="dpo")
        logged[on] = rec.rows[-1][1]
    assert logged["solution"]["dpo/loss/nll_chosen"] == pytest.approx(want_nll, rel=1e-5)
    assert logged["continuation"]["dpo/loss/nll_chosen"] == pytest.approx(want_cont, rel=1e-5)
    for k in ("dpo/loss/preference", "dpo/logps/chosen", "dpo/rewards/margin", "dpo/tokens/response"):
        assert logged["solution"][k] == pytest.approx(logged["continuation"][k], rel=1e-6, abs=1e-7), k


def long_examples(n: int, seed: int = 1, vocab: int = 90) -> list[Example]:
    """Pairs far longer than make_examples' (5 + 30 tokens a row), so a step shows which set it drew from."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [1] + [rng.randrange(4, vocab) for _ in range(4)]
        c = [rng.randrange(4, vocab) for _ in range(29)] + [2]
        r = [rng.randrange(4, vocab) for _ in range(29)] + [2]
        w = [1.0] * 30
        out.append(Example(p, c, r, w, w, w, w))
    return out


@pytest.mark.parametrize("precompute_ref", [False, True])
def test_rounds_refresh_the_pairs_from_the_current_policy(tmp_path, precompute_ref):
    """trainer.rounds=2: at the half-way step the loop asks for new pairs (model in eval mode), then
    trains on them with the same optimizer and schedule; a precomputed reference table is rebuilt."""
    calls = []

    def refresh(r, step):
        calls.append((r, step, policy.training))
        return long_examples(8)

    runs = {}
    for pre in sorted({False, precompute_ref}):
        policy, ref, tok = lora_model()
        rec = Recorder()
        train(cfg(max_steps=4, rounds=2, precompute_ref=pre, ref_cache_dir=str(tmp_path)), policy, tok,
              make_examples(16), rec, ref_model=ref, prefix="dpo", refresh=refresh, step_offset=100)
        runs[pre] = rec.rows
    assert calls[0] == (1, 102, False)  # round 1 starts after step 2 (logged as 102: stages share the x-axis)
    rows = runs[precompute_ref]
    assert [s for s, _ in rows] == [101, 102, 103, 104]
    nonpad = [m["dpo/tokens/pairs"] for _, m in rows]
    assert max(nonpad[:2]) <= 4 * 2 * 20 and nonpad[2:] == [4 * 2 * 35] * 2  # round 0 pairs, then round 1's
    lrs = [m["dpo/lr"] for _, m in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(1e-2 * 0.1)  # one cosine schedule
    if precompute_ref:  # the cached reference of round 1's pairs gives the same losses as live reference passes
        for (_, a), (_, b) in zip(runs[False], runs[True]):
            assert a["dpo/loss"] == pytest.approx(b["dpo/loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("precompute_ref", [False, True])
def test_ref_update_round_makes_the_policy_the_reference(tmp_path, precompute_ref):
    """trainer.ref_update=round (iterative DPO): round 1's reference is the policy after round 0, so
    its first step sees implicit rewards of exactly 0 and the preference loss is log 2; with the
    fixed reference (the adapter-off model) the policy has already moved away from it."""
    logged = {}
    for upd in ("fixed", "round"):
        policy, ref, tok = lora_model()
        rec = Recorder()
        train(cfg(max_steps=4, rounds=2, ref_update=upd, precompute_ref=precompute_ref, ref_cache_dir=str(tmp_path)),
              policy, tok, make_examples(16), rec, prefix="dpo", refresh=lambda r, step: long_examples(8))
        logged[upd] = [m for _, m in rec.rows]
    first = logged["round"][2]  # step 3: round 1's first step, measured before its optimizer update
    assert first["dpo/rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first["dpo/rewards/rejected"] == pytest.approx(0, abs=1e-5)
    assert first["dpo/loss/preference"] == pytest.approx(math.log(2), abs=1e-5)
    fixed = logged["fixed"][2]
    assert abs(fixed["dpo/rewards/chosen"]) > 1e-3 and abs(fixed["dpo/rewards/margin"]) > 1e-3
    for a, b in zip(logged["fixed"][:2], logged["round"][:2]):  # round 0 is the same either way
        assert a["dpo/loss"] == pytest.approx(b["dpo/loss"], rel=1e-6)
    assert logged["round"][3]["dpo/rewards/margin"] != pytest.approx(0, abs=1e-6)  # and then it learns


def test_rounds_config_errors():
    from stepdpo.config import validate_trainer
    from omegaconf import OmegaConf

    def check(**kw):
        validate_trainer(OmegaConf.structured(cfg(**kw)), "trainer")

    check(rounds=3, max_steps=3)
    check(rounds=2, ref_update="round")
    check(rounds=2, loss="sft")  # ignored by SFT, so an experiment can set it for all its arms
    for kw, msg in [(dict(rounds=0), "trainer.rounds: must be in 1..max_steps"),
                    (dict(rounds=4, max_steps=3), "trainer.rounds: must be in 1..max_steps (3)"),
                    (dict(rounds=2, resume="auto"), "resume needs rounds=1"),
                    (dict(ref_update="round"), "trainer.ref_update=round: the reference is updated at each round"),
                    (dict(ref_update="policy", rounds=2), "trainer.ref_update: 'policy' is not one of")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            check(**kw)


def test_rejected_read_off_the_chosen_row_is_exact():
    """first_error + error_span=token: the rejected side's one weighted token has the chosen side's
    context, so collate labels it up to that token and, packed or not, the model runs on B rows, not
    2B; the log-probs, loss, gradients and trained weights are those of separate rejected rows."""
    torch.manual_seed(0)
    model, tok = tiny_llama(**TINY)
    ex = token_span_pairs(tok)
    B = len(ex)
    trimmed, full = collate(ex, tok.pad_token_id), collate(ex, tok.pad_token_id, trim_rejected=False)
    assert trimmed.run_ids.shape[0] == B and full.run_ids.shape[0] == 2 * B
    assert collate(ex, tok.pad_token_id, pack=True).run_ids.shape[0] == B
    assert torch.equal(trimmed.run_ids, full.run_ids[:B, :trimmed.run_ids.shape[1]])  # the chosen rows' tokens
    for i, e in enumerate(ex):  # rejected labels: tokens 0..j only, j the first differing token
        j, p = e.shared_upto, len(e.prompt_ids)
        assert e.chosen_ids[:j] == e.rejected_ids[:j] and e.chosen_ids[j] != e.rejected_ids[j]
        assert trimmed.labels[B + i, p:p + j + 1].tolist() == e.rejected_ids[:j + 1]
        assert (trimmed.labels[B + i, p + j + 1:] == -100).all()
        assert not any(e.rejected_w[j + 1:])
    w_s, w_f = trimmed.token_weights, full.token_weights
    Ts = w_s.shape[1]
    assert torch.equal(w_s[:B], w_f[:B, :Ts]) and not w_f[:B, Ts:].any()
    assert w_s[B:].sum() == w_f[B:].sum() == B  # one token per side

    policy = ModelLogps(model)
    calls = []
    hook = model.model.register_forward_hook(lambda m, a, kw_out: calls.append(kw_out.last_hidden_state.shape[0]))
    lp_s, lp_f = policy(trimmed.input_ids, trimmed.attention_mask, trimmed.labels, trimmed.run), \
        policy(full.input_ids, full.attention_mask, full.labels, full.run)
    hook.remove()
    assert calls == [B, 2 * B]  # the trimmed batch ran the decoder on B rows
    pos_s, pos_f = trimmed.labels[:, 1:] != -100, full.labels[:, 1:] != -100
    wpos_s, wpos_f = w_s[:, 1:] > 0, w_f[:, 1:] > 0
    assert torch.allclose(lp_s[wpos_s], lp_f[wpos_f], atol=1e-6)  # the weighted tokens, same order
    assert torch.allclose(lp_s[:B][pos_s[:B]], lp_f[:B][pos_f[:B]], atol=1e-6)

    # training: the same loss curve and adapter whichever way the batch is built
    import stepdpo.train as T

    results = {}
    for trim in (True, False):
        policy_m, _, _ = lora_model(seed=0, lora_seed=1)
        real = T.collate
        T.collate = lambda exs, pad, **kw: real(exs, pad, **kw, trim_rejected=trim)
        try:
            rec = Recorder()
            train(cfg(max_steps=3, batch_size=3, nll_alpha=1.0, beta=0.5, weighting="first_error", pack=False),
                  policy_m, tok, ex, rec, seed=0, prefix="dpo")
        finally:
            T.collate = real
        lora = {n: p.detach().clone() for n, p in policy_m.named_parameters() if "lora_" in n}
        results[trim] = ([m for _, m in rec.rows], lora)
    (rows_s, lora_s), (rows_f, lora_f) = results[True], results[False]
    for ms, mf in zip(rows_s, rows_f):
        for k in ("dpo/loss", "dpo/loss/preference", "dpo/loss/nll_chosen", "dpo/rewards/margin", "dpo/rewards/chosen",
                  "dpo/rewards/rejected", "dpo/rewards/accuracy", "dpo/tokens/weighted_rejected"):
            assert ms[k] == pytest.approx(mf[k], rel=1e-4, abs=1e-6), k
        assert ms["dpo/tokens/rows"] == 3 and mf["dpo/tokens/rows"] == 6
        assert ms["dpo/tokens/nonpad"] < mf["dpo/tokens/nonpad"] and ms["dpo/tokens/pairs"] == mf["dpo/tokens/pairs"]
    for n in lora_s:
        assert torch.allclose(lora_s[n], lora_f[n], atol=1e-5), n


def test_rejected_rows_stay_separate_when_a_later_token_is_weighted():
    tok = tiny_llama(**TINY)[1]
    ex = token_span_pairs(tok, 2)
    from dataclasses import replace

    step = replace(ex[0], rejected_w=[1.0] * len(ex[0].rejected_w))  # plain DPO weights: every token counts
    b = collate([ex[1], step], tok.pad_token_id)
    assert b.run_ids.shape[0] == 3  # two chosen rows, and the plain side's own row
    assert torch.equal(b.run_ids[2], b.input_ids[3, :b.run_ids.shape[1]])  # the whole side, as it always ran
    packed = collate([ex[1], step], tok.pad_token_id, pack=True)
    assert packed.run_ids.shape[0] == 2
    j, p = step.shared_upto, len(step.prompt_ids)  # the plain side's own tokens follow its chosen row's
    n_c = p + len(step.chosen_ids)  # the whole chosen side first
    assert packed.run_ids[1, n_c:n_c + len(step.rejected_ids) - 1 - j].tolist() == step.rejected_ids[j:-1]
    assert packed.run_pos[1, n_c:n_c + len(step.rejected_ids) - 1 - j].tolist() == list(range(p + j, p + len(step.rejected_ids) - 1))


def test_sft_examples_obey_max_length():
    """sft.max_length / trainer.max_length bound SFT examples as they bound pairs: the question's oldest tokens go
    first; a solution that can't fit even so is left out and counted; none left is an error naming the knob."""
    from stepdpo.batching import encode_sft, encode_sft_all
    from stepdpo.model import char_tokenizer

    tok = char_tokenizer()
    short, long_ = ["1 + 1 = 2", "The answer is 2"], ["9 - 1 = 8"] * 30 + ["The answer is 8"]
    q = "Start with 1, add 1. What is the result? " * 3
    full = encode_sft(q, short, tok)
    cap = len(full.prompt_ids) + len(full.chosen_ids) - 20  # the question must lose 20 tokens
    cut = encode_sft(q, short, tok, max_length=cap)
    assert cut.chosen_ids == full.chosen_ids and len(cut.prompt_ids) + len(cut.chosen_ids) <= cap
    assert len(cut.prompt_ids) < len(full.prompt_ids)
    examples, dropped = encode_sft_all([(q, short), (q, long_)], tok, cap, where="sft.max_length")
    assert dropped == 1 and len(examples) == 1 and examples[0].chosen_ids == full.chosen_ids
    with pytest.raises(ValueError, match=r"sft.max_length=\d+: every one of the 1 SFT solutions is longer"):
        encode_sft_all([(q, long_)], tok, cap, where="sft.max_length")
    assert encode_sft_all([(q, long_)], tok, None, where="sft.max_length")[1] == 0  # no limit


@pytest.mark.parametrize("kind", ["none", "lora", "qlora"])
def test_gradient_checkpointing_gives_the_same_gradients_without_warnings(tmp_path, kind):
    """trainer.gradient_checkpointing on every lora path (qlora through peft's prepare_model_for_kbit_training):
    the trainable parameters' gradients equal those without checkpointing, and torch's non-reentrant mode is asked
    for explicitly (no use_reentrant warning)."""
    import warnings

    from stepdpo.model import ModelSpec, QuantSpec, load_base

    torch.manual_seed(0)
    base, tok = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    base.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    ids = torch.randint(3, base.config.vocab_size, (2, 12))
    grads = []
    for ckpt in (False, True):
        m, _ = load_base(ModelSpec(name="local", path=str(tmp_path / "m")),
                         quant=QuantSpec() if kind == "qlora" else None)
        spec = LoraSpec(name=kind, r=4, alpha=8, quant=QuantSpec() if kind == "qlora" else None)
        torch.manual_seed(1)  # the same adapter init
        m, _ = add_lora(m, spec, gradient_checkpointing=ckpt)
        if kind != "none":  # B starts at 0: make the adapter's own gradients depend on its path too
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
        m.train()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            F.cross_entropy(m(input_ids=ids).logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        assert not [w for w in seen if "reentrant" in str(w.message)], [str(w.message) for w in seen]
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
