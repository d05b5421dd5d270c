"""Per-device peak memory of one training step under a strategy, as formulas of the config.

The step is walked through its phases — forward and loss, loss backward, lm_head backward, each decoder layer's
backward (last to first), the optimizer step — and the bytes live in each phase are added up: persistent state
(parameters, optimizer state, communication buffers that live all run), gradients as they appear, the saved
activations still waiting for their backward, and the phase's own temporaries. The peak is the largest phase;
its terms are the breakdown `overdrive plan` prints. Live bytes are what `max_memory_allocated` (CUDA) or the
live-tensor tracker (CPU) measures; `reserved` adds the allocator margin and the CUDA context for the fit test.
See docs/plan.md for every term and the measured check (benchmarks/memory_model.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from overdrive.search import activations as act
from overdrive.search.layout import Layout
from overdrive.search.shape import ModelShape

F32 = 4
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size (elements): ZeRO-2/3's contiguous gradient bucket
DEEPSPEED_PERSISTENCE = 100_000  # stage3_param_persistence_threshold: smaller tensors are never partitioned
CUDA_MARGIN = 0.08  # caching-allocator fragmentation over the live peak (GPU targets)
CUDA_CONTEXT = 600 * 2**20  # CUDA context, cuBLAS/NCCL workspaces
GPU_CHUNK_ELEMENTS = 1 << 25  # overdrive.kernels.fused_linear_cross_entropy chunking (imported lazily there)
CPU_CHUNK_ELEMENTS, CPU_MAX_CHUNK_ELEMENTS = 1 << 22, 1 << 26

COMPONENTS = ("params", "grads", "optimizer", "activations", "loss", "comm", "transient")


@dataclass
class MemoryEstimate:
    """Bytes per device at the predicted peak, by term; `live` is their sum, `reserved` the fit figure."""

    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    loss: float = 0.0
    comm: float = 0.0
    transient: float = 0.0
    phase: str = ""
    margin: float = 0.0
    per_layer_activation: dict[str, float] = field(default_factory=dict)

    @property
    def live(self) -> float:
        return sum(getattr(self, name) for name in COMPONENTS)

    @property
    def reserved(self) -> float:
        return self.live + self.margin

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(live=self.live, reserved=self.reserved)
        return out


@dataclass(frozen=True)
class Stage:
    """The part of the model one device holds: its layers, and whether it has the embedding / the head."""

    layers: int
    first: bool
    last: bool
    in_flight: int  # micro-batches whose activations are alive at once (1F1B: stages - index)


def stages(shape: ModelShape, lay: Layout) -> list[Stage]:
    """First and last pipeline stage (the extremes of memory); layers split evenly, the first gets the rest."""
    if lay.pp == 1:
        return [Stage(shape.layers, True, True, 1)]
    per, extra = divmod(shape.layers, lay.pp)
    in_flight = min(lay.pp, lay.accum)
    return [Stage(per + (extra > 0), True, False, in_flight), Stage(per, False, True, 1)]


def fused_chunk(tokens: int, vocab: int, hidden: int, cuda: bool) -> int:
    """Tokens per chunk of the fused linear-CE (the same rule as the kernel)."""
    if cuda:
        per = GPU_CHUNK_ELEMENTS // max(vocab, 1)
    else:
        per = min(
            max(CPU_CHUNK_ELEMENTS // max(vocab, 1), 2 * hidden), CPU_MAX_CHUNK_ELEMENTS // max(vocab, 1)
        )
    return max(1, min(1 << (max(per, 1).bit_length() - 1), tokens))


def loss_phases(shape: ModelShape, lay: Layout, tokens: int, cuda: bool) -> dict[str, float]:
    """Bytes of the lm_head + loss in its forward peak, its backward peak and the lm_head backward."""
    v, h, c = shape.vocab / lay.tp, shape.hidden, lay.compute_bytes
    grad_w = 0.0 if lay.lora_rank else F32 * v * h  # a frozen (LoRA) head gets no gradient
    if lay.kernels:
        chunk = fused_chunk(tokens, int(v), h, cuda)
        work = F32 * chunk * v + (c * chunk * v + c * v * h if c == 2 else 0)
        kept = c * tokens * h + grad_w  # grad_x and the fp32 grad_w, computed in forward
        back = kept + c * tokens * h + grad_w + (F32 * tokens * h if c == 2 else 0)
        return {"forward": kept + work, "backward": back, "head": 0.0}
    logits = c * tokens * v
    forward = logits + F32 * tokens * v + (F32 * tokens * v if c == 2 else 0)
    backward = 3 * F32 * tokens * v
    head = logits + grad_w + (c * v * h if c == 2 else 0) + c * tokens * h
    return {"forward": forward, "backward": backward, "head": head}


def local_params(shape: ModelShape, lay: Layout, stage: Stage) -> dict[str, float]:
    """Elements of this device's parameters before data-parallel sharding: layers, embedding+head+norm."""
    layer = shape.layer_matmul_params() / lay.tp + 2 * shape.hidden
    root = (shape.embed_params() / lay.tp if stage.first else 0) + (
        (shape.head_params() / lay.tp + shape.hidden) if stage.last else 0
    )
    if stage.last and shape.tied and not stage.first:
        root += shape.embed_params() / lay.tp  # a tied head on its own stage holds its own copy
    trainable = stage.layers * shape.lora_params_per_layer(lay.lora_rank) / lay.tp  # this stage's layers
    return {"layer": layer, "layers": stage.layers * layer, "root": root, "trainable": trainable}


def trainable_elems(n: dict[str, float], lay: Layout) -> tuple[float, float]:
    """(elements with gradients and optimizer state, of them one layer's): all, or LoRA's adapters only."""
    if lay.lora_rank:
        return n["trainable"], n["trainable"] / max(1, n["layers"] / n["layer"])
    return n["layers"] + n["root"], n["layer"]


def deepspeed_resident(shape: ModelShape, lay: Layout, elems: float) -> float:
    """ZeRO-3 keeps tensors under the persistence threshold whole on every rank."""
    small = sum(s for s in shape.param_tensors_per_layer() if s < DEEPSPEED_PERSISTENCE) * shape.layers
    small += shape.hidden
    return small + (elems - small) / lay.dp


def state_bytes(shape: ModelShape, lay: Layout, stage: Stage, cuda: bool) -> dict[str, float]:
    """Persistent bytes: parameters, optimizer state (AdamW: 2 fp32), gradients after backward, buffers."""
    n = local_params(shape, lay, stage)
    trained, _ = trainable_elems(n, lay)
    total = n["layers"] + n["root"] + (n["trainable"] if lay.lora_rank else 0)
    shard = lay.shard if lay.zero_stage >= 1 else 1
    params = F32 * total
    if lay.fsdp or (lay.deepspeed and lay.zero_stage == 3):
        params = F32 * (deepspeed_resident(shape, lay, total) if lay.deepspeed else total / shard)
    grads = F32 * trained / (shard if lay.fsdp or lay.zero_stage >= 2 else 1)
    optimizer = 2 * F32 * trained / shard
    persistent_comm = 0.0
    if lay.data_parallel == "ddp" and lay.engine == "torch" and lay.world > 1:
        persistent_comm = F32 * trained  # DDP's gradient buckets (gradient_as_bucket_view is off)
    if lay.deepspeed and lay.param_dtype == "bf16":
        params = params / 2  # the module runs in bf16; the fp32 master lives with the optimizer
        grads = grads / 2
    if lay.deepspeed and lay.zero_stage >= 1:
        optimizer += F32 * trained / lay.dp  # fp32 master partition of the flat groups
        if lay.zero_stage >= 2:
            persistent_comm += grads  # the flat gradient partition is allocated up front
            # and one reduce bucket of reduce_bucket_size elements, whatever the model's size
            persistent_comm += DEEPSPEED_REDUCE_BUCKET * (2 if lay.param_dtype == "bf16" else F32)
    if cuda and lay.offload != "none":
        optimizer = 0.0
        if lay.offload == "optimizer+params":
            params, grads = 0.0, 0.0 if lay.fsdp else grads
    return {"params": params, "optimizer": optimizer, "grads": grads, "comm": persistent_comm}


def gathered_bytes(shape: ModelShape, lay: Layout, stage: Stage) -> dict[str, float]:
    """Unsharded parameters FSDP2 holds: the root's (kept through forward and backward) and the layers'."""
    n = local_params(shape, lay, stage)
    p = 2 if lay.param_dtype == "bf16" else F32
    if lay.deepspeed and lay.zero_stage == 3 and lay.dp > 1:
        # ZeRO-3 gathers a module's partitioned tensors for its forward/backward, prefetching the next one;
        # the largest module is the embedding (or head): it is gathered while the loss runs
        big = max(p * n["layer"], p * shape.embed_params() / lay.tp)
        return {"root": 0.0, "forward": p * n["layer"] + big, "backward": p * n["layer"] + big}
    if not lay.fsdp or lay.shard == 1:
        return {"root": 0.0, "forward": 0.0, "backward": 0.0}
    layer = p * n["layer"]
    if lay.zero_stage == 2:  # ZeRO-2: every layer stays gathered from its forward to its backward
        all_layers = p * n["layers"]
        return {"root": p * n["root"], "forward": all_layers, "backward": all_layers}
    return {"root": p * n["root"], "forward": 2 * layer, "backward": 2 * layer}


def layer_modes(shape: ModelShape, lay: Layout, count: int) -> list[str]:
    """Recompute mode of each layer of a stage: none, full (the checkpoint keeps the input) or selective."""
    if lay.recompute == "full":
        return ["full"] * count
    if lay.recompute == "every_k":
        return ["full" if i % max(1, lay.ac_every) == 0 else "none" for i in range(count)]
    if lay.recompute == "selective":
        return ["selective"] * count
    return ["none"] * count


def stored(shape: ModelShape, lay: Layout, tokens: int, mode: str) -> float:
    if mode == "full":
        return tokens * act.input_bytes_per_token(shape, lay)
    if mode == "selective":
        return tokens * act.selective_bytes_per_token(shape, lay)
    return tokens * act.full_layer_bytes_per_token(shape, lay) + act.weight_cast_bytes(shape, lay)


def stage_peak(shape: ModelShape, lay: Layout, seq: int, stage: Stage, cuda: bool) -> MemoryEstimate:
    """Walk one step of this stage's last micro-batch and keep the largest phase."""
    tokens = lay.micro * seq
    n = local_params(shape, lay, stage)
    state = state_bytes(shape, lay, stage, cuda)
    gathered = gathered_bytes(shape, lay, stage)
    modes = layer_modes(shape, lay, stage.layers)
    kept = [stored(shape, lay, tokens, m) for m in modes]
    full = stored(shape, lay, tokens, "none")
    outer = tokens * (8 + 8)  # token ids kept by the embedding, shifted labels
    if stage.last:
        outer += tokens * act.final_norm_bytes_per_token(shape, lay)
    outer += act.rope_bytes(shape, seq)
    mb_acts = sum(kept) + outer
    other = (stage.in_flight - 1) * mb_acts
    loss = loss_phases(shape, lay, tokens, cuda) if stage.last else {"forward": 0, "backward": 0, "head": 0}
    trained, grad_elems_layer = trainable_elems(n, lay)
    unsharded_grads = (2 if lay.param_dtype == "bf16" else F32) * trained
    # gradients already there when the last micro-batch starts: FSDP without sync accumulates them unsharded
    if lay.accum > 1:
        acc = (
            unsharded_grads
            if lay.fsdp
            else (0.0 if lay.deepspeed and lay.zero_stage >= 2 else state["grads"])
        )
    else:
        acc = 0.0
    base = {
        "params": state["params"],
        "optimizer": state["optimizer"],
        "comm": state["comm"] + gathered["root"],
    }
    phases: list[tuple[float, tuple]] = []

    def add(phase: str, grads: float, acts: float, loss_b: float, comm: float, transient: float) -> None:
        terms = (base["params"], grads, base["optimizer"], acts, loss_b, base["comm"] + comm, transient)
        phases.append((sum(terms), (*terms, phase)))

    add("forward", acc, other + mb_acts, loss["forward"], gathered["forward"], 0.0)
    if stage.last:
        add("loss backward", acc, other + mb_acts, loss["backward"], gathered["backward"], 0.0)
        if loss["head"]:
            head_grad = 0.0 if lay.lora_rank else F32 * shape.vocab * shape.hidden / lay.tp
            add("lm_head backward", acc + head_grad, other + mb_acts, loss["head"], gathered["backward"], 0.0)
    # the head (and final norm) gradients exist once the loss backward is through; the embedding's at the end
    head_elems = (shape.vocab * shape.hidden / lay.tp + shape.hidden) if stage.last and not lay.lora_rank else 0.0
    # (a tied head's gradient waits in autograd's input buffer for the embedding's, beside the accumulated one)
    done = (
        F32 * head_elems / (lay.shard if lay.fsdp else 1) if acc == 0 else acc + F32 * head_elems * shape.tied
    )
    below = sum(kept)
    back_work = act.backward_work_bytes(shape, lay, tokens)
    layer_grad, grad_step = layer_gradients(lay, grad_elems_layer)
    rs = grad_elems_layer * (2 if lay.reduce_dtype == "bf16" else F32) if lay.fsdp and lay.shard > 1 else 0.0
    # every term is linear in k within a recompute pattern of period `every`, so the largest layer phase is
    # among the first and the last `every` layers: only those are walked (the sums still cover every layer)
    every = max(1, lay.ac_every) if lay.recompute == "every_k" else 1
    walked = set(range(min(every + 1, stage.layers))) | set(
        range(max(0, stage.layers - every - 1), stage.layers)
    )
    for k in reversed(range(stage.layers)):
        below -= kept[k]
        if k not in walked:
            done += grad_step if acc == 0 else 0.0
            continue
        work = full + back_work + (kept[k] if modes[k] == "full" else 0)
        down = lay.lora_rank * (shape.intermediate + shape.hidden) or shape.hidden * shape.intermediate / lay.tp
        mlp_grad = layer_grad * down / grad_elems_layer  # down_proj's (its adapter's under LoRA)
        add(
            f"layer {k} backward",
            done + mlp_grad,
            other + outer + below,
            0.0,
            gathered["backward"] + rs,
            work,
        )
        done += grad_step if acc == 0 else 0.0
    if stage.first and not lay.lora_rank:  # a frozen embedding has no backward
        add("embedding backward", *embedding_phase(shape, lay, state, acc, other), gathered["backward"], 0.0)
    add("optimizer", state["grads"], other, 0.0, 0.0, optimizer_temporaries(lay, state))
    best = MemoryEstimate(*max(phases, key=lambda p: p[0])[1])
    best.per_layer_activation = {
        "none": full / max(tokens, 1),
        "full": tokens * act.input_bytes_per_token(shape, lay) / max(tokens, 1),
        "selective": tokens * act.selective_bytes_per_token(shape, lay) / max(tokens, 1),
    }
    best.margin = (CUDA_MARGIN * best.live + CUDA_CONTEXT) if cuda else 0.0
    return best


def layer_gradients(lay: Layout, elems: float) -> tuple[float, float]:
    """(bytes of a layer's gradients as backward makes them, bytes they leave resident afterwards).

    FSDP2 makes them unsharded in the parameter dtype and keeps the fp32 shard; DeepSpeed ZeRO-2/3 reduces
    them into its flat partition (already counted); otherwise they stay as made.
    """
    made = (2 if lay.param_dtype == "bf16" and (lay.fsdp or lay.deepspeed) else F32) * elems
    if lay.fsdp:
        return made, F32 * elems / lay.shard
    if lay.deepspeed and lay.zero_stage >= 2:
        return made, 0.0
    return made, made


def embedding_phase(
    shape: ModelShape, lay: Layout, state: dict[str, float], acc: float, other: float
) -> tuple[float, float, float]:
    """(grads, activations, loss) while the embedding's gradient is built: every other gradient exists; a tied
    weight also sums the new gradient into the lm_head's one (a third V x h tensor for a moment)."""
    emb = F32 * shape.embed_params() / lay.tp
    sharded = lay.shard if (lay.fsdp or lay.zero_stage >= 2) else 1
    if acc:
        return acc + emb * (3 if shape.tied else 1), other, 0.0
    grads = state["grads"] - (0 if shape.tied else emb / sharded) + emb
    if shape.tied:
        grads += emb
    return grads, other, 0.0


def optimizer_temporaries(lay: Layout, state: dict[str, float]) -> float:
    """torch's fused AdamW updates in place; the foreach path (DTensor shards) makes one sqrt(v) temporary."""
    if lay.deepspeed or (lay.offload != "none"):
        return 0.0
    if lay.fsdp or lay.tp > 1:
        return state["optimizer"] / 2
    return 0.0


def estimate(shape: ModelShape, lay: Layout, seq: int, cuda: bool = True) -> MemoryEstimate:
    """Predicted per-device peak: the largest of the pipeline's first and last stage (one stage without pp)."""
    return max((stage_peak(shape, lay, seq, s, cuda) for s in stages(shape, lay)), key=lambda e: e.reserved)
