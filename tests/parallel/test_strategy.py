"""Strategy as data: YAML round trip, presets, validation messages, batch resolution and rescaling."""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import pytest

from overdrive.errors import UsageError
from overdrive.parallel import PRESETS, Strategy

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_round_trip_and_validate(name: str) -> None:
    strategy = Strategy.from_name_or_path(name)
    assert Strategy.from_yaml(strategy.to_yaml()) == strategy
    if strategy.engine == "deepspeed" and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed not installed")
    world = 1 if name == "single" else 2
    strategy.validate(world)


def test_presets_mean_what_their_names_say() -> None:
    get = Strategy.from_name_or_path
    assert get("single").data_parallel == "none" and not get("single").is_distributed
    assert get("ddp").data_parallel == "ddp"
    assert get("fsdp") == get("zero3")
    assert get("fsdp").data_parallel == "fsdp" and get("fsdp").reshard_after_forward
    assert get("zero2").data_parallel == "fsdp" and not get("zero2").reshard_after_forward
    assert get("zero3-offload").offload == "optimizer+params"
    for stage in (1, 2, 3):
        ds = get(f"deepspeed-zero{stage}")
        assert (ds.engine, ds.zero_stage, ds.offload) == ("deepspeed", stage, "none")
    assert get("deepspeed-zero3-offload").offload == "optimizer+params"
    assert get(None) == Strategy()


def test_yaml_file_and_text(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "data_parallel: hsdp\nshard_size: 2\nparam_dtype: bf16\nactivation_checkpointing: every_k\nac_every: 2\n"
    )
    strategy = Strategy.from_name_or_path(str(path))
    assert (strategy.data_parallel, strategy.shard_size, strategy.param_dtype, strategy.ac_every) == (
        "hsdp",
        2,
        "bf16",
        2,
    )
    assert Strategy.from_yaml("data-parallel: ddp\n").data_parallel == "ddp"  # dashes accepted like CLI flags
    assert Strategy.from_yaml("") == Strategy()
    bare = tmp_path / "mystrategy"  # a file without a YAML suffix is still read as a file
    bare.write_text("data_parallel: fsdp\n")
    assert Strategy.from_name_or_path(str(bare)).data_parallel == "fsdp"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data_parallel: ddp\nsharding: full\n", "unknown key 'sharding'"),
        ("data_parallel: zero\n", "data_parallel in strategy YAML must be one of none, ddp, fsdp, hsdp"),
        ("compile: yes please\n", "compile in strategy YAML must be true or false"),
        ("zero_stage: two\n", "zero_stage in strategy YAML must be a whole number"),
        ("- ddp\n", "must be a mapping"),
        ("data_parallel: [\n", "not valid YAML at line"),
    ],
)
def test_bad_yaml_is_a_one_line_usage_error(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[")) as info:
        Strategy.from_yaml(text)
    assert "\n" not in str(info.value)


def test_unknown_name_lists_presets(tmp_path) -> None:
    with pytest.raises(UsageError, match="presets: single, ddp, fsdp"):
        Strategy.from_name_or_path("zero4")
    with pytest.raises(UsageError, match="not found"):
        Strategy.from_yaml(str(tmp_path / "missing.yaml"))


def _s(**kw) -> Strategy:
    return Strategy(**kw)


INVALID = [
    (_s(engine="torch", zero_stage=2, data_parallel="ddp"), 2, "zero_stage applies to engine: deepspeed"),
    (_s(engine="deepspeed", data_parallel="ddp", zero_stage=4), 2, "zero_stage must be 0, 1, 2 or 3"),
    (_s(engine="deepspeed", data_parallel="fsdp", zero_stage=3), 2, "set data_parallel: ddp"),
    (_s(), 2, "data_parallel: none runs one data-parallel rank but 2 ranks were launched"),
    (_s(data_parallel="hsdp"), 4, "hsdp needs shard_size"),
    (_s(data_parallel="hsdp", shard_size=3), 4, "hsdp shard_size 3 must divide the data-parallel size 4"),
    (_s(data_parallel="fsdp", shard_size=2), 4, "shard_size applies to data_parallel: hsdp only"),
    (_s(data_parallel="ddp", reshard_after_forward=False), 2, "reshard_after_forward: false"),
    (
        _s(data_parallel="ddp", offload="optimizer"),
        2,
        "offload needs data_parallel fsdp/hsdp or engine deepspeed",
    ),
    (_s(data_parallel="fsdp", offload="optimizer"), 2, "FSDP2 offloads parameters, gradients and optimizer"),
    (
        _s(engine="deepspeed", data_parallel="ddp", zero_stage=0, offload="optimizer"),
        2,
        "needs zero_stage 1, 2 or 3",
    ),
    (
        _s(engine="deepspeed", data_parallel="ddp", zero_stage=2, offload="optimizer+params"),
        2,
        "needs zero_stage 3",
    ),
    (_s(data_parallel="ddp", param_dtype="bf16"), 2, "param_dtype bf16 needs fsdp/hsdp or deepspeed"),
    (_s(reduce_dtype="bf16"), 1, "reduce_dtype applies only when gradients are reduced across ranks"),
    (
        _s(activation_checkpointing="full", ac_every=3),
        1,
        "ac_every applies to activation_checkpointing: every_k",
    ),
    (_s(activation_checkpointing="every_k", ac_every=0), 1, "ac_every must be at least 1"),
    (_s(micro_batch_size=0), 1, "micro_batch_size must be positive"),
    (_s(), 0, "world size must be positive"),
]


@pytest.mark.parametrize(("strategy", "world", "message"), INVALID)
def test_validation_names_problem_and_fix(strategy: Strategy, world: int, message: str) -> None:
    if strategy.engine == "deepspeed" and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed not installed")
    with pytest.raises(UsageError, match=message) as info:
        strategy.validate(world)
    assert "\n" not in str(info.value) and str(info.value).startswith("strategy: ")


def test_missing_deepspeed_says_how_to_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    with pytest.raises(UsageError, match=r"pip install 'overdrive\[deepspeed\]'"):
        Strategy.from_name_or_path("deepspeed-zero2").validate(2)


# Each valid combination next to its nearest invalid neighbour: validate draws the line exactly there.
BOUNDARIES = [
    # (valid strategy, world), (invalid neighbour, world, message)
    ((_s(data_parallel="hsdp", shard_size=2), 4), (_s(data_parallel="hsdp", shard_size=2), 3, "must divide")),
    (
        (_s(data_parallel="fsdp", reduce_dtype="bf16", param_dtype="bf16"), 8),
        (_s(data_parallel="ddp", param_dtype="bf16"), 8, "param_dtype bf16 needs fsdp/hsdp"),
    ),
    ((_s(data_parallel="ddp", reduce_dtype="bf16"), 2), (_s(reduce_dtype="bf16"), 1, "reduce_dtype applies")),
    (
        (_s(data_parallel="fsdp"), 1),
        (_s(), 2, "data_parallel: none runs one data-parallel rank"),
    ),  # FSDP on 1 process
    (
        (_s(data_parallel="fsdp", offload="optimizer+params"), 2),
        (_s(data_parallel="fsdp", offload="optimizer"), 2, "FSDP2 offloads parameters"),
    ),
    (
        (_s(activation_checkpointing="every_k", ac_every=3), 1),
        (_s(activation_checkpointing="full", ac_every=3), 1, "ac_every applies"),
    ),
]


@pytest.mark.parametrize(("valid", "invalid"), BOUNDARIES)
def test_validation_accepts_valid_combinations_and_rejects_their_neighbours(
    valid: tuple, invalid: tuple
) -> None:
    strategy, world = valid
    assert strategy.validate(world, global_batch_size=8 * world) is None
    assert strategy.resolve_batch(8 * world, world) == (8, 1)  # and it splits a global batch over the world
    neighbour, world, message = invalid
    with pytest.raises(UsageError, match=message):
        neighbour.validate(world)


def test_resolve_batch() -> None:
    assert Strategy().resolve_batch(8, 1, micro_batch_size=2) == (2, 4)
    assert Strategy(data_parallel="ddp").resolve_batch(8, 2, micro_batch_size=2) == (2, 2)
    assert Strategy(micro_batch_size=4).resolve_batch(8, 2, micro_batch_size=1) == (4, 1)  # strategy wins
    assert Strategy(grad_accumulation=2).resolve_batch(8, 2) == (2, 2)
    with pytest.raises(UsageError, match="must be a multiple of --micro-batch-size 3"):
        Strategy().resolve_batch(8, 2, micro_batch_size=3)
    with pytest.raises(UsageError, match="drop grad_accumulation"):
        Strategy(micro_batch_size=2, grad_accumulation=3).resolve_batch(8, 2)
    with pytest.raises(UsageError, match="must be a multiple of the 3 data-parallel ranks"):
        Strategy(data_parallel="ddp").validate(3, global_batch_size=8)


def test_default_micro_batch_is_at_most_eight_rows_and_fits_the_rank() -> None:
    """Unset micro batch: the largest divisor of each data-parallel rank's rows up to 8 (no error when the
    global batch leaves fewer rows per rank), and enough micro-batches to fill a pipeline."""
    assert Strategy().resolve_batch(8, 1) == (8, 1)
    assert Strategy(data_parallel="fsdp").resolve_batch(8, 2) == (4, 1)
    assert Strategy().resolve_batch(64, 1) == (8, 8)
    assert Strategy().resolve_batch(12, 1) == (6, 2)
    assert Strategy().resolve_batch(7, 1) == (7, 1)
    assert Strategy(pipeline_parallel=2).resolve_batch(8, 1) == (4, 2)
    assert Strategy(pipeline_parallel=4).resolve_batch(8, 1) == (2, 4)
    with pytest.raises(UsageError, match="needs at least 4 micro-batches"):
        Strategy(pipeline_parallel=4).resolve_batch(2, 1)


def test_rescale_keeps_global_batch() -> None:
    saved = Strategy(data_parallel="fsdp", micro_batch_size=2, grad_accumulation=2)  # 2 ranks × 2 × 2 = 8
    down = saved.rescale(2, 1, 8)
    assert (down.micro_batch_size, down.grad_accumulation) == (2, 4)
    up = saved.rescale(2, 4, 8)
    assert (up.micro_batch_size, up.grad_accumulation) == (2, 1)
    lowered = Strategy(data_parallel="ddp", micro_batch_size=4, grad_accumulation=1).rescale(3, 2, 12)
    assert (lowered.micro_batch_size, lowered.grad_accumulation) == (3, 2)  # 4 does not divide 6 per rank
    only_accum = Strategy(data_parallel="ddp", grad_accumulation=2).rescale(2, 1, 8)
    assert only_accum.grad_accumulation == 4
    assert dataclasses.replace(down, micro_batch_size=None, grad_accumulation=None) == dataclasses.replace(
        saved, micro_batch_size=None, grad_accumulation=None
    )


def test_rescale_errors() -> None:
    with pytest.raises(UsageError, match="cannot be split over 3 ranks"):
        Strategy(data_parallel="ddp", micro_batch_size=1).rescale(2, 3, 8)
    with pytest.raises(UsageError, match="shard_size 4 does not divide the new world size 6"):
        Strategy(data_parallel="hsdp", shard_size=4).rescale(8, 6, 48)
    with pytest.raises(UsageError, match="no data parallelism"):
        Strategy().rescale(1, 2, 8)


def test_describe_is_one_line() -> None:
    assert Strategy.from_name_or_path("zero2").describe() == "fsdp (ZeRO-2)"
    text = Strategy(
        data_parallel="hsdp", shard_size=8, param_dtype="bf16", offload="optimizer+params"
    ).describe()
    assert text == "hsdp (ZeRO-3 shard 8), offload optimizer+params, params bf16 reduce fp32"
    assert Strategy.from_name_or_path("deepspeed-zero3").describe() == "deepspeed ZeRO-3"


def test_parallelize_runs_in_the_documented_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels, (adapters, fp8,) tensor parallel, recompute, compile, data parallel; only the steps switched on."""
    import overdrive.kernels.compile as compile_module
    import overdrive.parallel as parallel
    import overdrive.parallel.data as data
    import overdrive.parallel.recompute as recompute
    import overdrive.parallel.tensor as tensor

    calls: list[tuple] = []
    model = object()
    monkeypatch.setattr(parallel, "apply_kernels", lambda m, s: calls.append(("kernels", m)))
    monkeypatch.setattr(tensor, "apply_tensor_parallel", lambda m, mesh, **kw: calls.append(("tp", m)) or [])
    monkeypatch.setattr(
        recompute, "apply_activation_checkpointing", lambda m, every: calls.append(("ac", every))
    )
    monkeypatch.setattr(compile_module, "compile_regions", lambda m: calls.append(("compile", m)))
    monkeypatch.setattr(data, "apply_data_parallel", lambda m, s, r: calls.append(("dp", m)) or (m, None))
    runtime = SimpleNamespace(mesh={"tp": "tp-mesh"}, rank=0)
    everything = Strategy(
        kernels=True, activation_checkpointing="every_k", ac_every=2, compile=True, data_parallel="fsdp",
    )  # fmt: skip
    result = parallel.parallelize(model, everything, runtime)
    assert [c[0] for c in calls] == ["kernels", "ac", "compile", "dp"] and ("ac", 2) in calls
    calls.clear()
    with_tp = Strategy(kernels=True, compile=True, data_parallel="fsdp", tensor_parallel=2)
    assert parallel.parallelize(model, with_tp, runtime).applied == [
        "kernels", "tensor_parallel", "compile", "data_parallel",
    ]  # fmt: skip
    assert [c[0] for c in calls] == ["kernels", "tp", "compile", "dp"]
    calls.clear()
    # recomputed tensor-parallel blocks are not compiled (dynamo runs them eagerly): skipped, with a note
    tp_ac = Strategy(compile=True, data_parallel="fsdp", tensor_parallel=2, activation_checkpointing="full")
    result = parallel.parallelize(model, tp_ac, runtime)
    assert [c[0] for c in calls] == ["tp", "ac", "dp"] and "compile skipped" in result.notes[0]
    assert list(parallel.PARALLELIZE_ORDER) == [
        "kernels", "adapters", "fp8", "tensor_parallel", "activation_checkpointing", "compile", "data_parallel",
    ]  # fmt: skip
    calls.clear()
    assert parallel.parallelize(model, Strategy(activation_checkpointing="full"), runtime).applied == [
        "activation_checkpointing"
    ]
    assert calls == [("ac", 1), ("dp", model)]
    calls.clear()
    assert parallel.parallelize(model, Strategy(), runtime).applied == [] and calls == [("dp", model)]


@pytest.mark.parametrize("preset", ["single", "ddp", "fsdp"])
def test_data_parallelism_wraps_the_transformed_model_last(preset, monkeypatch) -> None:
    import overdrive.parallel as parallel
    import overdrive.parallel.data as data
    import overdrive.parallel.engine as engine_module

    events: list[str] = []
    monkeypatch.setattr(parallel, "apply_kernels", lambda m, s: events.append("kernels"))
    monkeypatch.setattr(data, "apply_data_parallel", lambda m, s, r: events.append("dp") or (m, None))

    class RecordingEngine:
        def __init__(self, *args, **kwargs) -> None:
            events.append("engine")

    monkeypatch.setattr(engine_module, "TorchEngine", RecordingEngine)
    strategy = Strategy.from_name_or_path(preset)
    strategy.kernels = True
    engine = parallel.build_engine(object(), strategy, SimpleNamespace(mesh=None, rank=0), None, None, 1.0)
    assert isinstance(engine, RecordingEngine) and events == ["kernels", "dp", "engine"]


def test_deepspeed_config_is_generated_from_the_strategy() -> None:
    from overdrive.parallel.deepspeed_engine import deepspeed_config

    config = deepspeed_config(Strategy.from_name_or_path("deepspeed-zero2"), 4, 0.0, "fp32", 2)
    assert config["gradient_clipping"] == 0.0  # DeepSpeed's own default (1.0) would silently clip
    assert config["gradient_accumulation_steps"] == 1  # we own the accumulation boundary
    assert config["train_batch_size"] == 8 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["zero_optimization"] == {"stage": 2}
    assert config["zero_allow_untested_optimizer"] is True and config["bf16"] == {"enabled": False}
    offload = deepspeed_config(
        Strategy.from_name_or_path("deepspeed-zero3-offload"), 2, 1.0, "bf16", 1, cuda=True
    )
    assert offload["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert offload["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert offload["bf16"] == {"enabled": True} and offload["communication_data_type"] == "fp32"


def test_importing_the_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, overdrive.parallel; s = overdrive.parallel.Strategy(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
