"""Tokenize pairs once, then collate length-grouped, dynamically padded `PreferenceBatch`es."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .data import StepPair, encode_text, end_of_response_id, pair_prompt_ids, response_text, truncated_prompt_ids
from .loss import IGNORE  # the label of prompt/pad positions
from .weights import token_weights


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


def _encode_response(tokenizer, steps: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """Response ids (EOS appended) and each token's character offsets in `response_text(steps)`."""
    text = response_text(steps)
    enc = encode_text(tokenizer, text, return_offsets_mapping=True)
    ids = list(enc["input_ids"]) + [end_of_response_id(tokenizer)]
    offsets = list(enc["offset_mapping"]) + [(len(text), len(text))]
    return ids, offsets


def encode_pair(pair: StepPair, tokenizer, *, weighting: str = "uniform", weighting_kwargs: dict | None = None,
                max_length: int | None = None) -> Example:
    """Tokenize a pair; its token weights come from `weights.token_weights` (the whole score -> weight rule)."""
    p_ids, n_prefix = pair_prompt_ids(tokenizer, pair.question, pair.prefix)  # n_prefix: for trainer.nll_on=solution
    c_ids, c_off = _encode_response(tokenizer, pair.chosen)
    r_ids, r_off = _encode_response(tokenizer, pair.rejected)
    w = token_weights(pair, (c_off, r_off), weighting, **(weighting_kwargs or {}))
    if max_length is not None and len(p_ids) + max(len(c_ids), len(r_ids)) > max_length:
        # keep the responses, the template header and the prefix whole; drop the question's oldest tokens
        try:
            p_ids, n_prefix, _ = truncated_prompt_ids(tokenizer, pair.question, pair.prefix,
                                                      max_length - max(len(c_ids), len(r_ids)))
        except ValueError as e:
            raise ValueError(f"pair {pair.id}: {e} (trainer.max_length={max_length})") from None
    return Example(p_ids, c_ids, r_ids, w.chosen, w.rejected, w.chosen_focus, w.rejected_focus, n_prefix)


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
