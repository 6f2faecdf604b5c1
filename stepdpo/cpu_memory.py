"""Bounds on what a CPU training run keeps resident beyond its live tensors: the one place they are set.

Over a whole epoch on CPU the live tensors stay flat while the resident set keeps growing, because every
batch has new shapes (length-grouped, packed batches) and two caches keep something for each:

- **oneDNN's primitive cache.** bf16 matmuls on CPU run through oneDNN, which keeps one compiled primitive
  per GEMM shape, up to 1,024 of them (its default), about 0.5 MB each here. A packed training step creates
  about 26 (forward, reference forward, both backward GEMMs, LoRA's) and then finds them ~2,000 times; some
  shapes come back in later steps, and creating one takes ~3.5 ms. A cap of 128 (~5 steps) kept the tokens/s
  of the default over an epoch and 390 MB less resident; 64 cost 5-12 % of the tokens/s. Fewer shapes help
  too: the loop pads its rows to a multiple of 32 in bf16 on CPU (`train.run_multiple`).
- **glibc's heap.** Tensors up to glibc's mmap threshold come from the heap, and glibc raises that threshold
  (up to 32 MB) every time a larger mmapped block is freed. So after the first big logits buffer, the
  activations of each step are carved out of the heap, and long-lived small allocations between them keep
  the freed space from going back to the OS. A fixed threshold (`mallopt(M_MMAP_THRESHOLD)`, which also
  turns the raising off) maps every block of at least that size on its own and unmaps it when freed. That
  costs a page fault per 4 KB of every such block, ~15 % of the tokens/s at 1 MB, so it is off by default.

Both are process-wide and are left alone when the user set them through the environment
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, `MALLOC_MMAP_THRESHOLD_`) or where the library is not there (a libc
other than glibc). torch does not export oneDNN's `dnnl_set_primitive_cache_capacity`, so the cap goes
through oneDNN's environment variable, which it reads once, when it first creates a primitive: `bound`
must run before the process's first bf16 matmul on CPU (`train` calls it first thing; fp32 matmuls go
through BLAS, not oneDNN, so an fp32 SFT stage before it does not count). Measurements:
docs/experiments/benchmarks.md (session 9).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def bound(primitive_cache: int, mmap_threshold_mb: float) -> dict[str, object]:
    """Cap oneDNN's primitive cache at `primitive_cache` primitives and fix glibc's mmap threshold at
    `mmap_threshold_mb` MB (0 leaves either as it is). Returns what was set, for the run's log."""
    done: dict[str, object] = {}
    if primitive_cache > 0 and "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ:
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(int(primitive_cache))  # read at oneDNN's first primitive
        done["onednn_primitive_cache"] = int(primitive_cache)
    if mmap_threshold_mb > 0 and "MALLOC_MMAP_THRESHOLD_" not in os.environ and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        if libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold_mb * 2**20)) == 1:
            done["mmap_threshold_bytes"] = int(mmap_threshold_mb * 2**20)
    if done:
        log.debug("cpu memory bounds: %s", done)
    return done
