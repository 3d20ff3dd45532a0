"""Process-group start-up for torchrun (WORLD_SIZE > 1) and for DeepSpeed's one-process group; gloo on CPU, nccl on
GPU."""
from __future__ import annotations

import os

import torch


def _single_process_rendezvous() -> None:
    """Outside torchrun, describe a one-process group in the environment. Without it DeepSpeed falls back to MPI
    discovery, which needs mpi4py and an MPI launcher."""
    import socket

    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as probe:  # a free local port for the (one-member) rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init_distributed(use_deepspeed: bool) -> tuple[int, int, torch.device]:
    if use_deepspeed:
        _single_process_rendezvous()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 or use_deepspeed:
        join_process_group(device, use_deepspeed=use_deepspeed)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank, world_size, device


def join_process_group(device: torch.device, *, use_deepspeed: bool = False) -> bool:
    """The one way every command starts the process group: nccl on CUDA, gloo on CPU; through DeepSpeed when it runs
    the training. A group a caller already started (the demo pipeline runs generate inside train's) is joined, not
    started again. Returns whether this call started it (its owner destroys it)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if use_deepspeed:
        import deepspeed

        started = not torch.distributed.is_initialized()
        deepspeed.init_distributed(dist_backend=backend)
        return started
    if torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group(backend=backend)
    return True



# -- several processes ------------------------------------------------------------------------------------------------
class ProcessGroup:
    """torchrun's ranks (WORLD_SIZE > 1), or a single process where every collective is a no-op."""

    def __init__(self, device_request: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_request == "auto":
            device_request = "cuda" if torch.cuda.is_available() else "cpu"
        if device_request == "cuda" and self.world > 1:
            device_request = f"cuda:{local_rank}"
        self.device = torch.device(device_request)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._dist = None
        self._owns_group = False
        if self.world > 1:
            self._owns_group = join_process_group(self.device)
            self._dist = torch.distributed

    def barrier(self) -> None:
        if self._dist is not None:
            if self.device.type == "cuda":
                self._dist.barrier(device_ids=[self.device.index])
            else:
                self._dist.barrier()

    def gather(self, value) -> list:
        if self._dist is None:
            return [value]
        values = [None] * self.world
        self._dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self._owns_group:
            self._dist.destroy_process_group()

