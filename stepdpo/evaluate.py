"""Batched generation and answer accuracy (greedy pass@1, optional sampled maj@k).

Works for any `Problem` list: the built-in arith task, GSM8K (`#### answer`) and MATH-500
(`\\boxed{}` answer); `answers.extract_answer` finds the final answer and `answers.answers_match`
decides equivalence (exact, numeric, then math-verify). Problems whose `meta` carries `level` or
`subject` (MATH) also get per-level and per-subject accuracy.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from . import progress
from .answers import answers_match, extract_answer
from .data import Problem, format_prompt, prompt_ids


def split_steps(text: str) -> list[str]:
    """Steps of a generated solution: its non-empty lines."""
    return [s.strip() for s in text.split("\n") if s.strip()]


def truncate_at_stop(text: str, stop: Sequence[str] = ()) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def stop_from_config(strings: Sequence[str]) -> list[str]:
    """`eval.stop` as given on the command line: the two characters `\\n` / `\\t` mean newline / tab.

    Hydra keeps backslashes in override values, so `'eval.stop=["\\n\\nQuestion:"]'` arrives as a
    literal backslash-n; a YAML double-quoted "\\n" is already a newline and passes through.
    """
    return [s.replace("\\n", "\n").replace("\\t", "\t") for s in strings if s]


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer, counting equivalent answers ("0.5", "\\frac12") together.

    None (no answer found) never wins. Ties go to the answer seen first.
    """
    counts = Counter(a for a in answers if a is not None)  # exact duplicates first: few distinct strings remain
    clusters: list[list] = []  # [representative, votes], in order of first appearance
    for a, c in counts.items():
        for cl in clusters:
            if answers_match(a, cl[0]):
                cl[1] += c
                break
        else:
            clusters.append([a, c])
    return max(clusters, key=lambda cl: cl[1])[0] if clusters else None


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, batch_size: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_return_sequences: int = 1, seed: int = 0, stop: Sequence[str] | None = None) -> list[list[str]]:
    """Completions for each prompt (left-padded batches; stops at EOS, a stop string or max_new_tokens).

    Returns one list of `num_return_sequences` strings per prompt, in the order of `prompts`.
    Prompts are encoded exactly as in training (`data.prompt_ids`: one BOS + the prompt text). `stop`:
    extra stop strings (e.g. "\\n\\nQuestion:" for few-shot base models); a sequence ends once
    its text ends with one, and the returned text is cut before the stop string.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if do_sample:
        torch.manual_seed(seed)
    stop = [x for x in (stop or []) if x]
    stop_kw = dict(stop_strings=stop, tokenizer=tokenizer) if stop else {}  # transformers' StopStringCriteria
    out: list[list[str]] = []
    # longest prompts first keeps padding low; results are put back in order
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: dict[int, list[str]] = {}
    per = max(1, batch_size // num_return_sequences)
    for s in range(0, len(order), per):
        idx = order[s:s + per]
        enc = [prompt_ids(tokenizer, prompts[i]) for i in idx]
        T = max(map(len, enc))
        ids = torch.full((len(enc), T), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, e in enumerate(enc):
            ids[r, T - len(e):] = torch.tensor(e)
            attn[r, T - len(e):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
            top_k=0 if do_sample else None, num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **stop_kw)
        new = gen[:, T:].cpu()  # (len(idx) * num_return_sequences, <= max_new_tokens)
        dec = [truncate_at_stop(t, stop) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        for r, i in enumerate(idx):
            texts[i] = dec[r * num_return_sequences:(r + 1) * num_return_sequences]
        progress.advance(len(dec), {i: texts[i] for i in idx})  # the open sampling/eval bar, if any
    out = [texts[i] for i in range(len(prompts))]
    if was_training:
        model.train()
    return out


def math_accuracy(model, tokenizer, problems: Sequence[Problem], *, max_new_tokens: int = 128, batch_size: int = 64,
                  maj_k: int = 0, temperature: float = 0.7, seed: int = 0,
                  stop: Sequence[str] | None = None) -> tuple[dict[str, float], list[dict]]:
    """Greedy pass@1 (and maj@k if maj_k > 0) on `problems`.

    Returns (metrics, records); records hold question, output, predicted and gold answers, and
    correctness, one per problem. Metrics: `acc` (greedy pass@1), `n`, `no_answer` (share of
    outputs without an extractable answer), `maj@k` (sampled majority vote, equivalent answers
    pooled), and `acc/level/<L>`, `acc/subject/<S>` when the problems carry those meta fields (MATH).
    """
    prompts = [format_prompt(p.question, tokenizer) for p in problems]
    right = lambda text, gold: answers_match(extract_answer(text), gold)  # noqa: E731
    with progress.bar("eval", len(prompts), unit="problem", on_outputs=progress.accuracy_so_far([p.answer for p in problems], right)):
        outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop)
    records = []
    for p, (o,) in zip(problems, outs):
        pred = extract_answer(o)
        records.append({"id": p.id, "question": p.question, "output": o, "pred": pred, "gold": p.answer,
                        "correct": answers_match(pred, p.answer), "steps": split_steps(o), "meta": p.meta})
    n = max(1, len(records))
    metrics = {"acc": sum(r["correct"] for r in records) / n, "n": len(records),
               "no_answer": sum(r["pred"] is None for r in records) / n}
    if maj_k > 0:
        samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           do_sample=True, temperature=temperature, num_return_sequences=maj_k, seed=seed, stop=stop)
        hits = 0
        for p, r, outs_k in zip(problems, records, samples):
            maj = majority_vote([extract_answer(o) for o in outs_k])
            r["maj_pred"], r["maj_correct"] = maj, answers_match(maj, p.answer)
            hits += r["maj_correct"]
        metrics[f"maj@{maj_k}"] = hits / n
    for key in ("level", "subject"):
        groups: dict[str, list[bool]] = {}
        for r in records:
            if key in r["meta"]:
                groups.setdefault(str(r["meta"][key]), []).append(r["correct"])
        for g, v in sorted(groups.items()):
            metrics[f"acc/{key}/{g}"] = sum(v) / len(v)
    return metrics, records
