"""Models and tokenizers: a tiny Llama built from a config, Hugging Face loading, 4-bit and LoRA.

The `model` config group builds a `ModelSpec` (where the weights come from), the `lora` group a
`LoraSpec` (how they are fine-tuned), whose `quant` is a `QuantSpec` (how the base weights are
quantized when loaded: lora=qlora) or None.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import PromptFormat, set_prompt_format

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# Printable ASCII (letters, digits, punctuation, space) plus newline and tab: enough for
# arithmetic, GSM8K and most of MATH's LaTeX. Anything else maps to <unk>.
CHARSET = sorted(set(string.printable) - {"\x0b", "\x0c", "\r"})


def char_tokenizer():
    """A character-level tokenizer built locally with the `tokenizers` library (no download).

    One token per character, so offsets map exactly onto step spans. Wrapped as a
    `PreTrainedTokenizerFast` so it behaves like any Hugging Face tokenizer (offsets, padding,
    save_pretrained / from_pretrained).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in CHARSET:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    out.chat_template = CHAR_CHAT_TEMPLATE  # for model.prompt_format=chat on the tiny model
    return out


# A minimal role-tagged chat template (Jinja, as in any tokenizer_config.json) for the char tokenizer.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]\n{% endif %}"
)


@dataclass
class ModelSpec:
    """Where the policy's weights come from. Built by the `model` group."""

    name: str
    path: str | None = None  # HF hub id or local directory; None => tiny model from `tiny` kwargs
    tiny: dict[str, Any] = field(default_factory=dict)  # LlamaConfig kwargs for the built-in model
    dtype: str = "float32"  # float32 | bfloat16 | float16 (compute/storage dtype of the base)
    trust_remote_code: bool = False
    local_files_only: bool = False
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"
    prompt_format: str = "plain"  # plain ("Question: ...\nAnswer:\n") | chat (the tokenizer's chat template)
    system_prompt: str | None = None  # chat only: system message
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat only: extra apply_chat_template
    # variables, everywhere a prompt is built (enable_thinking: false for Qwen3; date_string pins Llama-3.x's date)

    def __post_init__(self):
        kw = dict(self.chat_template_kwargs or {})
        if kw and self.prompt_format != "chat":
            raise ValueError("model.chat_template_kwargs is set but model.prompt_format=plain ignores it; "
                             "use model.prompt_format=chat or model.chat_template_kwargs={}")
        self.format = PromptFormat(self.prompt_format, self.system_prompt, kw)  # checks the style


@dataclass(frozen=True)
class QuantSpec:
    """4-bit loading of the base weights through bitsandbytes (`load_base(..., quant=)`)."""

    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True  # quantize the quantization constants too
    compute_dtype: str = "float32"  # bf16 on GPUs that support it


@dataclass
class LoraSpec:
    """How the policy is fine-tuned. Built by the `lora` group."""

    name: str  # none | lora | qlora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"
    quant: QuantSpec | dict | None = None  # lora=qlora: the 4-bit base (a dict from YAML becomes a QuantSpec)

    def __post_init__(self):
        if isinstance(self.quant, dict):
            try:
                self.quant = QuantSpec(**self.quant)
            except TypeError as e:
                raise ValueError(f"lora.quant: {e}; keys: quant_type, double_quant, compute_dtype") from None
        if self.quant is not None and not self.enabled:
            raise ValueError("lora=none with lora.quant set: 4-bit weights can't be fully fine-tuned; use lora=qlora")

    @property
    def enabled(self) -> bool:
        return self.name != "none"


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype: unknown dtype {name!r}; use float32, bfloat16 or float16") from None


def tiny_llama(tokenizer=None, **kw):
    """A small LlamaForCausalLM from a config (random init) and its char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or char_tokenizer()
    cfg = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=512)
    cfg.update(kw)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, **cfg)
    return LlamaForCausalLM(config), tokenizer


def load_base(spec: ModelSpec, *, path: str | None = None, quant: QuantSpec | None = None):
    """Load (model, tokenizer). `path` overrides spec.path (e.g. an SFT checkpoint directory).

    With `quant`, the weights are loaded through bitsandbytes nf4; a tiny model is
    first written to disk so that exactly the same `from_pretrained` path is exercised on CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = path or spec.path
    if src is None:
        model, tok = tiny_llama(**spec.tiny)
        set_prompt_format(tok, spec.format)
        if quant is None:
            return model, tok
        raise ValueError("load_base: a tiny model must be saved before 4-bit loading (pass path=)")
    if spec.path and not path and not Path(src).exists() and spec.local_files_only:
        raise ValueError(f"model.path: {src!r} is not a directory and model.local_files_only=true")
    kwargs: dict[str, Any] = dict(trust_remote_code=spec.trust_remote_code, local_files_only=spec.local_files_only)
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if quant is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=_dtype(quant.compute_dtype),
        )
        kwargs["device_map"] = {"": _device_index()}
    else:
        kwargs["dtype"] = _dtype(spec.dtype)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=spec.trust_remote_code,
                                        local_files_only=spec.local_files_only)
    if tok.pad_token is None:  # Llama-3 and others ship without a pad token
        tok.pad_token = tok.eos_token
    set_prompt_format(tok, spec.format)  # before the weights load: a missing chat template fails fast
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    if quant is not None:
        keep_4bit_training_layout(model)
    return model, tok


def keep_4bit_training_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the layers changed.

    bitsandbytes 0.50's `Linear4bit.forward` on a CPU with AVX512-BF16, in eval mode and without
    grad, converts its weight in place to a packed layout (`_convert_weight_packed_for_cpu`: absmax
    cast to bf16, double quantization undone) and sets `quant_state.packing_format_for_cpu`. From
    then on every forward, training ones included, goes through `gemv_4bit`, which has no autograd
    formula: the LoRA gradients of the layers below come out wrong (torch only warns), and a biased
    layer (Qwen2's q/k/v) crashes on bitsandbytes' in-place `result += bias`. The inverse
    conversion is lossy (bf16 absmax, re-run double quantization), so the repacking is switched off
    instead: the flag `support_avx512bf16_for_cpu` gates it, and generation then runs the same
    dequantize + matmul path that training uses. A GPU never repacks (the check is CPU-only).
    A layer that was repacked already is converted back (best effort, as bitsandbytes does before
    saving).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            qs = getattr(m.weight, "quant_state", None)
            if qs is not None and getattr(qs, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)
            n += 1
    return n


def _device_index():
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


# torch's non-reentrant checkpointing for every path: peft's prepare_model_for_kbit_training passes {} on (not None),
# which transformers would turn into torch's reentrant default, with a warning
CHECKPOINTING = {"use_reentrant": False}


def add_lora(model, spec: LoraSpec, *, gradient_checkpointing: bool = False):
    """Wrap `model` for training according to the lora group. Returns (model, ref_model).

    - none:  full fine-tune; the reference is a frozen deep copy (fine for unquantized models).
    - lora / qlora: a peft LoRA adapter; the reference is the same model with the adapter
      disabled (`model.disable_adapter()`), so ref_model is None.
    """
    if not spec.enabled:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        model.requires_grad_(True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        return model, ref
    with peft_quietly():
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if spec.quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=CHECKPOINTING)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        model.enable_input_require_grads()
    tm = spec.target_modules
    if not isinstance(tm, str):
        tm = list(tm)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=tm,
                     task_type="CAUSAL_LM", bias="none")
    with peft_quietly():
        return get_peft_model(model, cfg), None


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def peft_quietly():
    """Import peft / wrap a model with it without two messages that say nothing about the user's run
    (each dropped by its exact source and text; every other warning passes):

    - `import peft` imports bitsandbytes whenever it is installed, also for plain LoRA, and on CPUs
      with AVX512-BF16 bitsandbytes' import logs "Failed to load CPU gemm_4bit_forward from
      kernels-community: No module named 'kernels'" (logger bitsandbytes.backends.cpu.ops): an
      optional faster kernel for 4-bit weights. A 4-bit run (lora=qlora) imports bitsandbytes
      earlier, when its weights load, so it still sees the message, where it is about its run.
    - peft 0.21's PeftModel reads `model.is_gradient_checkpointing`, which transformers 5 deprecates
      (FutureWarning "`is_gradient_checkpointing` is deprecated" from transformers.modeling_utils).
    """
    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    drop = _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community")
    bnb_log.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning, module="transformers")
            yield
    finally:
        bnb_log.removeFilter(drop)


def count_params(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params/total": total, "params/trainable": trainable}
