"""Tokenize pairs once, then collate length-grouped, dynamically padded `PreferenceBatch`es."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .data import StepPair, encode_text, end_of_response_id, pair_prompt_ids, response_text, truncated_prompt_ids
from .loss import IGNORE  # the label of prompt/pad positions
from .weights import token_weights

log = logging.getLogger(__name__)


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

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def rejected_labelled(self, trim: bool = True) -> int:
        """How many rejected tokens `collate` labels: all, or with `trim` tokens 0..j only when every weighted
        rejected token sits at or before j, the first token where the two sides differ."""
        n, j = len(self.rejected_ids), self.shared_upto
        return j + 1 if trim and j < min(len(self.chosen_ids), n) and not any(self.rejected_w[j + 1:]) else n

    def run_len(self, pack: bool) -> int:
        """What batches are grouped by: packed, the length of its run row (`collate`); unpacked, its longest
        side, the key batches have always been grouped by (so unpacked runs reproduce earlier ones)."""
        if not pack:
            return len(self)
        own = max(0, self.rejected_labelled() - 1 - self.shared_upto)  # rejected inputs past the shared part
        return len(self.prompt_ids) + len(self.chosen_ids) + own


@dataclass
class PreferenceBatch:
    """A batch in two layouts: the *sides* (what the loss reads: one row per chosen and per rejected
    side, labels aligned as in an unpacked batch) and the *run* rows (what the model runs on).

    Sides: (2B, T), chosen rows first, then rejected rows; right-padded. A rejected side whose
    weighted tokens all sit at or before the first token where the two sides differ is labelled only
    up to that token (`collate(trim_rejected=True)`), so it holds tokens 0..j of its response.

    Run rows (`run`): the inputs the model needs, each token once per pair where it can be
    (`collate(pack=True)`): one row per pair, [prompt + the sides' shared tokens | chosen's own
    tokens | rejected's own tokens], the rejected tokens placed at the positions they have in their
    own sequence and attending to the shared part and themselves only (`tree_mask`). Unpacked, the
    run rows are the sides, except a rejected side that has no token of its own: it is read off its
    chosen row. Either way `src` says which run position's hidden state predicts each side label.
    """

    input_ids: torch.Tensor  # (2B, T) the sides' tokens
    attention_mask: torch.Tensor  # (2B, T) 1 on real tokens
    labels: torch.Tensor  # (2B, T) token ids on response tokens, -100 on prompt/pad
    token_weights: torch.Tensor  # (2B, T) float, 0 on prompt/pad
    focus: torch.Tensor  # (2B, T) float, 1 on the first-error step tokens (metrics only)
    nll_only: torch.Tensor  # (2B, T) bool, True on prefix tokens labelled for the NLL anchor only
    run_ids: torch.Tensor  # (R, L) the rows the model runs on, right-padded
    run_seg: torch.Tensor  # (R, L) int8: SHARED, CHOSEN or REJECTED (own tokens of a packed pair), PAD
    run_pos: torch.Tensor | None  # (R, L) position ids of a packed batch; None: 0..L-1 (unpacked)
    src: torch.Tensor  # (2B, T-1) long: flat index (r * L + l) of the run position predicting labels[:, 1:]; -1 off-label
    n_tokens: int  # tokens of the pairs as separate sequences (prompt counted on each side, full responses):
    #                what an unpacked trainer runs on, and what tokens/s counts

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def run(self) -> tuple:
        """What `logprobs.ModelLogps` takes besides the sides' labels."""
        return self.run_ids, self.run_seg, self.run_pos, self.src

    def to(self, device) -> "PreferenceBatch":
        return PreferenceBatch(*(v.to(device) if isinstance(v, torch.Tensor) else v
                                 for v in (getattr(self, f) for f in self.__dataclass_fields__)))


SHARED, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # run_seg values


def tree_mask(seg: torch.Tensor) -> torch.Tensor:
    """(R, L) run_seg of a packed batch -> (R, 1, L, L) bool, True where query l may attend to key k:
    causal, and a key is shared or in the query's own side. Padding queries see themselves only."""
    L = seg.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
    q, k = seg[:, :, None], seg[:, None, :]
    vis = causal & (k != PAD) & ((k == SHARED) | (k == q)) & (q != PAD)
    vis |= torch.eye(L, dtype=torch.bool, device=seg.device) & (q == PAD)
    return vis[:, None]


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


def encode_sft(question: str, steps: list[str], tokenizer, max_length: int | None = None) -> Example:
    """An SFT example as a degenerate pair: only the chosen side is used (weights 1). Longer than `max_length`:
    the question's oldest tokens go, as for a pair; a ValueError when the solution itself does not fit."""
    pair = StepPair(id="", question=question, answer="", prefix=[], chosen=steps, rejected=steps)
    return encode_pair(pair, tokenizer, max_length=max_length)


def encode_sft_all(solutions, tokenizer, max_length: int | None, *, where: str) -> tuple[list[Example], int]:
    """SFT examples of (question, steps) pairs under `max_length` (sft.max_length or trainer.max_length, named by
    `where`): (examples, how many solutions were too long even with the question cut and were dropped, with a
    warning). Every one dropped: a ValueError naming the knob, since there is nothing to train on."""
    examples, dropped = [], 0
    for q, steps in solutions:
        try:
            examples.append(encode_sft(q, list(steps), tokenizer, max_length))
        except ValueError:
            dropped += 1
    if dropped and not examples:
        raise ValueError(f"{where}={max_length}: every one of the {dropped} SFT solutions is longer; raise it")
    if dropped:
        log.warning("%s=%d: %d SFT solutions longer than it were left out (%d kept)", where, max_length, dropped,
                    len(examples))
    return examples, dropped


def collate(examples: Sequence[Example], pad_id: int, *, sft: bool = False, nll_prefix: bool = False,
            trim_rejected: bool = True, pack: bool = False, run_multiple: int = 1) -> PreferenceBatch:
    """Right-pad to the longest row in this batch (dynamic padding, never to max_length).

    nll_prefix: also label the chosen rows' prefix-step tokens (weight 0, `nll_only` True), so the
    NLL anchor can cover the whole correct solution (trainer.nll_on=solution).
    trim_rejected: a rejected side whose weighted tokens all sit at or before j, the first token where
    the two sides differ (first_error with error_span=token and after_error=0), is labelled with its
    tokens 0..j only: every one of them is predicted from a context the chosen side has, so the model
    runs no token of its own for it.
    pack: one run row per pair (see `PreferenceBatch`); the model computes the prompt and the sides'
    shared tokens once. Without it, each side runs as its own row unless it has no own token.
    The log-probs are the same either way: every label is predicted from the same token ids at the
    same positions.
    run_multiple: the run rows' length is rounded up to a multiple of this (padding positions, which
    nothing attends to), so that batches of nearby lengths give the model the same GEMM shapes
    (`train.run_multiple`: on CPU in bf16, oneDNN compiles a kernel per shape).
    """
    B = len(examples)
    sides = []  # (prompt, side tokens (every one labelled), weights, focus)
    for ex in examples:
        sides.append((ex.prompt_ids, ex.chosen_ids, ex.chosen_w, ex.chosen_focus))
    if not sft:
        for ex in examples:
            n = ex.rejected_labelled(trim_rejected)
            sides.append((ex.prompt_ids, ex.rejected_ids[:n], ex.rejected_w[:n], ex.rejected_focus[:n]))
    T = max(len(p) + len(r) for p, r, _, _ in sides)
    n = len(sides)
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    labels = torch.full((n, T), IGNORE, dtype=torch.long)
    attn = torch.zeros((n, T), dtype=torch.long)
    w = torch.zeros((n, T), dtype=torch.float32)
    foc = torch.zeros((n, T), dtype=torch.float32)
    nll_only = torch.zeros((n, T), dtype=torch.bool)
    for i, (p, r, rw, rf) in enumerate(sides):
        L, P = len(p) + len(r), len(p)
        ids[i, :L] = torch.tensor(p + r)
        attn[i, :L] = 1
        labels[i, P:L] = torch.tensor(r)
        w[i, P:L] = torch.tensor(rw)
        foc[i, P:L] = torch.tensor(rf)
        k = examples[i].n_prefix if nll_prefix and i < B else 0
        if k:
            labels[i, P - k:P] = torch.tensor(p[P - k:])
            nll_only[i, P - k:P] = True

    # Run rows. A chosen row is its whole side, as an unpacked trainer runs it (so SFT and unpacked batches
    # have the shapes, and the rounding, they always had). A rejected side needs as inputs its tokens but the
    # last (whose prediction nothing needs); past the first s it shares with its chosen row, they are its own.
    # Side input t (predicting side token t + 1) sits at run position t if t < s, else at t + off:
    # places[i] = (run row, s, off).
    rows, seg_rows, pos_rows, places = [], [], [], []
    for i in range(B):
        c_in = sides[i][0] + sides[i][1]
        rows.append(c_in)
        seg_rows.append([SHARED] * len(c_in))
        pos_rows.append(list(range(len(c_in))))
        places.append((i, len(c_in), 0))
    for i in range(B if not sft else 0):
        c_in, r_side = rows[i], sides[B + i][0] + sides[B + i][1]
        r_in = r_side[:-1]
        s = next((t for t, (a, b) in enumerate(zip(c_in, r_in)) if a != b), min(len(c_in), len(r_in)))
        if s == len(r_in):  # no input of its own: read off its chosen row
            places.append((i, s, 0))
        elif pack:  # its own inputs go after the chosen row's, at their own positions
            seg_rows[i] = [SHARED] * s + [CHOSEN] * (len(c_in) - s) + [REJECTED] * (len(r_in) - s)
            pos_rows[i] = pos_rows[i] + list(range(s, len(r_in)))
            places.append((i, s, len(c_in) - s))
            rows[i] = c_in + r_in[s:]
        else:  # its own row, the whole side
            rows.append(r_side)
            seg_rows.append([SHARED] * len(r_side))
            pos_rows.append(list(range(len(r_side))))
            places.append((len(rows) - 1, len(r_side), 0))
    R, Lr = len(rows), max(len(r) for r in rows)
    Lr = -(-Lr // run_multiple) * run_multiple
    run_ids = torch.full((R, Lr), pad_id, dtype=torch.long)
    run_seg = torch.full((R, Lr), PAD, dtype=torch.int8)
    run_pos = torch.zeros((R, Lr), dtype=torch.long) if pack else None
    for r, (toks, sg) in enumerate(zip(rows, seg_rows)):
        run_ids[r, :len(toks)] = torch.tensor(toks)
        run_seg[r, :len(toks)] = torch.tensor(sg, dtype=torch.int8)
        if pack:
            run_pos[r, :len(toks)] = torch.tensor(pos_rows[r])
    src = torch.full((n, T - 1), -1, dtype=torch.long)
    t = torch.arange(T - 1)
    for i, (row, s, off) in enumerate(places):
        lab = labels[i, 1:] != IGNORE
        src[i, lab] = (torch.where(t < s, t, t + off) + row * Lr)[lab]
    n_tokens = sum(len(ex.prompt_ids) + len(ex.chosen_ids) + (0 if sft else len(ex.prompt_ids) + len(ex.rejected_ids))
                   for ex in examples)
    return PreferenceBatch(ids, attn, labels, w, foc, nll_only, run_ids, run_seg, run_pos, src, n_tokens)


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
