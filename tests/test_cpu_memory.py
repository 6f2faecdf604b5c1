"""stepdpo.cpu_memory: the bounds really change what oneDNN and glibc do (each check in a fresh process,
since both settings are process-wide and read once)."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from stepdpo.config import TrainerConfig


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "MALLOC_MMAP_THRESHOLD_")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**full, **(env or {})}, timeout=120)


CACHE = """
    import sys, torch
    from stepdpo import cpu_memory
    print(cpu_memory.bound({cap}, 0))
    a, b = torch.randn(64, 96).bfloat16(), torch.randn(96, 128).bfloat16()  # two GEMM shapes, alternating
    c, d = torch.randn(32, 96).bfloat16(), torch.randn(96, 80).bfloat16()
    for _ in range(3):
        a @ b; c @ d
"""


def _cache_events(cap: int) -> tuple[int, int, str]:
    p = _python(CACHE.format(cap=cap), {"ONEDNN_VERBOSE": "profile_create"})  # oneDNN logs each primitive creation
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.count("cache_hit"), p.stdout.count("cache_miss"), p.stdout.splitlines()[0]


@pytest.mark.slow  # builds real-tokenizer models / runs subprocesses: kept out of the fast tier
def test_primitive_cache_cap_reaches_onednn():
    hits, misses, _ = _cache_events(0)  # 0: oneDNN's own default capacity
    if hits + misses == 0:
        pytest.skip("this torch build runs bf16 matmuls without oneDNN primitives")
    assert misses == 2 and hits == 4  # two shapes compiled once, then found in the cache
    hits, misses, done = _cache_events(1)  # room for one: alternating shapes evict each other
    assert (hits, misses) == (0, 6)
    assert "'onednn_primitive_cache': 1" in done


def test_primitive_cache_left_alone_when_the_user_set_it():
    p = _python("from stepdpo import cpu_memory; import os; print(cpu_memory.bound(64, 0), "
                "os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["{}", "7"]


HEAP = """
    import json, torch
    from stepdpo import cpu_memory
    done = cpu_memory.bound(0, {mb})
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    block = torch.ones(16 * 2**20, dtype=torch.uint8)
    del block  # freeing a 16 MB mmapped block raises glibc's (moving) threshold to 16 MB
    big, small = [], []
    for _ in range(100):  # what a step does: 2 MB activations, with small long-lived tensors allocated between them
        big.append(torch.ones(2**19))
        small.append(torch.ones(16))
    before = rss()
    big.clear()  # the step ends: its activations are freed, the small tensors stay
    print(json.dumps({{"done": done, "held_mb": before, "after_free_mb": rss()}}))
"""


@pytest.mark.slow  # a subprocess run: kept out of the fast tier
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_mmap_threshold_returns_freed_activations_to_the_os():
    out = {}
    for mb in (0, 1):
        p = _python(HEAP.format(mb=mb))
        assert p.returncode == 0, p.stderr[-2000:]
        out[mb] = json.loads(p.stdout.splitlines()[-1])
    assert out[0]["done"] == {} and out[1]["done"] == {"mmap_threshold_bytes": 2**20}
    assert out[0]["held_mb"] - out[0]["after_free_mb"] < 50  # glibc's default: the 200 MB freed stay resident
    assert out[1]["held_mb"] - out[1]["after_free_mb"] > 150  # fixed 1 MB threshold: unmapped when freed


@pytest.mark.slow  # a subprocess run: kept out of the fast tier
def test_train_sets_the_bounds_from_the_trainer_config():
    """A CPU training run applies trainer.cpu_* before its first bf16 matmul: every primitive it creates is
    created under the capacity it was given (oneDNN reads it once, at its first primitive)."""
    tests = os.path.dirname(__file__)
    p = _python(f"""
        import os, sys
        sys.path.insert(0, {tests!r})
        from conftest import Recorder, cfg, lora_model, make_examples
        from stepdpo.train import train
        policy, ref, tok = lora_model()
        train(cfg(max_steps=1, precision="bf16", cpu_primitive_cache=5, cpu_mmap_threshold_mb=2), policy, tok,
              make_examples(4), Recorder(), ref_model=ref)
        print("capacity", os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "capacity 5" in p.stdout


def test_trainer_config_defaults_match_the_yaml():
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "conf", "trainer", "dpo.yaml"))
    assert yaml.cpu_primitive_cache == TrainerConfig.cpu_primitive_cache
    assert yaml.cpu_mmap_threshold_mb == TrainerConfig.cpu_mmap_threshold_mb
