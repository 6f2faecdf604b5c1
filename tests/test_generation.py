"""generation.generate: the model's EOS list, finish reasons and the ids behind each Completion.

The models have random weights; the checks compare against the same model's unconstrained output
(where it would have ended, which token it would have produced) rather than against fixed text.
"""

from __future__ import annotations

import pytest
import torch

from stepdpo.generation import Completion, eos_ids, generate
from stepdpo.model import tiny_llama

PROMPTS = ["Question: Start with 3, add 4. What is the result?\nAnswer:\n", "x", "Question: 7 * 6?\nAnswer:\n"]


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    yield model, tok
    torch.set_num_threads(threads)


def test_eos_ids_union_of_generation_config_and_tokenizer(tiny):
    model, tok = tiny
    old = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = 7
        assert eos_ids(model, tok) == sorted({7, tok.eos_token_id})
        model.generation_config.eos_token_id = [9, 7, tok.eos_token_id]
        assert eos_ids(model, tok) == sorted({7, 9, tok.eos_token_id})
        model.generation_config.eos_token_id = None
        assert eos_ids(model, tok) == [tok.eos_token_id]
    finally:
        model.generation_config.eos_token_id = old


def test_length_finish_reason_and_token_ids(tiny):
    model, tok = tiny
    outs = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=2)
    for (c,) in outs:
        assert isinstance(c, Completion)
        assert c.finish_reason == "length" and len(c.token_ids) == 8  # a random model never says EOS this soon
        assert c.text == tok.decode(list(c.token_ids), skip_special_tokens=True)


def test_second_eos_of_generation_config_ends_the_sequence(tiny):
    """Instruct models list several EOS ids (Qwen2.5: <|im_end|>, <|endoftext|>); ending on one
    that is not tokenizer.eos_token_id must end the sequence there, as a "stop"."""
    model, tok = tiny
    (free,) = generate(model, tok, PROMPTS[:1], max_new_tokens=16, batch_size=1)[0]
    ids = list(free.token_ids)
    j = 5
    second = ids[j]  # the token the model produces at step j becomes its second EOS id
    first_seen = ids.index(second)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, second]
    try:
        (ended,) = generate(model, tok, PROMPTS[:1], max_new_tokens=16, batch_size=1)[0]
    finally:
        model.generation_config.eos_token_id = old
    assert ended.finish_reason == "stop"
    assert list(ended.token_ids) == ids[:first_seen]  # cut where it first said the second EOS, which is excluded
    assert ended.text == tok.decode(ids[:first_seen], skip_special_tokens=True)
