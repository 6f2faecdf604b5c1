"""Every config option binds to its target; bad config fails fast, naming the key."""

import re
import shlex

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from stepdpo.config import TARGET_GROUPS, check_target, validate_targets

from conftest import CONF, ROOT, compose_config, run_cli

COMMAND = "# python -m stepdpo.run"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", TARGET_GROUPS)
def test_every_option_binds_to_its_target(group):
    opts = _options(group)
    assert opts, f"conf/{group} has no options"
    for opt in opts:
        node = OmegaConf.load(CONF / group / f"{opt}.yaml")
        check_target(node, f"{group}={opt}")  # importable, allowed package, every key a real parameter


def header_overrides(path) -> list[str]:
    """The overrides of the `# python -m stepdpo.run ...` command a YAML file opens with (after a `# @package`
    line), a sweep's comma list cut to its first value. A note in brackets may follow the command."""
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# @package"):
        lines = lines[1:]
    first = lines[0] if lines else ""
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    assert first == COMMAND or first.startswith(COMMAND + " "), f"{name} must open with '{COMMAND} ...', got {first!r}"
    args = shlex.split(re.split(r"\s\(", first[len(COMMAND):])[0])
    multirun = "-m" in args
    out = []
    for o in OverridesParser.create().parse_overrides([a for a in args if a != "-m"]):
        if o.is_sweep_override():
            assert multirun, f"{name}: '{o.input_line}' sweeps, so the command needs -m"
            out.append(f"{o.get_key_element()}={next(o.sweep_string_iterator())}")
        else:
            out.append(o.input_line)
    return out


def test_header_overrides_are_parsed_from_the_command(tmp_path):
    yaml = tmp_path / "x.yaml"
    yaml.write_text("# @package _global_\n# python -m stepdpo.run -m trainer=dpo,stepdpo seed=0,1 lora.r=8   (a note)\n")
    assert header_overrides(yaml) == ["trainer=dpo", "seed=0", "lora.r=8"]
    for bad in ("# the command that uses this file", "# python -m stepdpo.runner", "key: 1",
                "# python -m stepdpo.run trainer=dpo,stepdpo"):  # a sweep without -m
        yaml.write_text(bad + "\n")
        with pytest.raises(AssertionError):
            header_overrides(yaml)


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_opens_with_a_command_that_uses_it(path):
    """The command composes (every group option and key in it exists), validates, and selects this file."""
    cfg = compose_config(*header_overrides(path), hydra=True)
    validate_targets(cfg)
    group = str(path.parent.relative_to(CONF))
    if group != ".":  # conf/config.yaml: any command uses it
        # a group nested by other groups' defaults (engine@reward.engine) is chosen under its package's name
        picked = {v for k, v in cfg.hydra.runtime.choices.items() if k == group or k.startswith(f"{group}@")}
        assert path.stem in picked, f"{path.relative_to(ROOT)}: its command picks {group}={picked or None}"


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_default_composition_validates(trainer):
    cfg = compose_config(f"trainer={trainer}")
    validate_targets(cfg)
    assert cfg.trainer.loss in ("sft", "dpo")


def test_quantization_has_its_own_spec_and_the_engine_one_sub_config():
    from stepdpo.config import build
    from stepdpo.model import QuantSpec

    q = compose_config("lora=qlora", "lora.quant.compute_dtype=bfloat16")
    none = compose_config("lora=none", "+lora.quant.quant_type=nf4")
    llm = compose_config("reward=openai", "pairs=llm", "reward.engine.model=judge-m")
    assert build(q.lora, "lora").quant == QuantSpec(quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    assert build(compose_config("lora=lora").lora, "lora").quant is None
    with pytest.raises(ValueError, match="lora=none with lora.quant set"):
        build(none.lora, "lora")
    # reward.engine and pairs.engine are the same settings (conf/engine/openai.yaml), each overridable alone
    shared = set(llm.reward.engine) & set(llm.pairs.engine)
    assert shared == set(llm.reward.engine) and llm.reward.engine.model == "judge-m" != llm.pairs.engine.model
    assert (llm.reward.engine.temperature, llm.pairs.engine.temperature) == (0.0, 0.7)


def test_unknown_key_in_target_group_names_it():
    cfg = compose_config("+reward.bogus_knob=1")
    with pytest.raises(ValueError, match=r"reward\.bogus_knob: unknown key"):
        validate_targets(cfg)


@pytest.mark.parametrize("key,value", [("loss_type", "kto"), ("nll_on", "everything")])
def test_bad_choice_names_allowed_values(key, value):
    cfg = compose_config(f"trainer.{key}={value}")
    with pytest.raises(ValueError, match=rf"trainer\.{key}: '{value}' is not one of"):
        validate_targets(cfg)


@pytest.mark.parametrize("overrides,match", [
    (("pairs.reject=outcome",), r"pairs\.reject='outcome': choose one of process, answer"),
    (("pairs=outcome", "pairs.chosen=lines"), r"pairs\.chosen='lines': choose one of process, answer"),
])
def test_pairs_choices_are_checked_with_the_config(overrides, match):
    """The builders' own checks (stepdpo/pairs.py) run when the config is validated, before the warm-up."""
    cfg = compose_config(*overrides)
    with pytest.raises(ValueError, match=match):
        validate_targets(cfg)


@pytest.mark.parametrize("override,expect", [
    ("+trainer.bogus=1", "trainer.bogus: unknown key"),  # typed schema: unknown key
    ("trainer=nope", "trainer/nope"),         # unknown group option (Hydra lists the available ones)
    ("trainer.beta=abc", "trainer.beta"),     # wrong type
    ("+dataset.bogus=1", "dataset.bogus: unknown key"),
    ("trainer.weighting=nope", "unknown scheme"),
    ("threads=0", "threads=0: must be >= 1"),
    ("sft.sft_data=chosen", "the warm-up trains on gold solutions"),
    ("trainer.sft_data=chosen", "use trainer=sft_control"),  # trainer=stepdpo has no SFT data
    ("trainer.max_length=48", "trainer.max_length=48 <= pairs.max_new_tokens=48"),  # no sampled pair could fit
])
@pytest.mark.slow
def test_cli_fails_fast_naming_the_problem(tmp_path, override, expect):
    proc, run_dir = run_cli(tmp_path, override, check=False, timeout=120)
    assert proc.returncode != 0
    assert expect in proc.stdout + proc.stderr
    assert not (run_dir / "base_model").exists()  # failed before any model was built


@pytest.mark.slow
def test_qlora_block_size_checked_before_loading(tmp_path):
    proc, run_dir = run_cli(tmp_path, "lora=qlora", "model.tiny.hidden_size=96", check=False, timeout=120)
    assert proc.returncode != 0 and "model.tiny.hidden_size=96" in proc.stderr + proc.stdout
    assert not (run_dir / "base_model").exists()


def test_sft_cache_key_follows_what_changes_the_warm_up_weights(tmp_path):
    from stepdpo.arith import load
    from stepdpo.sft_cache import path as sft_cache_path

    train = load(n_train=20, n_eval=5, max_operand=9, max_value=30, ops="-").train  # the same data throughout

    def key(*overrides):
        return sft_cache_path(compose_config(f"sft_cache_dir={tmp_path}", *overrides), train)

    base = key()
    assert base.parent == tmp_path
    for same in ("sft.log_every=7", "sft.save_every=100", "trainer=dpo", "trainer.lr=0.5", "eval.n=3", "sft.pack=false"):
        assert key(same) == base, same
    for other in ("sft.lr=0.5", "sft.max_steps=5", "seed=1", "dataset.n_train=10", "model.tiny.hidden_size=64"):
        assert key(other) != base, other


def test_sft_cache_key_follows_the_training_data(tmp_path):
    # the same config over different data (a fixed generator, an edited file) must not reuse a warm-up
    import dataclasses

    from stepdpo.arith import load
    from stepdpo.sft_cache import path as sft_cache_path

    cfg = compose_config(f"sft_cache_dir={tmp_path}")
    train = load(n_train=50, n_eval=5, max_operand=9, max_value=30, ops="-").train
    same = load(n_train=50, n_eval=5, max_operand=9, max_value=30, ops="-").train
    other = load(n_train=50, n_eval=5, max_operand=9, max_value=30, ops="+-").train
    edited = [*train[:-1], dataclasses.replace(train[-1], steps=["2 - 1 = 1", "The answer is 1"])]
    assert sft_cache_path(cfg, train) == sft_cache_path(cfg, same) != sft_cache_path(cfg, other)
    assert sft_cache_path(cfg, edited) != sft_cache_path(cfg, train)


def test_pairs_cache_key_follows_what_changes_the_built_pairs(tmp_path):
    """Arms that only score or train differently share an entry; anything the sampled pairs depend on (their
    config, the problems, the seed, the sampling policy's weights, the engine) gives another. A builder that grades
    with the reward (pairs=on_policy) is keyed by it too; pairs=outcome is not."""
    import dataclasses

    from stepdpo.arith import load
    from stepdpo.config import build
    from stepdpo.model import tiny_llama
    from stepdpo.pairs_cache import path as pairs_cache_path

    data = load(n_train=20, n_eval=5, max_operand=9, max_value=30, ops="-")
    torch.manual_seed(0)
    policy, tok = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2)

    def key(*overrides, train=data.train, model=policy, seed=0):
        cfg = compose_config(f"pairs_cache_dir={tmp_path}", *overrides)
        return pairs_cache_path(cfg, build(cfg.pairs, "pairs"), train, (), model, tok, seed)

    assert pairs_cache_path(compose_config(), build(compose_config().pairs, "pairs"), data.train, (), policy, tok, 0) is None
    for pairs in ("on_policy", "outcome"):
        base = key(f"pairs={pairs}")
        assert base.parent == tmp_path
        for same in ("trainer=dpo", "trainer=sft_control", "trainer.lr=0.5", "eval.n=3", "logger=wandb", "threads=1"):
            assert key(f"pairs={pairs}", same) == base, same
        for other in ("pairs.k=3", "pairs.temperature=0.9", "eval.max_new_tokens=17", "generation=vllm",
                      "model.prompt_format=chat", "dataset.n_train=10"):
            assert key(f"pairs={pairs}", other) != base, other
        assert key(f"pairs={pairs}", seed=1) != base
        edited = [*data.train[:-1], dataclasses.replace(data.train[-1], answer="0")]
        assert key(f"pairs={pairs}", train=edited) != base
        trained = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2)[0]
        with torch.no_grad():
            trained.load_state_dict(policy.state_dict())
            next(trained.parameters()).add_(1e-3)  # one step of training moves the weights
        assert key(f"pairs={pairs}", model=trained) != base
    assert key("pairs=on_policy", "reward=rollout") != key("pairs=on_policy")  # it grades with the reward
    assert key("pairs=outcome", "reward=rollout") == key("pairs=outcome")  # it only hands its pairs to it


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_arm_composes_validates_and_has_equal_compute(experiment):
    # each arm of a saved sweep (the trainer options its sweeper lists), with the overlay applied
    # (or the conf/arm overlays it lists, +arm=..., when an arm sets trainer and reward together)
    params = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    key = "trainer" if "trainer" in params else "+arm"
    arms = str(params[key]).split(",")
    assert len(arms) > 1
    cfgs = {}
    for arm in arms:
        cfgs[arm] = compose_config(f"experiment={experiment}", f"{key}={arm}")
        validate_targets(cfgs[arm])

    def compute(t):  # optimizer steps x policy sequences per step (a DPO pair is 2 sequences, 1 when its
        # rejected side is read off the chosen row: first_error, error_span=token, after_error=0)
        kw = t.weighting_kwargs or {}
        one_row = t.weighting == "first_error" and kw.get("error_span") == "token" and not kw.get("after_error")
        return t.max_steps, t.batch_size * t.grad_accum * (2 if t.loss == "dpo" and not one_row else 1)

    assert len({compute(c.trainer) for c in cfgs.values()}) == 1, {a: compute(c.trainer) for a, c in cfgs.items()}
    assert len({str(OmegaConf.to_container(c.sft)) for c in cfgs.values()}) == 1  # one warm-up for every arm
    # the preference arms differ only in their token weights
    drop = ("weighting", "weighting_kwargs", "batch_size")  # batch_size: checked by compute() above
    pref = [{k: v for k, v in OmegaConf.to_container(c.trainer).items() if k not in drop}
            for c in cfgs.values() if c.trainer.loss == "dpo"]
    assert len(pref) >= 2 and all(t == pref[0] for t in pref)


@pytest.mark.parametrize("pairs", _options("pairs"))
def test_rollout_continuations_are_as_long_as_eval_allows_with_every_pairs_group(pairs):
    # reward=rollout takes its length from eval (one owner of how long a solution may be), with or without the
    # experiment arm, whichever pairs group builds the pairs (perturb and llm have no max_new_tokens of their own)
    for extra in (["reward=rollout"], ["+arm=stepdpo_rollout"]):
        cfg = compose_config(f"pairs={pairs}", *extra, "eval.max_new_tokens=80")
        assert cfg.reward.max_new_tokens == 80
    assert cfg.trainer.weighting == "advantage"
    if "max_new_tokens" in cfg.pairs:  # samplers: the same limit
        assert cfg.pairs.max_new_tokens == 80
    gsm8k = compose_config("dataset=gsm8k", f"pairs={pairs}", "reward=rollout")
    assert gsm8k.reward.max_new_tokens == gsm8k.eval.max_new_tokens == 512  # the dataset's preset reaches them


@pytest.mark.parametrize("dataset", ["step_dpo", "prm800k"])
def test_math_pair_datasets_get_maths_lengths(dataset):
    """dataset=step_dpo|prm800k hold MATH problems and evaluate on MATH-500: MATH's lengths (96 new tokens would cut
    nearly every solution), with their own one round and whole-step error span."""
    c, m = compose_config(f"dataset={dataset}"), compose_config("dataset=math")
    for key in ("eval.max_new_tokens", "trainer.max_length", "sft.max_length", "pairs.max_new_tokens"):
        assert OmegaConf.select(c, key) == OmegaConf.select(m, key), key
    assert c.eval.max_new_tokens == 1024 and c.trainer.rounds == 1 and c.trainer.weighting_kwargs.error_span == "step"


@pytest.mark.parametrize("pairs", ["on_policy", "outcome"])
def test_generation_batch_follows_eval(pairs):
    """model=qwen|llama size eval's generate calls for the KV cache; on-policy sampling and rollouts follow."""
    c = compose_config("model=qwen", f"pairs={pairs}", "reward=rollout")
    assert c.eval.batch_size == 32 and c.pairs.batch_size == 32 and c.reward.batch_size == 32


def test_sampling_and_rollouts_stop_where_eval_stops():
    for pairs in ("on_policy", "outcome"):
        c = compose_config(f"pairs={pairs}", "reward=rollout", "eval.stop=[\"\\n\\nQuestion:\"]")
        assert list(c.pairs.stop) == list(c.reward.stop) == list(c.eval.stop) == ["\\n\\nQuestion:"]


@pytest.mark.parametrize("pairs,override,match", [
    ("outcome", "pairs.align=shred", r"pairs\.align='shred': choose one of shared, none"),
    ("outcome", "pairs.k=0", r"pairs\.k=0: must be an integer >= 1"),
    ("outcome", "pairs.n_problems=0", r"pairs\.n_problems=0: must be an integer >= 1"),
    ("on_policy", "pairs.temperature=0", r"pairs\.temperature=0(\.0)?: must be > 0"),
    ("on_policy", "pairs.top_p=1.5", r"pairs\.top_p=1\.5: must be in \(0, 1\]"),
    ("outcome", "pairs.use_gold=no", r"pairs\.use_gold='no': must be true or false"),
    ("outcome", "pairs.check_annotations=1", r"pairs\.check_annotations=1: must be true or false"),
])
def test_sampler_settings_are_checked_with_the_config(pairs, override, match):
    """On-policy samplers' settings are refused, by key, before the warm-up (the builders run the same check)."""
    with pytest.raises(ValueError, match=match):
        validate_targets(compose_config(f"pairs={pairs}", override))
    validate_targets(compose_config("pairs=llm", "pairs.engine.temperature=0.0"))  # another group's knobs: its own


@pytest.mark.parametrize("overrides,match", [
    (("+trainer.weighting_kwargs.sined=true",), r"weighting_kwargs: unknown option\(s\) \['sined'\]"),
    (("+trainer.weighting_kwargs.value_before=0.3",), r"unknown option\(s\) \['value_before'\]"),
    (("trainer.weighting=advantage", "trainer.weighting_kwargs.signed=yes"), r"signed='yes': must be true or false"),
    (("trainer.weighting=advantage", "trainer.weighting_kwargs.signed=true", "trainer.weighting_kwargs.all_drops=true"),
     r"weighting=advantage: .*signed=true already weighs every step"),
])
def test_weighting_options_are_checked_with_the_config(overrides, match):
    """A scheme option no scheme reads (a typo), a non-boolean switch, or options the scheme refuses together are
    errors before any work, not silently ignored or found after the rollouts."""
    with pytest.raises(ValueError, match=match):
        validate_targets(compose_config("trainer=stepdpo", *overrides))
    validate_targets(compose_config("trainer=stepdpo", "trainer.weighting=advantage",
                                    "trainer.weighting_kwargs.signed=true"))  # fine on its own


def test_vllm_max_lora_rank_is_checked_against_the_adapter_with_the_config():
    with pytest.raises(ValueError, match=r"generation\.max_lora_rank=16 is below lora\.r=32"):
        validate_targets(compose_config("generation=vllm", "generation.max_lora_rank=16", "lora.r=32"))
    validate_targets(compose_config("generation=vllm", "lora.r=64"))  # the default 64 serves it
    validate_targets(compose_config("generation=vllm", "generation.max_lora_rank=8", "lora=none"))  # refused elsewhere


def test_every_cache_lives_under_one_root(monkeypatch, tmp_path):
    """SFT warm-ups, built pairs, reference log-probs, judge answers and rollout values: $STEPDPO_CACHE_DIR, else ./.cache of the
    launch directory (stepdpo/cache.py), whichever config or Python default names them; no YAML spells the rule."""
    from omegaconf import OmegaConf

    from stepdpo.config import TrainerConfig
    from stepdpo.rewards.llm_engine import EngineConfig

    def paths():
        a = compose_config("experiment=credit_arith", "+arm=stepdpo_rollout")
        b = compose_config("reward=openai")
        return [OmegaConf.select(a, "sft_cache_dir"), OmegaConf.select(a, "pairs_cache_dir"),
                OmegaConf.select(a, "trainer.ref_cache_dir"),
                OmegaConf.select(a, "reward.cache_path"), OmegaConf.select(b, "reward.engine.cache_path"),
                TrainerConfig().ref_cache_dir, str(EngineConfig(model="m").cache_path)]

    monkeypatch.setenv("STEPDPO_CACHE_DIR", str(tmp_path / "c"))
    root = str(tmp_path / "c")
    assert paths() == [f"{root}/sft", f"{root}/pairs", root, f"{root}/rollout.sqlite", f"{root}/judge.sqlite", root,
                       f"{root}/judge.sqlite"]
    monkeypatch.delenv("STEPDPO_CACHE_DIR")
    monkeypatch.chdir(tmp_path)
    assert all(p.startswith(str(tmp_path / ".cache")) for p in paths())
    assert not [f for f in CONF.rglob("*.yaml") if "STEPDPO_CACHE_DIR" in f.read_text()]
