"""Multi-process training helpers (``torchrun``): process group, per-rank shards, reductions.

One process per GPU (or per CPU worker with the gloo backend). Every rank holds the whole decoded
dataset and takes its shard of each epoch through ``DistributedSampler``; only rank 0 writes
checkpoints, logs and reports. ``--batch-size`` stays the GLOBAL batch: each rank takes
``batch_size / world_size`` images per step, so the schedule means the same at any scale (and a
frozen-backbone stage computes exactly the gradients a single process would).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from mediscan.core.ranks import ProcessRank


class DistEnv(ProcessRank):
    """The training run's place among the processes (see :class:`~mediscan.core.ranks.ProcessRank`)."""


def init_distributed(prefer_cuda: bool) -> DistEnv:
    """Join the process group torchrun describes in the environment; a plain run gets a 1-process env."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_nccl = prefer_cuda and torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return env


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def local_batch_size(batch_size: int, env: DistEnv) -> int:
    if batch_size % env.world_size:
        raise ValueError(f"--batch-size {batch_size} (the global batch) must be divisible by the "
                         f"{env.world_size} processes")
    return batch_size // env.world_size


def epoch_indices(n: int, epoch: int, seed: int, env: DistEnv) -> torch.Tensor:
    """This rank's shuffled sample indices for ``epoch`` (interleaved shards of one seeded permutation)."""
    sampler = DistributedSampler(range(n), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a small tensor over all ranks (identity for one process)."""
    if env.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
