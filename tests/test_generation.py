"""generation.generate: the model's EOS list, finish reasons and the ids behind each Completion.

The models have random weights; the checks compare against the same model's unconstrained output
(where it would have ended, which token it would have produced) rather than against fixed text.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from pathlib import Path

import pytest
import torch

from stepdpo.data import prompt_ids
from stepdpo.generation import Completion, eos_ids, generate, sampling_probs
from stepdpo.model import tiny_llama

PROMPTS = ["Question: Start with 3, add 4. What is the result?\nAnswer:\n", "x", "Question: 7 * 6?\nAnswer:\n"]




def test_eos_ids_union_of_generation_config_and_tokenizer(tiny):
    model, tok = tiny
    old = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = 7
        assert eos_ids(model, tok) == sorted({7, tok.eos_token_id})
        model.generation_config.eos_token_id = [9, 7, tok.eos_token_id]
        assert eos_ids(model, tok) == sorted({7, 9, tok.eos_token_id})
        model.generation_config.eos_token_id = None
        assert eos_ids(model, tok) == [tok.eos_token_id]
    finally:
        model.generation_config.eos_token_id = old


def test_length_finish_reason_and_token_ids(tiny):
    model, tok = tiny
    outs = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=2)
    for (c,) in outs:
        assert isinstance(c, Completion)
        assert c.finish_reason == "length" and len(c.token_ids) == 8  # a random model never says EOS this soon
        assert c.text == tok.decode(list(c.token_ids), skip_special_tokens=True)


def test_second_eos_of_generation_config_ends_the_sequence(tiny):
    """Instruct models list several EOS ids (Qwen2.5: <|im_end|>, <|endoftext|>); ending on one
    that is not tokenizer.eos_token_id must end the sequence there, as a "stop"."""
    model, tok = tiny
    (free,) = generate(model, tok, PROMPTS[:1], max_new_tokens=16, batch_size=1)[0]
    ids = list(free.token_ids)
    j = 5
    second = ids[j]  # the token the model produces at step j becomes its second EOS id
    first_seen = ids.index(second)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, second]
    try:
        (ended,) = generate(model, tok, PROMPTS[:1], max_new_tokens=16, batch_size=1)[0]
    finally:
        model.generation_config.eos_token_id = old
    assert ended.finish_reason == "stop"
    assert list(ended.token_ids) == ids[:first_seen]  # cut where it first said the second EOS, which is excluded
    assert ended.text == tok.decode(ids[:first_seen], skip_special_tokens=True)


# --- the decoding loop against transformers' generate (greedy) and an independent sampling distribution ---

QWEN_TOK = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen3"


def left_padded(tok, prompts):
    """The prompts' ids (as generate encodes them) and the left-padded batch of them: (enc, ids, attn)."""
    enc = [prompt_ids(tok, p) for p in prompts]
    T = max(map(len, enc))
    ids = torch.full((len(enc), T), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    for r, e in enumerate(enc):
        ids[r, T - len(e):], attn[r, T - len(e):] = torch.tensor(e), 1
    return enc, ids, attn


def hf_greedy(model, tok, prompts, max_new_tokens, k=1):
    """model.generate on the same left-padded batch, each row cut at its first EOS id of eos_ids()."""
    eos = eos_ids(model, tok)
    enc, ids, attn = left_padded(tok, prompts)
    gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                         num_return_sequences=k, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    return [tuple(r[:next((j for j, t in enumerate(r) if t in eos), len(r))]) for r in gen[:, ids.shape[1]:].tolist()]


def with_common_eos(model, tok, prompts, max_new_tokens):
    """Add as an EOS id a token the rows first write at the most different steps, so that rows end at
    different steps (the loop then drops finished rows from the batch)."""
    free = [c.token_ids for (c,) in generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))]
    first = lambda t: {r.index(t) if t in r else -1 for r in free}  # noqa: E731
    best = max({t for r in free for t in r}, key=lambda t: (len(first(t)), sum(t in r for r in free)))
    model.generation_config.eos_token_id = sorted(set(eos_ids(model, tok)) | {best})


def assert_greedy_matches_generate(model, tok, prompts, max_new_tokens=24):
    ours = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))
    ref = hf_greedy(model, tok, prompts, max_new_tokens)
    assert [c.token_ids for (c,) in ours] == ref
    lengths = {len(r) for r in ref}
    assert len(lengths) > 1, lengths  # rows ended at different steps: finished rows were dropped mid-batch
    # k greedy samples per prompt come from one prefill, repeated: each equals the prompt's generate row
    ours_k = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=3 * len(prompts),
                      num_return_sequences=3)
    assert [[c.token_ids for c in o] for o in ours_k] == [[r] * 3 for r in ref]


@pytest.fixture
def tiny_fresh():
    torch.manual_seed(1)
    model, tok = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    return model.eval(), tok


def test_greedy_token_identical_to_generate_tiny_llama(tiny_fresh):
    model, tok = tiny_fresh
    prompts = PROMPTS + ["Question: a much longer prompt, so that it needs left padding\nAnswer:\n", "ab"]
    with_common_eos(model, tok, prompts, 24)
    assert_greedy_matches_generate(model, tok, prompts)


def test_greedy_token_identical_to_generate_qwen2_real_tokenizer():
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(QWEN_TOK)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2,
                                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))).eval()
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ["What is 2 + 2?", "Natalia sold clips to 48 of her friends in April. How many in May?", "Hi"]]
    with_common_eos(model, tok, prompts, 16)
    assert_greedy_matches_generate(model, tok, prompts, max_new_tokens=16)


def qwen_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN_TOK)


def chat_prompts(tok):
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in ["What is 2 + 2?", "Natalia sold clips to 48 of her friends in April. How many in May?", "Hi"]]


@pytest.mark.parametrize("layout", ["qwen3_gqa", "qwen2_sliding_window", "llama_eager_attention"])
def test_greedy_token_identical_to_generate_other_layouts(layout):
    """The cache and mask shortcuts depend on the layout: Qwen3 (grouped-query attention, q/k norms), a Qwen2
    whose second layer has a sliding window shorter than the prompts (that layer keeps transformers' own
    sliding-window cache, and the mask goes in 2D), and eager attention (2D mask, no sdpa)."""
    import transformers

    torch.manual_seed(4)
    if layout == "llama_eager_attention":
        model, tok = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
        model.set_attn_implementation("eager")
        prompts = PROMPTS + ["Question: a much longer prompt, so that it needs left padding\nAnswer:\n"]
    else:
        tok = qwen_tok()
        arch, extra = {"qwen3_gqa": ("Qwen3", dict(num_key_value_heads=2, head_dim=16)),
                       "qwen2_sliding_window": ("Qwen2", dict(num_key_value_heads=4, use_sliding_window=True,
                                                              sliding_window=8, max_window_layers=1))}[layout]
        config = getattr(transformers, f"{arch}Config")(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            tie_word_embeddings=True, initializer_range=0.2, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), **extra)
        model = getattr(transformers, f"{arch}ForCausalLM")(config)
        prompts = chat_prompts(tok)
    model.eval()
    if layout == "qwen2_sliding_window":
        from stepdpo.generation import _new_cache

        assert [x.is_sliding for x in _new_cache(model).layers] == [False, True]
    with_common_eos(model, tok, prompts, 16)
    assert_greedy_matches_generate(model, tok, prompts, max_new_tokens=16)


def test_greedy_token_identical_with_the_models_own_cache(tiny_fresh, monkeypatch):
    """Before transformers 5 the loop lets the model build its cache (no BufferedLayer, 2D mask): same tokens."""
    from stepdpo import generation

    model, tok = tiny_fresh
    monkeypatch.setattr(generation, "_new_cache", lambda model: None)
    prompts = PROMPTS + ["Question: a much longer prompt, so that it needs left padding\nAnswer:\n"]
    with_common_eos(model, tok, prompts, 24)
    assert_greedy_matches_generate(model, tok, prompts)


def test_greedy_token_identical_with_a_lora_adapter(tiny_fresh):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_fresh
    torch.manual_seed(2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False)).eval()  # random B: the adapter matters
    with_common_eos(peft_model, tok, PROMPTS, 16)
    assert_greedy_matches_generate(peft_model, tok, PROMPTS, max_new_tokens=16)
    with peft_model.disable_adapter():
        base = generate(peft_model, tok, PROMPTS, max_new_tokens=16, batch_size=8)
    assert generate(peft_model, tok, PROMPTS, max_new_tokens=16, batch_size=8) != base  # the adapter acts in the loop


@pytest.mark.parametrize("prefill", ["one_forward", "row_groups"])
def test_greedy_token_identical_on_a_4bit_model(tmp_path, prefill, monkeypatch):
    from stepdpo import generation
    from stepdpo.model import ModelSpec, QuantSpec, load_base

    if prefill == "row_groups":  # the CPU prefill in groups of rows (`_prefill_in_chunks`), here one row each
        monkeypatch.setattr(generation, "PREFILL_TOKENS", 60)

    torch.manual_seed(3)
    model, tok = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    q4, tok = load_base(ModelSpec(name="local", path=str(tmp_path / "m")), quant=QuantSpec())
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q4.modules())
    chunked = generation._chunked_prefill(q4, generation._new_cache(q4), left_padded(tok, PROMPTS)[1])
    assert chunked == (prefill == "row_groups")
    with_common_eos(q4.eval(), tok, PROMPTS, 16)
    assert_greedy_matches_generate(q4, tok, PROMPTS, max_new_tokens=16)


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> dict[int, float]:
    """Independent of generation.sampling_probs: softmax at temperature, then walk the tokens from the most
    likely, keeping each while the mass kept so far is below top_p, and renormalise (plain Python)."""
    p = torch.softmax(logits.double() / temperature, -1).tolist()
    kept, mass = {}, 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        if mass >= top_p:
            break
        kept[i], mass = p[i], mass + p[i]
    return {i: v / mass for i, v in kept.items()}


def test_sampling_probs_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(5, 300) * torch.tensor([0.5, 1, 2, 4, 8])[:, None]
    for t, top_p in [(1.0, 1.0), (0.7, 0.9), (0.3, 0.5), (1.3, 0.95)]:
        ref = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(t)(None, logits.clone())).softmax(-1)
        assert torch.allclose(sampling_probs(logits, t, top_p), ref, atol=1e-6)
        for row in range(5):
            want = torch.zeros(300, dtype=torch.float64)
            for i, v in nucleus_probs(logits[row], t, top_p).items():
                want[i] = v
            assert torch.allclose(sampling_probs(logits, t, top_p)[row].double(), want, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora_merged"])
def test_samples_follow_the_models_distribution(tiny_fresh, lora):
    """Draw many samples of two tokens; the first token's frequencies match the nucleus of the model's own
    forward logits on the prompt, and the second token's (given the most common first token) those on
    prompt + that token: the shared prefill, the repeated cache and the decode step are what the model computes.
    With a LoRA adapter (random B), sampling runs the merged linears and must follow the adapted model's
    forward (unmerged, computed by peft), which the test first checks is far from the base model's."""
    model, tok = tiny_fresh
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a peaked distribution: a few tokens carry the mass
    if lora:
        from peft import LoraConfig, get_peft_model

        base_logits = model(torch.tensor([prompt_ids(tok, PROMPTS[2])])).logits[0, -1].detach()
        torch.manual_seed(7)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.02)  # random B, small enough that the nucleus keeps several tokens
            adapted = model(torch.tensor([prompt_ids(tok, PROMPTS[2])])).logits[0, -1]
        moved = (sampling_probs(adapted[None], 0.7, 0.9) - sampling_probs(base_logits[None], 0.7, 0.9)).abs().sum()
        assert moved > 0.2  # the adapter moves the distribution sampled from (base: 0.61 on its top token, adapted: 0.77)
    prompt, n, t, top_p = PROMPTS[2], 4000, 0.7, 0.9
    (outs,) = generate(model, tok, [prompt], max_new_tokens=2, batch_size=n, do_sample=True, temperature=t,
                       top_p=top_p, num_return_sequences=n, seed=5)
    assert len(outs) == n
    ids = prompt_ids(tok, prompt)

    def check(samples, context):
        with torch.no_grad():
            want = nucleus_probs(model(torch.tensor([context])).logits[0, -1], t, top_p)
        got = Counter(samples)
        assert set(got) <= set(want), set(got) - set(want)  # never a token outside the nucleus
        m = len(samples)
        for i, p in want.items():
            assert abs(got[i] / m - p) <= 4.5 * (p * (1 - p) / m) ** 0.5 + 1e-3, (i, got[i] / m, p)
        assert len(want) >= 3  # the test has several tokens to tell apart

    check([c.token_ids[0] for c in outs], ids)
    first = Counter(c.token_ids[0] for c in outs).most_common(1)[0][0]
    check([c.token_ids[1] for c in outs if c.token_ids[0] == first and len(c.token_ids) > 1], ids + [first])
    again = generate(model, tok, [prompt], max_new_tokens=2, batch_size=n, do_sample=True, temperature=t, top_p=top_p,
                     num_return_sequences=n, seed=5)
    assert again == [outs]  # seeded
    assert not any("forward" in vars(m) for m in model.modules())  # the merged linears are gone
    assert generate(model, tok, [prompt], max_new_tokens=2, batch_size=n, do_sample=True, temperature=t, top_p=top_p,
                    num_return_sequences=n, seed=6) != [outs]


def test_stop_string_ends_the_row_and_its_ids(tiny_fresh):
    model, tok = tiny_fresh
    free = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=8)
    text = free[0][0].text
    stop = text[6:8]
    ours = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=8, stop=[stop])
    for (f,), (c,) in zip(free, ours):
        cut = f.text.find(stop)
        if cut < 0:
            assert c == f
            continue
        assert c.text == f.text[:cut] and c.finish_reason == "stop"
        assert f.token_ids[:len(c.token_ids)] == c.token_ids  # the ids before the stop string
        assert stop not in tok.decode(list(c.token_ids)) and stop in tok.decode(list(f.token_ids[:len(c.token_ids) + len(stop)]))


# --- the KV cache and the per-step logits against independent computations ---

def close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float = 0.0) -> bool:
    """torch.allclose's rule, |a - b| <= atol + rtol |b| everywhere (allclose itself is slow on 150k-vocab rows)."""
    return bool(((a - b).abs() <= atol + rtol * b.abs()).all())


def test_buffered_layer_holds_what_dynamic_layer_holds():
    """BufferedLayer against transformers' DynamicLayer through the operations _decode uses: a prefill, repeating
    rows, one-position updates past several buffer growths, dropping rows (the compacted order _decode uses, and
    an arbitrary order with repeats); after each, the same keys, values, lengths and mask sizes."""
    from transformers.cache_utils import DynamicLayer

    from stepdpo.generation import _buffered_layer, _compaction

    torch.manual_seed(0)
    ours, ref = _buffered_layer()(), DynamicLayer()

    def same():
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
        assert ours.get_seq_length() == ref.get_seq_length() and ours.get_mask_sizes(1) == ref.get_mask_sizes(1)

    def update(B, q):
        k, v = torch.randn(B, 2, q, 8), torch.randn(B, 2, q, 6)  # value head dim may differ from the key's
        got, want = ours.update(k, v), ref.update(k.clone(), v.clone())
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        same()

    update(3, 5)
    ours.batch_repeat_interleave(2), ref.batch_repeat_interleave(2)
    same()
    for step in range(40):  # GROW is 16: the buffers grow twice
        update(len(ref.keys), 1)
        if step in (7, 19, 31):
            keep = _compaction(torch.tensor([i for i in range(len(ref.keys)) if i % 3 != step % 3]))
            ours.batch_select_indices(keep), ref.batch_select_indices(keep)
            same()
    for idx in ([1, 0], [1, 1, 0, 0, 1]):  # a swap, then more rows than the buffer holds
        ours.batch_select_indices(torch.tensor(idx)), ref.batch_select_indices(torch.tensor(idx))
        same()
        update(len(idx), 1)


@pytest.mark.parametrize("sampling", [False, True], ids=["own_cache", "shared_prefix"])
@pytest.mark.parametrize("arch", ["llama", "llama_lora", "qwen3", "qwen2", "mistral"])
def test_decode_sees_the_logits_of_a_full_forward(tiny_fresh, arch, sampling, monkeypatch):
    """The logits every sampled token is drawn from, step by step, against the model's forward on that row's
    whole unpadded text (prompt + its tokens so far) without a cache: for left-padded prompts of different
    lengths, k samples each, after rows have ended and been dropped (the cache rows moved around); with each
    row's own cache and with the prompt's keys and values shared by its k samples (shared_prefix_attention,
    which must then run at every decode step, inside `_decode_step`'s replay of the decoder layers), on
    grouped-query attention with per-head query/key norms (qwen3), q/k/v biases (qwen2) and mistral, and through a
    peft model (when sampling: with its LoRA linears merged, as `generate` samples, against the unmerged model's
    forward)."""
    from stepdpo import generation
    from stepdpo.generation import _decode, _merged_lora

    calls, linear_calls = [], []
    attention, linear = generation.shared_prefix_attention, generation._linear
    monkeypatch.setattr(generation, "shared_prefix_attention", lambda *a, **kw: calls.append(1) or attention(*a, **kw))
    monkeypatch.setattr(generation, "_linear", lambda *a, **kw: linear_calls.append(1) or linear(*a, **kw))
    if arch.startswith("llama"):
        model, tok = tiny_fresh
        prompts = PROMPTS + ["Question: a much longer prompt, so that it needs left padding\nAnswer:\n"]
        if arch == "llama_lora":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(3)
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     init_lora_weights=False)).eval()  # B != 0: the adapter acts
    else:
        import transformers

        tok = qwen_tok()
        torch.manual_seed(5)
        name = {"qwen3": "Qwen3", "qwen2": "Qwen2", "mistral": "Mistral"}[arch]
        cfg = getattr(transformers, f"{name}Config")(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                     head_dim=16, tie_word_embeddings=True, sliding_window=None)
        model = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
        if arch == "qwen2":  # its q/k/v projections carry biases: make them matter
            assert model.model.layers[0].self_attn.q_proj.bias is not None
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("proj.bias"):
                        p.normal_(0, 0.5)
        prompts = chat_prompts(tok)
    k, steps, t = 3, 12, 2.0
    enc, ids, attn = left_padded(tok, prompts)
    gen = torch.Generator().manual_seed(0)
    seen, made = [], {r: [] for r in range(len(enc) * k)}  # (rows, logits) per step; each row's tokens so far

    def on_logits(rows, logits):
        seen.append((rows.tolist(), logits.clone(), {r: list(made[r]) for r in rows.tolist()}))

    def pick(logits):  # sample at temperature t; an EOS put in at staggered steps ends rows at different steps
        nxt = torch.multinomial(sampling_probs(logits, t, 1.0), 1, generator=gen).squeeze(1)
        rows = seen[-1][0]
        for j, r in enumerate(rows):
            if (len(seen) + r) % 5 == 0 and len(made[r]) >= 2:
                nxt[j] = eos
            made[r].append(int(nxt[j]))
        return nxt

    eos = tok.eos_token_id
    with _merged_lora(model) if sampling else contextlib.nullcontext() as merged:
        out = _decode(model, ids, attn, k=k, max_new_tokens=steps, eos=torch.tensor([eos]), pick=pick,
                      on_logits=on_logits, sampling=sampling)
    n_layers = len(generation._base(model).model.layers)
    assert len(calls) == (n_layers * (len(seen) - 1) if sampling else 0)  # every decode step, every layer
    merges = 7 * n_layers if arch == "llama_lora" and sampling else 0  # q k v o gate up down: every LoRA linear
    assert (merged or 0) == merges and len(linear_calls) == merges * len(seen)  # merged, at the prefill and every step
    assert not any("forward" in vars(m) for m in model.modules())  # and the model's own forward back
    assert sorted({len(rows) for rows, _, _ in seen}) != [len(enc) * k]  # rows were dropped
    assert len({len(x) for x, _ in out}) > 2  # and ended at different steps
    checked = 0
    with torch.no_grad():  # one forward per row over its prompt and every token it drew (the model is causal)
        full = {r: model(torch.tensor([enc[r // k] + made[r]])).logits[0] for r in made}
        for rows, logits, so_far in seen:
            for j, r in enumerate(rows):
                want = full[r][len(enc[r // k]) + len(so_far[r]) - 1]
                assert close(logits[j], want, atol=1e-4, rtol=1e-4), (r, len(so_far[r]))
                assert close(sampling_probs(logits[j:j + 1], t, 1.0)[0], (want / t).softmax(-1), atol=1e-5)
                checked += 1
    assert checked > 3 * len(enc) * k


def tiny_qwen3():
    """A random 2-layer Qwen3 (grouped-query attention, per-head q/k norms) with the real Qwen3 tokenizer, in eval mode."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen_tok()
    torch.manual_seed(5)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         tie_word_embeddings=True)).eval()
    return model, tok


def tiny_lora(model, dropout: float = 0.0):
    """`model` under a peft LoRA adapter on every linear, with a random B (so that the adapter acts), in eval mode."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            init_lora_weights=False)).eval()


@pytest.mark.parametrize("arch", ["llama", "llama_lora", "llama_bf16", "qwen3"])
@pytest.mark.parametrize("padded", [True, False])
def test_decode_step_replays_the_forward_bit_for_bit(tiny_fresh, arch, padded, monkeypatch):
    """Greedy decode steps run through `_decode_step` (the decoder layers replayed with transformers' sdpa function
    and the additive mask sdpa would make of the forward's bool mask, in the model's dtype; the linears called as
    `_lean` functions: peft's LoRA linear without its forward) and see exactly the logits the model's own forward
    gives on the same cache and mask, step after step, with rows ending and being dropped: what keeps greedy
    decoding token-identical to `model.generate`."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from stepdpo import generation
    from stepdpo.generation import _decode

    if arch.startswith("llama"):
        model, tok = tiny_fresh
        prompts = PROMPTS + ["Question: a much longer prompt, so that it needs left padding\nAnswer:\n"]
        if arch == "llama_lora":  # with dropout: inactive in eval, as in peft's forward
            model = tiny_lora(model, dropout=0.1)
        if arch == "llama_bf16":  # the mask in bf16, as sdpa converts it for bf16 queries
            model = copy.deepcopy(model).to(torch.bfloat16)
    else:
        model, tok = tiny_qwen3()
        prompts = chat_prompts(tok)
    if not padded:
        prompts = [prompts[0]] * 3
    enc, ids, attn = left_padded(tok, prompts)
    assert bool((attn == 0).any()) == padded

    def run():
        seen, steps = [], []
        step = generation._decode_step
        monkeypatch.setattr(generation, "_decode_step", lambda *a: steps.append(1) or step(*a))

        def pick(logits):  # greedy, with rows ending at staggered steps
            nxt = logits.argmax(-1)
            if len(seen) in (3, 6):
                nxt[0] = tok.eos_token_id
            return nxt

        out = _decode(model, ids, attn, k=1, max_new_tokens=10, eos=torch.tensor([tok.eos_token_id]), pick=pick,
                      on_logits=lambda rows, logits: seen.append((rows.tolist(), logits.clone())))
        monkeypatch.setattr(generation, "_decode_step", step)
        return out, seen, len(steps)

    lora_calls = []
    lora_forward = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda *a, **kw: lora_calls.append(1) or lora_forward(*a, **kw))
    replayed, seen, n_steps = run()
    assert n_steps == len(seen) - 1  # every decode step
    n_lora = 7 * len(generation._base(model).model.layers) if arch == "llama_lora" else 0
    assert len(lora_calls) == n_lora  # the prefill only: decode steps call the lean linears
    standard = generation._standard_decoder
    monkeypatch.setattr(generation, "_standard_decoder", lambda m: None)  # the model's forward
    forward, seen_fwd, n_fwd = run()
    monkeypatch.setattr(generation, "_standard_decoder", standard)
    assert len(lora_calls) == n_lora * (1 + len(seen))  # the forward: peft's LoRA linear at every step
    assert n_fwd == 0 and replayed == forward and len(seen) == len(seen_fwd)
    assert sorted({len(r) for r, _ in seen}) != [len(enc)]  # rows were dropped
    for (rows, a), (rows_fwd, b) in zip(seen, seen_fwd):
        assert rows == rows_fwd and torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama_lora", "llama_lora_shared_prompts", "qwen3"])
def test_joined_batches_see_the_logits_of_batches_run_alone(tiny_fresh, arch, monkeypatch):
    """Once a batch is down to `join_at` rows the next batch is prefilled and joins it (`_Joined`): the rows of both
    (different padded lengths, masks, positions and step counts) share each step's linears, each batch attends to its
    own cache. Every row still sees, pick after pick, the logits it sees when the batches run one after the other
    (up to the rounding of GEMMs over more rows: a GEMM of a few rows rounds differently from one of many, on this
    CPU below 16 rows), and picks the same tokens. `llama_lora_shared_prompts`: 2 samples per prompt, each batch's
    prompts kept once (`shared_prefix_attention`), as sampling runs."""
    from stepdpo import generation
    from stepdpo.generation import _decode_stream

    k, shared = (2, True) if arch.endswith("shared_prompts") else (1, False)
    if arch.startswith("llama_lora"):
        model, tok = tiny_fresh
        model = tiny_lora(model)
        prompts = PROMPTS + ["Question: a much longer prompt, so that it needs left padding\nAnswer:\n", "ab", "7 - 2"]
    else:
        model, tok = tiny_qwen3()
        prompts = chat_prompts(tok) + ["Hello", "What is 12 - 5?"]
    halves = [left_padded(tok, prompts[:3]), left_padded(tok, prompts[3:])]
    assert halves[0][1].shape[1] != halves[1][1].shape[1]  # the batches' padded lengths differ
    eos = tok.eos_token_id
    joins = []
    joined_step = generation._joined_step
    monkeypatch.setattr(generation, "_joined_step", lambda *a: joins.append(len(a[0])) or joined_step(*a))

    def run(join_at):
        seen, rows_now = {}, []

        def on_logits(rows, logits):
            rows_now[:] = rows.tolist()
            for j, r in enumerate(rows_now):
                seen[(r, seen_count(r))] = logits[j].clone()  # (row, its pick) -> its logits

        def pick(logits):  # greedy; global rows 0 and 1 end after their 2nd token, row 2 after its 5th: batch 0
            nxt = logits.argmax(-1)  # drops to one row, and the next batch joins it for several steps
            for j, r in enumerate(rows_now):
                if (r in (0, 1) and seen_count(r) == 2) or (r == 2 and seen_count(r) == 5):
                    nxt[j] = eos
            return nxt

        def seen_count(r):
            return sum(1 for x in seen if x[0] == r)

        out = dict(_decode_stream(model, [(ids, attn) for _, ids, attn in halves], k=k, max_new_tokens=8,
                                  eos=torch.tensor([eos]), pick=pick, on_logits=on_logits, join_at=join_at,
                                  sampling=shared))
        return out, seen

    shares = []
    attention = generation.shared_prefix_attention
    monkeypatch.setattr(generation, "shared_prefix_attention", lambda *a: shares.append(1) or attention(*a))
    with torch.no_grad():
        alone, seen_alone = run(0)
        assert joins == []
        together, seen_together = run(1 if k == 1 else 3)  # 1 row of batch 0 left; or 3 of its 6 rows
    assert bool(shares) == shared
    assert joins and max(joins) == 2  # steps were shared by both batches
    assert together == alone and seen_together.keys() == seen_alone.keys()
    for key, logits in seen_alone.items():  # equal up to the rounding of a GEMM over more rows (a few 1e-8 here)
        assert (seen_together[key] - logits).abs().max() < 2e-6, key


def test_generate_joins_batches_and_keeps_generates_tokens(monkeypatch):
    """generate() joins a batch's last rows with the next batch (batches of 4 and 2 prompts here, joined once 2 rows
    are left; a Qwen3 under LoRA with the real tokenizer): each batch keeps `model.generate`'s tokens."""
    from stepdpo import generation

    model, tok = tiny_qwen3()
    model = tiny_lora(model)
    prompts = chat_prompts(tok) + ["Hello", "What is 12 - 5?", "Count to three."]
    joins = []
    joined_step = generation._joined_step
    monkeypatch.setattr(generation, "_joined_step", lambda *a: joins.append(len(a[0])) or joined_step(*a))
    order = sorted(prompts, key=lambda p: -len(prompt_ids(tok, p)))  # generate's batches: longest first
    free = [c.token_ids for (c,) in generate(model, tok, order, max_new_tokens=12, batch_size=8)]
    # EOS ids that end the first batch's rows 0 and 1 after one token, its row 2 after eight and its row 3 never
    extra = {free[0][1], free[1][1], free[2][8]}
    end = lambda r: next((j for j, t in enumerate(r) if t in extra), 12)  # noqa: E731  the step a row ends at
    first_batch, second_batch = sorted(map(end, free[:4])), list(map(end, free[4:]))
    assert first_batch[1] + 2 <= first_batch[3] and max(second_batch) >= 2  # 2 rows left for 2+ steps: a join
    model.generation_config.eos_token_id = sorted(set(eos_ids(model, tok)) | extra)
    ours = generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    assert joins  # batches were joined
    ref = {p: r for i in (0, 4) for p, r in zip(order[i:i + 4], hf_greedy(model, tok, order[i:i + 4], 12))}
    assert [tuple(c.token_ids) for (c,) in ours] == [tuple(ref[p]) for p in prompts]


def test_no_new_tokens_gives_empty_completions(tiny_fresh):
    model, tok = tiny_fresh
    out = generate(model, tok, PROMPTS, max_new_tokens=0, batch_size=2, num_return_sequences=2)
    assert [[(c.text, c.token_ids, c.finish_reason) for c in o] for o in out] == [[("", (), "length")] * 2] * 3


def test_shared_prefix_only_where_its_numbers_hold(tiny_fresh):
    """Sampling shares the prompt's keys/values only for float32 Llama-family models with full attention, built from
    transformers' own classes: a bf16 model (scores would be rounded to bf16 before the softmax), a sliding-window
    layer, a subclassed decoder layer and hooked layers keep the model's forward with sdpa."""
    import transformers

    from stepdpo.generation import _can_share_prefix, _new_cache

    model, _ = tiny_fresh
    assert _can_share_prefix(model, _new_cache(model))
    assert not _can_share_prefix(model, None)  # transformers < 5: the model's own cache
    half = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)[0].to(torch.bfloat16)
    assert not _can_share_prefix(half, _new_cache(half))
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class MyLayer(LlamaDecoderLayer):  # a user's own layer: _decode_step would replay the wrong forward
        pass

    custom = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2)[0]
    custom.model.layers[1].__class__ = MyLayer
    assert not _can_share_prefix(custom, _new_cache(custom))
    hooked = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2)[0]
    assert _can_share_prefix(hooked, _new_cache(hooked))
    handle = hooked.model.layers[0].register_forward_pre_hook(lambda *a: None)  # e.g. accelerate moving devices
    assert not _can_share_prefix(hooked, _new_cache(hooked))  # the replay would skip the hook: keep the forward
    handle.remove()
    hooked.model.layers[1].self_attn._hf_hook = object()  # accelerate's own hook attribute
    assert not _can_share_prefix(hooked, _new_cache(hooked))
    sliding = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    assert not _can_share_prefix(sliding, _new_cache(sliding))


def test_lora_merged_only_where_it_is_the_same_function():
    """Sampling merges LoRA into copies of float32 weights of plain LoRA linears only: not with the adapter
    disabled (the reference), not for DoRA (its magnitude is not in delta W), not on a bf16 base (W + delta W
    rounded to 8 bits loses a small update). The model's parameters are untouched, also when the block raises."""
    from peft import LoraConfig, get_peft_model

    from stepdpo.generation import _merged_lora

    def peft_tiny(**kw):
        torch.manual_seed(0)
        model, _ = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False, **kw)).eval()

    model = peft_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        want = model(x).logits
        with pytest.raises(RuntimeError, match="inside"):
            with _merged_lora(model) as n:
                assert n == 7
                assert torch.allclose(model(x).logits, want, atol=1e-5)
                raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(model(x).logits, want)  # peft's own forward again, bit for bit
    with model.disable_adapter(), _merged_lora(model) as n:
        assert n == 0
    with _merged_lora(peft_tiny(use_dora=True)) as n:
        assert n == 0
    with _merged_lora(peft_tiny().to(torch.bfloat16)) as n:
        assert n == 0
    with _merged_lora(tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)[0]) as n:
        assert n == 0  # not a peft model


def test_lean_linears_fall_back_to_the_module_where_they_would_differ(tiny_fresh):
    """`_lean` replaces a module call only where it computes what the module's forward computes: a hooked module,
    a LoRA layer with active dropout, with DoRA, with its adapters off or merged keeps the module itself."""
    from peft import LoraConfig, get_peft_model

    from stepdpo.generation import _lean, _merged_lora

    model, _ = tiny_fresh
    plain = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 1, plain.in_features)
    assert _lean(plain) is not plain and torch.equal(_lean(plain)(x), plain(x))
    handle = plain.register_forward_hook(lambda *a: None)
    assert _lean(plain) is plain
    handle.remove()
    lora = tiny_lora(model, dropout=0.1)
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert _lean(layer) is not layer and torch.equal(_lean(layer)(x), layer(x))
    lora.train()  # dropout active: peft's forward draws a mask
    assert _lean(layer) is layer
    lora.eval()
    with lora.disable_adapter():
        assert _lean(layer) is layer
    with _merged_lora(lora):
        merged = _lean(layer)
        assert merged is vars(layer)["forward"]  # the merged copy's linear
    layer.merge()
    assert _lean(layer) is layer
    layer.unmerge()
    torch.manual_seed(1)
    dora = get_peft_model(tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)[0],
                          LoraConfig(r=4, target_modules="all-linear", use_dora=True)).eval()
    q = dora.base_model.model.model.layers[0].self_attn.q_proj
    assert _lean(q) is q


@pytest.mark.parametrize("arch", ["llama_lora", "llama_eager", "qwen3"])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("groups", [2, 3])
def test_prefill_in_chunks_is_one_forward_bit_for_bit(tiny_fresh, arch, padded, groups, monkeypatch):
    """The CPU prefill over groups of rows (`_prefill_in_chunks`) gives the KV cache and last-position logits of one
    forward over the whole left-padded batch, bit for bit: in three groups the longest prompt's group has no padding
    but keeps the batch's mask. Greedy decoding and seeded sampling from it keep their tokens."""
    from stepdpo import generation
    from stepdpo.generation import _chunked_prefill, _decode, _new_cache, _prefill_in_chunks

    if arch.startswith("llama"):
        model, tok = tiny_fresh
        if arch == "llama_eager":  # eager attention: the mask is an additive float mask
            model.set_attn_implementation("eager")
        else:
            model = tiny_lora(model)
        prompts = [PROMPTS[0], PROMPTS[2], "Question: a much longer prompt, so that it needs left padding\nAnswer:\n",
                   PROMPTS[2] * 2, PROMPTS[0], PROMPTS[0] * 2]
    else:
        model, tok = tiny_qwen3()
        prompts = chat_prompts(tok) + ["What is 17 * 3?", "Hello"] + chat_prompts(tok)[:1]
    if not padded:
        prompts = [prompts[1]] * 6
    enc, ids, attn = left_padded(tok, prompts)
    assert bool((attn == 0).any()) == padded
    B, T = ids.shape
    pos = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
    mask = attn if padded else None
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, cache=_new_cache(model),
                      logits_to_keep=1)
        monkeypatch.setattr(generation, "PREFILL_TOKENS", B * T // groups)  # 6 rows: groups of 3 or 2 rows
        assert _chunked_prefill(model, _new_cache(model), ids)
        sizes = []
        embed = generation._standard_decoder(model).embed_tokens  # (hooks on the decoder would turn chunking off)
        handle = embed.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
        cache, logits = _prefill_in_chunks(model, ids, mask, pos, _new_cache(model), "cache")
        handle.remove()
    assert sizes == [B // groups] * groups
    assert torch.equal(logits, whole.logits[:, -1].float())
    for ours, ref in zip(cache.layers, whole.cache.layers):
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)

    def decode():  # greedy, and sampled with the prompt's keys shared by its k samples (SharedPrefixLayer)
        gen = torch.Generator().manual_seed(0)
        return [_decode(model, ids, attn, k=2, max_new_tokens=8, eos=torch.tensor([tok.eos_token_id]),
                        pick=lambda lg: lg.argmax(-1)),
                _decode(model, ids, attn, k=3, max_new_tokens=8, eos=torch.tensor([tok.eos_token_id]), sampling=True,
                        pick=lambda lg: torch.multinomial(lg.softmax(-1), 1, generator=gen).squeeze(1))]

    chunked = decode()
    monkeypatch.setattr(generation, "PREFILL_TOKENS", B * T)  # one forward
    assert not _chunked_prefill(model, _new_cache(model), ids)
    assert decode() == chunked  # the same logits, so the same draws from the same generator
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 1)
    monkeypatch.setattr(generation, "_mask_arguments", lambda: None)  # a transformers whose mask function we don't know
    assert not _chunked_prefill(model, _new_cache(model), ids)
