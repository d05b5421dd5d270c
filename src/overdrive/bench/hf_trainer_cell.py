"""One HF `Trainer` bench cell, run in its own process: `python -m overdrive.bench.hf_trainer_cell SPEC.json`.

Why a separate process: an out-of-memory cell, a hung collective or a crashed DeepSpeed rank must cost only its
own cell. The spec (written by the runner) names the saved initial model, the tokenized rows and the exact row
order overdrive's loader would use, so Trainer sees the same rows, in the same order, from the same weights.
Trainer runs as users run it — `use_cpu` on CPU, FSDP on several GPUs, the seed's ZeRO-3 config for DeepSpeed —
with a sequential sampler (the rows are already in order) and a callback that timestamps the end of every
optimizer step, exactly where overdrive's own step timer stops.

Rank 0 writes RESULT.json; an out-of-memory error prints a marker line and exits with code 3.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

OOM_MARKER = "OVERDRIVE_BENCH_OOM:"
OOM_EXIT_CODE = 3


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a plain RuntimeError)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def build_trainer(spec: dict[str, Any], clock: Any) -> Any:
    """TrainingArguments first (DeepSpeed ZeRO-3 must see its config before the model is loaded), then the rest."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    on_gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs: dict[str, Any] = {}
    if spec["system"] == "hf-deepspeed":
        kwargs["deepspeed"] = spec["deepspeed_config"]
        if not on_gpu:
            # Trainer needs use_cpu for bf16 on CPU, and use_cpu skips its DeepSpeed process-group setup, so
            # ZeRO-3's init would see a world of 1: start DeepSpeed's group (gloo) first, as its launcher would.
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
    elif on_gpu and world > 1:
        kwargs["fsdp"] = True  # the seed's "PyTorch FSDP" column: Trainer's FSDP, wrapping each decoder layer
    args = TrainingArguments(
        output_dir=spec["trainer_dir"],
        max_steps=spec["warmup_steps"] + spec["steps"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["accumulation_steps"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=spec["weight_decay"],
        adam_beta1=spec["adam_beta1"],
        adam_beta2=spec["adam_beta2"],
        adam_epsilon=spec["adam_epsilon"],
        max_grad_norm=spec["max_grad_norm"],
        optim="adamw_torch",
        bf16=spec["precision"] == "bf16",
        fp16=spec["precision"] == "fp16",
        use_cpu=not on_gpu,
        seed=spec["seed"],
        train_sampling_strategy="sequential",  # rows are pre-ordered as overdrive's loader orders them
        dataloader_drop_last=True,
        logging_steps=1,
        logging_strategy="steps",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **kwargs,
    )
    model = AutoModelForCausalLM.from_pretrained(
        spec["init_dir"],
        dtype=torch.float32,
        attn_implementation=spec["attn_implementation"],
        use_safetensors=True,
    )
    model.config.use_cache = False
    with open(spec["order_file"]) as fh:
        order = json.load(fh)
    rows = load_from_disk(spec["rows_dir"]).select(order)
    return Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=default_data_collator,
        callbacks=[clock],
    )


def make_clock() -> Any:
    """A callback recording when each optimizer step ends (device-synchronised) and each step's logged loss."""
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.step_end: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self.step_end.append(time.perf_counter() - self.start)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepClock()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from overdrive.metrics import device_name, peak_memory_bytes

    clock = make_clock()
    trainer = build_trainer(spec, clock)
    trainer.train()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return {
        "status": "ok",
        "losses": clock.losses,
        "step_end_sec": clock.step_end,
        "peak_memory_bytes": peak_memory_bytes(device),
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "device_name": device_name(device),
    }


def shutdown() -> None:
    """Without this a DeepSpeed rank aborts at exit after a good run (torchrun then reports a failure)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown must not hide the result
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m overdrive.bench.hf_trainer_cell SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = run(spec)
    except BaseException as exc:
        if not is_oom(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"{OOM_MARKER} rank {rank}: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(OOM_EXIT_CODE)  # skip teardown: other ranks may be stuck in a collective
    if rank == 0:
        from overdrive.atomic import write_json

        write_json(Path(spec["result_file"]), result)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
