"""Predicted step time of a strategy: compute, communication per collective, pipeline bubble, offload.

- compute: model FLOPs per step (6·N·tokens + 12·L·h·S·tokens, as metrics.py counts them; recompute adds the
  forward it repeats) divided over the devices, at the device's achievable rate for the precision; element-wise
  work is memory-bound (activation bytes ÷ memory bandwidth), halved by fused kernels or compile.
- communication: bytes each device sends per collective ÷ the link bandwidth of the group (inside a node or
  across nodes): DDP all-reduce, FSDP/ZeRO all-gather + reduce-scatter, tensor-parallel all-reduces per layer.
  Data-parallel collectives overlap with compute except for a tail; tensor-parallel ones are exposed.
- pipeline: (stages − 1) ÷ (micro-batches + stages − 1) of the step is bubble.
- offload: the optimizer state crosses PCIe twice per step and the CPU runs the update.
- LoRA: frozen weights skip their weight-gradient matmuls (4·N instead of 6·N) and only the adapters'
  gradients are reduced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from overdrive.search import activations as act
from overdrive.search.hardware import Device
from overdrive.search.layout import Layout
from overdrive.search.shape import ModelShape

DP_OVERLAP = 0.8  # share of compute that data-parallel communication can hide behind
PCIE_BW = 25e9
HOST_ADAM_BYTES_PER_S = 10e9


@dataclass
class TimeEstimate:
    """Seconds per optimizer step on one device, by term."""

    compute: float = 0.0
    elementwise: float = 0.0
    dp_comm: float = 0.0
    tp_comm: float = 0.0
    bubble: float = 0.0
    offload: float = 0.0
    total: float = 0.0
    flops_per_device: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def step_flops(shape: ModelShape, lay: Layout, seq: int, global_batch: int) -> float:
    """Model FLOPs of one optimizer step over all devices, with the forward recompute repeats."""
    tokens = global_batch * seq
    layer_fwd = 2 * shape.layer_params() + 4 * shape.hidden * seq  # per token: matmuls + attention scores
    matmul = 6 * shape.non_embedding_params()
    if lay.lora_rank:  # frozen weights get no weight gradient (4·N); the adapters train fully (6·A)
        matmul = 4 * shape.non_embedding_params() + 6 * shape.lora_params(lay.lora_rank)
    base = (matmul + 12 * shape.layers * shape.hidden * seq) * tokens
    recomputed = lay.recomputed_layers(shape.layers)
    return base + recomputed * layer_fwd * tokens


def link(device: Device, group: int, gpus_per_node: int) -> float:
    return device.intra_node_bw if group <= gpus_per_node else device.inter_node_bw


def dp_comm_seconds(shape: ModelShape, lay: Layout, device: Device, gpus_per_node: int) -> float:
    """Gradient reduction and parameter gathering of one step for this device's share of the model."""
    if lay.dp == 1:
        return 0.0
    elems = shape.total_params() / (lay.tp * lay.pp)
    grads = elems  # LoRA: only the adapters have gradients to reduce; frozen sharded weights are still gathered
    if lay.lora_rank:
        grads = shape.lora_params(lay.lora_rank) / (lay.tp * lay.pp)
    frac = (lay.dp - 1) / lay.dp
    grad_b = 2 if lay.reduce_dtype == "bf16" else 4
    param_b = 2 if lay.param_dtype == "bf16" else 4
    bw = (
        link(device, lay.dp * lay.tp * lay.pp, gpus_per_node)
        if lay.dp * lay.tp > gpus_per_node
        else link(device, lay.dp, gpus_per_node)
    )
    if lay.zero_stage == 0:
        volume = 2 * frac * grads * grad_b  # ring all-reduce
    elif lay.zero_stage in (1, 2):
        gathers = lay.accum if (lay.fsdp and lay.zero_stage == 2) else 1
        volume = frac * (grads * grad_b + elems * gathers * param_b)
    else:
        volume = frac * (grads * grad_b + elems * 2 * lay.accum * param_b)
    return volume / bw


def tp_comm_seconds(shape: ModelShape, lay: Layout, seq: int, device: Device, gpus_per_node: int) -> float:
    """Four all-reduces (or reduce-scatter + all-gather pairs) per layer per micro-batch, exposed."""
    if lay.tp == 1:
        return 0.0
    layers = shape.layers / lay.pp
    volume = 2 * (lay.tp - 1) / lay.tp * lay.micro * seq * shape.hidden * lay.compute_bytes
    return 4 * layers * lay.accum * volume / link(device, lay.tp, gpus_per_node)


def estimate_time(
    shape: ModelShape, lay: Layout, seq: int, global_batch: int, device: Device, gpus_per_node: int = 8
) -> TimeEstimate:
    precision = "bf16" if lay.compute_bytes == 2 else "fp32"
    flops = step_flops(shape, lay, seq, global_batch) / lay.world
    compute = flops / device.flops(precision)
    tokens_dev = global_batch * seq / (lay.dp * lay.tp)
    layer_bytes = act.full_layer_bytes_per_token(shape, lay) * shape.layers / lay.pp
    elementwise = 3 * tokens_dev * layer_bytes / device.memory_bw  # written, read in backward, its gradient
    if lay.kernels or lay.compile:
        elementwise /= 2
    dp = dp_comm_seconds(shape, lay, device, gpus_per_node)
    tp = tp_comm_seconds(shape, lay, seq, device, gpus_per_node)
    busy = compute + elementwise
    bubble = busy * (lay.pp - 1) / lay.accum if lay.pp > 1 else 0.0
    offload = 0.0
    if lay.offload != "none" and device.cuda:
        state = 16 * shape.total_params() / (lay.tp * lay.pp * max(lay.shard, 1))
        offload = state / PCIE_BW + state / HOST_ADAM_BYTES_PER_S
    exposed_dp = max(0.0, dp - DP_OVERLAP * busy)
    total = busy + exposed_dp + tp + bubble + offload
    return TimeEstimate(compute, elementwise, exposed_dp, tp, bubble, offload, total, flops)
