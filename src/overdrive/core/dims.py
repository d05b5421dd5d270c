"""Parallel degrees and the one device mesh they define.

A run's ranks form a 4-D grid `pp × dp_replicate × dp_shard × tp` (outermost first: pipeline stages talk
least, tensor-parallel ranks most, so TP groups are the contiguous ranks of one node). Every parallelism takes
its process group from a named dimension of that mesh; data-parallel code uses the flattened "dp" view
(replicate × shard), the ranks that see different data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from overdrive.errors import UsageError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each parallelism; their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1

    @classmethod
    def for_world(
        cls, world_size: int, *, tp: int = 1, pp: int = 1, dp_replicate: int = 1, dp_shard: int | None = None
    ) -> ParallelDims:
        """Degrees for `world_size` ranks; `dp_shard=None` takes whatever tp, pp and replication leave."""
        fixed = tp * pp * dp_replicate
        if min(tp, pp, dp_replicate) < 1 or (dp_shard is not None and dp_shard < 1):
            raise UsageError(
                f"parallel degrees must be positive, got tp {tp} pp {pp} replicate {dp_replicate}"
            )
        if dp_shard is None:
            if world_size % fixed:
                raise UsageError(
                    f"tensor {tp} × pipeline {pp} × replicate {dp_replicate} = {fixed} does not divide the "
                    f"world size {world_size}; launch a multiple of {fixed} ranks or lower the degrees"
                )
            dp_shard = world_size // fixed
        dims = cls(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, pp=pp)
        dims.validate(world_size)
        return dims

    def validate(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise UsageError(
                f"parallel degrees {self.describe()} make {self.world_size} ranks but {world_size} were "
                f"launched; launch {self.world_size} ranks or change the degrees"
            )

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes())

    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    def sizes(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.tp)

    def describe(self) -> str:
        return " × ".join(f"{name} {size}" for name, size in zip(MESH_DIMS, self.sizes(), strict=True))

    def build_mesh(self, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
        """(the named mesh over all ranks, its flattened "dp" view); needs a process group."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, self.sizes(), mesh_dim_names=MESH_DIMS)
        return mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")
