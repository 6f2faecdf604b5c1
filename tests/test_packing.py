"""Packed pairs (`collate(pack=True)`): one run row per pair, the prompt and the sides' shared tokens
computed once, each side's own tokens behind a tree mask. Checked against each side run alone,
unpadded and without a mask, through the model's own forward and `log_softmax`."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from stepdpo.batching import CHOSEN, PAD, REJECTED, SHARED, Example, collate, tree_mask
from stepdpo.logprobs import ModelLogps, reference_logps
from stepdpo.model import LoraSpec, add_lora
from stepdpo.train import train

from conftest import Recorder, cfg

VOCAB = 97


def prefix_pairs(n: int, seed: int = 0, eos: int = 2) -> list[Example]:
    """Pairs whose sides share a response prefix of 0..all tokens (a perturbed step's pairs), some
    rejected sides weighted only up to the first differing token, some chosen as a prefix of rejected."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 12))]
        c = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 20))] + [eos]
        k = [0, 1, len(c) // 2, len(c) - 1][i % 4]  # shared response tokens
        r = c[:k] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 15))] + [eos]
        if r[k] == c[k]:
            r[k] = 3
        cw = [rng.choice([0.0, 0.5, 1.0]) for _ in c]
        rw = [rng.choice([0.0, 1.0, 2.0]) for _ in r]
        if i % 5 == 4:  # only tokens 0..k weighted: trimmed
            rw = [1.0] * (k + 1) + [0.0] * (len(r) - k - 1)
        out.append(Example(p, c, r, cw, rw, [0.0] * len(c), [0.0] * len(r)))
    return out


def tiny(arch: str, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, attn_implementation=attn)
    if arch == "qwen3":  # grouped-query attention, q/k norms
        return Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=16, **kw)).eval()
    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **kw)).eval()


def side_alone(model, prompt, resp):
    """log p(resp_t | prompt, resp_<t) from one unpadded sequence, the model's own forward."""
    ids = torch.tensor([prompt + resp])
    logits = model(input_ids=ids).logits[0].float()
    P = len(prompt)
    return F.log_softmax(logits[P - 1:-1], -1).gather(1, torch.tensor(resp)[:, None]).squeeze(1)


def test_tree_mask_by_hand():
    # one pair: 2 shared, 2 chosen, 1 rejected, 1 pad
    seg = torch.tensor([[SHARED, SHARED, CHOSEN, CHOSEN, REJECTED, PAD]], dtype=torch.int8)
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0],  # the rejected token sees the shared part and itself
                         [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # padding sees itself (no empty softmax row)
    assert torch.equal(tree_mask(seg)[0, 0], want)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa")])
def test_packed_logps_and_grads_equal_each_side_run_alone(arch, attn):
    model = tiny(arch, attn)
    ex = prefix_pairs(12)
    B = len(ex)
    lp_mod = ModelLogps(model)
    assert lp_mod.packs
    batch = collate(ex, 0, pack=True)
    assert batch.run_ids.shape[0] == B and batch.run_pos is not None
    n_run = int((batch.run_seg >= 0).sum())
    assert n_run < sum(len(e.prompt_ids) * 2 + len(e.chosen_ids) + len(e.rejected_ids) - 2 for e in ex) - 100

    got = lp_mod(batch.input_ids, batch.attention_mask, batch.labels, batch.run)  # (2B, T-1)
    w = batch.token_weights[:, 1:]
    (got * w).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total = 0.0
    for i, e in enumerate(ex):
        P = len(e.prompt_ids)
        for row, resp in ((i, e.chosen_ids), (B + i, e.rejected_ids)):
            n = int((batch.labels[row] != -100).sum())  # a trimmed rejected side: tokens 0..j
            want = side_alone(model, e.prompt_ids, resp[:n])
            torch.testing.assert_close(got[row, P - 1:P - 1 + n].detach(), want.detach(), atol=2e-5, rtol=1e-5)
            assert not got[row, :P - 1].any() and not got[row, P - 1 + n:].any()
            total = total + (want * w[row, P - 1:P - 1 + n]).sum()
    total.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g_packed[name], p.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_reference_with_the_adapter_off_is_packed_too():
    model = tiny("llama", "sdpa")
    policy, _ = add_lora(model, LoraSpec(name="lora", r=4, alpha=8))
    for n, p in policy.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # an adapter that changes the outputs
    ex = prefix_pairs(8, seed=1)
    lp = ModelLogps(policy)
    packed, plain = collate(ex, 0, pack=True), collate(ex, 0, trim_rejected=False)
    ref_p, ref_u = reference_logps(lp, None, packed), reference_logps(lp, None, plain)
    with policy.disable_adapter():
        want = side_alone(policy, ex[3].prompt_ids, ex[3].rejected_ids)
    P = len(ex[3].prompt_ids)
    torch.testing.assert_close(ref_u[8 + 3, P - 1:P - 1 + len(want)], want, atol=2e-5, rtol=1e-5)
    lab = packed.labels[:, 1:] != -100
    torch.testing.assert_close(ref_p[lab], ref_u[:, :ref_p.shape[1]][lab], atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        pol = lp(packed.input_ids, packed.attention_mask, packed.labels, packed.run)
    assert (pol - ref_p)[lab].abs().max() > 1e-3  # the adapter really was off


def test_models_that_cannot_take_a_tree_mask_run_the_sides_as_rows():
    from transformers import MistralConfig, MistralForCausalLM

    m = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, sliding_window=16))
    assert not ModelLogps(m).packs  # the window would have to be in the mask
    assert ModelLogps(tiny("llama", "sdpa")).packs and ModelLogps(tiny("llama", "eager")).packs


@pytest.mark.parametrize("precompute_ref", [False, True])
def test_training_packed_or_not_takes_the_same_steps(tmp_path, precompute_ref):
    """3 optimizer steps, plain DPO weights plus an NLL anchor: the same losses and adapter packed or
    not; the model runs on fewer positions packed, and tokens/s counts the same pair tokens. One batch
    holds every pair (batches are grouped by run length, which packing changes)."""
    from stepdpo.model import tiny_llama

    from conftest import TINY

    tok = tiny_llama(**TINY)[1]  # its pad id (0) and its hash for the reference cache
    ex = prefix_pairs(16, seed=2)
    runs = {}
    for pack in (True, False):
        model = tiny("llama", "sdpa")
        torch.manual_seed(1)
        policy, ref = add_lora(model, LoraSpec(name="lora", r=4, alpha=8))
        rec = Recorder()
        train(cfg(max_steps=3, batch_size=16, nll_alpha=0.5, pack=pack, precompute_ref=precompute_ref,
                  ref_cache_dir=str(tmp_path / str(pack))), policy, tok, ex, rec, seed=0, prefix="dpo")
        lora = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
        runs[pack] = ([m for _, m in rec.rows], lora)
    (rows_p, lora_p), (rows_u, lora_u) = runs[True], runs[False]
    for mp, mu in zip(rows_p, rows_u):
        for k in ("dpo/loss", "dpo/loss/preference", "dpo/loss/nll_chosen", "dpo/rewards/margin",
                  "dpo/rewards/chosen", "dpo/rewards/rejected"):
            assert mp[k] == pytest.approx(mu[k], rel=1e-4, abs=1e-6), k
        assert mp["dpo/tokens/pairs"] == mu["dpo/tokens/pairs"]
        assert mp["dpo/tokens/nonpad"] < mu["dpo/tokens/nonpad"] and mp["dpo/tokens/rows"] == 16
    # Adam divides by sqrt(v): where a gradient is ~0 its float noise decides the update, so compare each
    # adapter matrix's change as a whole
    for n in lora_p:
        if "lora_B" in n:  # B starts at 0: the weight is the change
            assert lora_u[n].norm() > 0 and (lora_p[n] - lora_u[n]).norm() / lora_u[n].norm() < 1e-4, n


def test_packed_equals_unpacked_under_bf16_autocast():
    """The training precision of the GPU presets: the same log-probs packed or not, to bf16 rounding."""
    model = tiny("qwen3", "sdpa")
    ex = prefix_pairs(8, seed=3)
    lp = ModelLogps(model)
    packed, plain = collate(ex, 0, pack=True), collate(ex, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = lp(packed.input_ids, packed.attention_mask, packed.labels, packed.run)
        b = lp(plain.input_ids, plain.attention_mask, plain.labels, plain.run)
    lab = packed.labels[:, 1:] != -100
    assert torch.equal(lab, plain.labels[:, 1:] != -100)
    assert (a - b)[lab].abs().max() < 0.05 and (a - b)[lab].abs().mean() < 0.01
    assert a[lab].abs().mean() > 1.0  # real log-probs, not zeros


def test_batches_are_grouped_by_the_packed_row_length():
    from stepdpo.model import tiny_llama

    from conftest import TINY, token_span_pairs

    tok = tiny_llama(**TINY)[1]
    for exs in (token_span_pairs(tok), prefix_pairs(20)):  # trimmed rejected sides, and sides with own tokens
        for e in exs:
            b = collate([e], 0, pack=True)
            assert e.run_len(True) == int((b.run_seg >= 0).sum())


@pytest.mark.parametrize("pack", [True, False])
def test_run_rows_padded_to_a_multiple_give_the_same_logps_and_grads(pack):
    """collate(run_multiple=32): the run rows get padding positions that nothing attends to; every label is still
    predicted from the same positions, so log-probs and gradients are those of the unpadded batch (fp32)."""
    model = tiny("qwen3", "sdpa")
    ex = prefix_pairs(10, seed=4)
    lp = ModelLogps(model)
    plain, padded = collate(ex, 0, pack=pack), collate(ex, 0, pack=pack, run_multiple=32)
    assert padded.run_ids.shape[1] % 32 == 0 and padded.run_ids.shape[1] > plain.run_ids.shape[1]
    L, L2 = plain.run_ids.shape[1], padded.run_ids.shape[1]
    assert torch.equal(padded.run_ids[:, :L], plain.run_ids) and (padded.run_seg[:, L:] == PAD).all()
    # every label reads the same token's position: the same flat index, row by row, in the wider rows
    on = plain.src >= 0
    assert torch.equal(padded.src[on] // L2, plain.src[on] // L) and torch.equal(padded.src[on] % L2, plain.src[on] % L)
    out = {}
    for name, b in (("plain", plain), ("padded", padded)):
        model.zero_grad()
        got = lp(b.input_ids, b.attention_mask, b.labels, b.run)
        (got * b.token_weights[:, 1:]).sum().backward()
        out[name] = (got.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(out["padded"][0], out["plain"][0], atol=1e-5, rtol=1e-5)
    assert out["plain"][0].abs().sum() > 10
    for n, g in out["plain"][1].items():
        torch.testing.assert_close(out["padded"][1][n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_the_loop_pads_run_rows_for_bf16_on_cpu_only():
    from stepdpo.train import run_multiple

    cpu = torch.device("cpu")
    assert run_multiple(cfg(precision="bf16"), cpu) == 32  # oneDNN: one compiled kernel per GEMM shape
    assert run_multiple(cfg(precision="fp32"), cpu) == 1  # BLAS: no per-shape kernels, padding would only cost
    assert run_multiple(cfg(precision="bf16"), torch.device("cuda")) == 1
    assert run_multiple(cfg(precision="fp32", pad_to_multiple_of=8), cpu) == 8
