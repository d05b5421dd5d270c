"""Driver for test_materialize: build a tiny Llama on meta, parallelize it, fill it, save gathered weights.

Run under `torchrun --nproc-per-node N`. Each case writes `<out>/<case>-<N>.pt` (rank 0: the full state dict
gathered with torch.distributed.checkpoint, the loss of a fixed batch, facts about the sharding) so the test
can compare it with one process. Cases: fsdp-tied, fsdp-untied (FSDP2 per decoder layer + root on a 1-D mesh),
hsdp (2 replicas x N/2 shards), tp2d (dp 2 x tp 2: overdrive's tensor-parallel transform,
then FSDP2 over dp) and load (load_weights from --checkpoint).
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, LlamaConfig

from overdrive.parallel.materialize import build_meta_model, load_weights, materialize, meta_reference

SEED = 11
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=250,  # not divisible by 4: FSDP2 pads the last shards
    max_position_embeddings=64,
)


def tiny_config(tied: bool) -> LlamaConfig:
    return LlamaConfig(**TINY, tie_word_embeddings=tied)


def shard_fsdp(model: torch.nn.Module, mesh) -> None:
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def apply_tp(model: torch.nn.Module, tp_mesh) -> None:
    """overdrive's tensor-parallel transform (vocab-parallel embedding and lm_head, sequence parallel)."""
    from overdrive.parallel.tensor import apply_tensor_parallel

    apply_tensor_parallel(model, tp_mesh, sequence_parallel=True)


def facts(model: torch.nn.Module) -> dict:
    """Placements per parameter and how many elements this rank holds, to prove the layout was real."""
    placements, local = {}, 0
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            placements[name] = [str(x) for x in p.placements]
            local += p.to_local().numel()
        else:
            local += p.numel()
    return {"placements": placements, "local_numel": local}


def probe_loss(model: torch.nn.Module) -> float:
    """The LM loss of a fixed batch: proves the filled shards are the ones the parallel forward uses."""
    ids = (torch.arange(2 * 16).reshape(2, 16) * 7) % TINY["vocab_size"]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def build_case(case: str, world: int, checkpoint: str | None) -> torch.nn.Module:
    if case == "load":
        model = build_meta_model(AutoConfig.from_pretrained(checkpoint), "sdpa", "float32")
    else:
        model = build_meta_model(tiny_config(tied=case != "fsdp-untied"), "sdpa", "float32")
    reference = meta_reference(model)
    if case == "tp2d":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        apply_tp(model, mesh["tp"])
        shard_fsdp(model, mesh["dp"])
    elif case == "hsdp":
        shard_fsdp(model, init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))
    else:
        shard_fsdp(model, init_device_mesh("cpu", (world,)))
    if case == "load":
        load_weights(model, reference, checkpoint, "cpu")
    else:
        materialize(model, reference, seed=SEED, device="cpu")
    return model


def run_case(case: str, out: Path, checkpoint: str | None) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    record: dict = {}
    try:
        model = build_case(case, world, checkpoint)
        record = {"facts": facts(model), "loss": probe_loss(model), "state_dict": gathered(model)}
        record["facts"]["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
    except Exception as exc:  # recorded for the test to show, then the other cases still run
        record = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if rank == 0:
        torch.save(record, out / f"{case}-{world}.pt")
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        for case in args.cases:
            run_case(case, Path(args.out), args.checkpoint)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
