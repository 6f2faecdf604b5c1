"""Every config option binds to its target; bad config fails fast, naming the key."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stepdpo.config import TARGET_GROUPS, check_target, register_configs, validate_targets

from conftest import ROOT, run_cli

CONF = ROOT / "conf"
register_configs()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", TARGET_GROUPS)
def test_every_option_binds_to_its_target(group):
    opts = _options(group)
    assert opts, f"conf/{group} has no options"
    for opt in opts:
        node = OmegaConf.load(CONF / group / f"{opt}.yaml")
        check_target(node, f"{group}={opt}")  # importable, allowed package, every key a real parameter


def test_every_yaml_opens_with_the_command_that_uses_it():
    for path in CONF.rglob("*.yaml"):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path.relative_to(ROOT)} must open with a comment giving its command"


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_default_composition_validates(trainer):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"trainer={trainer}"])
    validate_targets(cfg)
    assert cfg.trainer.loss in ("sft", "dpo")


def test_unknown_key_in_target_group_names_it():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+reward.bogus_knob=1"])
    with pytest.raises(ValueError, match=r"reward\.bogus_knob: unknown key"):
        validate_targets(cfg)


@pytest.mark.parametrize("key,value", [("loss_type", "kto"), ("nll_on", "everything")])
def test_bad_choice_names_allowed_values(key, value):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"trainer.{key}={value}"])
    with pytest.raises(ValueError, match=rf"trainer\.{key}: '{value}' is not one of"):
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
])
def test_cli_fails_fast_naming_the_problem(tmp_path, override, expect):
    proc, run_dir = run_cli(tmp_path, override, check=False, timeout=120)
    assert proc.returncode != 0
    assert expect in proc.stdout + proc.stderr
    assert not (run_dir / "base_model").exists()  # failed before any model was built


def test_qlora_block_size_checked_before_loading(tmp_path):
    proc, run_dir = run_cli(tmp_path, "lora=qlora", "model.tiny.hidden_size=96", check=False, timeout=120)
    assert proc.returncode != 0 and "model.tiny.hidden_size=96" in proc.stderr + proc.stdout
    assert not (run_dir / "base_model").exists()


def test_sft_cache_key_follows_what_changes_the_warm_up_weights(tmp_path):
    from stepdpo.arith import load
    from stepdpo.run import sft_cache_path

    train = load(n_train=20, n_eval=5, max_operand=9, max_value=30, ops="-").train  # the same data throughout

    def key(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return sft_cache_path(compose("config", overrides=[f"sft_cache_dir={tmp_path}", *overrides]), train)

    base = key()
    assert base.parent == tmp_path
    for same in ("sft.log_every=7", "sft.save_every=100", "trainer=dpo", "trainer.lr=0.5", "eval.n=3"):
        assert key(same) == base, same
    for other in ("sft.lr=0.5", "sft.max_steps=5", "seed=1", "dataset.n_train=10", "model.tiny.hidden_size=64"):
        assert key(other) != base, other


def test_sft_cache_key_follows_the_training_data(tmp_path):
    # the same config over different data (a fixed generator, an edited file) must not reuse a warm-up
    import dataclasses

    from stepdpo.arith import load
    from stepdpo.run import sft_cache_path

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"sft_cache_dir={tmp_path}"])
    train = load(n_train=50, n_eval=5, max_operand=9, max_value=30, ops="-").train
    same = load(n_train=50, n_eval=5, max_operand=9, max_value=30, ops="-").train
    other = load(n_train=50, n_eval=5, max_operand=9, max_value=30, ops="+-").train
    edited = [*train[:-1], dataclasses.replace(train[-1], steps=["2 - 1 = 1", "The answer is 1"])]
    assert sft_cache_path(cfg, train) == sft_cache_path(cfg, same) != sft_cache_path(cfg, other)
    assert sft_cache_path(cfg, edited) != sft_cache_path(cfg, train)


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
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfgs[arm] = compose("config", overrides=[f"experiment={experiment}", f"{key}={arm}"])
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
