"""DistributedDataParallel under ``torchrun``: set-up, device choice, wrapping, teardown.

``torchrun --nproc-per-node 2 -m edge_tl.cli train DATA --out RUN`` (add torchrun's own
rendezvous flags, ``--nnodes``, ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT``, to span
machines). Every rank draws the same global batches and trains on its slice of each;
gradients are averaged, so N processes follow one process on the same global batch. Only
rank 0 writes checkpoints and the run folder. Batch norm in training mode normalises each
process's own slice, as plain DDP does (``--freeze-bn`` makes N processes match one exactly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from edge_tl.errors import EdgeTLError

__all__ = ["Context", "barrier", "device_for", "setup", "teardown", "wrap"]


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Context:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    if rank != 0:
        os.environ["EDGE_TL_QUIET"] = "1"  # one progress bar, from rank 0
    return Context(rank, world, local)


def device_for(ctx: Context, choice: str) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise EdgeTLError("--device cuda, but no CUDA GPU is visible; use --device cpu or auto")
    if choice != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def wrap(ctx: Context, model: nn.Module, device: torch.device) -> nn.Module:
    """The module to train: DDP-wrapped in a process group, else ``model`` itself."""
    if ctx.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


def teardown(ctx: Context) -> None:
    if ctx.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
