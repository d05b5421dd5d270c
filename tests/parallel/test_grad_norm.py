"""The reported gradient norm: accurate on CPU, and the same number however the gradients are sharded.

Reference: the fp64 norm of the full tensors. Bound 1e-7 relative: fp32 round-off of 16K-element partial norms
(~1e-8 measured) added in fp64; torch's own CPU kernel is ~3e-5 off on the 2M-element tensor used here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from overdrive.parallel.grad_norm import clip_, squared_norm, total_norm

TOL = 1e-7


def big_gradient(seed: int = 0) -> torch.Tensor:
    """An embedding-sized gradient (8000 x 256), small values like a real one."""
    return torch.randn(8000, 256, generator=torch.Generator().manual_seed(seed)) * 1e-3


def test_plain_cpu_norm_is_accurate() -> None:
    grads = [big_gradient(0), big_gradient(1)[:100], torch.randn(7, dtype=torch.bfloat16)]
    exact = sum(float(g.double().square().sum()) for g in grads) ** 0.5
    assert abs(float(total_norm(grads)) - exact) / exact <= TOL


def test_empty_gradients_have_zero_norm() -> None:
    assert float(squared_norm([])) == 0.0


def test_clip_scales_like_torch_clip_grad_norm() -> None:
    """fp32 gradients: torch's clip_grad_norm_ coefficient within fp32 round-off (1e-6 relative); bf16 ones:
    each element is the fp32 product rounded once to bf16, so equal to (g.float() * coef).bfloat16()."""
    params = [torch.nn.Parameter(torch.zeros(300, 40)), torch.nn.Parameter(torch.zeros(17))]
    for p, seed in zip(params, (0, 1), strict=True):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
    ours = [p.grad.clone() for p in params]
    clip_(ours, total_norm(ours), 0.5)
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    for got, want in zip(ours, params, strict=True):
        torch.testing.assert_close(got, want.grad, rtol=1e-6, atol=0)
    small = [g.clone() * 1e-4 for g in ours]
    clip_(small, total_norm(small), 0.5)  # below the bound: untouched
    assert all(torch.equal(a, b * 1e-4) for a, b in zip(small, ours, strict=True))
    half = torch.randn(1000, generator=torch.Generator().manual_seed(2)).bfloat16()
    total = total_norm([half])
    expected = (half.float() * torch.clamp(0.5 / (total + 1e-6), max=1.0).float()).bfloat16()
    clip_([half], total, 0.5)
    assert torch.equal(half, expected)


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = big_gradient(0)
        small = torch.randn(64, generator=torch.Generator().manual_seed(2))
        mesh = init_device_mesh("cpu", (world,))
        mesh_2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
        grads = [
            distribute_tensor(full, mesh, [Shard(0)]),
            distribute_tensor(full, mesh, [Replicate()]),
            distribute_tensor(full, mesh_2d, [Replicate(), Shard(1)]),
            small,  # a plain tensor that every rank holds whole (e.g. under DDP) counts once
        ]
        got = float(total_norm(grads))
        if rank == 0:
            Path(out).write_text(json.dumps({"norm": got}))
    finally:
        dist.destroy_process_group()


def test_sharded_and_replicated_dtensors_count_once(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "norm.json"
    mp.spawn(_sharded_worker, args=(2, port, str(out)), nprocs=2, join=True)
    full = big_gradient(0).double()
    small = torch.randn(64, generator=torch.Generator().manual_seed(2)).double()
    exact = float(3 * full.square().sum() + small.square().sum()) ** 0.5
    got = json.loads(out.read_text())["norm"]
    assert abs(got - exact) / exact <= TOL
