"""Data-parallel training's world: which rank this process is, and its process group.

A training pod runs ``torchrun --nproc-per-node=<gpus_per_node> -m <entry>``: torchrun
starts one process per GPU and tells each its place through the environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, plus ``MASTER_ADDR``/``MASTER_PORT`` for the rendezvous).
:func:`world_from_env` reads that into a :class:`World`; :func:`joined` holds the process
group for a block. The ranks talk over NCCL on GPUs and gloo on CPUs (the twin's two ranks).

Without torchrun's variables the world is one rank, and everything here is a no-op, so the
same entry point trains on one device. Torch only: no dagster, no flytekit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from homelab_dagster.errors import TrainingError

__all__ = ["World", "barrier", "joined", "mean_across", "world_from_env"]

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class World:
    """This process' place among the ranks of one training run.

    ``rank`` is its index among all ``world_size`` ranks, ``local_rank`` among the ranks of
    its node (the GPU it drives); ``backend`` is ``nccl`` (GPUs) or ``gloo`` (CPUs).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = "gloo"

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(
                f"rank {self.rank} (local {self.local_rank}) does not fit a world of "
                f"{self.world_size}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is neither gloo nor nccl")

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that logs and writes the checkpoint."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one rank: gradients are averaged across them."""
        return self.world_size > 1


def world_from_env(environ: Mapping[str, str] | None = None, backend: str | None = None) -> World:
    """The world torchrun describes in ``environ`` (default ``os.environ``); one rank without it.

    ``backend`` defaults to ``nccl`` where CUDA is available, else ``gloo``; name ``gloo``
    to train several CPU ranks on a machine that has a GPU.

    Raises:
        TrainingError: the variables are not integers or do not describe a valid world.
    """
    env = os.environ if environ is None else environ
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        world_size = int(env.get("WORLD_SIZE", "1"))
        return World(rank=rank, local_rank=local_rank, world_size=world_size, backend=backend)
    except ValueError as exc:
        raise TrainingError(f"torchrun's RANK, LOCAL_RANK and WORLD_SIZE: {exc}") from exc


@contextmanager
def joined(world: World) -> Iterator[World]:
    """Join ``world``'s process group for the block; leave it at the end, also on error.

    The group is initialised from torchrun's environment (``env://``). Where one is already
    initialised (an outer :func:`joined`), this block uses it and leaves it to its owner.
    For one rank nothing happens.

    Raises:
        TrainingError: the rendezvous failed (torchrun's variables missing, peers unreachable).
    """
    if not world.distributed or dist.is_initialized():
        yield world
        return
    if world.backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(world.backend, rank=world.rank, world_size=world.world_size)
    except (RuntimeError, ValueError) as exc:
        raise TrainingError(
            f"rank {world.rank} of {world.world_size} could not join its {world.backend} "
            f"process group: {exc}"
        ) from exc
    try:
        yield world
    finally:
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait until every rank of ``world`` reaches this point (no-op for one rank)."""
    if not world.distributed:
        return
    if world.backend == "nccl":
        dist.barrier(device_ids=[world.local_rank])
    else:
        dist.barrier()


def mean_across(value: torch.Tensor, world: World) -> torch.Tensor:
    """The element-wise mean of ``value`` over the ranks (a new tensor; ``value`` for one rank).

    Every rank must call it with a tensor of the same shape, on its own device (CUDA for
    NCCL). Sum then divide: gloo has no average.
    """
    if not world.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world.world_size
