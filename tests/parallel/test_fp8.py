"""fp8 linear layers (torchao float8 training): one clear line where they cannot run; on an fp8 GPU the loss
follows the bf16 loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from overdrive.core.runtime import Runtime
from overdrive.errors import UsageError
from overdrive.parallel import Strategy, build_engine
from overdrive.parallel.fp8 import check_fp8, fp8_eligible
from tests.conftest import cli_error, micro_args


def has_fp8_gpu() -> bool:
    return (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (8, 9)
        and importlib.util.find_spec("torchao") is not None
    )


@pytest.mark.skipif(has_fp8_gpu(), reason="this machine can train in fp8")
def test_cpu_run_is_refused_with_one_line(micro_config, text_file, tmp_path: Path, capsys) -> None:
    strategy = tmp_path / "fp8.yaml"
    strategy.write_text("fp8: true\n")
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, text_file, out, "--strategy", str(strategy)), capsys)
    # without torchao the strategy check names the install; with it, the device check names the GPU it needs
    assert "fp8 needs" in err and ("pip install 'overdrive[gpu]'" in err or "CUDA GPU" in err), err
    assert not out.exists()


def test_device_check_names_the_problem_and_the_fix() -> None:
    with pytest.raises(UsageError, match=r"fp8 needs a CUDA GPU .*8\.9.* on cpu; drop fp8 from the strategy"):
        check_fp8(torch.device("cpu"))


def test_strategy_check_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    with pytest.raises(UsageError, match=r"fp8 needs torchao .*pip install 'overdrive\[gpu\]'"):
        Strategy(fp8=True).validate(1)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "torchao" else real(name, *a)
    )
    Strategy(fp8=True).validate(1)  # torchao present: the device is checked when the model is parallelized
    assert Strategy(fp8=True).describe() == "single process, fp8"
    if real("deepspeed") is not None:
        with pytest.raises(UsageError, match="fp8 works with engine torch"):
            Strategy(fp8=True, engine="deepspeed", data_parallel="ddp").validate(1)


def test_only_plain_body_linears_with_fp8_shapes_are_converted() -> None:
    class Quantised(nn.Linear):
        pass

    assert fp8_eligible(nn.Linear(64, 128), "model.layers.0.mlp.up_proj")
    assert not fp8_eligible(nn.Linear(64, 512), "lm_head")
    assert not fp8_eligible(nn.Linear(64, 16), "model.layers.0.self_attn.q_proj.lora_A.default")
    assert not fp8_eligible(
        nn.Linear(64, 24), "model.layers.0.self_attn.k_proj"
    )  # 24 is not a multiple of 16
    assert not fp8_eligible(Quantised(64, 64), "model.layers.0.mlp.down_proj")
    assert not fp8_eligible(nn.LayerNorm(64), "model.norm")


def train_losses(fp8: bool, steps: int = 30) -> tuple[list[float], int]:
    """30 bf16-autocast AdamW steps of a small Llama on CUDA; fp8 swaps its body linears for Float8Linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=2048, max_position_embeddings=256,
    )  # fmt: skip
    device = torch.device("cuda")
    model = LlamaForCausalLM(config).to(device)
    engine = build_engine(
        model,
        Strategy(fp8=fp8),
        Runtime(device=device),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0),
        1.0,
        "bf16",
    )
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 2048, (8, 256), generator=g) for _ in range(3)]
    losses = []
    for step in range(steps):
        ids = data[step % len(data)]
        losses.append(float(engine.forward_backward([{"input_ids": ids, "labels": ids}], ids[:, 1:].numel())))
        engine.step(1.0)
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    return losses, converted


@pytest.mark.gpu
@pytest.mark.skipif(not has_fp8_gpu(), reason="needs a CUDA GPU with compute capability 8.9+ and torchao")
def test_fp8_loss_follows_bf16() -> None:
    bf16, none_converted = train_losses(fp8=False)
    fp8, converted = train_losses(fp8=True)
    assert none_converted == 0 and converted == 4 * 7  # q, k, v, o, gate, up, down of every layer
    assert fp8[-1] < fp8[0] and bf16[-1] < bf16[0]  # both learn the repeated batches
    worst = max(abs(a - b) for a, b in zip(bf16, fp8, strict=True))
    print(f"fp8 vs bf16 over 30 steps: max |Δloss| = {worst:.4f} (final {fp8[-1]:.4f} vs {bf16[-1]:.4f})")
    assert worst <= 5e-2
