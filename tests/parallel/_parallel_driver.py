"""Training driver for the parallel tests: the loop's loss contract on a tiny Llama, losses written as JSON.

Run under `torchrun --nproc-per-node N` (or plain python for one process). Several strategies run one after
the other in the same process group to save start-up time; each gets a fresh model from the same seed.

Loss contract (what overdrive.train.loop does): micro-batch loss = sum(token CE) / N_global, N_global = target
tokens of the whole global batch summed over ranks; engine.forward_backward; one engine.step per global
batch. The recorded loss of a step is the all-reduced sum of micro-batch losses = mean token CE of the batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from overdrive.core.layers import decoder_layers
from overdrive.data.loader import (
    BatchPlan,
    collate,
    count_target_tokens,
    global_batch_indices,
    rank_micro_batches,
)
from overdrive.parallel import Strategy, build_engine
from overdrive.parallel.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from overdrive.parallel.distributed import guard, init_runtime, is_peer_failure, shutdown

GLOBAL_BATCH = 8
MICRO_BATCH = 2
SEQ = 32
SAMPLES = 64
VOCAB = 256
SEED = 7
MAX_GRAD_NORM = 1.0

# Strategy variants the tests name; each is a preset plus overrides.
VARIANTS: dict[str, tuple[str, dict]] = {
    "single": ("single", {}),
    "ddp": ("ddp", {}),
    "fsdp": ("fsdp", {}),
    "zero2": ("zero2", {}),
    "hsdp": ("fsdp", {"data_parallel": "hsdp", "shard_size": 1}),
    "fsdp-ac": ("fsdp", {"activation_checkpointing": "every_k", "ac_every": 2}),
    "ddp-ac": ("ddp", {"activation_checkpointing": "full"}),
    "fsdp-bf16": ("fsdp", {"param_dtype": "bf16", "reduce_dtype": "fp32"}),
    "fsdp-bf16-reduce": ("fsdp", {"param_dtype": "bf16", "reduce_dtype": "bf16"}),
    "ddp-bf16-reduce": ("ddp", {"reduce_dtype": "bf16"}),
    "fsdp-offload": ("zero3-offload", {}),
    "fsdp-compile-ac": ("fsdp", {"compile": True, "activation_checkpointing": "full"}),
    "deepspeed-zero0": ("deepspeed-zero1", {"zero_stage": 0}),
    "deepspeed-zero1": ("deepspeed-zero1", {}),
    "deepspeed-zero2": ("deepspeed-zero2", {}),
    "deepspeed-zero3": ("deepspeed-zero3", {}),
    "deepspeed-zero3-offload": ("deepspeed-zero3-offload", {}),
}


class TokenData:
    """Synthetic rows with a random number of masked (-100) leading labels, so token counts differ per row."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)
        labels = ids.clone()
        masked = torch.randint(0, SEQ // 2, (SAMPLES,), generator=g)
        for row, k in enumerate(masked.tolist()):
            labels[row, :k] = -100
        self.columns = {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, rows: list[int]) -> dict[str, list]:
        return {k: [v[r] for r in rows] for k, v in self.columns.items()}


def llama_config(**overrides):
    """The tests' tiny Llama (hidden 64, 2 layers, vocab 256, sdpa), with `overrides`."""
    from transformers import LlamaConfig

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        attn_implementation="sdpa",
    )
    return LlamaConfig(**{**base, **overrides})


def make_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config())


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    # eps 1e-6, not 1e-8: Adam's step g/(sqrt(v)+eps) has slope 1/eps near g = 0, so an embedding row whose
    # gradient contributions cancel to ~0 turns fp32 reduction-order noise (ZeRO-3 reduces in another order)
    # into weight differences of lr * noise / eps (1.3e-5 seen with 1e-8). 1e-6 bounds that amplification at
    # 100x less while every real bug (scaling, missed sync, wrong shard) still moves losses and weights by far more.
    return torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-6)


def make_scheduler(optimizer: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 3) * max(0.1, 1 - s / 20)
    )


def facts(engine) -> dict:
    """What the engine really is, for the tests' 'is it what it says' checks."""
    out = {"engine": type(engine).__name__, "wrapper": type(engine.model).__name__}
    layers = decoder_layers(engine.unwrapped_model())
    out["checkpointed_layers"] = sum(
        getattr(layer.__dict__.get("forward"), "recompute", None) is not None for layer in layers
    )
    out["compiled_layers"] = sum(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)
    if getattr(engine, "strategy", None) is not None and engine.strategy.data_parallel in ("fsdp", "hsdp"):
        out.update(sharding_report(engine.module))
    if type(engine).__name__ == "DeepSpeedEngine":
        out["zero_stage"] = engine.zero_stage
        out["optimizer"] = type(engine.optimizer).__name__
        param = next(engine.model.module.parameters())
        out["ds_partitioned"] = hasattr(param, "ds_numel") and param.numel() == 0
        out["offload_optimizer"] = bool(engine.config["zero_optimization"].get("offload_optimizer"))
        out["partition_gradients"] = bool(engine.model.zero_optimization_partition_gradients())
    return out


def sharding_report(module: torch.nn.Module) -> dict[str, object]:
    """Facts for the tests: whether parameters are DTensors, on which mesh, where they live, FSDP2's own record."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    first = params[0]
    out: dict[str, object] = {
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "mesh_shape": list(first.device_mesh.shape) if isinstance(first, DTensor) else None,
        "placements": [str(p) for p in first.placements] if isinstance(first, DTensor) else None,
        "param_device": first.to_local().device.type if isinstance(first, DTensor) else first.device.type,
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "numel": sum(p.numel() for p in params),
    }
    try:  # private FSDP2 attributes: best effort
        group = (decoder_layers(module) or [module])[0]._get_fsdp_state()._fsdp_param_group
        out["reshard_after_forward"] = group.post_forward_mesh_info is not None
        out["offload_to_cpu"] = all(p.offload_to_cpu for p in group.fsdp_params)
    except AttributeError:
        pass
    return out


def variant(name: str) -> Strategy:
    preset, overrides = VARIANTS[name]
    return Strategy.from_dict({**Strategy.from_name_or_path(preset).to_dict(), **overrides})


def run_strategy(name: str, args, runtime, data: TokenData, record: dict, flush) -> None:
    strategy = variant(name)
    strategy.validate(runtime.world_size)
    dims = strategy.parallel_dims(runtime.world_size)
    if dims != runtime.dims and runtime.mesh is not None:  # each strategy on its own mesh, as in `train`
        mesh, dp_mesh = dims.build_mesh(runtime.device.type)
        runtime = dataclasses.replace(runtime, dims=dims, mesh=mesh, dp_mesh=dp_mesh)
    plan = BatchPlan(GLOBAL_BATCH, MICRO_BATCH, runtime.dp_size)
    engine = build_engine(
        make_model(),
        strategy,
        runtime,
        make_optimizer,
        make_scheduler,
        MAX_GRAD_NORM,
        "fp32",
        micro_batch_size=MICRO_BATCH,
    )
    record.update(losses=[], grad_norms=[], lrs=[], facts=facts(engine), start_step=0)
    start = 0
    resume = resume_path(args.resume, name)
    if resume:
        state = load_checkpoint(engine, resume)
        start = int(state.extra["step"])
        if state.same_world:
            restore_rng_state(state.extra["rng"])
        record.update(start_step=start, resumed_from_world=state.saved_world_size)
    for step in range(start, args.steps):
        if args.kill_at == step and runtime.rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        micros = [
            collate(data[m])
            for m in rank_micro_batches(
                global_batch_indices(len(data), plan, SEED, step), plan, runtime.dp_rank
            )
        ]
        local = torch.tensor(sum(count_target_tokens(b) for b in micros))
        n_global = int(runtime.all_reduce_sum(local, "dp"))
        total = engine.forward_backward(micros, n_global).double().cpu()
        record["losses"].append(float(runtime.all_reduce_sum(total, "dp")))
        record["grad_norms"].append(engine.step(MAX_GRAD_NORM))
        record["lrs"].append(engine.current_lr())
        flush()
        if args.save_at == step + 1:
            path = Path(args.ckpt_root) / f"{name}-{step + 1}"
            save_checkpoint(engine, path, extra={"step": step + 1, "rng": capture_rng_state()})
            record["saved"] = str(path)
            weights = engine.full_state_dict()  # a collective under FSDP / ZeRO-3: every rank calls it
            if runtime.is_main:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in weights.items()}, f"{path}.full.safetensors")
    del engine


def resume_path(spec: list[str] | None, name: str) -> str | None:
    """--resume PATH (every strategy) or NAME=PATH entries (per strategy)."""
    for item in spec or []:
        key, sep, path = item.partition("=")
        if not sep:
            return item
        if key == name:
            return path
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", nargs="+", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--ckpt-root", default=".")
    parser.add_argument("--resume", nargs="*")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--kill-rank", type=int, default=1)
    args = parser.parse_args()
    runtime = init_runtime(variant(args.strategies[0]))
    data = TokenData()
    results: dict[str, dict] = {"world_size": runtime.world_size}

    def flush() -> None:
        if runtime.is_main:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))

    with guard(runtime):
        for name in args.strategies:
            record: dict = {}
            results[name] = record
            began = time.perf_counter()
            try:
                run_strategy(name, args, runtime, data, record, flush)
            except Exception as exc:  # recorded so the other strategies still run; the test reports it
                if is_peer_failure(exc):
                    raise
                record["error"] = f"{type(exc).__name__}: {exc}"
                record["traceback"] = traceback.format_exc()
                print(record["traceback"], file=sys.stderr)
            record["seconds"] = time.perf_counter() - began
            flush()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
