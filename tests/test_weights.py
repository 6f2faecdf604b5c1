"""Scores -> step weights -> token weights, through a real tokenizer's offsets."""

import pytest

from stepdpo.batching import collate, encode_pair
from stepdpo.data import StepPair, response_text, step_spans
from stepdpo.model import char_tokenizer
from stepdpo.weights import first_error, get_scheme, score, step_token_weights, uniform


def test_schemes():
    assert uniform([1, 1], [1, 0, 0]) == ([1.0, 1.0], [1.0, 1.0, 1.0])
    assert first_error([1, 1, 1], [1, 0, 0]) == ([0.0, 1.0, 0.0], [0.0, 1.0, 0.0])
    assert first_error([1, 1, 1], [1, 0, 0], after_error=0.5) == ([0.0, 1.0, 0.5], [0.0, 1.0, 0.5])
    assert first_error([1], [1, 1, 0]) == ([1.0], [0.0, 0.0, 1.0])  # chosen index clipped
    # the correct continuation pushed up whole, the rejected one only at its first wrong step
    assert first_error([1, 1, 1, 1], [1, 0, 0], chosen_after_error=1.0) == ([0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0])
    assert first_error([1, 1, 1], [0, 0, 0], after_error=0.5, chosen_after_error=0.0) == \
        ([1.0, 0.0, 0.0], [1.0, 0.5, 0.5])
    assert first_error([1, 1], [1, 1]) == ([1.0, 1.0], [1.0, 1.0])  # no error: uniform
    assert score([1.0, 0.5], [1.0, 0.0]) == ([1.0, 0.5], [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown scheme"):
        get_scheme("nope")
    assert get_scheme("stepdpo.weights:uniform") is uniform


def test_token_straddling_two_steps_gets_overlap_mean():
    spans = [(0, 4), (4, 8)]  # "abc\n" "defg"
    w = step_token_weights([(0, 2), (2, 6), (6, 8), (8, 8)], spans, [1.0, 0.0])
    assert w == [1.0, 0.5, 0.0, 0.0]  # the (8, 8) zero-width EOS gets the last step's weight


def test_empty_step_has_no_tokens():
    steps = ["12 + 3 = 15", "", "The answer is 15"]
    spans = step_spans(steps)
    assert spans[1][1] - spans[1][0] == 1  # only its separator
    assert response_text(steps)[spans[2][0]:spans[2][1]] == "The answer is 15"
    tok = char_tokenizer()
    text = response_text(steps)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    w = step_token_weights(enc["offset_mapping"], spans, [0.0, 5.0, 1.0])
    assert w.count(5.0) == 1  # just the newline that belongs to the empty step
    assert len(w) == len(text)


def test_prompt_and_padding_weigh_zero_and_steps_align():
    tok = char_tokenizer()
    pair = StepPair(id="p", question="Start with 2, add 3.", answer="5", prefix=["x"],
                    chosen=["2 + 3 = 5", "The answer is 5"], rejected=["2 + 3 = 6", "The answer is 6", "extra"],
                    chosen_scores=[1.0, 1.0], rejected_scores=[0.0, 0.0, 0.0])
    ex = encode_pair(pair, tok, weighting="first_error")
    # chosen: step 0 (9 chars + newline) weighs 1, the rest (and EOS) 0
    assert ex.chosen_w[:10] == [1.0] * 10 and set(ex.chosen_w[10:]) == {0.0}
    assert len(ex.chosen_w) == len(ex.chosen_ids) == len("2 + 3 = 5\nThe answer is 5") + 1
    b = collate([ex, ex], tok.pad_token_id)
    n_prompt = len(ex.prompt_ids)
    assert b.input_ids.shape[0] == 4
    assert (b.token_weights[:, :n_prompt] == 0).all()
    assert (b.labels[:, :n_prompt] == -100).all()
    # rows 0-1 chosen (shorter than rejected): padding at the end weighs 0 and is ignored
    L = n_prompt + len(ex.chosen_ids)
    assert (b.token_weights[0, L:] == 0).all() and (b.labels[0, L:] == -100).all() and (b.attention_mask[0, L:] == 0).all()
    assert b.token_weights[2, n_prompt:n_prompt + 10].tolist() == [1.0] * 10


MISCOPY = StepPair(id="m", question="Start with 13, subtract 4, subtract 7. What is the result?", answer="2",
                   prefix=[], chosen=["13 - 4 = 9", "9 - 7 = 2", "The answer is 2"],
                   rejected=["13 - 7 = 6", "6 - 7 = 0", "The answer is 0"],
                   chosen_scores=[1.0, 1.0, 1.0], rejected_scores=[0.0, 1.0, 1.0])


def _weighted(tok, ids, w):
    return [(i, tok.decode([t]), x) for i, (t, x) in enumerate(zip(ids, w)) if x]


def test_error_span_token_keeps_only_the_first_differing_token():
    tok = char_tokenizer()
    step = encode_pair(MISCOPY, tok, weighting="first_error", weighting_kwargs={"error_span": "step"})
    assert sum(step.rejected_w) == len("13 - 7 = 6\n")  # the whole wrong step, its correct "= 6" too
    ex = encode_pair(MISCOPY, tok, weighting="first_error", weighting_kwargs={"error_span": "token"})
    # only the miscopied operand is pushed down and the right one up, at the same position
    assert _weighted(tok, ex.rejected_ids, ex.rejected_w) == [(5, "7", 1.0)]
    assert _weighted(tok, ex.chosen_ids, ex.chosen_w) == [(5, "4", 1.0)]
    # later steps keep their first_error weights
    after = encode_pair(MISCOPY, tok, weighting="first_error",
                        weighting_kwargs={"error_span": "token", "chosen_after_error": 1.0})
    n0 = len("13 - 4 = 9\n")
    assert after.chosen_w[:n0] == [0.0] * 5 + [1.0] + [0.0] * 5 and after.chosen_w[n0:] == [1.0] * (len(after.chosen_w) - n0)
    assert _weighted(tok, after.rejected_ids, after.rejected_w) == [(5, "7", 1.0)]


def test_error_span_token_edge_cases():
    tok = char_tokenizer()
    kw = {"error_span": "token"}
    # one step text a prefix of the other: the differing token is the chosen's separator / the rejected's extra char
    pair = StepPair(id="e", question="q", answer="0", prefix=[], chosen=["1 - 1 = 0", "The answer is 0"],
                    rejected=["1 - 1 = 0 0"], chosen_scores=[1.0, 1.0], rejected_scores=[0.0])
    ex = encode_pair(pair, tok, weighting="first_error", weighting_kwargs=kw)
    assert _weighted(tok, ex.chosen_ids, ex.chosen_w) == [(9, "\n", 1.0)]
    assert _weighted(tok, ex.rejected_ids, ex.rejected_w) == [(9, " ", 1.0)]
    # the wrong step is the last one and the chosen step extends it: the rejected side's EOS is the difference
    pair = StepPair(id="e", question="q", answer="0", prefix=[], chosen=["1 - 1 = 00"], rejected=["1 - 1 = 0"],
                    chosen_scores=[1.0], rejected_scores=[0.0])
    ex = encode_pair(pair, tok, weighting="first_error", weighting_kwargs=kw)
    assert ex.rejected_w == [0.0] * 9 + [1.0] and ex.rejected_ids[-1] == tok.eos_token_id
    assert _weighted(tok, ex.chosen_ids, ex.chosen_w) == [(9, "0", 1.0)]
    # equal step texts (a scorer that flags a step the chosen side has too), or no wrong step: whole-step weights
    same = StepPair(id="s", question="q", answer="0", prefix=[], chosen=["1 - 1 = 0", "The answer is 0"],
                    rejected=["1 - 1 = 0", "The answer is 9"], chosen_scores=[1.0, 1.0], rejected_scores=[0.0, 0.0])
    for p in (same, StepPair(**{**MISCOPY.__dict__, "rejected_scores": [1.0, 1.0, 1.0]})):
        assert encode_pair(p, tok, weighting="first_error", weighting_kwargs=kw).rejected_w == \
            encode_pair(p, tok, weighting="first_error").rejected_w


@pytest.mark.parametrize("kwargs,expect", [
    ({"error_span": "word"}, "error_span='word': choose one of"),
    ({"error_span": "token", "weighting": "uniform"}, "only trainer.weighting=first_error"),
])
def test_error_span_validated(kwargs, expect):
    from conftest import compose_config
    from stepdpo.config import validate_trainer

    overrides = [f"trainer.weighting_kwargs.error_span={kwargs['error_span']}"]
    if "weighting" in kwargs:
        overrides.append(f"trainer.weighting={kwargs['weighting']}")
    cfg = compose_config("trainer=stepdpo", *overrides)
    with pytest.raises(ValueError, match=expect):
        validate_trainer(cfg.trainer, "trainer")


def test_unscored_sides_read_as_the_preference_and_a_wrong_count_is_refused():
    """token_weights fills an unscored side explicitly (chosen 1.0, rejected 0.0: the error on the rejected
    side's first step) and refuses a score list that does not match the steps (a bug upstream)."""
    from stepdpo.weights import pair_scores, token_weights

    tok = char_tokenizer()
    kw = dict(id="u", question="q", answer="5", prefix=[], chosen=["2 + 3 = 5", "The answer is 5"],
              rejected=["2 + 3 = 6", "The answer is 6"])
    unscored = StepPair(**kw)
    scored = StepPair(**kw, chosen_scores=[1.0, 1.0], rejected_scores=[0.0, 0.0])
    assert pair_scores(unscored) == ([1.0, 1.0], [0.0, 0.0])
    for scheme in ("uniform", "first_error", "score"):
        assert encode_pair(unscored, tok, weighting=scheme) == encode_pair(scored, tok, weighting=scheme)
    offs = tuple([(i, i + 1) for i in range(len(response_text(s)))] + [(len(response_text(s)),) * 2]
                 for s in (kw["chosen"], kw["rejected"]))
    w = token_weights(unscored, offs, "first_error")
    assert w.rejected[:9] == [1.0] * 9 and set(w.rejected[10:]) == {0.0}  # the first rejected step, as in Step-DPO
    with pytest.raises(ValueError, match=r"pair u: 1 rejected_scores for 2 rejected steps"):
        token_weights(StepPair(**kw, rejected_scores=[0.0]), offs, "uniform")
    with pytest.raises(ValueError, match="only weighting=first_error"):
        token_weights(scored, offs, "uniform", error_span="token")


def test_one_is_wrong_rule_for_weights_and_scorers():
    from stepdpo.rewards.base import ScoreResult
    from stepdpo.weights import first_wrong, is_wrong

    assert is_wrong(0.49) and not is_wrong(0.5)
    assert first_wrong([0.9, 0.5, 0.2, 0.0]) == 2
    assert ScoreResult([0.9, 0.5, 0.2]).first_error == 2 and ScoreResult(None).first_error is None
    assert first_error([1, 1, 1], [0.9, 0.5, 0.2]) == ([0.0, 0.0, 1.0], [0.0, 0.0, 1.0])
