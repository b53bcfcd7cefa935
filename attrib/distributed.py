"""Several processes (torchrun / accelerate launch): who am I, and summing across ranks.

Sharding is by global sequence index modulo the world size, so every rank reads the
same stream and scores or accumulates a disjoint part of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, sequence_index: int) -> bool:
        return sequence_index % self.size == self.rank

    def all_reduce_sum(self, tensors: list) -> None:
        """Sum tensors in place across ranks (no-op on one process)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def reduce_sum(self, tensors: list) -> None:
        """Sum tensors across ranks into rank 0's copies (others' are left unspecified)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for tensor in tensors:
            dist.reduce(tensor, dst=0, op=dist.ReduceOp.SUM)

    def broadcast_object(self, value):
        """Rank 0's `value` on every rank: decisions made once, so all ranks enter the same collectives."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, make):
        """Run `make(is_main)` on rank 0, then on the other ranks (e.g. creating a stage directory)."""
        if self.is_main:
            result = make(True)
            self.barrier()
            return result
        self.barrier()
        return make(False)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then tear the process group down (avoids aborts at exit)."""
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


DEFAULT_COLLECTIVE_TIMEOUT = 6 * 3600.0  # seconds; NCCL's own default (10 min) kills long single-rank steps


def detect_world(device: str, timeout: float = DEFAULT_COLLECTIVE_TIMEOUT) -> World:
    """One process unless launched by torchrun/accelerate (WORLD_SIZE > 1).

    `timeout` (seconds) bounds how long a rank waits in a collective for the others.
    """
    import datetime

    import torch

    from attrib.models import resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(0, 1, resolve_device(device))
    from accelerate import PartialState

    state = PartialState(
        cpu=not torch.cuda.is_available() or device == "cpu", timeout=datetime.timedelta(seconds=timeout)
    )
    resolved = state.device.type if device == "auto" else resolve_device(device)
    if resolved == "cuda":
        resolved = f"cuda:{state.local_process_index}"
    from attrib.runtime import configure

    configure(rank=state.process_index)  # only rank 0 prints progress (others with --debug)
    return World(state.process_index, state.num_processes, resolved)
