"""PRMScorer on a tiny Llama saved to disk with a locally built tokenizer (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from stepdpo.rewards.base import ScoreRequest, ScoreResult, StepScorer
from stepdpo.rewards.prm_model import PRMScorer, build_text, token_at

WORDS = "Start with 23 add 45 multiply by 3 What is the result ? = + - * The answer is 68 204 187 17".split()
TAG = " ки"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "ки", ",", "."])}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+ with exact character offsets
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("tiny_prm")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


REQS = [
    ScoreRequest("Start with 23 , add 45 .", ("23 + 45 = 68", "The answer is 68"), "68"),
    ScoreRequest("Start with 68 , multiply by 3 , add 17 .", ("68 * 3 = 204", "204 + 17 = 187", "The answer is 187")),
    ScoreRequest("What is the result ?", ()),
]


def test_text_layout_and_tag_positions():
    text, ends = build_text("Q ?", ["a", "b"], prompt_template="{question} ", step_tag=TAG, step_sep="\n")
    assert text == "Q ? a ки\nb ки"
    assert [text[e] for e in ends] == ["и", "и"]
    assert token_at([(0, 0), (0, 1), (2, 4)], 3) == 2 and token_at([(0, 1)], 5) is None


def test_scores_shapes_and_range(prm_dir):
    scorer = PRMScorer(str(prm_dir), batch_size=2, dtype="float32")
    assert isinstance(scorer, StepScorer)
    res = scorer.score(REQS)
    assert [len(r.scores) for r in res] == [2, 3, 0]
    for r in res:
        assert isinstance(r, ScoreResult) and r.error is None and r.provenance.startswith("prm_model:")
        assert all(0.0 <= s <= 1.0 for s in r.scores)
    # batching and order don't change the numbers
    again = scorer.score([REQS[1], REQS[0]])
    assert again[0].scores == pytest.approx(res[1].scores, abs=1e-5)
    assert again[1].scores == pytest.approx(res[0].scores, abs=1e-5)


def test_scores_equal_softmax_of_full_logits_at_tags(prm_dir):
    """The fast path (two head rows) equals softmax over [pos, neg] of the full forward's logits."""
    scorer = PRMScorer(str(prm_dir), batch_size=4)
    tok, model = scorer.tokenizer, scorer.model
    r = REQS[1]
    text, ends = build_text(r.question, r.steps, prompt_template="{question} ", step_tag=TAG, step_sep="\n")
    enc = tok(text, return_offsets_mapping=True)
    pos = [token_at(enc["offset_mapping"], c) for c in ends]
    assert all(tok.convert_ids_to_tokens(enc["input_ids"][p]) == "ки" for p in pos)
    with torch.no_grad():
        logits = model(torch.tensor([enc["input_ids"]])).logits[0]  # (T, V)
    want = torch.softmax(logits[pos][:, [scorer.pos_id, scorer.neg_id]], -1)[:, 0].tolist()
    assert scorer.score([r])[0].scores == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("bias, expect_pos", [(3.0, True), (-3.0, False)])
def test_score_follows_the_label_logits(prm_dir, bias, expect_pos):
    """A head that favours '+' by `bias` gives sigmoid(bias) at every step; '-' favoured gives < 0.5."""
    scorer = PRMScorer(str(prm_dir))
    V = scorer.model.config.vocab_size
    head = torch.nn.Linear(32, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[scorer.pos_id] = bias
    scorer.model.set_output_embeddings(head)
    res = scorer.score(REQS[:2])
    want = float(torch.sigmoid(torch.tensor(bias)))
    for r in res:
        assert r.scores == pytest.approx([want] * len(r.scores), abs=1e-6)
        assert all((s > 0.5) == expect_pos for s in r.scores)
        assert r.first_error == (None if expect_pos else 0)


def test_bad_options_name_the_key(prm_dir, tmp_path):
    with pytest.raises(ValueError, match="reward.model_path"):
        PRMScorer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="reward.positive_token"):
        PRMScorer(str(prm_dir), positive_token="Start with")
    with pytest.raises(ValueError, match="reward.dtype"):
        PRMScorer(str(prm_dir), dtype="fp8")


def test_too_long_is_a_counted_failure(prm_dir):
    scorer = PRMScorer(str(prm_dir), max_length=8)
    res = scorer.score(REQS[:1])
    assert res[0].scores is None and "too_long" in res[0].error
