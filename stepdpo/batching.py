"""Tokenize pairs once, then collate length-grouped, dynamically padded `PreferenceBatch`es."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .data import StepPair, prompt_ids, prompt_text, response_text, step_spans
from .weights import (NORMALISE, VALUE_SCHEMES, first_difference, first_error, first_wrong, get_scheme, localise_step,
                      normalise_mean_one, step_token_weights)

IGNORE = -100


@dataclass
class Example:
    """One tokenized pair. Response ids end with EOS; weights/focus align with response ids."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_w: list[float]
    rejected_w: list[float]
    chosen_focus: list[float]  # 1 on the chosen step that faces the first wrong rejected step
    rejected_focus: list[float]  # 1 on the first wrong rejected step
    n_prefix: int = 0  # the last n_prefix prompt tokens are the pair's shared prefix steps

    @property
    def shared_upto(self) -> int:
        """j: the first j response tokens of the two sides are the same ids, so rejected token t <= j is
        predicted from exactly the context chosen token t is."""
        c, r = self.chosen_ids, self.rejected_ids
        return next((t for t, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))

    @property
    def rejected_on_chosen_row(self) -> bool:
        """Every weighted rejected token lies at or before the first differing token: the rejected side's
        log-probs can be read off the chosen row (one forward for the pair, the same loss exactly)."""
        j = self.shared_upto
        if j >= min(len(self.chosen_ids), len(self.rejected_ids)):
            return False
        return all(w == 0 for w in self.rejected_w[j + 1:])

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class PreferenceBatch:
    input_ids: torch.Tensor  # (2B, T) chosen rows first, then rejected rows; right-padded
    attention_mask: torch.Tensor  # (2B, T) 1 on real tokens
    labels: torch.Tensor  # (2B, T) token ids on response tokens, -100 on prompt/pad
    token_weights: torch.Tensor  # (2B, T) float, 0 on prompt/pad
    focus: torch.Tensor  # (2B, T) float, 1 on the first-error step tokens (metrics only)
    nll_only: torch.Tensor  # (2B, T) bool, True on prefix tokens labelled for the NLL anchor only
    row_src: torch.Tensor  # (2B,) long: the row whose tokens this row's log-probs are read from (itself, or
    #                        for a rejected side read off its chosen row, that row: see Example.rejected_on_chosen_row)

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def computed_rows(self) -> torch.Tensor:
        """(2B,) bool: the rows the model actually runs on (not read off another row)."""
        return self.row_src == torch.arange(len(self.row_src), device=self.row_src.device)

    def to(self, device) -> "PreferenceBatch":
        return PreferenceBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _encode_response(tokenizer, steps: list[str], step_w: list[float]) -> tuple[list[int], list[float], list[tuple]]:
    text = response_text(steps)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"]) + [tokenizer.eos_token_id]
    offsets = list(enc["offset_mapping"]) + [(len(text), len(text))]
    return ids, step_token_weights(offsets, step_spans(steps), step_w), offsets


def encode_pair(pair: StepPair, tokenizer, *, weighting: str = "uniform", weighting_kwargs: dict | None = None,
                max_length: int | None = None) -> Example:
    """Tokenize a scored pair; compute token weights with the chosen scheme."""
    cs = pair.chosen_scores if pair.chosen_scores is not None else [1.0] * len(pair.chosen)
    rs = pair.rejected_scores if pair.rejected_scores is not None else [0.0] * len(pair.rejected)
    kwargs = dict(weighting_kwargs or {})
    error_span = kwargs.pop("error_span", "step") if weighting == "first_error" else "step"
    if weighting in VALUE_SCHEMES:  # the value of the shared prefix (reward=rollout), for advantages
        kwargs["value_before"] = pair.meta.get("value_before")
    cw, rw = get_scheme(weighting)(cs, rs, **kwargs)
    cf, rf = first_error(cs, rs)
    p_ids = prompt_ids(tokenizer, prompt_text(pair.question, pair.prefix, tokenizer))
    n_prefix = 0
    if pair.prefix:  # prompt tokens that are the prefix steps (for trainer.nll_on=solution)
        n_prefix = max(0, len(p_ids) - len(prompt_ids(tokenizer, prompt_text(pair.question, (), tokenizer))))
    c_ids, c_w, c_off = _encode_response(tokenizer, pair.chosen, cw)
    r_ids, r_w, r_off = _encode_response(tokenizer, pair.rejected, rw)
    if error_span == "token":
        c_w, r_w = _localise_first_error(pair, rs, cw, rw, c_off, r_off, c_w, r_w)
    if weighting in NORMALISE:
        c_w, r_w = normalise_mean_one(c_w), normalise_mean_one(r_w)
    c_f = step_token_weights(c_off, step_spans(pair.chosen), cf)
    r_f = step_token_weights(r_off, step_spans(pair.rejected), rf)
    if max_length is not None:
        over = len(p_ids) + max(len(c_ids), len(r_ids)) - max_length
        if over > 0:  # keep the responses whole; drop the oldest prompt tokens (validation counts this)
            if over >= len(p_ids):
                raise ValueError(f"pair {pair.id}: responses alone exceed trainer.max_length={max_length}")
            p_ids = p_ids[over:]
            n_prefix = min(n_prefix, len(p_ids))
    return Example(p_ids, c_ids, r_ids, c_w, r_w, c_f, r_f, n_prefix)


def _localise_first_error(pair: StepPair, rs, cw, rw, c_off, r_off, c_w, r_w):
    """`first_error` with error_span=token: step k's weight only on the token where the chosen and
    rejected step-k texts first differ (each side's own token there). Unchanged (whole step) when the
    rejected side has no wrong step, the chosen side has no step k, or the two step texts are equal."""
    k = first_wrong(rs)
    if k is None or k >= len(pair.chosen):
        return c_w, r_w
    d = first_difference(pair.chosen[k], pair.rejected[k])
    if d is None:
        return c_w, r_w
    c_spans, r_spans = step_spans(pair.chosen), step_spans(pair.rejected)
    return (localise_step(c_off, c_spans, cw, k, c_spans[k][0] + d),
            localise_step(r_off, r_spans, rw, k, r_spans[k][0] + d))


def encode_sft(question: str, steps: list[str], tokenizer) -> Example:
    """An SFT example as a degenerate pair: only the chosen side is used (weights 1)."""
    pair = StepPair(id="", question=question, answer="", prefix=[], chosen=steps, rejected=steps)
    return encode_pair(pair, tokenizer)


def collate(examples: Sequence[Example], pad_id: int, *, sft: bool = False, nll_prefix: bool = False,
            share_rows: bool = True) -> PreferenceBatch:
    """Right-pad to the longest row in this batch (dynamic padding, never to max_length).

    nll_prefix: also label the chosen rows' prefix-step tokens (weight 0, `nll_only` True), so the
    NLL anchor can cover the whole correct solution (trainer.nll_on=solution).
    share_rows: a pair whose weighted rejected tokens all sit at or before the first token where the
    two sides differ (`Example.rejected_on_chosen_row`: first_error with error_span=token and
    after_error=0) gets a rejected row that *is* its chosen row's tokens, labelled with the rejected
    tokens 0..j; `row_src` points it at the chosen row, and the model runs once for both. The
    log-probs are those of the separate rejected row, exactly: the context is the same token ids.
    """
    B = len(examples)
    shared = [not sft and share_rows and ex.rejected_on_chosen_row for ex in examples]
    rows = [(ex.prompt_ids, ex.chosen_ids, ex.chosen_ids, ex.chosen_w, ex.chosen_focus) for ex in examples]
    if not sft:
        for ex, sh in zip(examples, shared):
            if sh:  # the chosen row's tokens; labels = the rejected tokens 0..j
                n = ex.shared_upto + 1
                rows.append((ex.prompt_ids, ex.chosen_ids, ex.rejected_ids[:n], ex.rejected_w[:n], ex.rejected_focus[:n]))
            else:
                rows.append((ex.prompt_ids, ex.rejected_ids, ex.rejected_ids, ex.rejected_w, ex.rejected_focus))
    T = max(len(p) + len(r) for p, r, _, _, _ in rows)
    n = len(rows)
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    labels = torch.full((n, T), IGNORE, dtype=torch.long)
    attn = torch.zeros((n, T), dtype=torch.long)
    w = torch.zeros((n, T), dtype=torch.float32)
    foc = torch.zeros((n, T), dtype=torch.float32)
    nll_only = torch.zeros((n, T), dtype=torch.bool)
    src = torch.arange(n)
    for i, (p, r, lab, rw, rf) in enumerate(rows):
        L, P, K = len(p) + len(r), len(p), len(lab)
        ids[i, :L] = torch.tensor(p + r)
        attn[i, :L] = 1
        labels[i, P:P + K] = torch.tensor(lab)
        w[i, P:P + K] = torch.tensor(rw)
        foc[i, P:P + K] = torch.tensor(rf)
        if i >= B and shared[i - B]:
            src[i] = i - B
        k = examples[i].n_prefix if nll_prefix and i < B else 0
        if k:
            labels[i, P - k:P] = torch.tensor(p[P - k:])
            nll_only[i, P - k:P] = True
    return PreferenceBatch(ids, attn, labels, w, foc, nll_only, src)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                           mega: int = 32, drop_last: bool = False) -> list[list[int]]:
    """Shuffle, then sort within mega-batches of `mega * batch_size` by length so each batch holds
    similar lengths (little padding), then shuffle the batch order. Deterministic in (seed, epoch)."""
    rng = random.Random(seed * 100003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    step = mega * batch_size
    for s in range(0, len(idx), step):
        chunk = sorted(idx[s:s + step], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches
