"""model.prompt_format: plain "Question/Answer" text or the tokenizer's chat template, the same
everywhere a prompt is tokenized (training pairs, sampling, evaluation, generation), one BOS."""

import json

import pytest

from conftest import run_cli
from stepdpo.batching import encode_pair
from stepdpo.data import PromptFormat, StepPair, format_prompt, prompt_ids, prompt_text, set_prompt_format
from stepdpo.model import ModelSpec, char_tokenizer, load_base, tiny_llama
from stepdpo.validate import pair_length

PAIR = StepPair(id="p", question="Start with 3, add 4, add 5. What is the result?", answer="12",
                prefix=["3 + 4 = 7"], chosen=["7 + 5 = 12", "The answer is 12"],
                rejected=["7 + 5 = 13", "The answer is 13"])


def chat_tok(system="Be brief."):
    return set_prompt_format(char_tokenizer(), PromptFormat("chat", system))


def test_plain_is_the_default_and_unchanged():
    tok = char_tokenizer()
    assert format_prompt(" What is 1 + 1? ", tok) == format_prompt("What is 1 + 1?") == "Question: What is 1 + 1?\nAnswer:\n"
    ids = prompt_ids(tok, format_prompt("q", tok))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_chat_renders_the_template_with_system_and_generation_prompt():
    tok = chat_tok()
    text = prompt_text(PAIR.question, PAIR.prefix, tok)
    assert text == f"<s>[system]\nBe brief.\n[user]\n{PAIR.question}\n[assistant]\n3 + 4 = 7\n"
    assert "[system]" not in format_prompt("q", chat_tok(system=None))
    ids = prompt_ids(tok, text)  # the template writes <s>; it must not be doubled
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == text[len("<s>"):]


def test_training_example_and_validation_use_the_chat_prompt():
    tok = chat_tok()
    ex = encode_pair(PAIR, tok, weighting="first_error")
    assert ex.prompt_ids == prompt_ids(tok, prompt_text(PAIR.question, PAIR.prefix, tok))
    assert ex.prompt_ids.count(tok.bos_token_id) == 1
    plain = encode_pair(PAIR, char_tokenizer(), weighting="first_error")
    assert len(ex.prompt_ids) > len(plain.prompt_ids) and ex.chosen_ids == plain.chosen_ids  # only the prompt differs
    assert pair_length(PAIR, tok) == (len(ex.prompt_ids), max(len(ex.chosen_ids), len(ex.rejected_ids)))


def test_generate_feeds_the_chat_prompt_with_one_bos():
    from stepdpo.evaluate import math_accuracy
    from stepdpo.data import Problem

    model, _ = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    tok = chat_tok()
    seen = []
    real = model.forward

    def spy(*a, **kw):  # the first forward is the prompt's prefill
        if not seen:
            ids, mask = kw["input_ids"][0], kw.get("attention_mask")
            ids = ids if mask is None else ids[mask[0].bool()]
            seen.extend([ids[0].item(), tok.decode(ids)])
        return real(*a, **kw)

    model.forward = spy
    math_accuracy(model, tok, [Problem(id="a", question="What is 2 + 2?", answer="4", steps=[])], max_new_tokens=2)
    first_id, text = seen[:2]
    assert first_id == tok.bos_token_id
    assert text == "<s>[system]\nBe brief.\n[user]\nWhat is 2 + 2?\n[assistant]\n"


@pytest.mark.slow
def test_bad_format_and_missing_template_fail_before_weights_load(tmp_path):
    with pytest.raises(ValueError, match="model.prompt_format: unknown 'chatml'"):
        ModelSpec(name="x", prompt_format="chatml")
    with pytest.raises(ValueError, match="model.system_prompt is set but model.prompt_format=plain"):
        ModelSpec(name="x", system_prompt="Be brief.")
    model, tok = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    tok.chat_template = None  # a base model's tokenizer
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not weights")  # would fail if the weights were read
    with pytest.raises(ValueError, match="model.prompt_format=chat: this tokenizer has no chat_template"):
        load_base(ModelSpec(name="local", path=str(tmp_path / "m"), prompt_format="chat"))


@pytest.mark.slow
def test_chat_format_end_to_end_and_in_generate(tmp_path, capsys):
    from stepdpo.generate import main

    _, run_dir = run_cli(tmp_path, "model.prompt_format=chat", "model.system_prompt=Show each step.")
    meta = json.loads((run_dir / "adapter/stepdpo.json").read_text())
    assert meta["prompt_format"] == "chat" and meta["system_prompt"] == "Show each step."
    samples = [json.loads(line) for line in (run_dir / "samples_after.jsonl").read_text().splitlines()]
    assert samples  # evaluation ran on chat prompts
    assert main([str(run_dir), "Start with 3, add 4. What is the result?", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<s>[system]\nShow each step.\n[user]\nStart with 3, add 4. What is the result?\n[assistant]\n")
