"""Throughput, FLOPs, MFU and memory — the numbers every seed document's table reports.

FLOPs per token = 6·N + 12·L·d·S, where N counts the non-embedding parameters (a tied lm_head counts: its
matmul runs), L is the number of layers, d the hidden size and S the sequence length. 6·N is the forward (2) and
backward (4) matmul work; 12·L·d·S is attention's QK^T and AV over the sequence. Activation recomputation is not
counted (this is MFU, not HFU).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak TFLOP/s per device (vendor datasheets, no sparsity).
PEAK_TFLOPS_BF16 = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "V100": 125.0,
}


def flops_per_token(non_embedding_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    return 6.0 * non_embedding_params + 12.0 * num_layers * hidden_size * seq_len


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def peak_tflops(device: torch.device) -> float | None:
    """Known peak for the device, or None (CPU peaks vary too much to guess)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, value in PEAK_TFLOPS_BF16.items():
        if key in name:
            return value
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Accelerator: allocator high-water mark. CPU: the process's resident-set high-water mark."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class MetricsWriter:
    """Appends one JSON object per line; each line is flushed so a crash loses at most the line in flight."""

    def __init__(self, path: Path, append: bool = False, tracker: Any = None) -> None:
        self.path = path
        self.tracker = tracker  # overdrive.tracking.Tracker: the same records go to --report-to
        self._fh = open(path, "a" if append else "w")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.tracker is not None:
            self.tracker.log(record["step"], record)

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (the run died mid-write) is dropped with a warning."""
    from overdrive.errors import UsageError

    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                print(f"overdrive: warning: dropped the torn last line of {path}", file=sys.stderr)
                continue
            raise UsageError(
                f"{path} line {number} is not a metrics record; fix or delete that line"
            ) from None
        records.append(record)
    return records


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Loss (train and eval) and throughput against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from overdrive.atomic import write_bytes

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    tps = [r for r in train if r.get("tokens_per_sec")]
    ax_tps.plot([r["step"] for r in tps], [r["tokens_per_sec"] for r in tps], color="tab:green")
    ax_tps.set(xlabel="step", ylabel="tokens/s", title="throughput")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
