"""trainer.precompute_ref: reference log-probs computed once, cached by content, shared by jobs."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from stepdpo import refcache
from stepdpo.batching import Example, collate
from stepdpo.model import LoraSpec, add_lora, tiny_llama
from stepdpo.logprobs import ModelLogps, reference_logps
from stepdpo.train import train

from conftest import TINY, Recorder, cfg, lora_model, make_examples, token_span_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cached_rows_line_up_with_a_live_reference_forward():
    policy, _, tok = lora_model()
    ex = make_examples(9)
    ex.append(Example([], [5, 6, 7, 2], [8, 2], [1.0] * 4, [1.0] * 2, [0.0] * 4, [0.0] * 2))  # no prompt at all
    lp = ModelLogps(policy)
    ref = refcache.compute(lambda b: reference_logps(lp, None, b), ex, tok.pad_token_id, batch_size=3,
                           device=torch.device("cpu"))
    assert ref.values.numel() == sum(len(e.chosen_ids) + len(e.rejected_ids) for e in ex)
    for idx in ([0, 4, 9], [7], [9, 2, 3, 1]):
        batch = collate([ex[i] for i in idx], tok.pad_token_id)
        want = reference_logps(lp, None, batch)  # (2B, T-1), other padding than the precompute batches
        torch.testing.assert_close(ref.for_batch(ex, idx, batch), want, rtol=1e-5, atol=1e-5)


def test_cache_serves_rejected_sides_read_off_the_chosen_row():
    """One file per pairs, whatever the weights: it holds every rejected token (computed on separate
    rows), and a batch whose rejected sides are read off the chosen rows takes tokens 0..j of it."""
    from dataclasses import replace

    policy, _, tok = lora_model()
    ex = token_span_pairs(tok)
    lp = ModelLogps(policy)
    ref = refcache.compute(lambda b: reference_logps(lp, None, b), ex, tok.pad_token_id, batch_size=4,
                           device=torch.device("cpu"))
    assert ref.values.numel() == sum(len(e.chosen_ids) + len(e.rejected_ids) for e in ex)
    uniform = [replace(e, rejected_w=[1.0] * len(e.rejected_w)) for e in ex]  # plain DPO: separate rows
    for exs in (ex, uniform):
        for pack in (False, True):
            idx = [5, 0, 3]
            batch = collate([exs[i] for i in idx], tok.pad_token_id, pack=pack)
            assert batch.run_ids.shape[0] == (3 if exs is ex or pack else 6)
            torch.testing.assert_close(ref.for_batch(exs, idx, batch), reference_logps(lp, None, batch),
                                       rtol=1e-5, atol=1e-5)


def test_precompute_matches_the_live_reference_and_is_reused(tmp_path, monkeypatch):
    ex = make_examples(16)
    runs = {}
    calls = []
    real = refcache.compute
    monkeypatch.setattr(refcache, "compute", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name, pre in (("live", False), ("pre", True), ("again", True)):
        policy, ref, tok = lora_model()
        rec = Recorder()
        train(cfg(max_steps=3, precompute_ref=pre, ref_cache_dir=str(tmp_path)), policy, tok, ex, rec, ref_model=ref)
        runs[name] = [m["train/loss"] for _, m in rec.rows]
    assert len(calls) == 1  # the second precomputing job loaded the file
    assert len(list((tmp_path / "ref_logps").glob("*.pt"))) == 1
    assert runs["pre"] == runs["again"]
    assert runs["live"] == pytest.approx(runs["pre"], rel=1e-5, abs=1e-6)


def test_cache_key_is_the_content_of_reference_tokenizer_and_data():
    torch.manual_seed(0)
    model, tok = tiny_llama(**TINY)
    ex = make_examples(4)
    base = refcache.cache_key(model, tok, ex, precision="fp32")
    torch.manual_seed(1)
    policy, _ = add_lora(model, LoraSpec(name="lora", r=4, alpha=8))
    assert refcache.cache_key(policy, tok, ex, precision="fp32") == base  # adapter excluded, names normalised
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)  # training the adapter does not change the reference
    assert refcache.cache_key(policy, tok, ex, precision="fp32") == base
    assert refcache.cache_key(policy, tok, ex, precision="bf16") != base
    assert refcache.cache_key(policy, tok, ex, precision="fp32", pack=True) != base  # packed rows round differently
    ex2 = [Example(e.prompt_ids, list(e.chosen_ids), e.rejected_ids, e.chosen_w, e.rejected_w, e.chosen_focus,
                   e.rejected_focus) for e in ex]
    ex2[3].chosen_ids[0] += 1
    assert refcache.cache_key(policy, tok, ex2, precision="fp32") != base
    ex3 = [Example(e.prompt_ids, e.chosen_ids, e.rejected_ids, [0.5] * len(e.chosen_w), e.rejected_w,
                   e.chosen_focus, e.rejected_focus) for e in ex]
    assert refcache.cache_key(policy, tok, ex3, precision="fp32") == base  # weights don't change log-probs
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.base_layer.weight[0, 0] += 1e-3
    assert refcache.cache_key(policy, tok, ex, precision="fp32") != base


def test_parallel_jobs_compute_once(tmp_path):
    made, results = [], []

    def compute():
        made.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the other job to arrive while this one holds the lock
        return refcache.RefLogps(torch.tensor([0, 3]), torch.tensor([-1.0, -2.0, -3.0]))

    jobs = [threading.Thread(target=lambda: results.append(refcache.load_or_compute(tmp_path, "k", 1, compute)))
            for _ in range(3)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    assert len(made) == 1
    assert sorted(hit for _, hit in results) == [False, True, True]
    assert all(torch.equal(r.values, results[0][0].values) for r, _ in results)
    assert [p.name for p in (tmp_path / "ref_logps").iterdir() if not p.name.endswith(".lock")] == ["k.pt"]
    with pytest.raises(ValueError, match="example count"):
        refcache.load_or_compute(tmp_path, "k", 5, compute)
