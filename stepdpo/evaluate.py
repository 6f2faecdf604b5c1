"""Batched generation and answer accuracy (greedy pass@1, optional sampled maj@k)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from .answers import answers_match, extract_answer
from .data import Problem, format_prompt


def split_steps(text: str) -> list[str]:
    """Steps of a generated solution: its non-empty lines."""
    return [s.strip() for s in text.split("\n") if s.strip()]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, batch_size: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_return_sequences: int = 1, seed: int = 0) -> list[list[str]]:
    """Completions for each prompt (left-padded batches; stops at EOS or max_new_tokens).

    Returns one list of `num_return_sequences` strings per prompt. Prompts are encoded exactly as
    in training (BOS + prompt, no other special tokens).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if do_sample:
        torch.manual_seed(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out: list[list[str]] = []
    # longest prompts first keeps padding low; results are put back in order
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: dict[int, list[str]] = {}
    per = max(1, batch_size // num_return_sequences)
    for s in range(0, len(order), per):
        idx = order[s:s + per]
        enc = [bos + tokenizer(prompts[i], add_special_tokens=False)["input_ids"] for i in idx]
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
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = gen[:, T:].cpu()
        dec = tokenizer.batch_decode(new, skip_special_tokens=True)
        for r, i in enumerate(idx):
            texts[i] = dec[r * num_return_sequences:(r + 1) * num_return_sequences]
    out = [texts[i] for i in range(len(prompts))]
    if was_training:
        model.train()
    return out


def math_accuracy(model, tokenizer, problems: Sequence[Problem], *, max_new_tokens: int = 128, batch_size: int = 64,
                  maj_k: int = 0, temperature: float = 0.7, seed: int = 0) -> tuple[dict[str, float], list[dict]]:
    """Greedy pass@1 (and maj@k if maj_k > 0) on `problems`.

    Returns (metrics, records); records hold question, output, predicted and gold answers, and
    correctness, one per problem. Metrics include per-level / per-subject accuracy when the
    problems carry those fields (MATH).
    """
    prompts = [format_prompt(p.question) for p in problems]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    records = []
    for p, (o,) in zip(problems, outs):
        pred = extract_answer(o)
        records.append({"id": p.id, "question": p.question, "output": o, "pred": pred, "gold": p.answer,
                        "correct": answers_match(pred, p.answer), "steps": split_steps(o), "meta": p.meta})
    n = max(1, len(records))
    metrics = {"acc": sum(r["correct"] for r in records) / n, "n": len(records)}
    if maj_k > 0:
        samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           do_sample=True, temperature=temperature, num_return_sequences=maj_k, seed=seed)
        hits = 0
        for p, r, outs_k in zip(problems, records, samples):
            votes = Counter(a for a in (extract_answer(o) for o in outs_k) if a is not None)
            maj = votes.most_common(1)[0][0] if votes else None
            r["maj_pred"] = maj
            hits += answers_match(maj, p.answer)
        metrics[f"maj@{maj_k}"] = hits / n
    for key in ("level", "subject"):
        groups: dict[str, list[bool]] = {}
        for r in records:
            if key in r["meta"]:
                groups.setdefault(str(r["meta"][key]), []).append(r["correct"])
        for g, v in sorted(groups.items()):
            metrics[f"acc/{key}/{g}"] = sum(v) / len(v)
    return metrics, records
