"""`overdrive plan`: the llama3-8b acceptance case, plan.json, bad inputs, and the time model's terms."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from overdrive.cli import main
from overdrive.parallel.strategy import Strategy
from overdrive.search.hardware import DEVICES
from overdrive.search.layout import Layout
from overdrive.search.shape import ModelShape
from overdrive.search.timing import estimate_time, step_flops
from tests.conftest import MICRO_LLAMA, cli_error

LLAMA8B = [
    "plan",
    "--model-config",
    "llama3-8b",
    "--seq",
    "4096",
    "--global-batch-size",
    "128",
    "--device",
    "h100",
    "--gpus-per-node",
    "8",
]


def test_llama3_8b_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    start = time.process_time()  # CPU seconds: wall time on a shared 2-core machine measures the neighbours
    assert main([*LLAMA8B, "--output", str(out)]) == 0
    assert time.process_time() - start < 10
    text = capsys.readouterr().out
    assert "fsdp zero-3" in text and "ddp" in text
    data = json.loads(out.read_text())
    rows = data["candidates"]
    assert rows[0]["fits"]
    by_layout = {}
    for row in rows:
        by_layout.setdefault(row["layout"], []).append(row)
    assert any(r["fits"] for r in by_layout["fsdp zero-3"])
    # plain DDP keeps 16 bytes per parameter (weights, grads, AdamW) on every GPU: never fits 80 GB for 8B
    assert "ddp" not in by_layout or not any(r["fits"] for r in by_layout["ddp"])


def test_ddp_never_fits_llama3_8b() -> None:
    from overdrive.modeling import preset_config
    from overdrive.search.memory import estimate

    shape = ModelShape.from_config(preset_config("llama3-8b"))
    lay = Layout.from_strategy(
        Strategy(data_parallel="ddp", activation_checkpointing="full", kernels=True), 8, 1, 16, "bf16"
    )
    assert estimate(shape, lay, 4096).reserved > DEVICES["h100"].memory_bytes


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["plan", "--device", "tpu9"], "unknown --device"),
        (["plan", "--seq", "0", "--device", "h100"], "--seq must be a positive"),
        (["plan", "--model-config", "nope", "--device", "h100"], "unknown model config"),
        (
            ["plan", "--global-batch-size", "4", "--device", "h100", "--gpus-per-node", "3"],
            "global-batch-size",
        ),
        (["plan", "--model", "/no/such/dir", "--device", "h100"], "not a directory"),
        (["plan", "--lora-r", "0", "--device", "h100"], "--lora-r must be a positive"),
    ],
)
def test_bad_inputs(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert needle in cli_error(argv, capsys)


def test_time_terms() -> None:
    shape = ModelShape.from_config(__import__("transformers").LlamaConfig(**MICRO_LLAMA))
    lay = Layout.from_strategy(Strategy(), 1, 2, 1)
    n, tokens = shape.non_embedding_params(), 2 * 32
    assert step_flops(shape, lay, 32, 2) == (6 * n + 12 * 2 * 64 * 32) * tokens
    full = Layout.from_strategy(Strategy(activation_checkpointing="full"), 1, 2, 1)
    assert (
        step_flops(shape, full, 32, 2)
        == step_flops(shape, lay, 32, 2) + 2 * (2 * shape.layer_params() + 4 * 64 * 32) * tokens
    )
    h100 = DEVICES["h100"]
    ddp = Layout.from_strategy(Strategy(data_parallel="ddp"), 8, 2, 1)
    one = estimate_time(shape, lay, 32, 2, h100)
    assert one.dp_comm == 0 and one.bubble == 0
    assert estimate_time(shape, ddp, 32, 16, h100).compute == pytest.approx(one.compute)


def test_lora_plan_trains_adapters_without_tensor_parallelism(tmp_path: Path) -> None:
    """--lora-r: gradients and optimizer state of the adapters only, no tp layouts, 4·N matmul FLOPs."""
    full, lora = tmp_path / "full.json", tmp_path / "lora.json"
    argv = [
        "plan",
        "--model-config",
        "llama3.2-1b",
        "--seq",
        "2048",
        "--device",
        "h100",
        "--gpus-per-node",
        "2",
    ]
    assert main([*argv, "--output", str(full)]) == 0
    assert main([*argv, "--lora-r", "16", "--output", str(lora)]) == 0
    plans = {name: json.loads(path.read_text()) for name, path in (("full", full), ("lora", lora))}
    assert plans["lora"]["lora_r"] == 16
    assert not any(c["strategy"]["tensor_parallel"] != 1 for c in plans["lora"]["candidates"])
    assert any(c["strategy"]["tensor_parallel"] != 1 for c in plans["full"]["candidates"])
    best = {name: plan["candidates"][0] for name, plan in plans.items()}
    assert best["lora"]["memory"]["optimizer"] < best["full"]["memory"]["optimizer"] / 50
    shape = ModelShape.from_config(__import__("transformers").LlamaConfig(**MICRO_LLAMA))
    one = Layout.from_strategy(Strategy(), 1, 2, 1, lora_rank=4)
    adapters = shape.layers * shape.lora_params_per_layer(4)
    expected = (4 * shape.non_embedding_params() + 6 * adapters + 12 * 2 * 64 * 32) * 2 * 32
    assert step_flops(shape, one, 32, 2) == expected
