"""Run configuration: one dataclass whose fields are the CLI flags and the YAML keys.

Flags override YAML; unknown YAML keys are errors. Validation happens here, before anything is loaded or
written, so bad input fails fast with one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from overdrive.errors import UsageError

Precision = Literal["fp32", "bf16", "fp16"]
Packing = Literal["concat", "documents"]
Scheduler = Literal["cosine", "linear", "constant"]
AttnImpl = Literal["eager", "sdpa", "flash_attention_2"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class TrainConfig:
    """Everything `overdrive train` needs. Field docs double as the CLI help."""

    # model
    model: str | None = field(default=None, metadata={"help": "HF model id or local dir to fine-tune"})
    model_config: str | None = field(
        default=None, metadata={"help": "preset (tiny, llama3.2-1b, llama3-8b, llama2-7b) or config.json"}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer id or dir (default: the model's)"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom code from the model repo"})
    dtype: Dtype = field(default="float32", metadata={"help": "dtype the weights are kept in"})
    attn_implementation: AttnImpl = field(default="sdpa", metadata={"help": "attention kernel"})
    vocab_size: int = field(default=8000, metadata={"help": "BPE vocab size when a tokenizer is trained"})
    # data
    dataset: str | None = field(default=None, metadata={"help": "datasets hub name"})
    dataset_config: str | None = field(default=None, metadata={"help": "datasets config name"})
    train_file: str | None = field(default=None, metadata={"help": "txt, json/jsonl, csv or parquet"})
    validation_file: str | None = field(default=None, metadata={"help": "same formats as --train-file"})
    text_column: str | None = field(default=None, metadata={"help": "column holding text (default: text)"})
    validation_split_percentage: int = field(default=5, metadata={"help": "%% of train held out"})
    block_size: int = field(default=256, metadata={"help": "tokens per training row"})
    packing: Packing = field(
        default="concat", metadata={"help": "concat (run_clm) or documents (no attention across docs)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "cap on training rows"})
    # optimisation
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides epochs)"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "epochs when --max-steps is not set"})
    micro_batch_size: int = field(default=8, metadata={"help": "rows per forward pass"})
    global_batch_size: int = field(default=8, metadata={"help": "rows per optimizer step (all ranks)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on norms/biases)"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    lr_scheduler: Scheduler = field(default="cosine", metadata={"help": "cosine, linear or constant"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "warm-up as a fraction of steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of the peak"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip threshold; 0 disables clipping"})
    precision: Precision = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 autocast"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute activations"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each decoder block"})
    kernels: bool = field(default=False, metadata={"help": "swap in overdrive's fused kernels"})
    strategy: str | None = field(default=None, metadata={"help": "strategy preset name or YAML file"})
    seed: int = 42
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms"})
    # evaluation, checkpoints, logging
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N steps (and at the end)"})
    max_eval_batches: int | None = field(default=None, metadata={"help": "cap on eval micro-batches"})
    save_steps: int | None = field(default=None, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept (oldest deleted)"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint dir or 'latest'"})
    logging_steps: int = field(default=10, metadata={"help": "metrics line every N steps"})
    output_dir: str | None = field(default=None, metadata={"help": "default runs/<timestamp>"})
    overwrite: bool = field(default=False, metadata={"help": "allow writing into a non-empty output dir"})
    export: bool = field(default=True, metadata={"help": "write OUTPUT/final with save_pretrained"})
    prompt: str = field(default="The", metadata={"help": "prompt for the closing sample"})
    max_new_tokens: int = field(default=40, metadata={"help": "tokens generated for the sample"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


POSITIVE_INTS = ("block_size", "micro_batch_size", "global_batch_size", "logging_steps", "vocab_size")
OPTIONAL_POSITIVE_INTS = ("max_steps", "eval_steps", "save_steps", "max_train_samples", "max_eval_batches")


def field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def literal_choices(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) is Literal:
        return get_args(tp)
    return None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run YAML file, rejecting unknown keys with a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p} not found; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"config file {p} is not valid YAML{at}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must be a mapping of option: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    normalised = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(f"unknown key '{key}' in {p}; see `overdrive train --help` for valid keys")
        normalised[name] = value
    return normalised


def build_config(yaml_values: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """YAML values, then explicit flag values on top; then validation."""
    values = {**yaml_values, **{k: v for k, v in overrides.items() if v is not None}}
    types = field_types()
    for name, value in values.items():
        values[name] = coerce(name, value, types[name])
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check a YAML value against the field's type (flags are already typed by argparse)."""
    flag = "--" + name.replace("_", "-")
    choices = literal_choices(tp)
    if choices is not None:
        if value not in choices:
            raise UsageError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    base = [a for a in get_args(tp) if a is not type(None)] or [tp]
    target = base[0]
    if value is None:
        return None
    if target is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{flag} must be true or false, got {value!r}")
        return value
    if target in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"{flag} must be a number, got {value!r}")
        if target is int and float(value) != int(value):
            raise UsageError(f"{flag} must be a whole number, got {value!r}")
        return target(value)
    if target is str:
        return str(value)
    return value


def validate(cfg: TrainConfig) -> None:
    for name in POSITIVE_INTS:
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in OPTIONAL_POSITIVE_INTS:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.num_train_epochs <= 0:
        raise UsageError(f"--num-train-epochs must be positive, got {cfg.num_train_epochs}")
    if cfg.learning_rate <= 0:
        raise UsageError(f"--learning-rate must be positive, got {cfg.learning_rate}")
    if cfg.max_grad_norm < 0 or cfg.weight_decay < 0 or cfg.warmup_steps < 0:
        raise UsageError("--max-grad-norm, --weight-decay and --warmup-steps must not be negative")
    if not 0 <= cfg.warmup_ratio < 1 or not 0 <= cfg.min_lr_ratio <= 1:
        raise UsageError("--warmup-ratio must be in [0, 1) and --min-lr-ratio in [0, 1]")
    if not 0 <= cfg.validation_split_percentage < 100:
        raise UsageError(
            f"--validation-split-percentage must be in [0, 100), got {cfg.validation_split_percentage}"
        )
    if cfg.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must not be negative, got {cfg.max_new_tokens}")
    if cfg.model and cfg.model_config:
        raise UsageError("--model and --model-config are exclusive; pass one (fine-tune or from scratch)")
    if cfg.dataset and cfg.train_file:
        raise UsageError("--dataset and --train-file are exclusive; pass one data source")
    if cfg.global_batch_size % cfg.micro_batch_size:
        raise UsageError(
            f"--global-batch-size {cfg.global_batch_size} must be a multiple of --micro-batch-size "
            f"{cfg.micro_batch_size}"
        )
