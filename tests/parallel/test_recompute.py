"""Memory axes of a strategy: full / every-k / selective activation checkpointing and activation offload.

Every mode must train the same model as plain HF + torch AdamW (fp32: losses and every gradient within 1e-6),
and the selective mode must do what it claims: hold fewer live bytes than no recompute, and re-run no matmul
in backward (full recompute re-runs them all).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from overdrive.core.runtime import Runtime
from overdrive.parallel import Strategy, build_engine, parallelize
from overdrive.parallel.offload import with_activation_offload
from overdrive.parallel.recompute import apply_activation_checkpointing
from tests.conftest import MICRO_LLAMA

TOL = 1e-6  # fp32, one process: recompute runs the very same kernels on the very same inputs
STEPS = 4
LR = 1e-2


def micro_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in MICRO_LLAMA.items() if k != "architectures"})
    config.attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float()


def batches(steps: int = STEPS, rows: int = 2, seq: int = 48) -> list[dict[str, torch.Tensor]]:
    """Two random-token batches with some masked labels (-100), alternating, so the loss falls as they are
    learnt and the token count of each step matters."""
    g = torch.Generator().manual_seed(1)
    pair = []
    for masked in (5, 17):
        ids = torch.randint(0, MICRO_LLAMA["vocab_size"], (rows, seq), generator=g)
        labels = ids.clone()
        labels[:, : min(masked, seq // 2)] = -100
        pair.append({"input_ids": ids, "labels": labels})
    return [pair[i % 2] for i in range(steps)]


def items(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def plain_run(model: LlamaForCausalLM, data: list[dict]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference: HF forward with num_items_in_batch, loss.backward, torch AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, first_grads = [], {}
    for step, batch in enumerate(data):
        loss = model(**batch, num_items_in_batch=items(batch)).loss
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first_grads


def engine_run(model: LlamaForCausalLM, strategy: Strategy, data: list[dict]):
    """The same steps through overdrive's engine (parallelize + loss context) for `strategy`."""
    engine = build_engine(
        model,
        strategy,
        Runtime(),
        lambda m: torch.optim.AdamW(m.parameters(), lr=LR),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0),
        0.0,
        "fp32",
    )
    losses, first_grads = [], {}
    for step, batch in enumerate(data):
        losses.append(float(engine.forward_backward([batch], items(batch))))
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        engine.step(0.0)
    return engine, losses, first_grads


MODES = {
    "full": Strategy(activation_checkpointing="full"),
    "every_k": Strategy(activation_checkpointing="every_k", ac_every=2),
    "selective": Strategy(activation_checkpointing="selective"),
    "offload": Strategy(activation_offload=True),
    "selective+offload": Strategy(activation_checkpointing="selective", activation_offload=True),
}


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    return plain_run(micro_model(), batches())


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_trains_the_plain_model(mode: str, reference) -> None:
    ref_losses, ref_grads = reference
    model = micro_model()
    engine, losses, grads = engine_run(model, MODES[mode], batches())
    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert abs(a - b) <= TOL, (mode, step, a, b)
    assert ref_losses[-1] < ref_losses[1] < ref_losses[0]  # alternating batches, both learnt
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max() <= TOL, (mode, name)
    checkpointed = [layer for layer in model.model.layers if "checkpointed" in repr(layer.forward)]
    expected = {"full": 2, "every_k": 1, "selective": 2}.get(mode.split("+")[0], 0)
    assert len(checkpointed) == expected, mode  # the feature is really on (every_k 2: layer 0 only)
    offloaded = "offload" in mode
    assert (engine.context_factory is not None) == offloaded
    with engine.loss_context():
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    assert (
        hooks is not None
    ) == offloaded  # save_on_cpu's pack/unpack hooks are live around forward+backward


def test_offload_composes_with_an_existing_loss_context() -> None:
    """Tensor parallelism's loss context stays entered when offload is added around it."""
    entered = []

    class Inner:
        def __enter__(self) -> None:
            entered.append("in")

        def __exit__(self, *exc: object) -> None:
            entered.append("out")

    factory = with_activation_offload(Inner, torch.device("cpu"))
    with factory():
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        assert entered == ["in"]
    assert entered == ["in", "out"]
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    runtime = SimpleNamespace(mesh={"tp": None}, rank=0, device=torch.device("cpu"))
    result = parallelize(micro_model(), Strategy(activation_offload=True), runtime)
    assert result.loss_context is not None and result.applied == []


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_deepspeed_engine_gets_the_offload_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed owns its wrapper; the offload context still reaches its forward_backward."""
    from overdrive.parallel.deepspeed_engine import DeepSpeedEngine

    monkeypatch.setattr(DeepSpeedEngine, "__init__", lambda self, *args, **kwargs: None)
    strategy = Strategy(engine="deepspeed", data_parallel="ddp", activation_offload=True)
    engine = build_engine(micro_model(), strategy, Runtime(), None, None, 1.0)
    assert isinstance(engine, DeepSpeedEngine)
    with engine.loss_context():
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class OpCounter(TorchDispatchMode):
    """Counts aten calls by op packet name (e.g. `aten.mm`)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def measure(granularity: str | None, seq: int = 256) -> tuple[int, collections.Counter[str]]:
    """(peak live activation bytes over forward+backward, ops run during backward) for one micro-batch."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    model = micro_model()
    if granularity:
        apply_activation_checkpointing(model, 1, granularity)
    batch = batches(1, rows=2, seq=seq)[0]
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = model(**batch).loss
        with OpCounter() as counter:
            loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return peak[_MemRefType.ACT] + peak[_MemRefType.TEMP], counter.counts


def test_selective_saves_memory_and_recomputes_less_than_full() -> None:
    none_bytes, none_ops = measure(None)
    sel_bytes, sel_ops = measure("selective")
    full_bytes, full_ops = measure("full")
    # memory: selective keeps only matmul/attention outputs, full keeps only layer inputs
    assert full_bytes < sel_bytes <= 0.85 * none_bytes, (none_bytes, sel_bytes, full_bytes)
    # compute: full re-runs every matmul of both layers in backward, selective none of them
    assert full_ops["aten.mm"] > none_ops["aten.mm"] and sel_ops["aten.mm"] == none_ops["aten.mm"]
    # ... while selective does recompute the element-wise ops (SwiGLU's silu, RMSNorm's rsqrt)
    for op in ("aten.silu", "aten.rsqrt"):
        assert none_ops[op] == 0 and sel_ops[op] > 0 and sel_ops[op] == full_ops[op], op
    assert sum(sel_ops.values()) < sum(full_ops.values())


def test_selective_composes_with_compile() -> None:
    """Selective recompute inside a compiled layer (the compile step follows recompute): same loss and grads."""
    from overdrive.kernels.compile import compile_regions

    eager = micro_model()
    compiled = copy.deepcopy(eager)
    apply_activation_checkpointing(compiled, 1, "selective")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_regions(compiled, backend="aot_eager") == 2
    batch = batches(1)[0]
    loss_e, loss_c = eager(**batch).loss, compiled(**batch).loss
    loss_e.backward()
    loss_c.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers really ran compiled
    assert abs(loss_e.item() - loss_c.item()) <= TOL
    for (name, p_c), p_e in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        assert (p_c.grad - p_e.grad).abs().max() <= TOL, name


def test_selective_composes_with_fused_kernels() -> None:
    """overdrive's kernels are autograd Functions; selective recompute inside them changes nothing."""
    from overdrive.patches import patch_model

    plain = micro_model()
    patch_model(plain)
    selective = copy.deepcopy(plain)
    apply_activation_checkpointing(selective, 1, "selective")
    batch = batches(1)[0]
    loss_p, loss_s = plain(**batch).loss, selective(**batch).loss
    loss_p.backward()
    loss_s.backward()
    assert abs(loss_p.item() - loss_s.item()) <= TOL
    for (name, p_s), p_p in zip(selective.named_parameters(), plain.parameters(), strict=True):
        assert (p_s.grad - p_p.grad).abs().max() <= TOL, name


def test_strategy_fields_round_trip_and_describe() -> None:
    strategy = Strategy.from_yaml(
        "activation_checkpointing: selective\nactivation_offload: true\nfp8: false\n"
    )
    assert Strategy.from_yaml(strategy.to_yaml()) == strategy
    assert strategy.describe() == "single process, AC selective, activation offload"
    strategy.validate(1)
    with pytest.raises(Exception, match="ac_every applies to activation_checkpointing: every_k only"):
        dataclasses.replace(strategy, ac_every=2).validate(1)
    # the pipeline engine enters the offload itself (tests/parallel/test_pipeline_engines.py: pp-memory)
    Strategy(activation_offload=True, pipeline_parallel=2, data_parallel="fsdp").validate(4)
    with pytest.raises(Exception, match="activation_offload .* must be true or false"):
        Strategy.from_yaml("activation_offload: yes-please\n")


@pytest.mark.parametrize(
    "strategy,flag,expected",
    [
        ("selective", True, "selective"),
        ("selective", False, "none"),
        (None, True, "full"),
        ("every_k", None, "every_k"),
    ],
)
def test_activation_checkpointing_flag_keeps_its_meaning(strategy, flag, expected, tmp_path: Path) -> None:
    """--activation-checkpointing turns recompute on (full unless the strategy picks a kind) or off."""
    from overdrive.train.build import resolve_strategy

    path = None
    if strategy:
        path = tmp_path / "s.yaml"
        extra = "ac_every: 2\n" if strategy == "every_k" else ""
        path.write_text(f"activation_checkpointing: {strategy}\n{extra}")
    cfg = SimpleNamespace(
        strategy=str(path) if path else None, activation_checkpointing=flag, compile=None, kernels=None
    )
    assert resolve_strategy(cfg).activation_checkpointing == expected


@pytest.mark.distributed
def test_selective_and_offload_under_fsdp_match_one_process(micro_config, text_file, tmp_path) -> None:
    """2 FSDP2 ranks with selective recompute + activation offload give the plain single-process losses."""
    from overdrive.cli import main
    from overdrive.metrics import read_metrics
    from tests.conftest import micro_args
    from tests.train.test_strategies_e2e import COMMON, torchrun
    from tests.train.test_strategies_e2e import TOL as DIST_TOL

    yaml_path = tmp_path / "fsdp-memory.yaml"
    yaml_path.write_text(
        "data_parallel: fsdp\nactivation_checkpointing: selective\nactivation_offload: true\n"
    )
    single, dist = tmp_path / "single", tmp_path / "fsdp"
    assert main(micro_args(micro_config, text_file, single, *COMMON, "--strategy", "single")) == 0  # not auto
    proc = torchrun(micro_args(micro_config, text_file, dist, *COMMON, "--strategy", str(yaml_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    expected, got = losses(single), losses(dist)
    assert len(got) == len(expected) == 10
    for a, b in zip(expected, got, strict=True):
        assert abs(a - b) <= DIST_TOL * abs(a), (a, b)
