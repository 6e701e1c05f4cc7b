"""Multi-process training under ``torchrun``: process-group setup, model wrapping (DDP or FSDP2),
full (unsharded) state dicts for checkpoints, and small collectives.

One process per device. ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them
everything here is a no-op for one process. The backend is NCCL when CUDA is available and gloo
otherwise (CPU). Untested on CUDA in this project's CI (no GPU); the CPU/gloo path is tested with
two processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistEnv", "setup", "env", "wrap", "full_state", "load_full_state", "all_reduce_sum", "broadcast_object",
           "barrier", "cleanup"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int  # global rank of this process
    world_size: int  # number of processes
    local_rank: int  # rank on this machine (picks the GPU)
    device: torch.device  # the device this process trains on

    @property
    def is_main(self) -> bool:
        """True on rank 0, which logs, evaluates and writes files."""
        return self.rank == 0


def env(device: torch.device | str | None = None) -> DistEnv:
    """This process's :class:`DistEnv` (one process when no process group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(rank, world, local, torch.device(device))


def setup(device: str | None = None) -> DistEnv:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on
    CUDA, gloo on CPU. Returns this process's :class:`DistEnv`."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    dev = None if device is None else (torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
                                       if str(device) == "cuda" and world > 1 else torch.device(device))
    return env(dev)


def cleanup(wait: bool = True) -> None:
    """Destroy the process group if one was initialised; with ``wait``, once every process has got
    here (a process that tears its group down while another still uses it can abort at exit). An
    error path passes ``wait=False``: the other processes may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, e: DistEnv) -> nn.Module:
    """The module to train: ``model`` itself for one process, else DDP or FSDP2 (``fully_shard`` on
    every block, then on the model)."""
    if e.world_size == 1:
        return model
    if strategy == "ddp":
        ids = [e.device.index] if e.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {strategy!r}")


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimiser state dicts keyed by parameter names (the same for one
    process, DDP and FSDP2, so a run can resume under another world size or strategy). Every rank
    must call it (FSDP gathers)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return get_state_dict(inner, optimizer, options=_options(cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load state dicts made by :func:`full_state` into a (wrapped) model and its optimiser."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    set_state_dict(inner, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=_options())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (in place; returns it). No-op for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled). No-op for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    """Wait for all processes. No-op for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
