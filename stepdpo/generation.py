"""Generation: `generate(model, tokenizer, prompts, ...) -> list[list[Completion]]`, one list per prompt.

The one owner of decoding for eval, on-policy sampling, resampling and `python -m stepdpo.generate`.
A sequence ends at any EOS id of the model (the union of `generation_config.eos_token_id`, which
instruct models set to a list such as Qwen2.5's `<|im_end|>`/`<|endoftext|>` or Llama-3's
128001/128008/128009, and `tokenizer.eos_token_id`), at a stop string, or after `max_new_tokens`;
`Completion.finish_reason` says which ("stop" or "length").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .data import prompt_ids


@dataclass(frozen=True)
class Completion:
    text: str                   # decoded new tokens (special tokens skipped), cut before a stop string
    token_ids: tuple[int, ...]  # the generated ids exactly as sampled (EOS / stop tokens excluded)
    finish_reason: str          # "stop" (an EOS id of the model's generation_config, or a stop string) | "length"


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sequence: the model's generation_config list (an int or a list) plus the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


def truncate_at_stop(text: str, stop: Sequence[str] = ()) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def _completion(tokenizer, ids: list[int], eos: set[int], stop: Sequence[str], max_new_tokens: int) -> Completion:
    """A row of generated ids (maybe padded after it ended) as a Completion."""
    end = next((j for j, t in enumerate(ids) if t in eos), None)
    if end is not None:
        ids = ids[:end]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = truncate_at_stop(text, stop)
    if len(cut) < len(text):  # a stop string ended it: keep the ids whose text comes before the stop string
        lo, hi = 0, len(ids)
        while lo < hi:  # the most ids whose decoded text is a prefix of the cut text
            mid = (lo + hi + 1) // 2
            if cut.startswith(tokenizer.decode(ids[:mid], skip_special_tokens=True)):
                lo = mid
            else:
                hi = mid - 1
        return Completion(cut, tuple(ids[:lo]), "stop")
    reason = "stop" if end is not None else "length" if len(ids) >= max_new_tokens else "stop"
    return Completion(text, tuple(ids), reason)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, batch_size: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_return_sequences: int = 1, seed: int = 0, stop: Sequence[str] | None = None) -> list[list[Completion]]:
    """Completions for each prompt (left-padded batches; stops at an EOS id, a stop string or max_new_tokens).

    Returns one list of `num_return_sequences` Completions per prompt, in the order of `prompts`.
    Prompts are encoded exactly as in training (`data.prompt_ids`: one BOS + the prompt text). `stop`:
    extra stop strings (e.g. "\\n\\nQuestion:" for few-shot base models); a sequence ends once
    its text contains one, and the returned text is cut before the stop string.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if do_sample:
        torch.manual_seed(seed)
    stop = [x for x in (stop or []) if x]
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    stop_kw = dict(stop_strings=stop, tokenizer=tokenizer) if stop else {}  # transformers' StopStringCriteria
    # longest prompts first keeps padding low; results are put back in order
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    done: dict[int, list[Completion]] = {}
    per = max(1, batch_size // num_return_sequences)
    for s in range(0, len(order), per):
        idx = order[s:s + per]
        enc = [prompt_ids(tokenizer, prompts[i]) for i in idx]
        T = max(map(len, enc))
        ids = torch.full((len(enc), T), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, e in enumerate(enc):
            ids[r, T - len(e):] = torch.tensor(e)
            attn[r, T - len(e):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
            top_k=0 if do_sample else None, num_return_sequences=num_return_sequences,
            pad_token_id=pad, eos_token_id=eos, **stop_kw)
        rows = gen[:, T:].tolist()  # len(idx) * num_return_sequences rows of <= max_new_tokens ids
        outs = [_completion(tokenizer, row, set(eos), stop, max_new_tokens) for row in rows]
        for r, i in enumerate(idx):
            done[i] = outs[r * num_return_sequences:(r + 1) * num_return_sequences]
    if was_training:
        model.train()
    return [done[i] for i in range(len(prompts))]
