"""`overdrive train --lora-r R`: adapters through peft, checked against peft and plain HF models (fp32)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from overdrive.cli import main
from overdrive.metrics import read_metrics
from tests.conftest import cli_error, micro_args
from tests.train.test_strategies_e2e import torchrun

TOL = 1e-5
COMMON = [
    "--precision",
    "fp32",
    "--deterministic",
    "--max-steps",
    "10",
    "--global-batch-size",
    "8",
    "--micro-batch-size",
    "4",
    "--logging-steps",
    "1",
    "--learning-rate",
    "1e-2",
    "--lora-r",
    "8",
    "--save-steps",
    "5",
    "--save-total-limit",
    "3",
]
STEP10 = "checkpoints/step-0000010"


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def assert_same_losses(expected: list[float], got: list[float], what: str) -> None:
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(expected, got, strict=True), start=1):
        assert abs(a - b) <= TOL * abs(a), (what, step, a, b)


@pytest.fixture(scope="module")
def lora_run(micro_config, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    assert main(micro_args(micro_config, text_file, out, *COMMON)) == 0
    return out


def reference_logits(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    """Plain HF model + peft adapters with the checkpoint's tensors loaded (no overdrive code)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint / "hf")
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config), LoraConfig.from_pretrained(checkpoint / "hf")
    )
    weights = load_file(str(checkpoint / "model.safetensors"))
    result = model.load_state_dict({f"base_model.model.{k}": v for k, v in weights.items()}, strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    return logits(model, ids)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(_run: Path) -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def test_lora_trains_only_the_adapters(lora_run) -> None:
    got = losses(lora_run)
    assert len(got) == 10 and sum(got[-3:]) / 3 < sum(got[:3]) / 3 - 0.05, got
    summary = json.loads((lora_run / "summary.json").read_text())
    # r × (in + out) per adapted linear layer: 2 layers × (q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128,
    # down 128+64)
    assert summary["trainable_parameters"] == 2 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert sorted(p.name for p in (lora_run / "final").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "base",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_base_weights_are_bit_identical_after_training(lora_run) -> None:
    """The frozen base in the last checkpoint and in final/base is exactly the initial model."""
    from transformers import AutoConfig

    from overdrive.parallel.adapter_outputs import base_weights
    from overdrive.parallel.materialize import build_meta_model, materialize, meta_reference

    config = AutoConfig.from_pretrained(lora_run / STEP10 / "hf")
    model = build_meta_model(config, "sdpa", "float32")
    materialize(model, meta_reference(model), seed=42, device="cpu")
    initial = model.state_dict()
    trained = base_weights(load_file(str(lora_run / STEP10 / "model.safetensors")))
    saved = load_file(str(lora_run / "final" / "base" / "model.safetensors"))
    for name, tensor in initial.items():
        assert torch.equal(trained[name], tensor), name
        assert torch.equal(saved[name], tensor), name


def test_adapter_loads_in_peft_with_the_same_logits(lora_run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = lora_run / "final"
    base = AutoModelForCausalLM.from_pretrained(final / "base", use_safetensors=True)
    model = PeftModel.from_pretrained(base, final)
    ids = sample_ids(lora_run)
    expected = reference_logits(lora_run / STEP10, ids)
    assert (logits(model, ids) - expected).abs().max() <= TOL
    # transformers' own adapter loading follows the base reference in adapter_config.json
    auto = AutoModelForCausalLM.from_pretrained(final)
    assert (logits(auto, ids) - expected).abs().max() <= TOL
    plain = AutoModelForCausalLM.from_pretrained(final / "base", use_safetensors=True)
    assert (logits(plain, ids) - expected).abs().max() > 1e-3  # the adapters changed the model


def test_export_merge_writes_one_model_with_the_same_logits(lora_run, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["export", str(lora_run / STEP10), str(out), "--merge"]) == 0
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert not any("lora" in name for name in merged.state_dict())
    ids = sample_ids(lora_run)
    assert (logits(merged, ids) - reference_logits(lora_run / STEP10, ids)).abs().max() <= TOL
    # without --merge: the adapter and its base, as in OUTPUT/final
    plain = tmp_path / "adapter"
    assert main(["export", str(lora_run / STEP10), str(plain)]) == 0
    a = load_file(str(plain / "adapter_model.safetensors"))
    b = load_file(str(lora_run / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_of_a_full_checkpoint_is_refused(micro_config, text_file, tmp_path, capsys) -> None:
    run = tmp_path / "full"
    argv = micro_args(micro_config, text_file, run, "--max-steps", "1", "--save-steps", "1", "--no-export")
    assert main(argv) == 0
    err = cli_error(
        ["export", str(run / "checkpoints" / "step-0000001"), str(tmp_path / "x"), "--merge"], capsys
    )
    assert "has none; drop --merge" in err


def test_resume_continues_the_lora_curve(lora_run, micro_config, text_file, tmp_path) -> None:
    cut = tmp_path / "cut"
    shutil.copytree(lora_run / "checkpoints" / "step-0000005", cut / "checkpoints" / "step-0000005")
    shutil.copytree(lora_run / "tokenizer", cut / "tokenizer")
    assert main(micro_args(micro_config, text_file, cut, *COMMON, "--resume", "latest")) == 0
    got = {r["step"]: r["loss"] for r in read_metrics(cut / "metrics.jsonl") if "loss" in r}
    expected = losses(lora_run)
    for step in range(6, 11):
        assert abs(got[step] - expected[step - 1]) <= TOL * abs(expected[step - 1]), step


@pytest.mark.parametrize("flag", ["--kernels", "--activation-checkpointing"])
def test_kernels_and_recompute_keep_the_lora_losses(
    flag, lora_run, micro_config, text_file, tmp_path
) -> None:
    """Fused linear-CE (frozen lm_head), RMSNorm, RoPE and SwiGLU, or recompute, with LoRA: the same losses."""
    run = tmp_path / "run"
    assert main(micro_args(micro_config, text_file, run, *COMMON[:-4], flag, "--no-export")) == 0
    assert_same_losses(losses(lora_run), losses(run), flag)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed-zero3"])
def test_two_ranks_match_one_process(strategy, lora_run, micro_config, text_file, tmp_path) -> None:
    out = tmp_path / strategy
    proc = torchrun(micro_args(micro_config, text_file, out, *COMMON, "--strategy", strategy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses(losses(lora_run), losses(out), strategy)
    a = load_file(str(lora_run / "final" / "adapter_model.safetensors"))
    b = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-4, name
    if strategy == "ddp":  # its adapters go through the same DCP save/load as the fsdp leg's resume below
        return
    # resume on the same sharded layout from step 5 continues the single-process curve
    cut = tmp_path / f"{strategy}-cut"
    shutil.copytree(out / "checkpoints" / "step-0000005", cut / "checkpoints" / "step-0000005")
    shutil.copytree(out / "tokenizer", cut / "tokenizer")
    proc = torchrun(
        micro_args(micro_config, text_file, cut, *COMMON, "--strategy", strategy, "--resume", "latest")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {r["step"]: r["loss"] for r in read_metrics(cut / "metrics.jsonl") if "loss" in r}
    expected = losses(lora_run)
    for step in range(6, 11):
        assert abs(got[step] - expected[step - 1]) <= TOL * abs(expected[step - 1]), (strategy, step)


def test_dora_and_modules_to_save_load_in_peft(micro_config, text_file, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "dora"
    extra = ["--use-dora", "--modules-to-save", "lm_head", "--lora-target", "q_proj,v_proj"]
    argv = micro_args(micro_config, text_file, run, *COMMON[:-6], "--lora-r", "4", "--max-steps", "3", *extra)
    argv += ["--save-steps", "3"]
    assert main(argv) == 0
    final = run / "final"
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in adapter) and any("lm_head" in k for k in adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(final / "base"), final)
    ids = sample_ids(run)
    expected = reference_logits(run / "checkpoints" / "step-0000003", ids)
    assert (logits(model, ids) - expected).abs().max() <= TOL


def test_qlora_trains_and_resumes_on_cpu(micro_config, text_file, tmp_path) -> None:
    """bitsandbytes 0.50's CPU backend runs NF4 Linear4bit forward and backward: QLoRA trains on CPU."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "qlora"
    assert main(micro_args(micro_config, text_file, run, *COMMON, "--load-in-4bit")) == 0
    got = losses(run)
    assert sum(got[-3:]) / 3 < sum(got[:3]) / 3 - 0.05, got
    final = run / "final"
    base = load_file(str(final / "base" / "model.safetensors"))
    assert not any(k.endswith("absmax") for k in base)  # the dequantised NF4 base the adapter was trained on
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(final / "base"), final)
    # the checkpoint holds the adapters; the NF4 base is rebuilt, and the curve continues exactly
    cut = tmp_path / "cut"
    shutil.copytree(run / "checkpoints" / "step-0000005", cut / "checkpoints" / "step-0000005")
    shutil.copytree(run / "tokenizer", cut / "tokenizer")
    argv = micro_args(
        micro_config, text_file, cut, *COMMON, "--load-in-4bit", "--resume", "latest", "--no-export"
    )
    assert main(argv) == 0
    resumed = {r["step"]: r["loss"] for r in read_metrics(cut / "metrics.jsonl") if "loss" in r}
    for step in range(6, 11):
        assert abs(resumed[step] - got[step - 1]) <= TOL * abs(got[step - 1]), step


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora-r", "0"], "--lora-r must be positive"),
        (["--lora-r", "8", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
        (["--lora-r", "8", "--lora-target", "q_proj,foo"], "--lora-target foo is not a module of"),
        (["--lora-r", "8", "--lora-target", "embed_tokens"], "not a linear layer"),
        (["--lora-r", "8", "--modules-to-save", "nope"], "--modules-to-save nope is not a module"),
        (["--use-dora"], "--use-dora configures LoRA adapters; add --lora-r"),
        (["--load-in-4bit"], "--load-in-4bit configures LoRA adapters; add --lora-r"),
        (
            ["--lora-r", "8", "--use-dora", "--strategy", "deepspeed-zero3"],
            "not supported with DeepSpeed ZeRO-3",
        ),
        (
            ["--lora-r", "8", "--load-in-4bit", "--strategy", "fsdp"],
            "runs with the single and ddp strategies",
        ),
    ],
)
def test_bad_adapter_flags_fail_in_one_line(
    extra, message, micro_config, text_file, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    err = cli_error(micro_args(micro_config, text_file, out, *extra), capsys)
    assert message in err, err
    assert not out.exists()
