"""Child process for test_run_clm_path.py: builds and trains a model the way run_clm.py does.

Run as a script (a fresh interpreter is the point: the kernels' self-test cache starts empty).
``train``: optional ``overdrive.patch_transformers()`` first, then run_clm's logging set-up from real
``TrainingArguments``, ``AutoConfig.from_pretrained`` + ``AutoModelForCausalLM.from_pretrained(dir,
config=..., dtype=...)``, and ``Trainer`` on fixed token rows. ``meta-then-cpu``: a model built on the
meta device, then a CPU one, then a bf16 ``from_pretrained``, all after ``patch_transformers()``.
Writes a JSON result to the given path; the transformers log goes to stderr as in run_clm.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

PATCHED_CLASSES = ("LlamaForCausalLM", "LlamaRMSNorm", "LlamaMLP", "LlamaAttention")


def swapped_per_class(model: nn.Module) -> dict[str, list[int]]:
    """{HF class name: [modules whose class was swapped by overdrive, modules of that class]}."""
    counts: dict[str, list[int]] = {name: [0, 0] for name in PATCHED_CLASSES}
    for module in model.modules():
        cls = type(module)
        original = cls.__dict__.get("_overdrive_original_class", cls)
        if original.__name__ in counts:
            counts[original.__name__][0] += int(original is not cls)
            counts[original.__name__][1] += 1
    return counts


def fixed_rows(vocab: int, rows: int = 16, length: int = 32) -> list[dict[str, list[int]]]:
    """What run_clm's group_texts yields: input_ids, attention_mask, labels (= input_ids)."""
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1234)).tolist()
    return [{"input_ids": r, "attention_mask": [1] * length, "labels": list(r)} for r in ids]


def run_clm_logging(args: TrainingArguments) -> None:
    """run_clm.py's logging set-up: INFO on the main process unless --log_level says otherwise."""
    if args.should_log:
        transformers.utils.logging.set_verbosity_info()
    transformers.utils.logging.set_verbosity(args.get_process_log_level())
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def train(model_dir: str, output_dir: str, steps: int) -> dict[str, Any]:
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    run_clm_logging(args)
    set_seed(args.seed)
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=fixed_rows(config.vocab_size),
        data_collator=default_data_collator,
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "swapped": swapped_per_class(model),
        "losses": [h["loss"] for h in history],
        "grad_norms": [h["grad_norm"] for h in history],
    }


def meta_then_cpu(model_dir: str) -> dict[str, Any]:
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        on_meta = LlamaForCausalLM(config)
    on_cpu = LlamaForCausalLM(config)
    bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    return {
        "meta": swapped_per_class(on_meta),
        "cpu": swapped_per_class(on_cpu),
        "bf16_from_pretrained": swapped_per_class(bf16),
        "default_dtype": str(torch.get_default_dtype()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "meta-then-cpu"])
    parser.add_argument("model_dir")
    parser.add_argument("result")
    parser.add_argument("--patch", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    opts = parser.parse_args()
    if opts.patch:  # the one line, before anything builds a model
        import overdrive

        overdrive.patch_transformers()
    torch.set_num_threads(1)
    if opts.mode == "train":
        result = train(opts.model_dir, str(Path(opts.result).parent / "trainer-out"), opts.steps)
    else:
        result = meta_then_cpu(opts.model_dir)
    Path(opts.result).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
