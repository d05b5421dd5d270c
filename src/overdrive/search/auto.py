"""`--strategy auto` and `--precision auto` (the defaults): decide how a run executes before anything heavy.

The evidence, best first:
1. resuming: the choice stored in the run dir when the run started (`strategy_choice.json`), so a resumed run
   never re-decides into another strategy;
2. a cached `overdrive tune` result for this model shape, sequence, global batch, world and device;
3. the plan's fitting candidates for this device and world, ranked by its prediction:
   - one CPU process: the plan cannot tell precision, kernels and compile apart (same FLOPs), so they are
     measured (`auto_measure`): every eager precision × kernels combination the flags leave open, side by
     side, then compile on the winner when the run is long enough to repay compiling (its measured first step,
     spread over the run's micro-steps, is added to its step time);
   - GPUs: the plan's best (bf16, which every GPU in the device table runs faster), not measured;
   - several ranks: the plan alone, computed identically on every rank before the process group exists
     (no measurement, hence no broadcast): on CPU the data-parallel kind, kernels, fp32 and no compile.
Explicit flags pin their axis: `--strategy NAME` (the layout and everything its file sets), `--[no-]kernels`,
`--[no-]compile`, `--[no-]activation-checkpointing`, `--precision fp32|bf16|fp16`. The micro batch and the
global batch are always the run's (a tuned micro batch from the cache excepted).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overdrive.errors import UsageError
from overdrive.parallel.strategy import Strategy, default_micro
from overdrive.search.auto_measure import Measurer

AUTO = "auto"
CHOICE_FILE = "strategy_choice.json"


@dataclass
class Choice:
    """What runs (strategy, precision), where the decision came from, and the one line that says why."""

    strategy: Strategy
    precision: str
    source: str  # flags | resumed | cache | measured | plan | fallback
    reason: str
    auto: tuple[str, ...] = ()  # the axes left to auto: "strategy", "precision"
    measured: dict[str, float] = field(default_factory=dict)  # candidate label -> tokens/s

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "auto": list(self.auto),
            "strategy": self.strategy.to_dict(),
            "describe": self.strategy.describe(),
            "precision": self.precision,
            "reason": self.reason,
            "measured_tokens_per_sec": self.measured,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Choice:
        return cls(
            Strategy.from_dict(data["strategy"], CHOICE_FILE),
            str(data["precision"]),
            str(data.get("source", "resumed")),
            str(data.get("reason", "")),
            tuple(data.get("auto", ())),
            dict(data.get("measured_tokens_per_sec") or {}),
        )

    def line(self) -> str:
        """`overdrive: strategy auto -> kernels+compile, fp32 (measured ...)`."""
        what = "strategy auto" if "strategy" in self.auto else "precision auto"
        shown = (
            f"{short_label(self.strategy)}, {self.precision}" if "strategy" in self.auto else self.precision
        )
        return f"overdrive: {what} -> {shown} ({self.reason})"


@dataclass(frozen=True)
class Pins:
    """The axes the flags fix (None: auto decides)."""

    strategy: str | None
    precision: str | None
    kernels: bool | None
    compile: bool | None
    recompute: bool | None

    @classmethod
    def of(cls, cfg: Any) -> Pins:
        return cls(
            None if cfg.strategy == AUTO else (cfg.strategy or "single"),
            None if cfg.precision == AUTO else cfg.precision,
            cfg.kernels,
            cfg.compile,
            cfg.activation_checkpointing,
        )

    def admits(self, strategy: Strategy) -> bool:
        if self.kernels is not None and strategy.kernels != self.kernels:
            return False
        if self.compile is not None and strategy.compile != self.compile:
            return False
        if self.recompute is not None and (strategy.activation_checkpointing != "none") != self.recompute:
            return False
        if self.precision == "fp16":  # the engines run fp16 with single and ddp only
            plain = strategy.tensor_parallel == 1 and strategy.pipeline_parallel == 1
            return plain and strategy.engine == "torch" and strategy.data_parallel in ("none", "ddp")
        return True

    def apply(self, strategy: Strategy) -> Strategy:
        """The flags on top of a chosen strategy (as `resolve_strategy` applies them to a named one)."""
        out = copy.deepcopy(strategy)
        if self.kernels is not None:
            out.kernels = self.kernels
        if self.compile is not None:
            out.compile = self.compile
        if self.recompute is not None and self.recompute != (out.activation_checkpointing != "none"):
            out.activation_checkpointing = "full" if self.recompute else "none"
            out.ac_every = 1
        return out


def short_label(strategy: Strategy) -> str:
    """`kernels+compile` for a single process; the strategy's own description otherwise."""
    if strategy.is_distributed or strategy.activation_checkpointing != "none" or strategy.offload != "none":
        return strategy.describe()
    parts = [p for p, on in (("kernels", strategy.kernels), ("compile", strategy.compile)) if on]
    return "+".join(parts) or "plain"


# ------------------------------------------------------------------------------------------------ choose
def choose(
    cfg: Any,
    world: int,
    output_dir: Path | None = None,
    resume_from: Path | None = None,
    measurer: Measurer | None = None,
) -> Choice:
    """The strategy and precision this run uses (see the module docstring); raises only for bad flags."""
    pins = Pins.of(cfg)
    auto = tuple(a for a, pin in (("strategy", pins.strategy), ("precision", pins.precision)) if pin is None)
    if not auto:
        return Choice(pinned_strategy(cfg), cfg.precision, "flags", "given by the flags")
    if resume_from is not None and output_dir is not None:
        stored = load_choice(output_dir)
        if stored is not None:
            return resumed(stored, pins, cfg, auto)
    if pins.strategy is not None:
        from overdrive.search.auto_cpu import choose_precision

        strategy = pinned_strategy(cfg)
        strategy.validate(world)  # a named strategy that cannot run fails before anything is measured
        choice = choose_precision(cfg, Context.build(cfg, world), strategy, measurer)
    else:
        context = Context.build(cfg, world)
        choice = from_cache(cfg, context, pins) or from_plan(cfg, context, pins, measurer)
    choice.auto = auto
    return choice


def pinned_strategy(cfg: Any) -> Strategy:
    from overdrive.train.build import resolve_strategy

    return resolve_strategy(cfg)


def resumed(stored: Choice, pins: Pins, cfg: Any, auto: tuple[str, ...]) -> Choice:
    strategy = pins.apply(stored.strategy) if pins.strategy is None else pinned_strategy(cfg)
    precision = pins.precision or stored.precision
    why = stored.reason.removeprefix("as chosen when this run started: ")
    return Choice(
        strategy, precision, "resumed", f"as chosen when this run started: {why}", auto, stored.measured
    )


@dataclass
class Context:
    """What the decision depends on: the model's config and shape, the device row, the world's layout."""

    model_config: Any
    shape: Any
    device: Any  # hardware.Device, or None for a GPU not in the table
    device_name: str
    world: int
    nodes: int
    gpus_per_node: int

    @classmethod
    def build(cls, cfg: Any, world: int) -> Context:
        from overdrive.parallel.distributed import launch_env
        from overdrive.search.shape import ModelShape

        config = model_config(cfg)
        local = launch_env().local_world_size if world > 1 else 1
        nodes, per_node = (world // local, local) if local and world % local == 0 else (1, world)
        device, name = target_device()
        shape = ModelShape.from_config(config) if config is not None else None
        return cls(config, shape, device, name, world, nodes, per_node)

    @property
    def cuda(self) -> bool:
        return self.device_name != "cpu"


def model_config(cfg: Any) -> Any:
    """The run's model config (a from-scratch preset with the run's vocabulary), or None when unreadable."""
    from overdrive.modeling import preset_config
    from overdrive.train.build import padded_vocab

    try:
        if cfg.model:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(
                cfg.model, trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir
            )
        config = preset_config(cfg.model_config or "tiny")
    except Exception:  # noqa: BLE001 - the run itself reports a bad model; auto then falls back
        return None
    config.vocab_size = padded_vocab(cfg.vocab_size, 1)  # from scratch: the BPE's vocabulary
    return config


def target_device() -> tuple[Any, str]:
    """This machine's device row (the CPU row with the host's memory, uncalibrated, hence the same on every
    rank), or (None, name) for a GPU the table does not know."""
    import torch

    from overdrive.search.hardware import detect, device_named, host_memory_bytes

    try:
        name = detect()
    except UsageError:
        return None, torch.cuda.get_device_name(0)
    device = device_named(name)
    if name == "cpu":
        device = dataclasses.replace(device, memory_bytes=host_memory_bytes())
    return device, name


# ------------------------------------------------------------------------------------------------- cache
def from_cache(cfg: Any, ctx: Context, pins: Pins) -> Choice | None:
    """A stored `overdrive tune` result for this key, when it is still valid for this run; None otherwise."""
    if ctx.shape is None:
        return None
    try:
        from overdrive.search import cache
    except ImportError:
        return None
    try:  # the key `overdrive tune` stores under (cache.shape_dict reads configs and a tokenizer only)
        tuned = cache.load_tuned(cache.key_for_config(cfg, ctx.world, ctx.device_name))
    except Exception:  # noqa: BLE001 - no usable cache is never an error: the plan decides
        return None
    if not tuned:
        return None
    try:
        strategy = pins.apply(Strategy.from_dict(tuned["strategy"], "tune cache"))
        micro = tuned.get("micro_batch_size")
        if isinstance(micro, int) and micro > 0:
            strategy.micro_batch_size = micro
        if not compatible(cfg, strategy, ctx.world):
            return None
    except (UsageError, KeyError, TypeError):
        return None
    precision = pins.precision or str(tuned.get("precision", "fp32"))
    tps = tuned.get("tokens_per_sec")
    rate = f": {tps:,.0f} tok/s measured" if isinstance(tps, int | float) else ""
    return Choice(strategy, precision, "cache", f"the cached `overdrive tune` result{rate}")


def compatible(cfg: Any, strategy: Strategy, world: int) -> bool:
    """Whether the run can execute `strategy`: its layout on this world and global batch, the optimizer, the
    adapters."""
    from overdrive.parallel.adapters import check_adapters
    from overdrive.train.optim import check_optimizer

    try:
        strategy.validate(world, cfg.global_batch_size)
        resolved = strategy.resolved_for(world)
        resolved.resolve_batch(cfg.global_batch_size, strategy.dp_degree(world), cfg.micro_batch_size)
        check_optimizer(cfg, strategy)
        check_adapters(cfg, strategy)
    except UsageError:
        return False
    return True


# -------------------------------------------------------------------------------------------------- plan
def plan_options(cfg: Any, ctx: Context, pins: Pins) -> list[Any]:
    """The plan's fitting candidates the flags and the run admit, best predicted first (on CPU: no tensor or
    pipeline parallelism, torch engine only, one process or ddp/fsdp)."""
    from overdrive.search.plan import plan

    if ctx.shape is None or ctx.device is None:
        return []
    try:
        ranked = plan(
            ctx.shape, cfg.block_size, cfg.global_batch_size, ctx.device, ctx.nodes, ctx.gpus_per_node
        )
    except UsageError:
        return []
    checked: dict[str, bool] = {}
    out = []
    for c in ranked:
        s = c.strategy
        if not c.fits or not pins.admits(s) or not (ctx.cuda or cpu_layout(s, ctx.world)):
            continue
        key = repr(dataclasses.replace(s, kernels=False, compile=False, micro_batch_size=None))
        if key not in checked:
            checked[key] = compatible(cfg, dataclasses.replace(s, micro_batch_size=None), ctx.world)
        if checked[key]:
            out.append(c)
    same_micro = [c for c in out if c.micro == run_micro(cfg, ctx.world)]
    return same_micro or out


def cpu_layout(strategy: Strategy, world: int) -> bool:
    if strategy.tensor_parallel != 1 or strategy.pipeline_parallel != 1 or strategy.engine != "torch":
        return False
    return strategy.data_parallel == "none" if world == 1 else strategy.data_parallel in ("ddp", "fsdp")


def run_micro(cfg: Any, world: int) -> int:
    per_rank = max(1, cfg.global_batch_size // world)
    return min(cfg.micro_batch_size, per_rank) if cfg.micro_batch_size else default_micro(per_rank)


def from_plan(cfg: Any, ctx: Context, pins: Pins, measurer: Measurer | None) -> Choice:
    options = plan_options(cfg, ctx, pins)
    if not options:
        return fallback(cfg, ctx, pins, "the plan has no candidate for this run")
    positions = getattr(model_config(cfg), "max_position_embeddings", None)
    if positions is not None and cfg.block_size > positions:  # the run fails on its data checks; don't time it
        return fallback(cfg, ctx, pins, f"--block-size {cfg.block_size} exceeds the model's {positions} positions")
    if not ctx.cuda and ctx.world == 1:
        from overdrive.search.auto_cpu import measured_choice

        return measured_choice(cfg, ctx, pins, options, measurer)
    if ctx.cuda:
        precision = pins.precision or options[0].precision
        why = f"plan's best prediction for {ctx.world} × {ctx.device_name}"
    else:  # several CPU ranks: no measurement (every rank must decide the same), so fp32 and no compile
        options = [c for c in options if c.strategy.compile == bool(pins.compile)] or options
        precision = pins.precision or "fp32"
        why = "plan's best data-parallel layout for CPU ranks; fp32, no compile (not measured across ranks)"
    best = next((c for c in options if c.precision == precision), options[0])
    tps = best.tokens_per_second_per_device(cfg.block_size, cfg.global_batch_size, ctx.world)
    strategy = dataclasses.replace(pins.apply(best.strategy), micro_batch_size=None)
    if precision != "bf16":  # the plan's bf16 candidates keep sharded parameters in bf16
        strategy.param_dtype = strategy.reduce_dtype = "fp32"
    return Choice(strategy, precision, "plan", f"{why}: {tps:,.0f} tok/s/device predicted")


def fallback(cfg: Any, ctx: Context, pins: Pins, why: str) -> Choice:
    """No plan: one process or ddp, kernels on, no compile; bf16 on a GPU that has it, else fp32."""
    import torch

    strategy = pins.apply(Strategy(data_parallel="none" if ctx.world == 1 else "ddp", kernels=True))
    precision = pins.precision or ("bf16" if ctx.cuda and torch.cuda.is_bf16_supported() else "fp32")
    return Choice(strategy, precision, "fallback", why)


# ------------------------------------------------------------------------------------------- run dir
def save_choice(output_dir: Path, choice: Choice) -> None:
    """`strategy_choice.json` in the run dir: what a resume reuses, and what summary.json records."""
    from overdrive.atomic import write_json

    write_json(output_dir / CHOICE_FILE, choice.to_dict())


def load_choice(output_dir: Path) -> Choice | None:
    """The stored choice of a run being resumed; None when there is none (a run from before auto) or it is
    unreadable (the decision is then made again)."""
    try:
        return Choice.from_dict(json.loads((output_dir / CHOICE_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError, UsageError):
        return None
