"""Bench workloads: named presets plus flag overrides, resolved into one `Workload` every system runs.

A preset pins what the seed tables pin (model, sequence length, global batch sizes, precision, attention) so
that `overdrive bench --preset NAME` reproduces a table's shape; every field can be overridden by a flag.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

from overdrive.errors import UsageError

SYSTEM_KINDS = ("hf-trainer", "hf-deepspeed", "overdrive")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: overdrive --precision auto, HF best of fp32/bf16


@dataclass(frozen=True)
class BenchPreset:
    """A named workload. `device` says where it is meant to run (it still runs elsewhere, slowly or OOM)."""

    name: str
    description: str
    device: str  # "cpu" or "cuda"
    model_config: str  # overdrive model preset name or a config.json path
    seq_len: int
    batch_sizes: tuple[int, ...]
    steps: int  # measured optimizer steps per cell
    warmup_steps: int  # steps run before timing starts (compilation, allocator warm-up)
    precision: str = "bf16"
    timeout: float = 600.0  # seconds per cell
    vocab_size: int = 8000  # BPE vocab trained on the bench text (the model keeps a preset's own vocab)


PRESETS: dict[str, BenchPreset] = {
    "cpu-smoke": BenchPreset(
        name="cpu-smoke",
        description="the CPU probe's tiny Llama (hidden 256, 4 layers, 8q/4kv heads, vocab 8000), seq 256",
        device="cpu",
        model_config="tiny",
        seq_len=256,
        batch_sizes=(8, 16),
        steps=12,
        warmup_steps=3,
        precision="auto",  # overdrive chooses; HF Trainer runs fp32 and bf16 and the faster counts
        timeout=300.0,
    ),
    "llama3.2-1b-seq4096": BenchPreset(
        name="llama3.2-1b-seq4096",
        description="Llama-3.2-1B shape (vocab 128256), seq 4096, global batch = 1/2/3/4 rows per GPU on 8 GPUs",
        device="cuda",
        model_config="llama3.2-1b",
        seq_len=4096,
        batch_sizes=(8, 16, 24, 32),
        steps=20,
        warmup_steps=5,
        timeout=1800.0,
    ),
    "llama3-8b-seq4096": BenchPreset(
        name="llama3-8b-seq4096",
        description="the TorchAcc seed table: Llama3-8B, seq 4096, global batch 8/16/24 on 8 GPUs, bf16, flash",
        device="cuda",
        model_config="llama3-8b",
        seq_len=4096,
        batch_sizes=(8, 16, 24),
        steps=20,
        warmup_steps=5,
        timeout=2400.0,
    ),
}


@dataclass(frozen=True)
class SystemSpec:
    """One column of the table: a system kind and, for overdrive, the `overdrive train` flags it adds.

    The launch fields are filled by `plan.plan_system`: an overdrive column's strategy (preset name or absolute
    YAML path) decides its processes and its tensor/pipeline degrees; HF columns run on the bench's --nproc. A
    strategy that cannot run on those processes leaves the column planned with `skip` set to the reason.
    """

    name: str
    kind: str
    extra_args: tuple[str, ...] = ()
    strategy: str | None = None
    nproc: int | None = None  # None: the workload's nproc
    tp: int = 1
    pp: int = 1
    skip: str = ""  # why this column cannot run on the bench's processes: its cells are reported skipped


@dataclass(frozen=True)
class Workload:
    """Everything fixed across systems: the same tokens, model init, precision and global batch for all."""

    preset: str | None
    model_config: str
    seq_len: int
    batch_sizes: tuple[int, ...]
    steps: int
    warmup_steps: int
    precision: str
    device: str  # "cpu" or "cuda": where the cells run
    nproc: int  # processes (one per GPU) per HF cell and per distributed overdrive strategy
    micro_batch_size: int | None  # per device; None = global / nproc (no accumulation, as the seeds)
    attn_implementation: str
    learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    seed: int = 42
    vocab_size: int = 8000
    tokenizer: str | None = None
    train_file: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    text_column: str | None = None
    timeout: float = 600.0
    repeats: int = 1  # runs per cell; the fastest successful one is reported
    threads: int | None = None  # OMP/MKL threads per process for every system (CPU); None leaves them alone
    systems: tuple[SystemSpec, ...] = field(default_factory=tuple)

    def micro_for(self, global_batch: int, dp: int | None = None) -> int:
        """Rows per forward over `dp` data-parallel ranks (default: all processes)."""
        return self.micro_batch_size or max(1, global_batch // (dp or self.nproc))

    def accumulation_for(self, global_batch: int, dp: int | None = None) -> int:
        return global_batch // (self.micro_for(global_batch, dp) * (dp or self.nproc))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["systems"] = [asdict(s) for s in self.systems]
        return out


def default_overdrive_args(device: str, nproc: int) -> tuple[str, ...]:
    """overdrive's default, `--strategy auto` (overdrive.search.auto): one process unless --nproc asks for
    more, where auto chooses among the data-parallel layouts on those processes."""
    return ("--strategy", "auto") if nproc > 1 else ()


def parse_systems(
    text: str, device: str, nproc: int, overdrive_args: str | None, strategies: str | None = None
) -> list[SystemSpec]:
    """`hf-trainer,hf-deepspeed,overdrive` -> specs; overdrive gets the device default unless args are given.
    With `strategies` (`single,fsdp,tp`) the overdrive entry becomes one column per strategy."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError("--systems is empty; pass e.g. hf-trainer,hf-deepspeed,overdrive")
    if len(set(names)) != len(names):
        raise UsageError("--systems names a system twice; list each once")
    specs = []
    for name in names:
        if name not in SYSTEM_KINDS:
            raise UsageError(f"unknown system {name!r} in --systems; choose from {', '.join(SYSTEM_KINDS)}")
        if name != "overdrive":
            specs.append(SystemSpec(name=name, kind=name))
        elif strategies is not None:
            specs += strategy_columns(strategies, overdrive_args)
        else:
            extra = (
                tuple(shlex.split(overdrive_args))
                if overdrive_args is not None
                else default_overdrive_args(device, nproc)
            )
            specs.append(SystemSpec(name=name, kind=name, extra_args=extra))
    if strategies is not None and "overdrive" not in names:
        raise UsageError("--overdrive-strategies needs overdrive in --systems; add it there")
    return specs


def strategy_columns(strategies: str, overdrive_args: str | None) -> list[SystemSpec]:
    """`single,fsdp,tp` -> columns overdrive-single, overdrive-fsdp, overdrive-tp, each running the overdrive
    flags (default --compile --kernels) with its own --strategy."""
    from overdrive.bench.plan import strategy_arg, strategy_label

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    if not names:
        raise UsageError("--overdrive-strategies is empty; pass e.g. single,fsdp,tp")
    base = tuple(shlex.split(overdrive_args)) if overdrive_args is not None else ("--compile", "--kernels")
    if strategy_arg(base) is not None:
        raise UsageError(
            "--overdrive-args sets --strategy while --overdrive-strategies gives each column its own; drop one"
        )
    return [
        SystemSpec(
            name=f"overdrive-{strategy_label(n)}", kind="overdrive", extra_args=(*base, "--strategy", n)
        )
        for n in names
    ]


def parse_variant(text: str) -> SystemSpec:
    """`NAME=FLAGS` -> an extra overdrive column `overdrive-NAME` running `overdrive train FLAGS`."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(
            f"--overdrive-variant must look like NAME=FLAGS (e.g. eager=--no-compile), got {text!r}"
        )
    return SystemSpec(name=f"overdrive-{name}", kind="overdrive", extra_args=tuple(shlex.split(flags)))


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--batch-sizes must be comma-separated whole numbers, got {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise UsageError(f"--batch-sizes must be positive whole numbers, got {text!r}")
    return tuple(dict.fromkeys(sizes))


def validate(w: Workload) -> None:
    """Fail before anything is built: every cell must be able to split its batch the same way."""
    if w.steps <= 0:
        raise UsageError(f"--steps must be positive, got {w.steps}")
    if w.warmup_steps < 1:
        raise UsageError(
            f"--warmup-steps must be at least 1 (timing starts at the end of a step), got {w.warmup_steps}"
        )
    if w.seq_len <= 0 or w.nproc <= 0 or w.timeout <= 0 or w.repeats <= 0:
        raise UsageError("--seq-len, --nproc, --timeout and --repeats must be positive")
    if w.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {w.precision!r}")
    if w.threads is not None and w.threads <= 0:
        raise UsageError(f"--threads must be positive, got {w.threads}")
    if w.micro_batch_size is not None and w.micro_batch_size <= 0:
        raise UsageError(f"--micro-batch-size must be positive, got {w.micro_batch_size}")
    # overdrive columns split the batch over their strategy's data-parallel ranks: checked by plan.plan_workload
    hf = any(s.kind != "overdrive" for s in w.systems)
    for g in w.batch_sizes if hf else ():
        m = w.micro_for(g)
        if g % (m * w.nproc):
            raise UsageError(
                f"global batch size {g} is not a multiple of micro batch {m} × {w.nproc} processes; "
                "change --batch-sizes, --micro-batch-size or --nproc"
            )
    if w.train_file and w.dataset:
        raise UsageError("--train-file and --dataset are exclusive; pass one data source")
    if not w.systems:
        raise UsageError("no systems to run; pass --systems")
