"""Devices as data: memory, peak FLOP/s, the fraction of it training reaches, and link bandwidths.

One table, so a new accelerator is one row. Peaks are the vendors' dense (no sparsity) figures; the achievable
fraction is a typical model-FLOPs utilisation of a well-run decoder training step (it is what turns FLOPs into
seconds, not a promise). On a CPU target nothing is known in advance: `calibrate` measures a matmul rate and a
memory-copy bandwidth for a fraction of a second, and that measured device replaces the row.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from overdrive.errors import UsageError

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Device:
    """One accelerator (or the host CPU) and the links between copies of it."""

    name: str
    memory_bytes: float
    bf16_flops: float  # dense peak, FLOP/s
    fp32_flops: float
    achievable: float  # fraction of peak a training step reaches
    intra_node_bw: float  # bytes/s per device for collectives inside a node (NVLink, or memory on CPU)
    inter_node_bw: float  # bytes/s per device across nodes (InfiniBand/Ethernet)
    memory_bw: float  # bytes/s of device memory
    cuda: bool = True
    calibrated: bool = False

    def flops(self, precision: str) -> float:
        """Achievable FLOP/s for the matmuls of a step in `precision`."""
        peak = self.bf16_flops if precision in ("bf16", "fp16") else self.fp32_flops
        return peak * self.achievable


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device("a100-40g", 40 * GIB, 312e12, 19.5e12, 0.45, 300 * GB, 25 * GB, 1.55e12),
        Device("a100-80g", 80 * GIB, 312e12, 19.5e12, 0.45, 300 * GB, 25 * GB, 2.0e12),
        Device("h100", 80 * GIB, 989e12, 67e12, 0.40, 450 * GB, 50 * GB, 3.35e12),
        Device("h200", 141 * GIB, 989e12, 67e12, 0.42, 450 * GB, 50 * GB, 4.8e12),
        Device("l40s", 48 * GIB, 362e12, 91.6e12, 0.35, 32 * GB, 12.5 * GB, 0.86e12),
        Device("a10g", 24 * GIB, 125e12, 31.2e12, 0.35, 16 * GB, 6.25 * GB, 0.6e12),
        Device("mi300x", 192 * GIB, 1307e12, 163e12, 0.30, 448 * GB, 50 * GB, 5.3e12),
        # A CPU row is only a placeholder: `calibrate` replaces its rates with measured ones.
        Device("cpu", 16 * GIB, 0.2e12, 0.2e12, 1.0, 10 * GB, 1 * GB, 10 * GB, cuda=False),
    )
}

# CUDA device names (torch.cuda.get_device_name) -> table rows, most specific first.
_CUDA_NAMES = (
    ("H200", "h200"),
    ("H100", "h100"),
    ("A100-SXM4-40GB", "a100-40g"),
    ("A100-PCIE-40GB", "a100-40g"),
    ("A100", "a100-80g"),
    ("L40S", "l40s"),
    ("A10G", "a10g"),
    ("MI300X", "mi300x"),
)


def device_named(name: str) -> Device:
    if name not in DEVICES:
        raise UsageError(f"unknown --device {name!r}; use one of {', '.join(DEVICES)}")
    return DEVICES[name]


def detect() -> str:
    """The table row of this machine's first accelerator, or "cpu"."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    for needle, row in _CUDA_NAMES:
        if needle in name:
            return row
    raise UsageError(f"GPU {name!r} is not in overdrive's device table; pass --device with the closest row")


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def calibrate(seconds: float = 0.3) -> Device:
    """This CPU, measured: fp32 and bf16 matmul rates (all threads) and a large memcpy's bandwidth."""
    import torch

    def rate(dtype: torch.dtype, n: int = 512) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            torch.mm(a, b)
            count += 1
        return 2 * n**3 * count / (time.perf_counter() - start)

    src = torch.empty(32 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 3:
        dst.copy_(src)
        count += 1
    copy_bw = 2 * src.numel() * count / (time.perf_counter() - start)
    base = DEVICES["cpu"]
    return dataclasses.replace(
        base,
        memory_bytes=host_memory_bytes(),
        fp32_flops=rate(torch.float32),
        bf16_flops=rate(torch.bfloat16),
        achievable=0.6,  # a step's matmuls are smaller than the probe's and share time with element-wise ops
        intra_node_bw=copy_bw / 4,  # gloo on one host: a few copies per byte reduced
        memory_bw=copy_bw,
        calibrated=True,
    )


def resolve(name: str | None, calibrate_cpu: bool = True) -> Device:
    """--device (or the detected one); a CPU target that is this machine is calibrated."""
    chosen = name or detect()
    device = device_named(chosen)
    if not device.cuda and calibrate_cpu and (name is None or detect() == "cpu"):
        return calibrate()
    return device
