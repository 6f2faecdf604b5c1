"""Step scores -> per-step weights -> per-token weights: the whole rule, here only. Pure functions.

`token_weights(pair, offsets, scheme, **kwargs)` is the one entry point (`stepdpo.batching.encode_pair`
tokenizes and calls it). For one pair it:
1. reads the step scores, filling an unscored side from the pair's preference alone (`pair_scores`);
2. turns them into per-step weights with the scheme (below);
3. spreads step weights over the tokens through their character offsets (`step_token_weights`);
4. with first_error and `error_span=token`, keeps step k's weight on one token (`localise_step`);
5. normalises each side to mean 1 for the schemes in `NORMALISE`;
and also gives the `focus` rows (1 on the first wrong rejected step and the chosen step facing it).

A step is wrong when its score is < 0.5 (`is_wrong`): every module that asks calls it.

Weighting schemes (`trainer.weighting`), for a pair with chosen scores c_1..c_n and rejected
scores r_1..r_m (scores in [0, 1]; a step is "wrong" when its score < 0.5):

- `uniform`: every response step weight 1 on both sides. With uniform weights the stepwise loss
  is exactly standard DPO.
- `first_error` (Step-DPO): let k be the first wrong step of the rejected continuation. The
  rejected step k and the chosen step k (clipped to the chosen's last step) weigh 1; steps
  before k weigh 0 (shared correct context); steps after k weigh `after_error` (0 reproduces
  Step-DPO; 1 keeps every token from the error on). `chosen_after_error` (default: the same as
  `after_error`) sets the chosen side's later steps alone: 1 pushes the whole correct continuation
  up while the rejected steps after its error (which usually carry the wrong value forward with
  correct arithmetic) stay out of the loss. A rejected response with no wrong step falls back to
  uniform weights. `error_span` (a keyword of `token_weights`, which has the texts):
  `step` (default) weighs every token of step k; `token` keeps step k's weight only on the token
  where the two step-k texts first differ, on each side, and 0 on the rest of step k. A wrong step
  that miscopies an operand (`13 - 7 = 6` for `13 - 4 = 9`) then has only `7` pushed down, not the
  `6`, which is correct arithmetic for the operand written. It assumes one canonical way of writing
  a step (the built-in task); with free-form steps the first difference need not be the error.
- `score`: chosen step i weighs c_i, rejected step j weighs 1 - r_j (good steps pushed up, bad
  steps pushed down, in proportion to the scorer's confidence). Each response's weights are then
  normalised to mean 1 over its tokens, so beta keeps the meaning it has in DPO.

- `advantage` (credit assignment from step values, e.g. `reward=rollout`: scores are V_i, the chance
  of reaching the answer after step i). With v = the value of the shared prefix (`value_before`:
  the pair's `meta["value_before"]`; 1 when the scorer gave none, i.e. a prefix judged correct),
  advantages are A^c_i = c_i - c_{i-1} and A^r_j = r_j - r_{j-1}, with c_0 = r_0 = v. The rejected
  side's critical step j* = argmin_j A^r_j (the largest drop, the first on ties) weighs
  max(0, -A^r_{j*}), its other steps 0 (`all_drops=true`: every step weighs its drop, max(0, -A^r_j));
  chosen step i weighs its gain max(0, A^c_i). Weights stay in [0, 1] and are not normalised, so a
  drop of 1 weighs as first_error's wrong step does, and a doubtful drop (0.75 -> 0.5) half as much.
  `signed=true` keeps every step and both signs: chosen step i weighs A^c_i and rejected step j weighs
  -A^r_j, in [-1, 1]. A negative weight reverses a token's pull on the margin, so the loss raises every
  step that raised the value and lowers every step that lowered it, on both sides. This is
  advantage-weighted policy gradient through DPO's link (Setlur et al. 2024). A failed solution's good
  steps before its critical one are pushed up. Those are states the chosen side may never visit. Needs
  `token_reduction=sum`, because with signed weights a mean's denominator can be 0.

A user-defined scheme is any function `fn(chosen_scores, rejected_scores, **kwargs) ->
(chosen_step_weights, rejected_step_weights)`, named as `trainer.weighting=my_pkg.module:fn`.

Token weights: token t covering response characters [s, e) gets the overlap-weighted mean of the
weights of the steps it overlaps; a zero-width token (EOS) gets the weight of the last step.
Prompt and padding tokens weigh 0 (that is done in batching, by construction).

Unscored pairs: a side whose scores are None (a pairs file without scores, `encode_sft`) reads as the
pair's preference alone: every chosen step right (1.0), every rejected step wrong (0.0), so first_error
puts the error on the rejected side's first step. A side whose score count differs from its step count
is a bug upstream and raises.
"""

from __future__ import annotations

import importlib
from typing import Callable, NamedTuple, Sequence

from .data import StepPair, step_spans

WRONG = 0.5  # a step scoring below this is wrong
StepWeights = tuple[list[float], list[float]]
UNSCORED_CHOSEN, UNSCORED_REJECTED = 1.0, 0.0  # step scores read from an unscored pair's preference alone


def is_wrong(score: float) -> bool:
    """A step is wrong when its score (in [0, 1]) is below 0.5. The one place this is decided."""
    return score < WRONG


def uniform(chosen: Sequence[float], rejected: Sequence[float], **_) -> StepWeights:
    return [1.0] * len(chosen), [1.0] * len(rejected)


def first_wrong(scores: Sequence[float]) -> int | None:
    """Index of the first wrong step (score < WRONG), None when every step is right."""
    return next((i for i, s in enumerate(scores) if is_wrong(s)), None)


def first_error(chosen: Sequence[float], rejected: Sequence[float], *, after_error: float = 0.0,
                chosen_after_error: float | None = None, **_) -> StepWeights:
    k = first_wrong(rejected)
    if k is None or not chosen:
        return uniform(chosen, rejected)

    def row(n: int, at: int, after: float) -> list[float]:
        return [0.0 if i < at else 1.0 if i == at else after for i in range(n)]

    c_after = after_error if chosen_after_error is None else chosen_after_error
    return row(len(chosen), min(k, len(chosen) - 1), c_after), row(len(rejected), k, after_error)


def score(chosen: Sequence[float], rejected: Sequence[float], **_) -> StepWeights:
    return [float(s) for s in chosen], [1.0 - float(s) for s in rejected]


def advantage(chosen: Sequence[float], rejected: Sequence[float], *, value_before: float | None = None,
              all_drops: bool = False, signed: bool = False, **_) -> StepWeights:
    """Step weights from step advantages (formula in the module docstring): the rejected side's
    critical step (largest drop) by the size of its drop, the chosen side's steps by their gains;
    `signed`: every step by its advantage, both signs (chosen A^c_i, rejected -A^r_j)."""
    v = 1.0 if value_before is None else float(value_before)

    def adv(values: Sequence[float]) -> list[float]:
        return [float(x) - float(p) for x, p in zip(values, [v] + list(values[:-1]))]

    ac, ar = adv(chosen), adv(rejected)
    if signed:
        if all_drops:
            raise ValueError("weighting=advantage: signed=true already weighs every step; drop all_drops")
        return ac, [-a for a in ar]
    cw = [max(0.0, a) for a in ac]
    if all_drops:
        return cw, [max(0.0, -a) for a in ar]
    rw = [0.0] * len(ar)
    if ar:
        j = min(range(len(ar)), key=lambda i: (ar[i], i))
        rw[j] = max(0.0, -ar[j])
    return cw, rw


SCHEMES: dict[str, Callable[..., StepWeights]] = {"uniform": uniform, "first_error": first_error, "score": score,
                                                  "advantage": advantage}
NORMALISE = {"score"}  # schemes whose token weights are normalised to mean 1 per response
VALUE_SCHEMES = {"advantage"}  # schemes that read the pair's meta["value_before"] (token_weights passes it)


def get_scheme(name: str) -> Callable[..., StepWeights]:
    if name in SCHEMES:
        return SCHEMES[name]
    if ":" in name:
        mod, _, fn = name.partition(":")
        try:
            return getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"trainer.weighting: can't import {name!r} ({e})") from None
    raise ValueError(f"trainer.weighting: unknown scheme {name!r}; choose one of {sorted(SCHEMES)} or 'module:function'")


def step_token_weights(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]],
                       step_weights: Sequence[float]) -> list[float]:
    """Weight of each response token from the weights of the steps its characters fall in.

    offsets: (start, end) character offsets of each response token in the response text.
    spans:   (start, end) of each step in the same text (`stepdpo.data.step_spans`).
    """
    if len(spans) != len(step_weights):
        raise ValueError(f"step_token_weights: {len(spans)} step spans but {len(step_weights)} step weights")
    last = step_weights[-1] if len(step_weights) else 0.0
    out = []
    for s, e in offsets:
        if e <= s:
            out.append(float(last) if s >= (spans[-1][1] if spans else 0) else _at(s, spans, step_weights, last))
            continue
        tot = 0.0
        for (a, b), w in zip(spans, step_weights):
            ov = min(e, b) - max(s, a)
            if ov > 0:
                tot += ov * w
        out.append(tot / (e - s))
    return out


def _at(pos: int, spans, weights, default: float) -> float:
    for (a, b), w in zip(spans, weights):
        if a <= pos < b:
            return float(w)
    return float(default)


ERROR_SPANS = ("step", "token")


def first_difference(a: str, b: str) -> int | None:
    """Index of the first character where a and b differ (len of the shorter when one is a prefix of
    the other); None when they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def localise_step(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]],
                  step_weights: Sequence[float], k: int, pos: int) -> list[float]:
    """Token weights as `step_token_weights`, except that step k's weight stays only on the token
    covering response character `pos` (inside step k's span, or at the text's end: EOS); the rest of
    step k weighs 0."""
    a, b = spans[k]
    if not a <= pos <= b:
        raise ValueError(f"localise_step: position {pos} outside step {k}'s span {spans[k]}")
    tok = next(((s, e) for s, e in offsets if s <= pos < e), None)
    spans2, w2 = list(spans[:k]), list(step_weights[:k])
    if tok is None:  # pos is the end of the text: the differing "token" is EOS
        if k != len(spans) - 1:
            raise ValueError(f"localise_step: no token covers position {pos} of step {k}")
        return step_token_weights(offsets, spans2 + [(a, b), (b, b)], w2 + [0.0, step_weights[k]])
    s, e = max(tok[0], a), min(tok[1], b)
    spans2 += [(a, s), (s, e), (e, b)] + list(spans[k + 1:])
    w2 += [0.0, step_weights[k], 0.0] + list(step_weights[k + 1:])
    return step_token_weights(offsets, spans2, w2)


def normalise_mean_one(weights: list[float]) -> list[float]:
    total = sum(weights)
    if total <= 0:
        return weights
    k = len(weights) / total
    return [w * k for w in weights]


class PairWeights(NamedTuple):
    """Per-token weights of one pair, aligned with each side's token offsets (response tokens + EOS)."""

    chosen: list[float]
    rejected: list[float]
    chosen_focus: list[float]  # 1 on the chosen step facing the first wrong rejected step (metrics only)
    rejected_focus: list[float]  # 1 on the first wrong rejected step (metrics only)


def pair_scores(pair: StepPair) -> StepWeights:
    """The pair's step scores; an unscored side (None) reads as the preference alone (module docstring)."""
    out = []
    for side, scores, fill in (("chosen", pair.chosen_scores, UNSCORED_CHOSEN),
                               ("rejected", pair.rejected_scores, UNSCORED_REJECTED)):
        steps = getattr(pair, side)
        if scores is None:
            out.append([fill] * len(steps))
        elif len(scores) != len(steps):
            raise ValueError(f"pair {pair.id}: {len(scores)} {side}_scores for {len(steps)} {side} steps")
        else:
            out.append([float(x) for x in scores])
    return out[0], out[1]


def token_weights(pair: StepPair, offsets: tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]]],
                  scheme: str = "uniform", **kwargs) -> PairWeights:
    """Token weights of one pair from its step scores (the whole rule: see the module docstring).

    offsets: (chosen, rejected) character offsets of every response token in `response_text(side)`,
    EOS included as a zero-width (len, len). kwargs: the scheme's keywords (`trainer.weighting_kwargs`),
    plus `error_span` (step | token; token only with first_error).
    """
    error_span = kwargs.pop("error_span", "step")
    if error_span not in ERROR_SPANS:
        raise ValueError(f"error_span={error_span!r}: choose one of {list(ERROR_SPANS)}")
    if error_span != "step" and scheme != "first_error":
        raise ValueError(f"error_span={error_span}: only weighting=first_error localises the error, got {scheme}")
    cs, rs = pair_scores(pair)
    if scheme in VALUE_SCHEMES:  # the value of the shared prefix (reward=rollout), for advantages
        kwargs["value_before"] = pair.meta.get("value_before")
    cw, rw = get_scheme(scheme)(cs, rs, **kwargs)  # per-step weights
    cf, rf = first_error(cs, rs)  # per-step focus
    c_off, r_off = offsets
    c_spans, r_spans = step_spans(pair.chosen), step_spans(pair.rejected)
    c_w, r_w = step_token_weights(c_off, c_spans, cw), step_token_weights(r_off, r_spans, rw)
    k = first_wrong(rs)
    if error_span == "token" and k is not None and k < len(pair.chosen):
        # step k's weight only on the token where the two step-k texts first differ (each side's own
        # token there); whole steps when the texts are equal
        d = first_difference(pair.chosen[k], pair.rejected[k])
        if d is not None:
            c_w = localise_step(c_off, c_spans, cw, k, c_spans[k][0] + d)
            r_w = localise_step(r_off, r_spans, rw, k, r_spans[k][0] + d)
    if scheme in NORMALISE:
        c_w, r_w = normalise_mean_one(c_w), normalise_mean_one(r_w)
    return PairWeights(c_w, r_w, step_token_weights(c_off, c_spans, cf), step_token_weights(r_off, r_spans, rf))
