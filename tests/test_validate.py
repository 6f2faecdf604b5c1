"""Validation: each kind of bad row gives its own message naming file:line, the field and the fix
(through the pair-file loader and through validate_pairs), skip reports, and token-length policies."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from stepdpo.batching import encode_pair
from stepdpo.data import Problem, StepPair
from stepdpo.datasets import pairs_file
from stepdpo.model import char_tokenizer
from stepdpo.validate import pair_length, validate_pairs, validate_problems

GOOD = {"prompt": "What is 2 + 3?", "chosen": ["2 + 3 = 5", "The answer is 5"], "rejected": ["2 + 3 = 6", "The answer is 6"],
        "chosen_scores": [1.0, 1.0], "rejected_scores": [0.0, 0.0], "answer": "5"}


def bad(**change) -> dict:
    row = {**GOOD, **change}
    return {k: v for k, v in row.items() if v is not DROP}


DROP = object()

# (bad row as a JSON line, the message that must follow "<file>:2: ")
BAD_ROWS = [
    (bad(prompt=DROP), "field 'prompt' missing (keys: ['answer', 'chosen', 'chosen_scores', 'rejected', "
                       "'rejected_scores'])"),
    (bad(prompt="   "), "field 'prompt' must be non-empty"),
    (bad(chosen=7), "field 'chosen' must be str/list, got int"),
    (bad(chosen=[]), "field 'chosen' must be non-empty"),
    (bad(chosen="  \n "), "field 'chosen' must be non-empty"),
    (bad(chosen=["2 + 3 = 5", " "]), "field 'chosen[1]' is an empty step; remove it"),
    (bad(rejected=[6, "x"]), "field 'rejected[0]' must be a string (one step), got int"),
    (bad(rejected=GOOD["chosen"], rejected_scores=[1.0, 1.0]),
     "field 'chosen' equals field 'rejected'; a pair needs two different continuations"),
    (bad(chosen_scores=[1.0]), "field 'chosen_scores' has 1 scores for 2 steps"),
    (bad(rejected_scores=[0.0, 1.5]), "field 'rejected_scores[1]' must be a finite number in [0, 1], got 1.5"),
    (bad(rejected_scores=[-0.1, 0.0]), "field 'rejected_scores[0]' must be a finite number in [0, 1], got -0.1"),
    (bad(chosen_scores=[True, 1.0]), "field 'chosen_scores[0]' must be a finite number in [0, 1], got True"),
    (json.dumps(GOOD).replace('"rejected_scores": [0.0, 0.0]', '"rejected_scores": [NaN, 0.0]'),
     "field 'rejected_scores[0]' must be a finite number in [0, 1], got nan"),
    (bad(chosen_scores="1,1"), "field 'chosen_scores' must be a list of numbers, got str"),
    (bad(prefix=[""]), "field 'prefix[0]' is an empty step; remove it"),
    (bad(answer=[5]), "field 'answer' must be a string, got list"),
    (bad(meta="note"), "field 'meta' must be an object, got str"),
    (bad(id=[1]), "field 'id' must be a string, got list"),
    ('{"prompt": "unterminated', "invalid JSON (Unterminated string starting at at column 12)"),
    ("[1, 2]", "expected a JSON object, got list"),
]


def write(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=[m.split(";")[0][:40] for _, m in BAD_ROWS])
def test_pair_file_bad_row_named_by_line_and_field(tmp_path, row, message):
    f = write(tmp_path / "pairs.jsonl", GOOD, row, GOOD)
    with pytest.raises(ValueError) as e:
        pairs_file.load(path=str(f), eval_fraction=None)
    assert str(e.value).startswith(f"{f}:2: {message}"), str(e.value)
    assert "on_invalid=skip" in str(e.value)  # says how to go on
    b = pairs_file.load(path=str(f), eval_fraction=None, on_invalid="skip")
    assert [p.meta["where"] for p in b.pairs] == [f"{f}:1", f"{f}:3"]


def test_pair_file_skip_counts_every_bad_row(tmp_path, caplog):
    f = write(tmp_path / "pairs.jsonl", GOOD, *[r for r, _ in BAD_ROWS], "", GOOD)
    caplog.set_level(logging.WARNING)
    b = pairs_file.load(path=str(f), eval_fraction=None, on_invalid="skip")
    assert len(b.pairs) == 2
    assert f"skipped {len(BAD_ROWS)} of {len(BAD_ROWS) + 2} rows" in caplog.text


# ----------------------------------------------------------------------------- validate_pairs


def pair(i: int = 0, **kw) -> StepPair:
    base = dict(id=f"p{i}", question="What is 2 + 3?", answer="5", prefix=[], chosen=["2 + 3 = 5", "The answer is 5"],
                rejected=["2 + 3 = 6", "The answer is 6"], chosen_scores=[1.0, 1.0], rejected_scores=[0.0, 0.0],
                meta={"where": f"data/pairs.jsonl:{i + 1}"})
    base.update(kw)
    return StepPair(**base)


IN_MEMORY = [
    ("missing_field", pair(1, chosen=None), "data/pairs.jsonl:2: field 'chosen' missing; add it"),
    ("wrong_type", pair(2, question=5), "data/pairs.jsonl:3: field 'question' must be str, got int"),
    ("empty", pair(3, question=" "), "data/pairs.jsonl:4: field 'question' must be non-empty"),
    ("empty", pair(4, rejected=[]), "data/pairs.jsonl:5: field 'rejected' must be non-empty"),
    ("empty_step", pair(5, prefix=["ok", "  "]), "data/pairs.jsonl:6: field 'prefix[1]' is an empty step; remove it"),
    ("wrong_type", pair(6, chosen="2 + 3 = 5"), "data/pairs.jsonl:7: field 'chosen' must be list, got str"),
    ("chosen_equals_rejected", pair(7, rejected=["2 + 3 = 5", "The answer is 5"]),
     "data/pairs.jsonl:8: fields 'chosen' and 'rejected' are the same text"),
    ("score_count", pair(8, chosen_scores=[1.0, 1.0, 1.0]),
     "data/pairs.jsonl:9: field 'chosen_scores' has 3 scores for 2 steps; give one score per step"),
    ("score_value", pair(9, rejected_scores=[0.0, math.inf]),
     "data/pairs.jsonl:10: field 'rejected_scores[1]' must be a finite number in [0, 1], got inf"),
    ("score_value", pair(10, rejected_scores=[0.0, "0"]),
     "data/pairs.jsonl:11: field 'rejected_scores[1]' must be a finite number in [0, 1], got '0'"),
    ("wrong_type", pair(11, meta=["x"]), "on_policy: pair 1 (id 'p11'): field 'meta' must be an object, got list"),
    ("duplicate_id", pair(0, meta={"where": "data/pairs.jsonl:13"}),
     "data/pairs.jsonl:13: field 'id' 'p0' is used by an earlier pair; ids must be unique"),
]


@pytest.mark.parametrize("reason,bad_pair,message", IN_MEMORY, ids=[m[:30] for *_, m in IN_MEMORY])
def test_validate_pairs_each_error(reason, bad_pair, message):
    with pytest.raises(ValueError) as e:
        validate_pairs([pair(0), bad_pair], source="on_policy")
    assert str(e.value).startswith(message)
    kept, rep = validate_pairs([pair(0), bad_pair], on_invalid="skip", source="on_policy")
    assert [p.id for p in kept] == ["p0"]
    assert rep["dropped_by_reason"] == {reason: 1} and rep["examples"][reason][0].startswith(message)


def test_validate_pairs_skip_report_and_dicts():
    pairs = [pair(0)] + [b for _, b, _ in IN_MEMORY] + [pair(20)]
    kept, rep = validate_pairs(pairs, on_invalid="skip", source="x")
    assert [p.id for p in kept] == ["p0", "p20"]
    assert (rep["rows"], rep["kept"], rep["dropped"]) == (14, 2, 12)
    assert rep["dropped_by_reason"] == {"missing_field": 1, "wrong_type": 3, "empty": 2, "empty_step": 1,
                                        "chosen_equals_rejected": 1, "score_count": 1, "score_value": 2,
                                        "duplicate_id": 1}
    assert len(rep["examples"]["wrong_type"]) == 3 and rep["source"] == "x"
    # dicts (e.g. rows read from a pairs.jsonl) are checked the same way and come back as StepPairs
    d = pair(30).to_dict()
    kept, _ = validate_pairs([d])
    assert isinstance(kept[0], StepPair) and kept[0].chosen == d["chosen"]
    del d["rejected"]
    with pytest.raises(ValueError, match=r"data/pairs.jsonl:31: field 'rejected' missing"):
        validate_pairs([d])
    # scores may be absent until a reward option scores the pair, unless required
    assert len(validate_pairs([pair(0, chosen_scores=None, rejected_scores=None)])[0]) == 1
    with pytest.raises(ValueError, match="field 'chosen_scores' missing; give one score"):
        validate_pairs([pair(0, chosen_scores=None)], require_scores=True)
    with pytest.raises(ValueError, match="truncation: 'cut' is not one of"):
        validate_pairs([], truncation="cut")
    with pytest.raises(ValueError, match="on_invalid: 'ignore' is not one of"):
        validate_pairs([], on_invalid="ignore")


# ----------------------------------------------------------------------------- lengths


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()  # one token per character: lengths are easy to count by hand


def test_length_counts_match_batching(tok):
    p = pair(0, prefix=["First, add."])
    n_prompt, n_resp = pair_length(p, tok)
    assert n_prompt == 1 + len("Question: What is 2 + 3?\nAnswer:\nFirst, add.\n")  # BOS + prompt
    assert n_resp == len("2 + 3 = 6\nThe answer is 6") + 1  # longer response + EOS
    ex = encode_pair(p, tok)
    assert len(ex) == n_prompt + n_resp


@pytest.mark.parametrize("truncation", ["error", "drop", "truncate_left"])
def test_length_policies(tok, truncation):
    p = pair(0)
    total = sum(pair_length(p, tok))
    kept, rep = validate_pairs([p], tokenizer=tok, max_length=total, truncation=truncation)
    assert len(kept) == 1 and rep["truncated"] == 0  # exactly at the limit: fine
    limit = total - 5
    if truncation == "error":
        with pytest.raises(ValueError, match=rf"data/pairs.jsonl:1: pair is {total} tokens .* > max_length={limit}"):
            validate_pairs([p], tokenizer=tok, max_length=limit, truncation=truncation)
        kept, rep = validate_pairs([p, pair(1)], tokenizer=tok, max_length=limit, on_invalid="skip")
        assert kept == [] and rep["dropped_by_reason"] == {"too_long": 2}
    elif truncation == "drop":  # an explicit policy: drops even with on_invalid=error
        kept, rep = validate_pairs([p, pair(1, question="Q?")], tokenizer=tok, max_length=limit, truncation="drop")
        assert [k.id for k in kept] == ["p1"] and rep["dropped_by_reason"] == {"too_long": 1}
    else:
        kept, rep = validate_pairs([p], tokenizer=tok, max_length=limit, truncation="truncate_left")
        assert rep["truncated"] == 1 and kept[0].meta["truncated_prompt_tokens"] == 5
        assert p.meta == {"where": "data/pairs.jsonl:1"}  # the input is not modified
        ex = encode_pair(kept[0], tok, max_length=limit)
        assert len(ex) == limit  # batching drops exactly the counted prompt tokens
        with pytest.raises(ValueError, match="the responses are 26 tokens and .*the prompt without its question"):
            validate_pairs([p], tokenizer=tok, max_length=20, truncation="truncate_left")


# ----------------------------------------------------------------------------- problems


def test_validate_problems():
    good = Problem(id="a", question="What is 1 + 1?", answer="2", steps=["1 + 1 = 2"], meta={"where": "p.jsonl:1"})
    bads = [
        ("duplicate_id", Problem(id="a", question="Q", answer="1", steps=[], meta={"where": "p.jsonl:2"}),
         "p.jsonl:2: field 'id' 'a' is used by an earlier problem"),
        ("empty", Problem(id="b", question="Q", answer=" ", steps=[], meta={"where": "p.jsonl:3"}),
         "p.jsonl:3: field 'answer' must be non-empty"),
        ("wrong_type", Problem(id="c", question="Q", answer="1", steps="1 + 1 = 2", meta={"where": "p.jsonl:4"}),
         "p.jsonl:4: field 'steps' must be list, got str"),
        ("empty_step", Problem(id="d", question="Q", answer="1", steps=["x", ""], meta={"where": "p.jsonl:5"}),
         "p.jsonl:5: field 'steps[1]' is an empty step"),
        ("missing_field", {"id": "e", "answer": "1", "steps": []}, "problems: problem 1 (id 'e'): field 'question' missing; add it"),
    ]
    for reason, b, msg in bads:
        with pytest.raises(ValueError) as e:
            validate_problems([good, b])
        assert str(e.value).startswith(msg)
    kept, rep = validate_problems([good] + [b for _, b, _ in bads], on_invalid="skip")
    assert kept == [good] and rep["dropped_by_reason"] == {r: 1 for r, _, _ in bads}
    no_steps = Problem(id="z", question="Q", answer="1", steps=[])
    assert validate_problems([no_steps])[0] == [no_steps]
    with pytest.raises(ValueError, match="field 'steps' must be non-empty"):
        validate_problems([no_steps], require_steps=True)
    assert validate_problems([Problem(id="y", question="Q", answer="", steps=[])], require_answer=False)[1]["kept"] == 1
