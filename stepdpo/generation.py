"""Generation: `generate(model, tokenizer, prompts, ...) -> list[list[Completion]]`, one list per prompt.

The one owner of decoding for eval, on-policy sampling, resampling and `python -m stepdpo.generate`.
A sequence ends at any EOS id of the model (the union of `generation_config.eos_token_id`, which
instruct models set to a list such as Qwen2.5's `<|im_end|>`/`<|endoftext|>` or Llama-3's
128001/128008/128009, and `tokenizer.eos_token_id`), at a stop string, or after `max_new_tokens`;
`Completion.finish_reason` says which ("stop" or "length").

The decoding itself is a small loop over the model's forward (`_decode_stream`): one prefill per prompt shared
by its k samples (on the CPU in groups of rows, `_prefill_in_chunks`), finished rows dropped from the batch,
the KV cache written in place (`BufferedLayer`), decode steps that replay the decoder layers with lean calls
of their linears (`_decode_step`, `_lean`), and a batch's last rows joined by the next batch (`_Joined`: the
two share each step's linears, each attends to its own cache); greedy picks the tokens `model.generate` picks.
Sampling also keeps each prompt's keys and values once for its k samples and attends to them through
`shared_prefix_attention` (decode reads the KV cache from memory at every step, and the prompt is most of it)
inside `_decode_step`, and runs a float32 peft LoRA policy with its adapters merged into copies of the weights
(`_merged_lora`): the same distribution, rounded differently.
Cost model and numbers: docs/experiments/benchmarks.md.
`set_backend` hands the calls to an inference engine instead (`inference.py`, the `generation` group).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from . import progress
from .data import prompt_ids


@dataclass(frozen=True)
class Completion:
    text: str                   # decoded new tokens (special tokens skipped), cut before a stop string
    token_ids: tuple[int, ...]  # the generated ids exactly as sampled (EOS / stop tokens excluded)
    finish_reason: str          # "stop" (an EOS id of the model's generation_config, or a stop string) | "length"


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sequence: the model's generation_config list (an int or a list) plus the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


def stop_from_config(strings: Sequence[str]) -> list[str]:
    """Stop strings as the config gives them (`eval.stop`; on-policy sampling and rollouts follow it): the two
    characters `\\n` / `\\t` mean newline / tab.

    Hydra keeps backslashes in override values, so `'eval.stop=["\\n\\nQuestion:"]'` arrives as a
    literal backslash-n; a YAML double-quoted "\\n" is already a newline and passes through.
    """
    if isinstance(strings, str):  # `pairs.stop=Question:` is one stop string, not one per character
        strings = [strings]
    return [s.replace("\\n", "\n").replace("\\t", "\t") for s in strings if s]


def truncate_at_stop(text: str, stop: Sequence[str] = ()) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a sample is drawn from: softmax(logits / temperature) over the nucleus, the
    most likely tokens whose mass before each reaches less than top_p (Holtzman et al. 2020; the rule of
    transformers' TopPLogitsWarper), renormalised. logits: (N, V) fp32 -> (N, V) probabilities."""
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the tokens more likely than this one already hold top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the wrapped model


def _config(model):
    return _base(model).config


def _forward_names(model) -> tuple[str, bool]:
    """The forward's name for the KV cache (`cache` in transformers 5, `past_key_values` before) and
    whether it takes `logits_to_keep` (then the prefill computes only the last position's logits)."""
    params = inspect.signature(_base(model).forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


@functools.cache
def _buffered_layer():
    """The class `BufferedLayer`, defined on first use (transformers is imported late, as everywhere here)."""
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A DynamicLayer that keeps its keys and values in buffers with `GROW` spare positions: `update` writes
        the new states in place and returns views of the filled part, where DynamicLayer's torch.cat copies the
        whole cache at every step of every layer. The views hold DynamicLayer's values, shapes and padding, so the
        attention kernel computes the same numbers. A full buffer is copied into one `GROW` positions longer (a
        copy every GROW steps; a buffer allocated for all max_new_tokens at once measured slower on this CPU, its
        filled parts spread out in memory). The live rows are the buffer's first rows: selecting rows copies only
        the rows whose slot changes."""

        GROW = 16

        def _filled(self) -> int:  # positions held in the buffers
            return self.keys.shape[-2] if self.is_initialized else 0

        def update(self, key_states, value_states, *args, **kwargs):
            n, q, B = self._filled(), key_states.shape[-2], key_states.shape[0]  # states: (B, H, q, D)
            if not self.is_initialized or n + q > self._k.shape[-2]:
                k = key_states.new_empty(B, key_states.shape[1], n + q + self.GROW, key_states.shape[-1])
                v = value_states.new_empty(B, value_states.shape[1], n + q + self.GROW, value_states.shape[-1])
                if n:
                    k[:, :, :n], v[:, :, :n] = self.keys, self.values
                self._k, self._v, self.device, self.is_initialized = k, v, key_states.device, True
            self._k[:B, :, n:n + q], self._v[:B, :, n:n + q] = key_states, value_states
            self.keys, self.values = self._k[:B, :, :n + q], self._v[:B, :, :n + q]
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self._filled():
                self._k, self._v = self.keys.repeat_interleave(repeats, 0), self.values.repeat_interleave(repeats, 0)
                self.keys, self.values = self._k, self._v  # full: the next update grows them

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """New row i is old row indices[i]."""
            n = self._filled()
            if n and len(indices) > len(self._k):
                self._k, self._v = self.keys[indices], self.values[indices]
            elif n:
                moved = (indices != torch.arange(len(indices), device=indices.device)).nonzero().squeeze(1)
                src = indices[moved]  # the right-hand sides are gathered (copied) before they are written
                self._k[moved, :, :n], self._v[moved, :, :n] = self._k[src, :, :n], self._v[src, :, :n]
            if n:
                self.keys, self.values = self._k[:len(indices), :, :n], self._v[:len(indices), :, :n]

    return BufferedLayer


@functools.cache
def _shared_prefix_layer():
    """The class `SharedPrefixLayer` (a BufferedLayer), defined on first use."""

    class SharedPrefixLayer(_buffered_layer()):
        """The cache layer of k samples per prompt: the prompt's keys and values are kept once per prompt
        (`prefix_keys`, `prefix_values`: (P, H_kv, T, D), from the prefill), the positions generated after it
        once per sample in BufferedLayer's buffers. The prefill's update stores the prefix and returns it (the
        prefill attends as usual); every later update returns the sample's own positions only, which
        `shared_prefix_attention` reads together with its prompt's prefix. Repeating rows copies nothing."""

        prefix_keys = prefix_values = None

        def update(self, key_states, value_states, *args, **kwargs):
            if self.prefix_keys is None:  # contiguous once here: the projections' (B, T, H, D) -> (B, H, T, D)
                # transposes would otherwise be copied by every decode step's matmuls, in every layer
                self.prefix_keys, self.prefix_values = key_states.contiguous(), value_states.contiguous()
                return key_states, value_states
            return super().update(key_states, value_states, *args, **kwargs)

        def get_seq_length(self) -> int:
            return (0 if self.prefix_keys is None else self.prefix_keys.shape[-2]) + self._filled()

        def batch_repeat_interleave(self, repeats: int) -> None:
            pass  # the samples share the prefix: the attention maps each row to its prompt

    return SharedPrefixLayer


@dataclass
class SharedPrefix:
    """What `shared_prefix_attention` needs besides the query and the row's own keys/values."""
    layers: list            # SharedPrefixLayer per decoder layer
    mask: torch.Tensor      # (P, 1, 1, T) additive prompt-padding mask: 0 for a prompt token, -inf for padding
    k: int                  # samples per prompt
    rows: torch.Tensor      # (L,) each live row's slot, prompt * k + sample (the loop's `live`)


# model_type -> the prefix of its transformers classes (<P>Model, <P>DecoderLayer, <P>Attention): the families
# whose decoder layer `_decode_step` replays (pre-norm, rotary, standard attention with GQA, gated MLP)
SHARED_PREFIX_MODELS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def shared_prefix_attention(query, key, value, scaling: float, prefix: SharedPrefix, layer: int):
    """Attention of each row's new position over its prompt (shared by the prompt's k samples) and its own
    generated positions: softmax(q [K_prompt; K_own]^T * scaling + padding mask) [V_prompt; V_own], the numbers
    sdpa computes up to rounding. A prompt's keys and values are read once for its k samples: the queries
    are laid out k per prompt (a finished sample's slot holds zeros, its result is never read) so that one
    batched product per prompt and key head serves all of them. Decode steps only (one query position).
    query: (L, H, 1, D); key/value: (L, H_kv, S, D), the rows' own positions. Returns (L, 1, H, D)."""
    pk, pv = prefix.layers[layer].prefix_keys, prefix.layers[layer].prefix_values
    L, H, _, D = query.shape
    P, KV, T, _ = pk.shape
    G, k, rows = H // KV, prefix.k, prefix.rows  # G query heads per key head (GQA)
    every = L == P * k  # no sample has ended yet: the rows are the slots, in order (the loop drops, never reorders, before)

    def by_prompt(x):  # (L, KV, G, X) -> (P, KV, k * G, X): row prompt * k + j -> prompt's query row j * G + g
        full = x
        if not every:
            full = x.new_zeros(P * k, *x.shape[1:])
            full[rows] = x
        return full.view(P, k, KV, G, -1).transpose(1, 2).reshape(P, KV, k * G, -1)

    def by_row(x):  # the inverse: (P, KV, k * G, X) -> (L, KV, G, X)
        full = x.view(P, KV, k, G, -1).transpose(1, 2).reshape(P * k, KV, G, -1)
        return full if every else full[rows]

    q = query.reshape(L, KV, G, D) * scaling
    scores = torch.cat([by_row(by_prompt(q) @ pk.transpose(-1, -2) + prefix.mask), q @ key.transpose(-1, -2)], -1)
    w = scores.softmax(-1, dtype=torch.float32).to(value.dtype)  # (L, KV, G, T + S)
    out = by_row(by_prompt(w[..., :T].contiguous()) @ pv) + w[..., T:] @ value  # (L, KV, G, D)
    return out.reshape(L, 1, H, D)


def _standard_decoder(model):
    """The decoder (`<P>Model`) of a SHARED_PREFIX_MODELS model whose decoder, layers and attention modules are
    transformers' own classes for its model type (their forward is what `_decode_step` replays) and carry no
    forward hooks (the replay does not call those modules, so their hooks would not run), else None."""
    cfg, lm = _config(model), _base(model)
    name, dec = SHARED_PREFIX_MODELS.get(cfg.model_type), getattr(lm, "model", None)
    mod = sys.modules.get(type(dec).__module__)
    if name is None or mod is None or type(dec) is not getattr(mod, f"{name}Model", None):
        return None
    ok = (hasattr(mod, "apply_rotary_pos_emb") and len(dec.layers) == cfg.num_hidden_layers
          and all(type(x) is getattr(mod, f"{name}DecoderLayer", None)
                  and type(x.self_attn) is getattr(mod, f"{name}Attention", None) for x in dec.layers))
    # hooks on the modules whose forward the replay skips (e.g. accelerate's device placement with a device_map)
    skipped = [lm, dec, *dec.layers, *(x.self_attn for x in dec.layers)] if ok else []
    ok = ok and not any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in skipped)
    return dec if ok else None


def _can_share_prefix(model, cache) -> bool:
    """Whether sampling may decode with `_decode_step` and `shared_prefix_attention`: transformers' own Llama,
    Mistral, Qwen2 or Qwen3 modules (`_standard_decoder`), sdpa or eager, full attention in every layer, and float32
    activations (its scores come out of a matmul in the activations' dtype; in bf16/fp16 they would be rounded to
    8 or 11 bits before the softmax, where sdpa keeps them in float32, so low-precision models keep sdpa)."""
    cfg = _config(model)
    return (cache is not None and _standard_decoder(model) is not None and not any(cache.is_sliding)
            and cfg._attn_implementation in ("sdpa", "eager")
            and _base(model).get_input_embeddings().weight.dtype == torch.float32)


def _hooked(m) -> bool:
    """Whether calling module `m` would run more than its forward: its own hooks (or accelerate's) or global ones."""
    from torch.nn.modules import module as nn_module

    return bool(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook")
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def _lean(m):
    """A callable that computes `m(x)` with the same tensor operations in the same order (so the same numbers),
    without nn.Module's call machinery or peft's per-call argument handling: on a small model most of a decode
    step is that Python work, not arithmetic. nn.Linear -> F.linear with its weight and bias; `_merged_lora`'s
    merged linear -> that linear; peft's plain `lora.Linear` (adapters on, not merged, no DoRA or other variant,
    dropout inactive as in eval) -> `_lora_linear`, its forward's vanilla path; anything else, or any module with
    hooks, -> the module itself (called as usual)."""
    if _hooked(m):
        return m
    patched = vars(m).get("forward")
    if patched is not None:  # only `_merged_lora`'s own patch is known to be a plain linear
        return patched if isinstance(patched, functools.partial) and patched.func is _linear else m
    if type(m) is torch.nn.Linear:  # nn.Linear.forward: F.linear(input, self.weight, self.bias)
        return functools.partial(torch.nn.functional.linear, weight=m.weight, bias=m.bias)
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return m
    if type(m) is not LoraLinear or m.merged or m.disable_adapters:
        return m
    adapters = []
    for a in m.active_adapters:
        if a not in m.lora_A:
            continue  # as peft's forward: an active adapter this layer does not carry
        drop, A, B = m.lora_dropout[a], m.lora_A[a], m.lora_B[a]
        off = type(drop) is torch.nn.Identity or (type(drop) is torch.nn.Dropout and not drop.training)
        if a in m.lora_variant or not off or type(A) is not torch.nn.Linear or type(B) is not torch.nn.Linear \
                or _hooked(drop) or _hooked(A) or _hooked(B):
            return m
        adapters.append((_lean(A), _lean(B), m.scaling[a], A.weight.dtype))
    return functools.partial(_lora_linear, base=_lean(m.base_layer), adapters=tuple(adapters),
                             cast=getattr(m, "cast_input_dtype_enabled", True))


def _lora_linear(x, *, base, adapters, cast: bool):
    """peft's `lora.Linear.forward` for plain LoRA with dropout off: base(x) + B(A(x)) * scaling per active adapter,
    the input cast to the adapter's dtype first (peft's `_cast_input_dtype`), the result back to the base's dtype."""
    result = base(x)
    dtype = result.dtype
    for A, B, scaling, adapter_dtype in adapters:
        if cast and x.dtype != adapter_dtype:
            x = x.to(adapter_dtype)
        result = result + B(A(x)) * scaling
    return result.to(dtype)


def _gated_mlp(x, *, gate, up, down, act):  # `<P>MLP.forward` of the Llama family
    return down(act(gate(x)) * up(x))


class _Replay:
    """The modules `_decode_step` calls, looked up once per batch: `_lean` versions of the linears (and of the MLP
    when it is the family's own `<P>MLP`), the model's own norms, embedding, rotary embedding and rotary function."""

    def __init__(self, lm, dec):
        mod = sys.modules[type(dec).__module__]
        mlp_type = getattr(mod, f"{SHARED_PREFIX_MODELS[_config(lm).model_type]}MLP", None)
        self.rotary, self.embed, self.rotary_emb = mod.apply_rotary_pos_emb, dec.embed_tokens, dec.rotary_emb
        self.norm = dec.norm
        self.head = _lean(lm.lm_head)
        self.layers = []
        for layer in dec.layers:
            a, mlp = layer.self_attn, layer.mlp
            if type(mlp) is mlp_type and not _hooked(mlp):
                mlp = functools.partial(_gated_mlp, gate=_lean(mlp.gate_proj), up=_lean(mlp.up_proj),
                                        down=_lean(mlp.down_proj), act=mlp.act_fn)
            norms = (a.q_norm, a.k_norm) if hasattr(a, "q_norm") else None  # qwen3: RMSNorm over each head
            self.layers.append((a, layer.input_layernorm, _lean(a.q_proj), _lean(a.k_proj), _lean(a.v_proj), norms,
                                _lean(a.o_proj), layer.post_attention_layernorm, mlp))


def _decode_step(replay: _Replay, nxt: torch.Tensor, pos: torch.Tensor, cache, attend) -> torch.Tensor:
    """One decode step, (L,) next ids at (L,) positions -> (L, V) float32 logits, replaying the decoder layer's
    forward of transformers' Llama/Mistral/Qwen2/Qwen3 (`_standard_decoder`) op for op, with the model's own
    modules or `_lean` calls of them (so LoRA, merged or not, and biases act as in its forward; the same operations
    in the same order) and its own rotary function, but none of the forward's per-call work (mask building, output
    capture, argument handling, module calls: on a small model most of a step). `replay`: the batch's `_Replay`;
    `cache`: the step's cache (its layers' `update`); `attend(module, query, key, value, layer) -> (L, 1, H, D)`:
    the attention."""
    x = replay.embed(nxt[:, None])  # (L, 1, E)
    cos, sin = replay.rotary_emb(x, pos[:, None])
    for i, (a, norm1, q_proj, k_proj, v_proj, qk_norms, o_proj, norm2, mlp) in enumerate(replay.layers):
        h = norm1(x)
        shape = (len(h), 1, -1, a.head_dim)
        q, k, v = q_proj(h).view(shape), k_proj(h).view(shape), v_proj(h).view(shape).transpose(1, 2)
        if qk_norms is not None:
            q, k = qk_norms[0](q), qk_norms[1](k)
        q, k = replay.rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        k, v = cache.layers[i].update(k, v)
        x = x + o_proj(attend(a, q, k, v, i).reshape(len(h), 1, -1))
        x = x + mlp(norm2(x))
    return replay.head(replay.norm(x))[:, -1].float()


def _sdpa(mask):
    """`_decode_step`'s attention as the model's forward runs it with implementation "sdpa": transformers' own
    sdpa function, with `_start`'s 4D mask: the additive mask sdpa itself makes of the bool mask the forward
    would pass through as it is (so its kernel sees the same numbers)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return lambda a, q, k, v, i: fn(a, q, k, v, mask, dropout=0.0, scaling=a.scaling)[0]


def _mergeable_lora(model) -> list:
    """The LoRA linears of a peft model when every one of them can run as a single linear with W + delta W:
    peft's plain `lora.Linear` over a float32 `nn.Linear` (not quantized: a 4-bit base would have to be
    dequantized; not bf16/fp16: W + delta W rounded to 8 or 11 bits would lose most of a small update),
    adapters on and not merged, plain LoRA (no DoRA or other variant) for every active adapter, and no
    forward already patched. An empty list otherwise (then nothing is merged)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear, LoraLayer
    except ImportError:
        return []
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    ok = all(type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear and not m.merged
             and m.base_layer.weight.dtype == torch.float32 and not m.disable_adapters and "forward" not in vars(m)
             and not getattr(m, "fan_in_fan_out", False)
             and not any(a in m.lora_variant for a in m.active_adapters) for m in layers)
    return layers if ok else []


@contextlib.contextmanager
def _merged_lora(model):
    """Sampling only: inside the block each LoRA linear of a peft model runs as one linear whose weight is
    W + sum over active adapters of scaling * B @ A (peft's `get_delta_weight`), computed once here, instead
    of W x + scaling * B(A(x)): two small matmuls, a scale and an add fewer per linear per step. The same
    function, rounded differently (so never for greedy decoding, which must pick generate's tokens). Nothing
    is written into the model: the merged weights are copies (one per adapted linear, the memory of those
    weights) held by a per-instance forward that is removed on exit, so training resumes on the exact weights.
    Yields the number of linears merged (0: the model is not a peft LoRA model `_mergeable_lora` accepts)."""
    layers = _mergeable_lora(model)
    try:
        with torch.no_grad():
            for m in layers:
                w = m.base_layer.weight
                for a in m.active_adapters:
                    if a in m.lora_A:
                        w = w + m.get_delta_weight(a).to(w.dtype)
                m.forward = functools.partial(_linear, weight=w, bias=m.base_layer.bias)
        yield len(layers)
    finally:
        for m in layers:
            vars(m).pop("forward", None)


def _linear(x, *, weight, bias):  # a merged LoRA linear's forward: nothing but the input (no adapter_names etc.)
    return torch.nn.functional.linear(x, weight, bias)


def _new_cache(model):
    """The cache `model.generate` builds (a DynamicCache laid out from the model's config: one layer per decoder
    layer, sliding-window layers where the config has them), each full-attention DynamicLayer a BufferedLayer.
    None before transformers 5, whose cache layers BufferedLayer is not written for: the model builds its own."""
    import transformers
    from transformers.cache_utils import DynamicCache

    if int(transformers.__version__.split(".")[0]) < 5:
        return None
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=_config(model))
    cache.layers = [_buffered_layer()() if type(x) is DynamicLayer else x for x in cache.layers]
    return cache


PREFILL_TOKENS = 2048  # CPU prefill: most prompt positions per forward (whole rows of the batch at its padded length)


def _chunked_prefill(model, cache, ids: torch.Tensor) -> bool:
    """Whether the prompts' prefill runs in groups of rows (`_prefill_in_chunks`): on the CPU, for a batch of more than
    PREFILL_TOKENS positions, on transformers' own Llama-family modules with sdpa or eager attention and full attention
    in every layer (`_standard_decoder`: the models whose mask `_prefill_in_chunks` builds as their forward does,
    and whose causal LM applies its head to the decoder's last hidden states), with a `logits_to_keep` forward."""
    return (cache is not None and _forward_names(model)[1] and ids.device.type == "cpu" and ids.numel() > PREFILL_TOKENS
            and not any(cache.is_sliding) and _config(model)._attn_implementation in ("sdpa", "eager")
            and _standard_decoder(model) is not None and _mask_arguments() is not None)


@functools.cache
def _mask_arguments() -> tuple[str, str, bool] | None:
    """How this transformers version's `create_causal_mask` names its embeddings and cache arguments and whether it
    takes `cache_position` (the names differ between transformers versions), or None when it takes neither known name."""
    try:
        from transformers.masking_utils import create_causal_mask
    except ImportError:
        return None
    params = inspect.signature(create_causal_mask).parameters
    embeds = next((n for n in ("inputs_embeds", "input_embeds") if n in params), None)
    cache = next((n for n in ("cache", "past_key_values") if n in params), None)
    if embeds is None or cache is None or "position_ids" not in params:
        return None
    return embeds, cache, "cache_position" in params


def _whole_batch_mask(model, attn: torch.Tensor, pos: torch.Tensor):
    """The attention mask the causal LM's forward builds for a prefill of the whole left-padded batch (from its 2D
    mask `attn` and positions `pos`): transformers' own `create_causal_mask` (a 4D mask for sdpa/eager, or None)."""
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask

    embeds, cache, takes_position = _mask_arguments()
    B, T = attn.shape
    # the embeddings argument is read for its batch size, length, dtype and device only
    kw = {embeds: _base(model).get_input_embeddings().weight.new_empty(B, T, 1),
          cache: DynamicCache(config=_config(model))}
    if takes_position:
        kw["cache_position"] = torch.arange(T, device=attn.device)
    return create_causal_mask(config=_config(model), attention_mask=attn, position_ids=pos, **kw)


def _prefill_in_chunks(model, ids, attn, pos, cache, cache_name: str):
    """The prefill of a batch of left-padded prompts as decoder forwards over groups of about PREFILL_TOKENS positions
    (whole rows at the batch's padded length), their keys and values then written into `cache` as one batch, and the
    LM head applied once to every row's last position: the KV cache and last-position logits of one forward over the
    whole batch with `logits_to_keep=1`, with activations a few MB each instead of hundreds (on the CPU each large new
    tensor is fresh pages from the OS: 0.21-0.25 s instead of 0.30-0.42 s for 64 prompts of 90 positions on the
    benchmark's model).
    - Every row sees the mask the whole batch's forward builds (`_whole_batch_mask`, sliced): a group without
      padding keeps the batch's masked kernel.
    - A decoder row's results do not depend on the other rows of its forward while its GEMMs keep hundreds of rows
      (the groups are of equal size, more than PREFILL_TOKENS / 2 positions each; a GEMM of a few rows rounds
      differently on some CPUs).
    - The head's can (its row count and the memory layout of its input change its rounding on some CPUs), so it
      runs once on all rows, laid out as in the forward.
    Tests: logits and cache equal to one forward's bit for bit. Returns (cache, (B, V) float32 logits)."""
    from transformers.cache_utils import DynamicCache

    lm, dec = _base(model), _standard_decoder(model)
    B, T = ids.shape
    # the 4D mask of the whole batch (a 4D mask is handed through by the forward as it is)
    mask = None if attn is None else _whole_batch_mask(model, attn, pos)
    rows = -(-B // -(-B * T // PREFILL_TOKENS))  # equal groups of at most ~PREFILL_TOKENS positions: no small last one
    keys, values, last = [], [], None
    for s in range(0, B, rows):
        part = DynamicCache(config=_config(model))
        hidden = dec(input_ids=ids[s:s + rows], attention_mask=None if mask is None else mask[s:s + rows],
                     position_ids=pos[s:s + rows], use_cache=True, **{cache_name: part}).last_hidden_state
        keys.append([x.keys for x in part.layers])
        values.append([x.values for x in part.layers])
        if last is None:  # (B, T, E), only its last positions written (untouched pages are never allocated): the head
            # reads them in the layout of the forward's `hidden_states[:, -1:]` (one row every T * E: the GEMM's
            # leading dimension, which changes its rounding on some CPUs)
            last = hidden.new_empty(B, T, hidden.shape[-1])
        last[s:s + rows, -1:] = hidden[:, -1:]
        del hidden, part
    for i, layer in enumerate(cache.layers):
        layer.update(torch.cat([k[i] for k in keys]), torch.cat([v[i] for v in values]))
    return cache, lm.lm_head(last[:, -1:])[:, -1].float()


def _compaction(keep: torch.Tensor) -> torch.Tensor:
    """The rows to keep (sorted indices), ordered so that the kept rows already in the first
    len(keep) slots stay where they are and the others fill the slots that were freed: (len(keep),) indices."""
    order = torch.arange(len(keep), device=keep.device)
    stays = keep < len(keep)
    free = torch.ones(len(keep), dtype=torch.bool, device=keep.device)
    free[keep[stays]] = False
    order[free] = keep[~stays]
    return order


class _Batch:
    """One batch's decoding state in `_decode_stream`, from its prefill (`_start`): its cache, positions and mask
    for its live rows, how it steps (`replay`, `prefix`), and the tokens its rows have picked. Each batch counts its
    own steps: batches joined at different steps see only their own keys, mask and positions."""

    def __init__(self, index: int, offset: int, n: int, T: int, cache, mask, pos, replay, prefix, max_new_tokens: int):
        self.index, self.offset, self.T, self.cache, self.mask, self.pos = index, offset, T, cache, mask, pos
        self.replay, self.prefix = replay, prefix  # `_Replay` or None (the model's forward); SharedPrefix or None
        self.live = torch.arange(n)  # (L,) the batch row of each row still decoding
        self.tokens = torch.zeros(n, max_new_tokens, dtype=torch.long)  # filled up to each row's end
        self.length, self.hit_eos = [max_new_tokens] * n, [False] * n
        self.step = 0  # tokens picked so far

    def joinable(self) -> bool:  # decode steps that can share their linears with another batch's (`_Joined`)
        return self.replay is not None

    def rows(self) -> list[tuple[list[int], bool]]:
        return [(self.tokens[r, :self.length[r]].tolist(), self.hit_eos[r]) for r in range(len(self.tokens))]


def _start(model, ids: torch.Tensor, attn: torch.Tensor, *, k: int, max_new_tokens: int, sampling: bool,
           index: int, offset: int) -> tuple[_Batch, torch.Tensor]:
    """A batch's prefill: its `_Batch` and the (B * k, V) float32 logits of its rows' first picks."""
    cache_name, keep_arg = _forward_names(model)
    last_only = {"logits_to_keep": 1} if keep_arg else {}
    B, T = ids.shape
    built = _new_cache(model)
    shared = sampling and k > 1 and _can_share_prefix(model, built)
    if shared:
        built.layers = [_shared_prefix_layer()() for _ in built.layers]
    pos = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)  # (B, T) positions, as generate computes them
    padded = bool((attn == 0).any())  # generate drops an all-ones mask (same attention kernel): so do we
    if _chunked_prefill(model, built, ids):
        cache, logits = _prefill_in_chunks(model, ids, attn if padded else None, pos, built, cache_name)
    else:
        out = model(input_ids=ids, attention_mask=attn if padded else None, position_ids=pos, use_cache=True,
                    **({cache_name: built} if built is not None else {}), **last_only)
        cache, logits = getattr(out, cache_name), out.logits[:, -1].float()  # logits: (B, V)
    pos = pos[:, -1]
    if k > 1:  # one prefill per prompt, shared by its k samples
        cache.batch_repeat_interleave(k)
        logits, pos, attn = logits.repeat_interleave(k, 0), pos.repeat_interleave(k, 0), attn.repeat_interleave(k, 0)
    n = B * k
    padded = padded and not shared  # shared: the prompt's padding mask lives in `prefix`, the rest needs none
    mask = None
    if padded:  # (n, T + max_new_tokens): the prompt's mask, then ones; step s attends to the first T + s + 1
        mask = torch.ones(n, T + max_new_tokens, dtype=torch.bool, device=attn.device)
        mask[:, :T] = attn.bool()
        if built is not None and _config(model)._attn_implementation == "sdpa" and not any(cache.is_sliding):
            mask = mask[:, None, None]  # (n, 1, 1, .): the 4D mask create_causal_mask builds for sdpa from
            # the 2D one for one query position (the causal part allows every key), handed over to skip that work
    # decode steps replay the decoder layers (`_decode_step`) for transformers' own Llama-family modules, sharing the
    # prompt (sampling) or through sdpa as the forward would (the same numbers: greedy keeps generate's tokens)
    replay = prefix = None
    if built is not None and not any(cache.is_sliding) and (shared or _config(model)._attn_implementation == "sdpa"):
        decoder = _standard_decoder(model)
        if decoder is not None:
            replay = _Replay(_base(model), decoder)
            if padded and not shared:  # the additive mask sdpa makes of a bool one (0 where True, -inf where False,
                # in the query's dtype: the cache's, as sdpa requires) and hands its kernel, made once here
                # instead of in every layer's call
                mask = torch.zeros(mask.shape, dtype=cache.layers[0].keys.dtype,
                                   device=mask.device).masked_fill_(~mask, float("-inf"))
    if shared:
        dtype = cache.layers[0].prefix_keys.dtype
        prefix = SharedPrefix(cache.layers, torch.zeros(B, 1, 1, T, dtype=dtype, device=attn.device).masked_fill(
            attn[::k, None, None] == 0, float("-inf")), k, torch.arange(n))
    return _Batch(index, offset, n, T, cache, mask, pos, replay, prefix, max_new_tokens), logits


class _JoinedLayer:
    """Layer i of `_Joined`: its update writes each batch's rows into that batch's own cache layer."""

    def __init__(self, joined: "_Joined", i: int):
        self.joined, self.i = joined, i

    def update(self, key_states, value_states, *args, **kwargs):  # -> ([keys per batch], [values per batch])
        out = [b.cache.layers[self.i].update(key_states[s:e], value_states[s:e])
               for b, (s, e) in zip(self.joined.batches, self.joined.bounds)]
        return [x for x, _ in out], [y for _, y in out]


class _Joined:
    """`_decode_step`'s cache and attention for the live rows of several batches, laid out batch after batch: each
    layer's update hands every batch's rows to that batch's own cache layer, and the attention runs per batch on its
    own keys, values and mask (or its shared prompts), as a step of that batch alone would. The linears work on all
    rows at once, as they do on the rows left whenever rows are dropped. A GEMM's rounding can depend on its row
    count when that is small (below 16 rows on some CPUs): a joined row's logits equal its batch's alone up to that
    (tests: within 2e-6, the same picks), and greedy rows keep `model.generate`'s tokens, whose GEMMs always run
    over the whole batch."""

    def __init__(self, batches: list[_Batch]):
        self.batches, self.attends = batches, [_attention(b) for b in batches]
        ends = list(itertools.accumulate(len(b.live) for b in batches))
        self.bounds = list(zip([0] + ends[:-1], ends))
        self.layers = [_JoinedLayer(self, i) for i in range(len(batches[0].cache.layers))]

    def attend(self, a, q, keys, values, i):
        return torch.cat([f(a, q[s:e], k, v, i) for f, (s, e), k, v in zip(self.attends, self.bounds, keys, values)])


def _decode_stream(model, batches, *, k: int, max_new_tokens: int, eos: torch.Tensor, pick, stop_hit=None,
                   window: int = 0, on_logits=None, sampling: bool = False, join_at: int = 0):
    """Decode left-padded prompt batches ((ids, attn) pairs, in order), k samples per prompt: yields (batch index,
    rows) as each batch ends, rows being (ids, ended at an EOS id) per row, ordered prompt 0's k samples, then
    prompt 1's, ...

    Each prompt is prefilled once and its KV cache rows repeated for its k samples (`_start`); a row that ends is
    dropped from its batch (and its cache rows) at once, so every forward works on live rows only. The cache
    writes in place (`BufferedLayer`) and the attention mask is one buffer, sliced. Positions, masks and the
    last-position logits are those of transformers' `generate`, so greedy decoding picks the same tokens. For
    transformers' own Llama/Mistral/Qwen2/Qwen3 modules (`_standard_decoder`) decode steps replay the decoder
    layers (`_decode_step`, the same operations and numbers as the forward); there, once `join_at` rows or fewer
    are left, the next batch is prefilled and joins the running one (`_Joined`): a batch's last few rows do not
    take steps of their own (on the benchmark's small model a step of 16 rows costs 40 % of one of 64). With
    `sampling` the computation may round differently from generate's (the same distribution, so not for greedy): a
    peft LoRA model runs with merged weights (`_merged_lora`), and with k > 1 (a model `_can_share_prefix` accepts)
    a prompt's keys and values are kept once for its k samples and decode steps attend through
    `shared_prefix_attention` (a joined batch through its own prompts). `pick`: (N, V) fp32 logits -> (N,) ids.
    `stop_hit(tails)`: which of the live rows' last `window` token ids now hold a stop string (None: no stop
    strings). `on_logits(rows, logits)` (tests): called before each pick with each live row's index among all
    batches' rows (batch after batch) and its logits."""
    if max_new_tokens < 1:  # nothing to generate: every row is empty
        for i, (ids, _) in enumerate(batches):
            yield i, [([], False)] * (len(ids) * k)
        return
    pending = iter(batches)
    running: list[_Batch] = []
    logits: list[torch.Tensor] = []  # per running batch: (L_b, V)
    admitted = rows_so_far = 0

    def admit() -> bool:
        nonlocal admitted, rows_so_far
        nxt_batch = next(pending, None)
        if nxt_batch is None:
            return False
        b, first = _start(model, *nxt_batch, k=k, max_new_tokens=max_new_tokens, sampling=sampling,
                          index=admitted, offset=rows_so_far)
        admitted, rows_so_far = admitted + 1, rows_so_far + len(b.live)
        running.append(b)
        logits.append(first)
        return True

    admit()
    while running:
        every = torch.cat(logits) if len(logits) > 1 else logits[0]
        if on_logits is not None:
            on_logits(torch.cat([b.offset + b.live for b in running]), every)
        picked = pick(every).split([len(b.live) for b in running])  # (L_b,) per batch
        going, nxts = [], []
        for b, nxt in zip(running, picked):
            step, live = b.step, b.live
            b.tokens[live, step] = nxt.cpu()
            ended = torch.isin(nxt, eos).cpu()  # (L,) bool
            for r in live[ended].tolist():
                b.length[r], b.hit_eos[r] = step, True  # the EOS itself is not kept
            if stop_hit is not None:
                left = (~ended).nonzero().squeeze(1)  # rows not at an EOS: does their text now hold a stop string
                tails = b.tokens[live[left], max(0, step + 1 - window):step + 1].tolist()
                hits = left[torch.tensor(stop_hit(tails), dtype=torch.bool).reshape(-1)]
                for r in live[hits].tolist():
                    b.length[r] = step + 1  # kept: _completion cuts the text (and its ids) before the stop string
                ended[hits] = True
            b.step += 1
            if b.step == max_new_tokens or bool(ended.all()):
                yield b.index, b.rows()
                continue
            if ended.any():
                keep = _compaction((~ended).nonzero().squeeze(1))  # the same rows, in the order that moves fewest
                b.cache.batch_select_indices(keep.to(b.pos.device))  # cache rows
                b.live, nxt, b.pos = live[keep], nxt[keep.to(nxt.device)], b.pos[keep.to(b.pos.device)]
                if b.mask is not None:
                    b.mask = b.mask[keep.to(b.mask.device)]
            b.pos = b.pos + 1
            going.append(b)
            nxts.append(nxt)
        running[:] = going
        if len(running) > 1 and all(b.joinable() for b in running):
            logits = _joined_step(running, nxts)
        else:
            logits = [_step(model, b, nxt) for b, nxt in zip(running, nxts)]
        while join_at and running and all(b.joinable() for b in running) \
                and sum(len(b.live) for b in running) <= join_at:
            if not admit():  # no batch left to join
                break
        if not running:
            admit()


def _step_mask(b: _Batch):
    """The batch's mask for its next decode step: its keys so far, (L, [1, 1,] T + step) (None: no padding)."""
    return None if b.mask is None else b.mask[..., :b.T + b.step]


def _attention(b: _Batch):
    """A replayed batch's attention for its next decode step (`_decode_step`'s `attend`): over its shared prompts
    (`shared_prefix_attention`) or through sdpa with its mask."""
    if b.prefix is None:
        return _sdpa(_step_mask(b))
    b.prefix.rows = b.live.to(b.pos.device)
    p = b.prefix
    return lambda a, q, k, v, i: shared_prefix_attention(q, k, v, a.scaling, p, i)


def _step(model, b: _Batch, nxt: torch.Tensor) -> torch.Tensor:
    """One decode step of one batch: (L,) next ids -> (L, V) float32 logits."""
    if b.replay is not None:
        return _decode_step(b.replay, nxt, b.pos, b.cache, _attention(b))
    cache_name, _ = _forward_names(model)
    out = model(input_ids=nxt[:, None], attention_mask=_step_mask(b), position_ids=b.pos[:, None], use_cache=True,
                **{cache_name: b.cache})
    return out.logits[:, -1].float()


def _joined_step(running: list[_Batch], nxts: list[torch.Tensor]) -> list[torch.Tensor]:
    """One decode step of several joinable batches at once (`_Joined`): (L_b, V) float32 logits per batch."""
    joined = _Joined(running)
    logits = _decode_step(running[0].replay, torch.cat(nxts), torch.cat([b.pos for b in running]), joined,
                          joined.attend)
    return list(logits.split([len(b.live) for b in running]))


def _decode(model, ids: torch.Tensor, attn: torch.Tensor, **kw) -> list[tuple[list[int], bool]]:
    """One batch through `_decode_stream` (same keywords): its rows."""
    ((_, rows),) = _decode_stream(model, [(ids, attn)], **kw)
    return rows


def ids_before(tokenizer, ids: list[int], text: str) -> list[int]:
    """The longest prefix of `ids` whose decoded text is a prefix of `text` (the ids before a stop string)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(tokenizer.decode(ids[:mid], skip_special_tokens=True)):
            lo = mid
        else:
            hi = mid - 1
    return ids[:lo]


def _completion(tokenizer, ids: list[int], hit_eos: bool, stop: Sequence[str]) -> Completion:
    """A row's generated ids (EOS excluded) as a Completion; the text is cut before any stop string and
    the ids kept are those whose text comes before it."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = truncate_at_stop(text, stop)
    if len(cut) == len(text):
        return Completion(text, tuple(ids), "stop" if hit_eos else "length")
    return Completion(cut, tuple(ids_before(tokenizer, ids, cut)), "stop")


class LocalBackend:
    """generation=hf (the default): the decoding loop below, on the policy in this process."""


_backend = None  # the engine generate() hands its calls to (set_backend); None / LocalBackend: the local loop


def set_backend(backend) -> None:
    """Route every generate() call (eval, on-policy sampling, resampling) through `backend`, an object with
    the same generate() signature built from the `generation` group (`inference.VLLMBackend`,
    `inference.ServerBackend`); None or a LocalBackend restores the local loop."""
    global _backend
    _backend = None if isinstance(backend, LocalBackend) else backend


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, batch_size: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_return_sequences: int = 1, seed: int = 0, stop: Sequence[str] | None = None) -> list[list[Completion]]:
    """Completions for each prompt: greedy (the tokens transformers' `generate` picks), or sampled at
    `temperature` from the top-p nucleus with a generator seeded by `seed` (the global RNG is untouched).

    Returns one list of `num_return_sequences` Completions per prompt, in the order of `prompts`.
    Prompts are encoded exactly as in training (`data.prompt_ids`: one BOS + the prompt text) and
    batched longest first (`batch_size` sequences, i.e. batch_size // num_return_sequences prompts, per
    batch) so that padding stays low. A sequence ends at any EOS id of the model (`eos_ids`), once its
    text contains a stop string (e.g. "\\n\\nQuestion:" for few-shot base models; the text is cut
    before it), or after max_new_tokens. Under generation=vllm|openai_server (`set_backend`) the engine
    answers instead, with the same arguments and the same Completions.
    """
    if _backend is not None:
        res = _backend.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                do_sample=do_sample, temperature=temperature, top_p=top_p,
                                num_return_sequences=num_return_sequences, seed=seed, stop=stop)
        progress.advance(sum(map(len, res)), dict(enumerate(res)))  # the open sampling/eval bar, if any
        return res
    k = num_return_sequences
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = [x for x in (stop or []) if x]
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    gen = torch.Generator(device=device).manual_seed(seed)

    def pick(logits):  # (N, V) -> (N,)
        if not do_sample:
            return logits.argmax(-1)
        return torch.multinomial(sampling_probs(logits, temperature, top_p), 1, generator=gen).squeeze(1)

    window = 4 * max(map(len, stop), default=0) + 2  # tokens that can hold a stop string (>= 1 byte per token)

    def stop_hit(tails):  # token-id tails -> does each one's text contain a stop string
        return [any(x in t for x in stop) for t in tokenizer.batch_decode(tails, skip_special_tokens=True)]

    enc = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))  # longest first; put back in order below
    done: dict[int, list[Completion]] = {}
    per = max(1, batch_size // k)
    merged = _merged_lora(model) if do_sample else contextlib.nullcontext()  # sampling: LoRA merged (same function)
    batches = []  # (prompt indices, ids, attn) per batch of `per` prompts, left-padded
    for s in range(0, len(order), per):
        idx = order[s:s + per]
        T = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, T - len(enc[i]):] = torch.tensor(enc[i])
            attn[r, T - len(enc[i]):] = 1
        batches.append((idx, ids.to(device), attn.to(device)))
    with merged:  # a batch's last rows share their steps with the next batch (`join_at`: half a batch)
        for b, rows in _decode_stream(model, [(ids, attn) for _, ids, attn in batches], k=k,
                                      max_new_tokens=max_new_tokens, eos=torch.tensor(eos, device=device), pick=pick,
                                      stop_hit=stop_hit if stop else None, window=window, sampling=do_sample,
                                      join_at=per * k // 2):
            idx = batches[b][0]
            outs = [_completion(tokenizer, r_ids, hit, stop) for r_ids, hit in rows]
            for r, i in enumerate(idx):
                done[i] = outs[r * k:(r + 1) * k]
            progress.advance(len(outs), {i: done[i] for i in idx})  # the open sampling/eval bar, if any
    if was_training:
        model.train()
    return [done[i] for i in range(len(prompts))]
