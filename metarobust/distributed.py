"""Multi-process training with ``torchrun`` and DistributedDataParallel.

Launch one process per GPU (or CPU worker); each reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from the environment ``torchrun`` sets::

    torchrun --nproc_per_node=2 -m metarobust.cli train configs/at/cifar10_pgd_at.yaml
    torchrun --nnodes=2 --node_rank=0 --master_addr=host0 --nproc_per_node=8 -m metarobust.cli train ...

What each rank does (:class:`metarobust.training.engine.Trainer`): the same
seeded model initialisation (DDP also broadcasts rank 0's weights), the same epoch permutation
of the training images of which it takes a disjoint slice of every global batch (``at.batch_size``
images per rank, so the global batch is ``world_size x at.batch_size``), its own attack noise,
gradients averaged by DDP. Only rank 0 writes the run folder; metrics are averaged over ranks
at each log step (one collective), and hooks' decisions (Fast AT's early stop) use rank means
so that every rank takes the same branch.

Backends: ``nccl`` on CUDA, ``gloo`` on CPU (the tests run two CPU processes with gloo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node,
    and the ``device`` it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder and prints."""
        return self.rank == 0


def single(device: torch.device) -> DistInfo:
    """A one-process "world" on ``device``."""
    return DistInfo(0, 1, 0, device)


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process launch (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``); without them, a single process.

    Args:
        device: the config's ``device`` (``auto``: CUDA if available). On CUDA each rank takes
            ``cuda:LOCAL_RANK``.
        backend: ``nccl`` (CUDA) or ``gloo`` (CPU); ``None`` picks by device.

    Example:
        >>> info = init_from_env("auto")
        >>> info.rank, info.world_size
    """
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not launched_by_torchrun():
        return single(torch.device(("cuda" if device == "auto" else device) if use_cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def all_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``tensor`` summed over ranks (a copy; itself when not distributed)."""
    if not info.distributed:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``tensor`` averaged over ranks (gloo has no AVG reduction, so a sum divided)."""
    return all_sum(tensor, info) / info.world_size if info.distributed else tensor


def average_gradients(params: list[torch.Tensor], info: DistInfo) -> None:
    """Average ``.grad`` of ``params`` over the ranks in place, as one flattened all-reduce (the
    meta-gradient of a meta-batch whose tasks are split across ranks; DDP does this for plain
    training). A parameter without a gradient (the same on every rank) takes part as zeros and
    is left without one, so the optimizer skips it as a single process would."""
    if not info.distributed:
        return
    missing = [p.grad is None for p in params]
    grads = [torch.zeros_like(p) if none else p.grad for p, none in zip(params, missing)]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p, g, none in zip(params, grads, missing):
        p.grad = None if none else flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small picklable objects only)."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when distributed (itself otherwise)."""
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (at the end of a torchrun launch)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistInfo", "all_mean", "average_gradients", "all_sum", "barrier", "cleanup", "gather_objects", "init_from_env",
           "launched_by_torchrun", "single", "wrap"]
