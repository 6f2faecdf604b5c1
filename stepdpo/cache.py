"""Where stepdpo keeps what runs share: SFT warm-ups (`sft_cache_dir`), built pairs (`pairs_cache_dir`),
reference log-probs (`trainer.ref_cache_dir`), LLM-judge answers (`reward.engine.cache_path`) and Monte-Carlo rollout
values (`reward.cache_path`). One root for all of them: `$STEPDPO_CACHE_DIR`, else `.cache` in the directory the run was
launched from (Hydra's `runtime.cwd`, also in sweep jobs on other nodes). The configs name it `${stepdpo_cache:...}`.
"""

from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
    """`$STEPDPO_CACHE_DIR/<parts>`, else `<launch dir>/.cache/<parts>`."""
    root = os.environ.get("STEPDPO_CACHE_DIR")
    if not root:
        try:
            from hydra.core.hydra_config import HydraConfig

            launch = HydraConfig.get().runtime.cwd  # set inside a Hydra run or sweep job
        except Exception:  # outside Hydra (scripts, tests, the Python API): the current directory
            launch = os.getcwd()
        root = os.path.join(launch, ".cache")
    return os.path.join(os.path.expanduser(root), *[p for p in parts if p])


def register_resolver() -> None:
    """`${stepdpo_cache:}` (the root) and `${stepdpo_cache:rollout.sqlite}` in YAML."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("stepdpo_cache", lambda *parts: cache_dir(*map(str, parts)), replace=True)
