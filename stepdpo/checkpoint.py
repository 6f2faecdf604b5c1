"""Exact-resume checkpoints: atomic directories under `<run dir>/checkpoints/<stage>/step_<N>/`.

A checkpoint holds everything the loop needs to continue as if it had never stopped: the
trainable parameters (the LoRA adapter, or the whole model for a full fine-tune), the optimizer
and LR-scheduler state, the torch / python / numpy RNG states of every rank, the step, and the
position in the batch stream (the stream is deterministic in (seed, epoch), so epoch + index is
the whole data state). On CPU with the same thread count, losses after a resume are bitwise equal
to an uninterrupted run's.

Writes are atomic: everything goes to a hidden temp directory next to the target, which is then
renamed into place, so a kill at any moment leaves either the previous checkpoint or the new one,
never a half-written one. Older checkpoints beyond `keep` are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch


STATE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].copy()),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy(), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x):  # random.setstate needs tuples; serialisation may have turned them into lists
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates, by name (adapter weights, or every weight)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor], where: str) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"{where}: its trainable parameters don't match this model's "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); "
                         "resume with the same model and lora groups as the run that wrote it")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise ValueError(f"{where}: parameter {n} has shape {tuple(state[n].shape)}, this model's is "
                                 f"{tuple(p.shape)} (different lora.r or model size?)")
            p.copy_(state[n])


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to `path`; on success rename it to `path` (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        yield tmp
        if path.exists():  # e.g. the same step saved again by a resumed run
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(ckpt_root: str | os.PathLike, step: int, state: dict[str, Any], *, keep: int = 1) -> Path:
    """Atomically write `state` to ckpt_root/step_<step>/ and delete all but the newest `keep`."""
    final = Path(ckpt_root) / f"step_{step:06d}"
    with atomic_dir(final) as tmp:
        torch.save(state, tmp / STATE)
        (tmp / "meta.json").write_text(json.dumps({"step": step, **state.get("meta", {})}, indent=2) + "\n")
        with open(tmp / STATE, "rb") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
    for old in checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ckpt_root, oldest first (temp directories are ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest(ckpt_root: str | os.PathLike | None) -> Path | None:
    if ckpt_root is None:
        return None
    found = checkpoints(ckpt_root)
    return found[-1] if found else None


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    file = path / STATE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (expected {STATE} inside a step_<N> directory)")
    return torch.load(file, map_location="cpu", weights_only=True)


@dataclass
class Resume:
    """Where a resumed run continues from: a run directory, and optionally one pinned checkpoint."""

    run_dir: Path
    pinned: Path | None = None  # trainer.resume=<run dir>/checkpoints/<stage>/step_<N>

    def checkpoint(self, stage: str) -> Path | None:
        """The checkpoint the `stage` (sft, dpo, ...) resumes from, or None to start it fresh."""
        if self.pinned is not None:
            return self.pinned if self.pinned.parent.name == stage else None
        return latest(self.run_dir / "checkpoints" / stage)

    def artifact(self, name: str) -> Path | None:
        """A finished stage's output in the run directory (base_model, pairs.jsonl, ...), if there."""
        p = self.run_dir / name
        return p if p.exists() else None


def resolve_resume(resume: str | None, out: str | os.PathLike) -> Resume | None:
    """`trainer.resume` -> what to continue from.

    null: start fresh. auto: this run's own directory (pass the old one as hydra.run.dir); a
    directory holding nothing to resume just starts fresh, so one command serves both the first
    start and every restart. <path>: a run directory, or one checkpoint directory inside one
    (.../checkpoints/<stage>/step_<N>) to resume that stage from that step.
    """
    if resume in (None, "", "null", "none"):
        return None
    if resume == "auto":
        return Resume(Path(out))
    p = Path(resume).expanduser()
    if p.name == STATE:
        p = p.parent
    if not p.exists():
        raise FileNotFoundError(f"trainer.resume: {p} does not exist (give a run directory, a checkpoint "
                                "directory, auto or null)")
    if _STEP_DIR.match(p.name):
        if not (p / STATE).is_file() or p.parent.parent.name != "checkpoints":
            raise ValueError(f"trainer.resume: {p} is not a complete checkpoint (<run dir>/checkpoints/<stage>/step_<N> "
                             f"with a {STATE})")
        return Resume(p.parent.parent.parent, pinned=p)
    return Resume(p)
