"""Precomputed reference log-probs (`trainer.precompute_ref=true`), cached on disk by content.

The reference model never changes during preference training, so its per-token log-probs on the
training examples are computed once, before the loop, and the loop skips the reference forward.
The file is keyed by a hash of what determines it:

    key = blake2b(reference weights (adapter excluded) + model config + precision,
                  tokenizer, token ids of every example)

so every job of a sweep over loss, beta, weighting, lr, LoRA rank... on the same base model and
data reuses one file:

    <trainer.ref_cache_dir>/ref_logps/<key>.pt
        offsets: (n_examples + 1,) int64; values: (total response tokens,) float32
        example i: chosen response tokens at values[offsets[i] : offsets[i] + len(chosen_ids)],
                   its rejected response tokens right after

Parallel jobs are safe: the first to take `<key>.lock` (fcntl) computes and writes atomically
(temp file + rename); the others wait for the lock, then load the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .locks import exclusive_lock
from .batching import IGNORE, Example, PreferenceBatch, collate

VERSION = 1  # bump when the way log-probs are computed changes
VOLATILE_CONFIG_KEYS = {"architectures", "dtype", "torch_dtype", "_name_or_path", "transformers_version", "use_cache",
                        "_commit_hash", "_attn_implementation_autoset", "output_attentions", "output_hidden_states"}


@dataclass
class RefLogps:
    """Reference per-token log-probs of each example's chosen and rejected response tokens."""

    offsets: torch.Tensor  # (n + 1,) int64 into values
    values: torch.Tensor  # (total,) float32

    def for_batch(self, examples: Sequence[Example], idx: Sequence[int], batch: PreferenceBatch) -> torch.Tensor:
        """The (2B, T-1) reference log-probs of `collate([examples[i] for i in idx])`, 0 off-response."""
        n, T = batch.input_ids.shape
        out = torch.zeros((n, T - 1), dtype=torch.float32)  # aligned with labels[:, 1:]
        B = len(idx)
        for row in range(n):
            i = idx[row % B]
            ex, start = examples[i], int(self.offsets[i])
            if row < B:
                lp = self.values[start:start + len(ex.chosen_ids)]
            else:
                lp = self.values[start + len(ex.chosen_ids):int(self.offsets[i + 1])]
                lp = lp[:int((batch.labels[row] != IGNORE).sum())]  # a trimmed side: tokens 0..j only
            p = len(ex.prompt_ids)  # response token k sits at position p + k, predicted at p + k - 1
            lo = max(p - 1, 0)
            out[row, lo:p - 1 + len(lp)] = lp[lo - (p - 1):]
        return out.to(batch.input_ids.device)


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def model_fingerprint(model) -> str:
    """Hash of the reference weights: base weights only (LoRA adapters are excluded), names
    normalised so a peft-wrapped model and the plain model hash alike."""
    h = hashlib.blake2b(digest_size=16)
    items = []
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or "lora_" in name or "modules_to_save" in name:
            continue
        items.append((name.removeprefix("base_model.model.").replace(".base_layer", ""), t))
    for name, t in sorted(items, key=lambda x: x[0]):
        _hash_tensor(h, name, t)
    cfg = getattr(model, "config", None)
    if cfg is not None:  # the architecture; not bookkeeping that save_pretrained or loading fill in
        d = {k: v for k, v in cfg.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr((tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return h.hexdigest()


def examples_fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for ex in examples:
        for ids in (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().data)
    return h.hexdigest()


def cache_key(ref_model, tokenizer, examples: Sequence[Example], *, precision: str, pack: bool = False,
              run_multiple: int = 1) -> str:
    """pack: computed on packed pairs (`collate(pack=True)`), which rounds differently from separate rows (in
    bf16 by up to ~1e-2 per token), so that a run's reference matches its own policy forward at step 0; the same
    for run_multiple (the run rows' padded length changes the GEMM shapes, and with them the rounding)."""
    h = hashlib.blake2b(digest_size=16)
    parts = (f"v{VERSION}", precision, model_fingerprint(ref_model), tokenizer_fingerprint(tokenizer),
             examples_fingerprint(examples)) + (("packed",) if pack else ()) + (
                 (f"run_multiple{run_multiple}",) if run_multiple != 1 else ())
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def compute(ref_fn: Callable[[PreferenceBatch], torch.Tensor], examples: Sequence[Example], pad_id: int, *,
            batch_size: int, device: torch.device, pack: bool = False, run_multiple: int = 1) -> RefLogps:
    """Run `ref_fn` (a batch -> (2B, T-1) reference log-probs) over every example, in length order."""
    lengths = [len(e.chosen_ids) + len(e.rejected_ids) for e in examples]
    offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    values = torch.zeros(int(offsets[-1]), dtype=torch.float32)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]), reverse=True)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate([examples[i] for i in idx], pad_id, trim_rejected=False, pack=pack,
                        run_multiple=run_multiple).to(device)  # every token, whatever
        # the weights: one file serves every weighting of the same pairs
        lp = ref_fn(batch).float().cpu()  # (2B, T-1)
        B = len(idx)
        for row in range(2 * B):
            i, ex = idx[row % B], examples[idx[row % B]]
            ids = ex.chosen_ids if row < B else ex.rejected_ids
            p = len(ex.prompt_ids)
            start = int(offsets[i]) + (0 if row < B else len(ex.chosen_ids))
            lo = max(p - 1, 0)
            values[start + lo - (p - 1):start + len(ids)] = lp[row, lo:p - 1 + len(ids)]
    return RefLogps(offsets, values)


def load_or_compute(cache_dir: str | os.PathLike, key: str, n_examples: int,
                    compute_fn: Callable[[], RefLogps]) -> tuple[RefLogps, bool]:
    """The cached RefLogps for `key`, computing and writing it first if no job has yet.
    Returns (ref, hit)."""
    root = Path(cache_dir).expanduser() / "ref_logps"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{key}.pt"
    if path.exists():
        return _load(path, n_examples), True
    with exclusive_lock(root / f"{key}.lock", "reference log-probs"):  # another job may be computing this very file
        if path.exists():
            return _load(path, n_examples), True
        ref = compute_fn()
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"version": VERSION, "key": key, "offsets": ref.offsets, "values": ref.values}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ref, False


def _load(path: Path, n_examples: int) -> RefLogps:
    d = torch.load(path, map_location="cpu", weights_only=True)
    if d.get("version") != VERSION or len(d["offsets"]) != n_examples + 1:
        raise ValueError(f"{path}: reference log-prob cache of another format or example count "
                         f"({len(d['offsets']) - 1} vs {n_examples}); delete it to recompute")
    return RefLogps(d["offsets"], d["values"])
