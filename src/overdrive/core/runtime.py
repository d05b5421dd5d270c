"""Where this process runs: its rank, its device, the parallel degrees and the device mesh of the job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from overdrive.core.dims import ParallelDims

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

Group = Literal["world", "dp"]


@dataclass
class Runtime:
    """One rank of a job. Without a process group (a plain single-process run) `mesh` is None."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dims: ParallelDims = field(default_factory=ParallelDims)
    mesh: DeviceMesh | None = None
    dp_mesh: DeviceMesh | None = None  # the flattened (dp_replicate, dp_shard) view of `mesh`

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Ranks that see different data (tensor/pipeline ranks of one data-parallel rank share a batch)."""
        return self.dims.dp

    @property
    def dp_rank(self) -> int:
        if self.dp_mesh is None or self.dims.dp == 1:
            return 0
        return self.dp_mesh.get_local_rank()

    def process_group(self, group: Group) -> object | None:
        """The torch process group of `group` (None = the default world group)."""
        if group == "world" or self.dp_mesh is None:
            return None
        return self.dp_mesh.get_group()

    def all_reduce_sum(self, value: torch.Tensor, group: Group = "world") -> torch.Tensor:
        """Sum a tensor over the ranks of `group` (identity when the group has one rank)."""
        size = self.world_size if group == "world" else self.dp_size
        if size == 1:
            return value
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.process_group(group))
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
