"""Data-parallel training under torchrun: who this process is, and the collective steps.

gloo on the CPU, nccl on CUDA. Gradients are averaged with one flat all-reduce per optimizer
step rather than through the DistributedDataParallel wrapper: the SR methods update D and G
alternately and call D three times per iteration outside any single forward(), which the
wrapper cannot follow. BatchNorm buffers follow rank 0, as with DDP's broadcast_buffers.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 without one), and the collectives
    the training loop needs; each is a no-op in a one-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def decorrelate(self, model, seed: int, start_iter: int) -> None:
        """Each rank draws its own flips and RoI samples (bitwise resume is a one-process guarantee)."""
        if self.world_size == 1:
            return
        import random

        import numpy as np

        rank_seed = seed + 1000 * start_iter + self.rank
        random.seed(rank_seed)
        np.random.seed(rank_seed)
        torch.manual_seed(rank_seed)
        if hasattr(model, "sampling_rng"):
            model.sampling_rng.manual_seed(seed + self.rank)

    def end_step(self, model, record: dict, stopping: bool) -> tuple[dict, bool]:
        """After a step: rank 0's BatchNorm buffers for all, the log averaged over ranks, and a
        stop on any rank stops every rank at the same step."""
        if self.world_size == 1:
            return record, stopping
        broadcast_buffers(model)
        record = reduce_record(record, self.world_size)
        flag = torch.tensor([float(stopping)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return record, bool(flag.item())

    def digests(self, model) -> list[str] | None:
        """Every rank's parameter digest, gathered on all ranks (None in a one-process run)."""
        if self.world_size == 1:
            return None
        digests: list = [None] * self.world_size
        dist.all_gather_object(digests, parameter_digest(model))
        return digests


def init_distributed() -> Distributed:
    """Join the torchrun job named by WORLD_SIZE/RANK/LOCAL_RANK: gloo on the CPU, nccl on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    ddp = Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(ddp.local_rank)
    return ddp


def average_gradients(params: list, world_size: int) -> None:
    """Data parallelism: every rank steps with the mean gradient over all ranks' batches.

    One flat all-reduce per optimizer step. We do this by hand rather than through the
    DistributedDataParallel wrapper because the SR methods update D and G alternately, calling D
    three times per iteration outside any single forward(), which the wrapper cannot follow.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def any_rank(flag: bool, world_size: int, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on any rank: the same answer on every rank, so that all of them take
    (or all skip) a step whose gradients they average."""
    if world_size == 1:
        return flag
    votes = torch.tensor([float(flag)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


def broadcast_buffers(model) -> None:
    """Rank 0's BatchNorm statistics for everyone (DistributedDataParallel's broadcast_buffers),
    so every rank evaluates the same model."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def reduce_record(record: dict, world_size: int) -> dict:
    """Mean of every logged number over the ranks that logged it, so the log describes the global
    batch. Ranks may log different numbers: G's PSNR, say, only where the batch held RoIs for G."""
    numbers = {k for k, v in record.items() if k != "iter" and isinstance(v, (int, float))}
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, numbers)
    keys = sorted(set().union(*everyone))
    sums = torch.tensor([[float(record[k]), 1.0] if k in numbers else [0.0, 0.0] for k in keys], dtype=torch.float64)
    dist.all_reduce(sums)
    return record | {k: total / count for k, (total, count) in zip(keys, sums.tolist())}


def parameter_digest(model) -> str:
    """sha256 of every parameter and buffer: equal digests mean the ranks ended in step."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
