"""Data parallelism over torch.distributed (gloo on CPU, nccl on GPU), applied from outside the model.

`DataParallel` shards each global batch by rows across ranks and averages gradients with all-reduce
after backward, so every rank takes the same optimiser step a single process would take on the whole
batch; `FullyShardedDataParallel` shards the parameters too (FSDP2). Launch with
`torchrun --nproc-per-node N ...`; `init()` reads torchrun's environment.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun set up (no-op when not launched distributed). -> (rank, world).
    backend: "nccl" (one GPU per process) or "gloo" (CPU tensors); default nccl when CUDA is present."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
            return 0, 1
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":  # one GPU per process
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


class DataParallel:
    """The Trainer's parallel plan: shard batches by rank, all-reduce-average gradients and losses, sum counts."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        # where the process group's collectives take their tensors: NCCL has no CPU backend
        nccl = world > 1 and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] % self.world:
            raise ValueError(f"global batch of {batch.shape[0]} rows does not split over {self.world} ranks")
        return batch[self.rank::self.world]

    def sync_gradients(self, model: torch.nn.Module) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).item()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over ranks (in place): expert loads, so the balancing bias update is the same everywhere;
        target-token counts, so a masked loss is normalised by the global batch's count."""
        if self.world > 1:
            dist.all_reduce(t)
        return t


class FullyShardedDataParallel(DataParallel):
    """FSDP2: parameters sharded over ranks per block (`fully_shard`), gradients reduce-scattered by it."""

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        for block in list(model.layers) + list(model.mtp):
            fully_shard(block)
        fully_shard(model)
        return model

    def sync_gradients(self, model: torch.nn.Module) -> None:
        """FSDP already averaged them."""
