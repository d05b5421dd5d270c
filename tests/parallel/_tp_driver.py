"""Tensor-parallel driver: TP (optionally × FSDP2) against a plain 1-process copy of the same model.

Run under `torchrun --nproc-per-node N`. Every rank also builds the plain model and trains it on the whole
global batch by itself (no collectives: that is the single-process reference), so each case compares, in
one job: the loss of every step, every parameter's gradient after the first backward (gathered with
`full_tensor()`), and the weights after the last step. Results per case go to `--out` as JSON (rank 0).

Loss contract (overdrive's loop): a micro-batch's loss is sum(token CE) / N_global, N_global = target tokens
of the whole global batch; data is split over the data-parallel ranks only (TP ranks of a group see the same
rows). FSDP averages gradients over the dp ranks, so each rank backpropagates loss * dp: the mean of dp
gradients of dp * loss_r is the gradient of sum_r loss_r, the global token-mean loss.
"""

from __future__ import annotations

import argparse
import json
import traceback
import warnings

import torch
import torch.distributed as dist

from overdrive.parallel.tensor import apply_tensor_parallel, tp_loss_context

SEQ = 32
VOCAB = 256
ROWS = 8  # global batch
MICRO = 2  # rows per micro-batch: several accumulated backwards per step on every layout
STEPS = 4
SEED = 7

# name -> (model_type, tied, sequence_parallel, dp_shard, kernels, built on meta)
CASES: dict[str, tuple[str, bool, bool, int, bool, bool]] = {
    "llama-tied-sp": ("llama", True, True, 1, False, False),
    "llama-tied": ("llama", True, False, 1, False, False),
    "llama-untied-sp": ("llama", False, True, 1, False, False),
    "qwen3-sp": ("qwen3", False, True, 1, False, False),
    "qwen3": ("qwen3", False, False, 1, False, False),
    "mistral-sp": ("mistral", False, True, 1, False, False),
    "qwen2-sp": ("qwen2", True, True, 1, False, False),
    "llama-kernels-sp": ("llama", True, True, 1, True, False),
    "qwen3-kernels": ("qwen3", True, False, 1, True, False),
    "meta-qwen3-tied-sp": ("qwen3", True, True, 1, False, True),
    "gemma-generic": (
        "gemma",
        True,
        True,
        1,
        False,
        False,
    ),  # base_model_tp_plan path; SP requested, not applied
    "fsdp-llama-tied-sp": ("llama", True, True, 2, False, False),
    "fsdp-qwen3-untied-kernels": ("qwen3", False, False, 2, True, False),
}


def make_model(model_type: str, tied: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        tie_word_embeddings=tied,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at 1: make them matter, so their sharded gradients are checked
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens; each row's first k labels masked, so micro-batches hold different token counts."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (STEPS, ROWS, SEQ), generator=g)
    labels = ids.clone()
    masked = torch.randint(0, SEQ // 2, (STEPS, ROWS), generator=g)
    for s in range(STEPS):
        for r in range(ROWS):
            labels[s, r, : int(masked[s, r])] = -100
    return ids, labels


def materialize(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Meta-built TP model -> real local shards holding the reference weights (as a loader would)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device="cpu")
    with torch.no_grad():  # non-persistent buffers (rotary inv_freq) are not in any state dict
        for (name, buffer), (ref_name, ref_buffer) in zip(
            model.named_buffers(), ref.named_buffers(), strict=True
        ):
            assert name == ref_name
            buffer.copy_(ref_buffer)
    set_model_state_dict(model, ref.state_dict(), options=StateDictOptions(full_state_dict=True))


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels[..., 1:] != -100).sum()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # eps 1e-5 bounds Adam's amplification of reduction-order noise in near-zero gradients (slope 1/eps)
    return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)


def train_step(model, optimizer, ids, labels, rows, scale: float, group=None) -> tuple[float, dict]:
    """One optimizer step over `rows` of the global batch in micro-batches; returns (global loss, grads)."""
    n_global = target_tokens(labels)
    total = torch.zeros(())
    logits = set()
    for start in range(rows.start, rows.stop, MICRO):
        batch = slice(start, start + MICRO)
        with tp_loss_context(model):
            out = model(input_ids=ids[batch], labels=labels[batch], num_items_in_batch=n_global)
            (out.loss * scale).backward()
        total += out.loss.detach()
        logits.add(out.logits is not None)
    if group is not None:
        dist.all_reduce(total, group=group)
    grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    grads["partial"] = torch.tensor(float(sum(_is_partial(p.grad) for p in model.parameters())))
    grads["logits"] = torch.tensor(float(all(logits)))  # 0: the fused loss ran without logits
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total), grads


def _is_partial(grad: torch.Tensor | None) -> bool:
    """A gradient left as an unreduced sum (it should have been reduced to the parameter's placements)."""
    return any(p.is_partial() for p in getattr(grad, "placements", ()))


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str, float]:
    """max over tensors of max|a-b| / max|b| (and the worst name, and the largest absolute difference)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    worst, name, absolute = 0.0, "", 0.0
    for key in b:
        diff = float((a[key].float() - b[key].float()).abs().max())
        rel = diff / max(float(b[key].abs().max()), 1e-12)
        absolute = max(absolute, diff)
        if rel > worst:
            worst, name = rel, key
    return worst, name, absolute


def run_case(name: str, tp: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model_type, tied, sp, dp, kernels, meta = CASES[name]
    world = dist.get_world_size()
    assert dp * tp == world, f"{name}: dp {dp} x tp {tp} != world {world}"
    ids, labels = make_data()

    ref = make_model(model_type, tied)
    with torch.device("meta" if meta else "cpu"):
        model = make_model(model_type, tied)
    if kernels:  # every kernel, fused linear-CE included; the reference stays plain HF
        from overdrive.patches import patch_model

        report = patch_model(model, strict=True)
        if model_type == "qwen3":  # several token chunks (24, 24, 16) through the vocab-parallel fused CE
            import overdrive.kernels.vocab_parallel_cross_entropy as vocab_parallel

            vocab_parallel.default_chunk_size = lambda *args: 24
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp_shard", "tp"))
    notes = apply_tensor_parallel(model, mesh["tp"], sequence_parallel=sp)
    if meta:
        materialize(model, ref)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight, "tie lost"
    if dp > 1:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp_shard"])
        fully_shard(model, mesh=mesh["dp_shard"])
    ref_opt, opt = make_optimizer(ref), make_optimizer(model)

    dp_rank = mesh["dp_shard"].get_local_rank()
    per_rank = ROWS // dp
    mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    dp_group = mesh["dp_shard"].get_group() if dp > 1 else None
    record: dict = {"notes": notes, "losses": [], "ref_losses": []}
    if kernels:
        record["kernels"] = report.applied
    for step in range(STEPS):
        ref_loss, ref_grads = train_step(ref, ref_opt, ids[step], labels[step], slice(0, ROWS), 1.0)
        loss, grads = train_step(model, opt, ids[step], labels[step], mine, float(dp), dp_group)
        record["losses"].append(loss)
        record["ref_losses"].append(ref_loss)
        if step == 0:
            record["partial_grads"] = int(grads.pop("partial"))
            record["logits"] = bool(grads.pop("logits"))
            ref_grads.pop("partial"), ref_grads.pop("logits")
            record["grad_rel"], record["grad_worst"], record["grad_abs"] = rel_diff(grads, ref_grads)
    weights = {n: _full(p) for n, p in model.named_parameters()}
    record["weight_rel"], record["weight_worst"], record["weight_abs"] = rel_diff(
        weights, dict(ref.named_parameters())
    )
    record["loss_rel"] = max(
        abs(a - b) / abs(b) for a, b in zip(record["losses"], record["ref_losses"], strict=True)
    )
    record["placements"] = _placements(model)
    record["tied"] = model.lm_head.weight is model.get_input_embeddings().weight
    record["tied_config"] = tied
    return record


def _placements(model: torch.nn.Module) -> dict[str, str]:
    from torch.distributed.tensor import DTensor

    return {
        name: [repr(x) for x in p.placements] if isinstance(p, DTensor) else "plain"
        for name, p in model.named_parameters()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    results: dict = {"world_size": dist.get_world_size()}
    try:
        for name in args.cases:
            try:
                results[name] = run_case(name, args.tp)
            except Exception as exc:  # record and go on: one broken case must not hide the others
                results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            if dist.get_rank() == 0:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
