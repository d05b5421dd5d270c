"""Training driver for the pipeline tests: a tied-embedding tiny Llama (4 layers) on synthetic tokens.

Run under `torchrun --nproc-per-node N` (or plain python for the single-process reference). Variants run one
after the other in one process group (start-up costs more than training here). Each builds the model on meta
and fills it from the same seed, as `overdrive train` does, records per-step losses and grad norms, and after
the first step's backward every parameter's full gradient (gathered on rank 0) for the gradient comparison.
In the "-docs" variants every row packs three documents (position ids restart), which exercises the stages'
document masks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from _parallel_driver import (
    GLOBAL_BATCH,
    MAX_GRAD_NORM,
    MICRO_BATCH,
    SEED,
    SEQ,
    TokenData,
    llama_config,
    make_optimizer,
    make_scheduler,
)
from safetensors.torch import save_file

from overdrive.data.loader import (
    BatchPlan,
    collate,
    count_target_tokens,
    global_batch_indices,
    rank_micro_batches,
)
from overdrive.parallel import Strategy, build_engine
from overdrive.parallel.checkpoint import load_checkpoint, save_checkpoint
from overdrive.parallel.distributed import guard, init_runtime, is_peer_failure, shutdown
from overdrive.parallel.materialize import build_meta_model, materialize, meta_reference

PP = {"data_parallel": "none", "pipeline_parallel": 2}
VARIANTS: dict[str, dict] = {
    "single": {},
    "pp-gpipe": {**PP, "pipeline_schedule": "gpipe"},
    "pp-1f1b": {**PP, "pipeline_schedule": "1f1b"},
    "pp-interleaved-1f1b": {**PP, "pipeline_schedule": "interleaved-1f1b", "virtual_stages": 2},
    "pp-interleaved-zero-bubble": {**PP, "pipeline_schedule": "interleaved-zero-bubble", "virtual_stages": 2},
    "pp-zbv-zero-bubble": {**PP, "pipeline_schedule": "zbv-zero-bubble", "virtual_stages": 2},
    "pp-split": {**PP, "pipeline_split": [1]},  # an explicit, unbalanced split: 1 layer | 3 layers
    "pp-memory": {**PP, "activation_checkpointing": "selective", "activation_offload": True},
    "pp-fsdp": {"data_parallel": "fsdp", "pipeline_parallel": 2},
    "pp-tp": {**PP, "tensor_parallel": 2},
    "pp-tp-nosp": {**PP, "tensor_parallel": 2, "sequence_parallel": False},
    "pp-fsdp-tp": {"data_parallel": "fsdp", "pipeline_parallel": 2, "tensor_parallel": 2},
    "fsdp": {"data_parallel": "fsdp"},
    # packed documents (DocumentData): the single-process reference and the pipeline
    "single-docs": {},
    "pp-1f1b-docs": {**PP, "pipeline_schedule": "1f1b"},
}


class DocumentData(TokenData):
    """TokenData whose rows pack 3 documents each: position ids restart and a document's first label is -100."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(99)
        positions, labels = [], []
        for row in self.columns["labels"]:
            cuts = sorted(torch.randint(2, SEQ - 2, (2,), generator=g).tolist())
            pos = list(range(cuts[0])) + list(range(cuts[1] - cuts[0])) + list(range(SEQ - cuts[1]))
            positions.append(pos)
            labels.append([-100 if p == 0 else t for p, t in zip(pos, row, strict=True)])
        self.columns = {**self.columns, "labels": labels, "position_ids": positions}


def make_meta_model():
    model = build_meta_model(llama_config(num_hidden_layers=4, tie_word_embeddings=True), "sdpa", "float32")
    reference = meta_reference(model)
    return model, lambda m: materialize(m, reference, seed=SEED, device="cpu")


def full_gradients(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient by name, on rank 0 (a collective)."""
    from torch.distributed.tensor import DTensor

    modules = getattr(engine, "stages", None) or [engine.unwrapped_model()]
    grads = {}
    for module in modules:
        for name, p in module.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                grads[name] = g.detach().cpu().clone()
    if not dist.is_initialized():
        return grads
    parts: list = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(grads, parts if dist.get_rank() == 0 else None, dst=0)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged


def run_variant(name: str, args, runtime, data, record: dict, flush) -> None:
    strategy = Strategy.from_dict(VARIANTS[name]).resolved_for(runtime.world_size)
    dims = strategy.parallel_dims(runtime.world_size)
    if runtime.mesh is not None and dims != runtime.dims:
        mesh, dp_mesh = dims.build_mesh(runtime.device.type)
        runtime = dataclasses.replace(runtime, dims=dims, mesh=mesh, dp_mesh=dp_mesh)
    plan = BatchPlan(GLOBAL_BATCH, MICRO_BATCH, runtime.dp_size)
    data = DocumentData() if name.endswith("-docs") else data
    model, fill = make_meta_model()
    engine = build_engine(
        model,
        strategy,
        runtime,
        make_optimizer,
        make_scheduler,
        MAX_GRAD_NORM,
        "fp32",
        micro_batch_size=MICRO_BATCH,
        accumulation_steps=plan.accumulation_steps,
        fill=fill,
    )
    record.update(losses=[], grad_norms=[], engine=type(engine).__name__, start_step=0)
    start = 0
    if args.resume:
        start = int(load_checkpoint(engine, args.resume).extra["step"])
        record["start_step"] = start
    for step in range(start, args.steps):
        indices = global_batch_indices(len(data), plan, SEED, step)
        micros = [collate(data[m]) for m in rank_micro_batches(indices, plan, runtime.dp_rank)]
        n_global = int(
            runtime.all_reduce_sum(torch.tensor(sum(count_target_tokens(b) for b in micros)), "dp")
        )
        loss = engine.forward_backward(micros, n_global).double().cpu()
        record["losses"].append(float(runtime.all_reduce_sum(loss, "dp")))
        if step == start and args.grads:
            grads = full_gradients(engine)
            if runtime.is_main:
                save_file(grads, str(Path(args.grads) / f"{name}.safetensors"))
        record["grad_norms"].append(engine.step(MAX_GRAD_NORM))
        flush()
        if args.save_at == step + 1:
            save_checkpoint(engine, Path(args.ckpt_root) / name, extra={"step": step + 1})
    if args.export:
        weights = engine.full_state_dict()
        if runtime.is_main:
            save_file(
                {k: v.contiguous().clone() for k, v in weights.items()},
                str(Path(args.export) / f"{name}.safetensors"),
            )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--grads", help="directory for the first step's gradients")
    parser.add_argument("--export", help="directory for the final full weights")
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--ckpt-root", default=".")
    parser.add_argument("--resume")
    args = parser.parse_args()
    first = Strategy.from_dict(VARIANTS[args.variants[0]])
    runtime = init_runtime(first if first.is_distributed else None)
    data = TokenData()
    results: dict[str, dict] = {"world_size": runtime.world_size}

    def flush() -> None:
        if runtime.is_main:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))

    with guard(runtime):
        for name in args.variants:
            record: dict = {}
            results[name] = record
            try:
                run_variant(name, args, runtime, data, record, flush)
            except Exception as exc:  # recorded so the other variants still run; the test reports it
                if is_peer_failure(exc):
                    raise
                record["error"] = f"{type(exc).__name__}: {exc}"
                record["traceback"] = traceback.format_exc()
                print(record["traceback"], file=sys.stderr)
            flush()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
