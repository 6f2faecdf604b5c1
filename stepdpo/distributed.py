"""Multi-process data parallelism (torch DDP): `torchrun --nproc_per_node=N -m stepdpo.run ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init()` reads them and
starts a process group (nccl on GPUs, gloo on CPU). Without them everything here is a no-op for a
single process, so the same code path runs with and without torchrun.

The arithmetic lives in `train.train`: one optimizer step consumes one global batch of
batch_size * grad_accum * world_size pairs and each rank takes a disjoint shard of it. Rank 0
alone logs, evaluates, builds pairs and writes files; the others wait at `barrier()`.
See docs/distributed.md.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(hours=2)  # rank 0 may evaluate or build pairs while the others wait


def init() -> tuple[int, int]:
    """Start the process group if launched by torchrun. Returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(name: str = "auto") -> torch.device:
    """`trainer.device` for this process: auto -> this rank's GPU if there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_metrics(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum per-rank metrics over ranks: each is a count, or this rank's share of a global-batch mean."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP-wrap `module` when running multi-process (broadcasts rank 0's weights); else return it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int = 0) -> None:
    """Under torchrun, end this worker process now, once its job is done and its outputs are closed.

    DDP keeps Python references to its process group that outlive both the wrapper and
    `destroy_process_group` (torch 2.13: building one DDP adds 11 and deleting it releases 1), so
    the gloo worker threads stay alive until interpreter teardown. Tearing them down there
    occasionally aborts the process after a finished run ("terminate called without an active
    exception", SIGABRT), and torchrun then reports the whole job as failed. Everything a run
    writes is written and closed before this is called, so the worker flushes its logs and streams
    and leaves through `os._exit`, skipping interpreter teardown. Without torchrun: a no-op."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    cleanup()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say on it
            pass
    os._exit(code)
