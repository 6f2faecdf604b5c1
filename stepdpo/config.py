"""Typed config schemas (registered in Hydra's ConfigStore) and `build()`, a restricted instantiate.

Groups whose implementation varies (dataset, pairs, reward, model, lora, logger, generation) carry a
`_target_`; `validate_targets` binds every key against the target's signature before anything
is loaded, so a typo fails in seconds naming the group and key. `trainer`, `sft` and `eval` are
typed dataclasses: Hydra rejects unknown keys and wrong types while composing.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from .cache import cache_dir, register_resolver

register_resolver()  # ${stepdpo_cache:...} in the YAML (stepdpo/cache.py): wherever a config is composed

TARGET_GROUPS = ("dataset", "pairs", "reward", "model", "lora", "logger", "generation")
ALLOWED_PREFIXES = ("stepdpo.", "peft.", "torch.optim.")
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_", "defaults"}


@dataclass
class TrainerConfig:
    """One training stage. `conf/trainer/*.yaml` fill this in; every field is documented there."""

    loss: str = "dpo"  # sft | dpo
    sft_data: str = "gold"  # loss=sft in the main stage: gold (training solutions) | chosen (the pairs' chosen sides)
    weighting: str = "uniform"  # uniform | first_error | score | advantage | module:function
    weighting_kwargs: dict = field(default_factory=dict)
    loss_type: str = "sigmoid"  # sigmoid | robust | hinge | ipo
    beta: float = 0.1
    label_smoothing: float = 0.0
    nll_alpha: float = 0.0
    nll_on: str = "continuation"  # continuation | solution (prefix steps + chosen continuation)
    token_reduction: str = "sum"  # sum | mean
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    optimizer: str = "adamw"  # adamw | paged_adamw_8bit (GPU)
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_steps: int = 100
    batch_size: int = 8  # pairs (or SFT examples) per micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_length: int = 512
    gradient_checkpointing: bool = False
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    eval_every: int = 0
    rounds: int = 1  # on-policy rounds: pairs re-built from the current policy at max_steps * r / rounds
    ref_update: str = "fixed"  # fixed | round (iterative DPO: each round's reference is the policy it starts from)
    save_every: int = 0  # checkpoint every N optimizer steps into <run dir>/checkpoints/<stage>/ (0 = never)
    keep_checkpoints: int = 1  # newest checkpoints kept per stage (writes are atomic, so 1 is safe)
    resume: Optional[str] = None  # null | auto | <run dir or checkpoint dir>; trainer.resume drives every stage
    precompute_ref: bool = False  # reference log-probs computed once before training, cached on disk
    pack: bool = True  # one run row per pair: prompt and shared tokens computed once (sdpa/eager attention)
    ref_cache_dir: str = field(default_factory=cache_dir)  # precomputed reference log-probs (ref_logps/<hash>.pt)
    pad_to_multiple_of: Optional[int] = None  # run rows' length rounded up to this (None: 32 for bf16 on CPU, else 1)
    cpu_primitive_cache: int = 128  # CPU: oneDNN primitives kept (its default 1024: one per GEMM shape); 0 = as is
    cpu_mmap_threshold_mb: float = 0.0  # CPU: glibc mmaps blocks of at least this size (0 = glibc's moving default)


@dataclass
class EvalConfig:
    n: Optional[int] = None  # how many held-out problems (None = all of the dataset's eval split)
    max_new_tokens: int = 128
    batch_size: int = 64
    before: bool = True  # also evaluate before the preference stage
    maj_k: int = 0  # >0: also sampled majority vote over k samples
    temperature: float = 0.7  # for maj@k sampling
    n_samples_saved: int = 50  # generations written to samples.jsonl
    stop: List[str] = field(default_factory=list)  # extra stop strings besides EOS, e.g. ["\n\nQuestion:"]


@dataclass
class Config:
    seed: int = 0
    validate_only: bool = False  # build and validate pairs, report, exit without training
    sft_cache_dir: Optional[str] = None  # share SFT warm-ups between runs (keyed by model, data, sft, seed)
    pairs_cache_dir: Optional[str] = None  # share built pairs between runs (keyed by config, data, policy, seed)
    threads: Optional[int] = None  # torch CPU threads for this job (null = torch's default: one per core)
    dataset: Any = MISSING
    pairs: Any = MISSING
    reward: Any = MISSING
    model: Any = MISSING
    lora: Any = MISSING
    sft: TrainerConfig = field(default_factory=lambda: TrainerConfig(loss="sft"))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = MISSING
    generation: Any = MISSING  # the engine eval and on-policy sampling decode with: hf | vllm | openai_server
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="stepdpo_schema", node=Config)


TRAINER_CHOICES = {
    "loss": ("sft", "dpo"),
    "sft_data": ("gold", "chosen"),
    "loss_type": ("sigmoid", "robust", "hinge", "ipo"),
    "token_reduction": ("sum", "mean"),
    "nll_on": ("continuation", "solution"),
    "ref_update": ("fixed", "round"),
    "optimizer": ("adamw", "paged_adamw_8bit"),
    "schedule": ("cosine", "linear", "constant"),
    "precision": ("fp32", "bf16"),
}


def check_keys(node: Any, schema: type, group: str) -> None:
    """Hydra's `+key=value` can append to a typed node; refuse keys the schema doesn't have."""
    allowed = set(schema.__dataclass_fields__)
    for key in node:
        if key not in allowed:
            raise ValueError(f"{group}.{key}: unknown key; allowed keys: {sorted(allowed)}")


def validate_trainer(node: Any, group: str) -> None:
    check_keys(node, TrainerConfig, group)
    for key, allowed in TRAINER_CHOICES.items():
        v = node[key]
        if v not in allowed:
            raise ValueError(f"{group}.{key}: {v!r} is not one of {allowed}")
    for key in ("max_steps", "batch_size", "grad_accum", "log_every", "max_length"):
        if node[key] < (0 if key == "max_steps" else 1):
            raise ValueError(f"{group}.{key}: must be >= {0 if key == 'max_steps' else 1}, got {node[key]}")
    if node.save_every < 0 or node.keep_checkpoints < 1:
        raise ValueError(f"{group}.save_every must be >= 0 and {group}.keep_checkpoints >= 1; "
                         f"got {node.save_every} and {node.keep_checkpoints}")
    if (node.get("weighting_kwargs") or {}).get("signed") and node.token_reduction != "sum":
        raise ValueError(f"{group}.weighting_kwargs.signed=true needs {group}.token_reduction=sum (signed token "
                         f"weights can sum to 0, and the mean divides by that sum); got {node.token_reduction!r}")
    if node.rounds < 1 or node.rounds > max(1, node.max_steps):
        raise ValueError(f"{group}.rounds: must be in 1..max_steps ({node.max_steps}), got {node.rounds}")
    if node.rounds > 1 and node.resume is not None:
        raise ValueError(f"{group}.rounds={node.rounds} with {group}.resume: resuming a multi-round run is not "
                         "supported yet; resume needs rounds=1")
    if node.sft_data != "gold" and (group == "sft" or node.loss != "sft"):
        raise ValueError(f"{group}.sft_data={node.sft_data}: only the main stage's SFT (trainer.loss=sft, e.g. "
                         f"trainer=sft_control) can train on the pairs' chosen sides; "
                         f"{'the warm-up trains on gold solutions' if group == 'sft' else 'use trainer=sft_control'}")
    if node.ref_update == "round" and node.rounds < 2 and node.loss != "sft":
        raise ValueError(f"{group}.ref_update=round: the reference is updated at each round boundary and "
                         f"{group}.rounds={node.rounds} has none; set {group}.rounds>=2 or ref_update=fixed")
    if node.beta <= 0:
        raise ValueError(f"{group}.beta: must be > 0, got {node.beta}")
    if node.lr <= 0:
        raise ValueError(f"{group}.lr: must be > 0, got {node.lr}")
    from .weights import SCHEMES, get_scheme

    try:
        scheme = get_scheme(node.weighting)
    except ValueError as e:
        raise ValueError(f"{group}.weighting: {e}") from None
    kwargs = dict(node.weighting_kwargs or {})
    # every built-in scheme's options (conf/trainer/stepdpo.yaml lists them all) and token_weights' error_span:
    # a name outside them is a typo that no scheme would read
    known = {"error_span"} | {n for fn in SCHEMES.values() for n, p in inspect.signature(fn).parameters.items()
                              if p.kind == p.KEYWORD_ONLY} - {"value_before"}  # value_before: each pair's own
    if node.weighting in SCHEMES and (unknown := sorted(set(kwargs) - known)):
        raise ValueError(f"{group}.weighting_kwargs: unknown option(s) {unknown}; the built-in schemes read "
                         f"{sorted(known)}")
    for key in ("signed", "all_drops"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise ValueError(f"{group}.weighting_kwargs.{key}={kwargs[key]!r}: must be true or false")
    if node.weighting in SCHEMES:  # the scheme's own checks on its options (e.g. signed with all_drops), now
        try:
            scheme([1.0], [0.0], **{k: v for k, v in kwargs.items() if k != "error_span"})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{group}.weighting={node.weighting}: {e}") from None
    from .weights import ERROR_SPANS

    span = kwargs.get("error_span", "step")
    if span not in ERROR_SPANS:
        raise ValueError(f"{group}.weighting_kwargs.error_span={span!r}: choose one of {list(ERROR_SPANS)} "
                         f"(token = only the token where the first wrong step departs from the chosen one)")
    if span != "step" and node.weighting != "first_error":
        raise ValueError(f"{group}.weighting_kwargs.error_span={span}: only trainer.weighting=first_error "
                         f"localises the error; it has weighting={node.weighting}")


def _import(path: str) -> Any:
    mod, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"_target_ {path!r} can't be imported ({e})") from None


def check_target(node: Any, group: str) -> Any:
    """Check one `_target_` node: allowed module, importable, every key a real parameter."""
    if not isinstance(node, (DictConfig, dict)) or "_target_" not in node:
        raise ValueError(f"{group}: expected a config with a _target_, got {node!r}")
    target = node["_target_"]
    if not target.startswith(ALLOWED_PREFIXES):
        raise ValueError(f"{group}._target_: {target!r} is outside the allowed packages {ALLOWED_PREFIXES}")
    obj = _import(target)
    sig = inspect.signature(obj)
    params = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind == p.VAR_KEYWORD and n != "_" for n, p in sig.parameters.items())
    for key in node:
        if key in HYDRA_KEYS or takes_any:
            continue
        if key not in params:
            raise ValueError(f"{group}.{key}: unknown key for {target}; allowed keys: {sorted(params)}")
    return obj


def validate_pairs_settings(node: Any) -> None:
    """The `pairs` group's choices, checked by the same functions the builders call (pairs.py owns them)."""
    from .pairs import (SAMPLING_FLAGS, SAMPLING_RULES, check_chosen, check_from_split, check_reject, check_resample,
                        check_sampling)

    check_from_split(node.get("from_split", "train"))
    if str(node.get("_target_", "")).rsplit(".", 1)[-1] in ("build_on_policy_pairs", "build_outcome_pairs"):
        check_sampling(**{k: node[k] for k in (*SAMPLING_RULES, *SAMPLING_FLAGS, "align") if k in node})
    if "reject" in node:
        check_reject(node.reject)
    if "chosen" in node:
        check_chosen(node.chosen)
    if "resample_k" in node:
        check_resample(node.resample_k, node.get("resample_temperature", 0.7))


def validate_quantized_tiny(model: Any, lora: Any) -> None:
    """lora=qlora on the built-in tiny model: bitsandbytes quantizes in blocks of 64 input features."""
    if lora.get("quant") is None or model.get("path") is not None:
        return
    for key in ("hidden_size", "intermediate_size"):
        v = (model.get("tiny") or {}).get(key, 64)
        if v % 64:
            raise ValueError(f"model.tiny.{key}={v}: lora=qlora quantizes in blocks of 64 input features; "
                             "use a multiple of 64")


def validate_engine_lora(generation: Any, lora: Any) -> None:
    """generation=vllm serves the policy's adapter: vLLM refuses one of a higher rank than max_lora_rank."""
    rank = generation.get("max_lora_rank")
    if rank is not None and lora.get("name") != "none" and lora.get("r") is not None and rank < lora.r:
        raise ValueError(f"generation.max_lora_rank={rank} is below lora.r={lora.r}: vLLM would refuse the adapter; "
                         f"set generation.max_lora_rank to a rank vLLM accepts that is >= {lora.r} (e.g. 8, 16, 32, "
                         "64, 128, 256)")


def validate_targets(cfg: DictConfig) -> None:
    for g in TARGET_GROUPS:
        check_target(cfg[g], g)
    validate_pairs_settings(cfg.pairs)
    validate_quantized_tiny(cfg.model, cfg.lora)
    validate_engine_lora(cfg.generation, cfg.lora)
    validate_trainer(cfg.sft, "sft")
    validate_trainer(cfg.trainer, "trainer")
    check_keys(cfg.eval, EvalConfig, "eval")
    check_keys({k: None for k in cfg if k != "hydra"}, Config, "config")
    if cfg.get("threads") is not None and cfg.threads < 1:
        raise ValueError(f"conf/config.yaml: threads={cfg.threads}: must be >= 1 (or null for torch's default)")


def build(node: Any, group: str = "?", **runtime) -> Any:
    """`hydra.utils.instantiate` limited to stepdpo.*, peft.*, torch.optim.*; errors name the group."""
    from hydra.utils import instantiate

    check_target(node, group)
    try:
        return instantiate(node, _recursive_=False, _convert_="all", **runtime)
    except Exception as e:  # instantiate wraps user errors; surface the group and the real cause
        cause = e.__cause__ or e
        if isinstance(cause, (ValueError, TypeError)):
            raise type(cause)(f"{group}: {cause}") from cause
        raise


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
