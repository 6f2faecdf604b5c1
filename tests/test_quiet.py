"""Library messages that say nothing about the user's run are dropped at their source (model.peft_quietly),
and only those: the same logger's other records and every other warning still show."""

from __future__ import annotations

import pytest

import logging
import subprocess
import sys
import warnings

from stepdpo.model import peft_quietly
from tests.conftest import ROOT
from tests.conftest import test_env as env

BNB_MSG = "Failed to load CPU gemm_4bit_forward from kernels-community"
LORA = ("import torch; torch.set_num_threads(1)\n"
        "from stepdpo.model import LoraSpec, add_lora, tiny_llama\n"
        "m, _ = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, "
        "num_key_value_heads=4)\n"
        "add_lora(m, LoraSpec(name='lora', r=4, alpha=8))\n")


def python(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stderr


@pytest.mark.slow  # a subprocess run: kept out of the fast tier
def test_lora_prints_neither_the_bitsandbytes_kernel_message_nor_the_futurewarning():
    err = python(LORA)
    assert BNB_MSG not in err and "FutureWarning" not in err and "is_gradient_checkpointing" not in err, err
    # the same calls without the filter, as a check that this machine shows them (the kernel message
    # only on CPUs with AVX512-BF16, where bitsandbytes looks for the faster kernel)
    raw = python("import peft, torch\n"
                 "from transformers import LlamaConfig, LlamaForCausalLM\n"
                 "m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, "
                 "num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))\n"
                 "peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules='all-linear'))\n")
    assert "is_gradient_checkpointing" in raw
    import torch

    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert BNB_MSG in raw


def test_the_filters_drop_only_those_messages(caplog):
    lg = logging.getLogger("bitsandbytes.backends.cpu.ops")
    caplog.set_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops")
    with peft_quietly(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lg.warning("%s: No module named 'kernels'. Please make sure ...", BNB_MSG)
        lg.warning("some other bitsandbytes warning")
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("a FutureWarning about something else", FutureWarning)
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
    # the deprecation filter matches only warnings raised in transformers' modules: both raised here show
    assert [str(w.message)[:30] for w in seen] == ["`is_gradient_checkpointing` is", "a FutureWarning about somethin"]
    lg.warning("%s: after the block", BNB_MSG)  # the filter is gone once the block ends
    assert caplog.records[-1].getMessage().startswith(BNB_MSG)
