"""HF Trainer + overdrive: patch_transformers() and OverdriveTrainer give the same losses as plain HF."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import overdrive
from overdrive.hf import OverdriveCallback, OverdriveTrainer
from overdrive.patches import unpatch_transformers
from overdrive.patches._swap import is_swapped
from tests.numerics import single_thread  # noqa: F401  (autouse: tiny models run single-threaded)

VOCAB = 257


class _Tokens(Dataset):
    """Deterministic toy LM data: noisy arithmetic progressions (learnable, offline)."""

    def __init__(self, n: int = 64, length: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 5, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(length)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(cfg)


def _train(
    tmp_path: Path, trainer_cls: type = Trainer, **extra: object
) -> tuple[list[float], torch.nn.Module]:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,  # exercises num_items_in_batch
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    trainer = trainer_cls(model=_model(), args=args, train_dataset=_Tokens(), **extra)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6
    return losses, trainer.model


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], torch.nn.Module]:
    return _train(tmp_path_factory.mktemp("plain"))


def test_patch_transformers_with_trainer_same_losses(tmp_path: Path, plain_run) -> None:
    plain, plain_model = plain_run
    assert not any(is_swapped(m) for m in plain_model.modules())
    overdrive.patch_transformers()
    try:
        patched, patched_model = _train(tmp_path / "patched")
    finally:
        unpatch_transformers()
    assert is_swapped(patched_model) and is_swapped(patched_model.model.layers[0].mlp)
    assert plain[-1] < plain[0]
    for a, b in zip(patched, plain, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b) + 1e-6


@pytest.mark.parametrize("how", ["trainer", "callback"])
def test_overdrive_trainer_and_callback(tmp_path: Path, how: str, plain_run) -> None:
    plain, _ = plain_run
    if how == "trainer":  # the whole strategy: kernels + checkpointing + regional compile
        opts = {
            "activation_checkpointing": True,
            "compile": "regional",
            "compile_kwargs": {"backend": "aot_eager"},
        }
        losses, model = _train(tmp_path, trainer_cls=OverdriveTrainer, overdrive=opts)
        assert model.model.layers[0]._compiled_call_impl is not None
        assert model.is_activation_checkpointing
    else:  # kernels only, through the callback
        losses, model = _train(tmp_path, callbacks=[OverdriveCallback()])
    assert is_swapped(model) and is_swapped(model.model.norm)
    for a, b in zip(losses, plain, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)


def test_example_trainer_script_gives_the_plain_hf_loss(tmp_path: Path) -> None:
    """examples/hf_trainer_clm.py (the documented one-line change) trains to the loss of the plain script."""
    example = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_clm.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def final_loss(*flags: str) -> float:
        proc = subprocess.run(
            [sys.executable, str(example), "--max-steps", "4", *flags],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        found = re.search(r"final train loss ([0-9.]+)", proc.stdout + proc.stderr)
        assert found, proc.stdout[-2000:]
        return float(found.group(1))

    with_overdrive, plain = final_loss(), final_loss("--no-overdrive")
    assert with_overdrive == pytest.approx(plain, abs=2e-4)  # fp32; the script prints 4 decimals
