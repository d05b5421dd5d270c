"""Run configuration: one dataclass whose fields are the CLI flags and the YAML keys.

Flags override YAML; unknown YAML keys are errors. Validation happens here, before anything is loaded or
written, so bad input fails fast with one line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from overdrive.errors import UsageError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Packing = Literal["concat", "documents"]
DataFormat = Literal["text", "prompt-completion", "chat"]
Scheduler = Literal["cosine", "linear", "constant"]
AttnImpl = Literal["eager", "sdpa", "flash_attention_2"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
OptimizerName = Literal["adamw", "adamw-8bit", "paged-adamw-8bit", "galore-adamw", "adafactor", "sgd"]
GaloreProj = Literal["std", "reverse_std", "right", "left", "full"]


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
    cache_dir: str | None = field(
        default=None, metadata={"help": "where downloaded models and datasets are cached (default: HF's)"}
    )
    # adapters (peft): overdrive.parallel.adapters
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank; unset: train every weight"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)"})
    lora_target: str = field(
        default="all-linear", metadata={"help": "all-linear or module names, e.g. q_proj,v_proj"}
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA: LoRA with a learned magnitude"})
    modules_to_save: str | None = field(
        default=None, metadata={"help": "modules trained fully beside LoRA, e.g. lm_head,embed_tokens"}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: base linear layers in NF4 (bitsandbytes)"}
    )
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
    data_format: DataFormat = field(
        default="text",
        metadata={"help": "text, prompt-completion ('prompt'/'completion' columns) or chat ('messages')"},
    )
    train_on_prompt: bool = field(
        default=False, metadata={"help": "instruction data: loss on prompts too (default: completions only)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "cap on training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "cap on evaluation rows"})
    # optimisation
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides epochs)"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "epochs when --max-steps is not set"})
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "rows per forward pass (default: up to 8, as many as divide each data-parallel rank's rows)"},
    )
    global_batch_size: int = field(default=8, metadata={"help": "rows per optimizer step (all ranks)"})
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "micro-batches per rank per step; sets global = micro × WORLD_SIZE × this"},
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on norms/biases)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1, in [0, 1)"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2, in [0, 1)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon, > 0"})
    optimizer: OptimizerName = field(
        default="adamw", metadata={"help": "adamw, adamw-8bit, paged-adamw-8bit, galore-adamw, adafactor or sgd"}
    )
    sgd_momentum: float = field(default=0.9, metadata={"help": "SGD momentum, in [0, 1)"})
    galore_rank: int = field(default=128, metadata={"help": "GaLore projection rank"})
    galore_update_gap: int = field(default=200, metadata={"help": "steps between GaLore projection updates"})
    galore_scale: float = field(default=0.25, metadata={"help": "GaLore update scale, > 0"})
    galore_proj_type: GaloreProj = field(default="std", metadata={"help": "GaLore projection side"})
    galore_target: str = field(
        default="attn,mlp", metadata={"help": "linear layers GaLore projects: parts of module names, comma list"}
    )
    neftune_noise_alpha: float | None = field(
        default=None, metadata={"help": "NEFTune embedding noise alpha in training (0 or unset: off)"}
    )
    lr_scheduler: Scheduler = field(default="cosine", metadata={"help": "cosine, linear or constant"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "warm-up as a fraction of steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of the peak"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip threshold; 0 disables clipping"})
    precision: Precision = field(
        default="auto", metadata={"help": "auto (measured on CPU, bf16 on GPUs), fp32, bf16 or fp16 autocast"}
    )
    # None: the strategy decides; true/false overrides it either way
    activation_checkpointing: bool | None = field(default=None, metadata={"help": "recompute activations"})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile each decoder block"})
    kernels: bool | None = field(default=None, metadata={"help": "swap in overdrive's fused kernels"})
    strategy: str | None = field(
        default="auto", metadata={"help": "auto (tune cache, plan, quick measurement), a preset name or YAML file"}
    )
    seed: int = field(default=42, metadata={"help": "random seed, in [0, 2**32)"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms"})
    # evaluation, checkpoints, logging
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N steps (and at the end)"})
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "rows per evaluation forward pass (default: the micro batch)"}
    )
    max_eval_batches: int | None = field(default=None, metadata={"help": "cap on eval micro-batches"})
    save_steps: int | None = field(default=None, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(
        default=2, metadata={"help": "checkpoints kept, at least 1 (oldest deleted; null in YAML: all)"}
    )
    resume: str | None = field(default=None, metadata={"help": "checkpoint dir or 'latest'"})
    logging_steps: int = field(default=10, metadata={"help": "metrics line every N steps"})
    report_to: str | None = field(
        default=None, metadata={"help": "trackers, comma list: none, tensorboard, wandb, trackio, mlflow"}
    )
    output_dir: str | None = field(default=None, metadata={"help": "default runs/<timestamp>"})
    overwrite: bool = field(default=False, metadata={"help": "allow writing into a non-empty output dir"})
    export: bool = field(default=True, metadata={"help": "write OUTPUT/final with save_pretrained"})
    prompt: str = field(default="The", metadata={"help": "prompt for the closing sample"})
    max_new_tokens: int = field(default=40, metadata={"help": "tokens generated for the sample"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Implied:
    """A value a flag implies for another field (e.g. run_clm's per-device batch implies accumulation 1).

    It applies only when neither YAML nor an explicit flag sets that field, nor any field in `unless`.
    """

    value: Any
    unless: tuple[str, ...] = ()


# byte-level BPE: 256 byte symbols plus the two special tokens (see overdrive.data.tokenizer)
MIN_VOCAB = 258
MAX_VOCAB = 2**20
MAX_SEED = 2**32
MAX_INT = 2**63 - 1  # everything below ends up in int64 tensors or counters

POSITIVE_INTS = (
    "block_size",
    "global_batch_size",
    "logging_steps",
    "galore_rank",
    "galore_update_gap",
)
OPTIONAL_POSITIVE_INTS = (
    "micro_batch_size",
    "lora_r",
    "max_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "max_train_samples",
    "max_eval_samples",
    "max_eval_batches",
    "gradient_accumulation_steps",
    "eval_batch_size",
)
# name: (low, low inclusive, high, high inclusive)
FLOAT_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "learning_rate": (0.0, False, math.inf, False),
    "num_train_epochs": (0.0, False, math.inf, False),
    "weight_decay": (0.0, True, math.inf, False),
    "adam_beta1": (0.0, True, 1.0, False),
    "adam_beta2": (0.0, True, 1.0, False),
    "adam_epsilon": (0.0, False, math.inf, False),
    "warmup_ratio": (0.0, True, 1.0, False),
    "min_lr_ratio": (0.0, True, 1.0, True),
    "max_grad_norm": (0.0, True, math.inf, False),
    "lora_alpha": (0.0, False, math.inf, False),
    "lora_dropout": (0.0, True, 1.0, False),
    "sgd_momentum": (0.0, True, 1.0, False),
    "galore_scale": (0.0, False, math.inf, False),
}
# name: (low, high) inclusive, and how the message says it
INT_RANGES: dict[str, tuple[int, int, str]] = {
    "vocab_size": (MIN_VOCAB, MAX_VOCAB, f"must be in [{MIN_VOCAB}, {MAX_VOCAB}]"),
    "seed": (0, MAX_SEED - 1, "must be in [0, 2**32)"),
    "validation_split_percentage": (0, 99, "must be in [0, 100)"),
    "warmup_steps": (0, MAX_INT, "must not be negative"),
    "max_new_tokens": (0, MAX_INT, "must not be negative"),
}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


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
    except (UnicodeDecodeError, OSError) as exc:
        name = type(exc).__name__
        raise UsageError(f"config file {p} cannot be read ({name}); pass a UTF-8 YAML file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must be a mapping of option: value")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    normalised = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(f"unknown key '{key}' in {p}; {_yaml_key_hint(name)}")
        normalised[name] = value
    return normalised


def _yaml_key_hint(name: str) -> str:
    """run_clm users write HF names in YAML too: point them at overdrive's key."""
    from overdrive.hf_flags import YAML_KEY_FOR

    if name in YAML_KEY_FOR:
        return f"the YAML key for run_clm's --{name} is '{YAML_KEY_FOR[name]}'"
    return "see `overdrive train --help` for valid keys"


def build_config(yaml_values: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """YAML values, then explicit flag values on top (implied values only where neither set one)."""
    explicit = {k: v for k, v in overrides.items() if v is not None and not isinstance(v, Implied)}
    values = {**yaml_values, **explicit}
    for name, value in overrides.items():
        if isinstance(value, Implied) and name not in values and not set(value.unless) & set(values):
            values[name] = value.value
    types = field_types()
    for name, value in values.items():
        values[name] = coerce(name, value, types[name])
    cfg = TrainConfig(**values)
    check_ranges(cfg)
    resolve_global_batch(cfg, explicit_global="global_batch_size" in values)
    check_relations(cfg)
    return cfg


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check a YAML value against the field's type (flags are already typed by argparse)."""
    flag = flag_name(name)
    choices = literal_choices(tp)
    if choices is not None:
        if not isinstance(value, str | int | float | bool) or value not in choices:
            raise UsageError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    args = get_args(tp)
    optional = type(None) in args
    target = ([a for a in args if a is not type(None)] or [tp])[0]
    if value is None:
        if optional:
            return None
        raise UsageError(f"{flag} needs a value, got null; give one or remove the key")
    if target is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{flag} must be true or false, got {value!r}")
        return value
    if target in (int, float):
        return _coerce_number(flag, value, target)
    if target is str:
        return _coerce_text(flag, name, value)
    return value


def _coerce_number(flag: str, value: Any, target: type) -> int | float:
    """Numbers, or strings that read as one (YAML reads `1e-3` as a string)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if target is int and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise UsageError(f"{flag} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{flag} must be a number, got {value!r}")
    if target is int:
        if isinstance(value, int):
            return value
        if not math.isfinite(value) or value != int(value):
            raise UsageError(f"{flag} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _coerce_text(flag: str, name: str, value: Any) -> str:
    """Scalars only: a list or mapping turned into its repr would name a file nobody meant."""
    if name == "report_to" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, dict | list | tuple | set):
        raise UsageError(f"{flag} must be a single value, got {value!r}")
    return str(value)


def validate(cfg: TrainConfig) -> None:
    """Every check, for a config built without `build_config`."""
    check_ranges(cfg)
    check_relations(cfg)


def check_ranges(cfg: TrainConfig) -> None:
    """Each number on its own: finite, and inside the range where it means something."""
    for name in POSITIVE_INTS:
        _check_int(name, getattr(cfg, name), 1, MAX_INT, "must be positive")
    for name in OPTIONAL_POSITIVE_INTS:
        if getattr(cfg, name) is not None:
            _check_int(name, getattr(cfg, name), 1, MAX_INT, "must be positive")
    for name, (low, high, meaning) in INT_RANGES.items():
        _check_int(name, getattr(cfg, name), low, high, meaning)
    for name, bounds in FLOAT_RANGES.items():
        _check_float(name, getattr(cfg, name), *bounds)
    if cfg.neftune_noise_alpha is not None:
        _check_float("neftune_noise_alpha", cfg.neftune_noise_alpha, 0.0, True, math.inf, False)


def _check_int(name: str, value: int, low: int, high: int, meaning: str) -> None:
    if value > high and high == MAX_INT:
        raise UsageError(f"{flag_name(name)} {value} is too large; use a value below 2**63")
    if not low <= value <= high:
        hint = ""
        if name == "vocab_size":
            hint = f" (a byte-level BPE needs {MIN_VOCAB}: 256 bytes and 2 special tokens)"
        elif name == "save_total_limit":
            hint = " (the checkpoints kept; leave it out to keep 2, or null in YAML to keep all)"
        raise UsageError(f"{flag_name(name)} {meaning}{hint}, got {value}")


def _check_float(name: str, value: float, low: float, low_in: bool, high: float, high_in: bool) -> None:
    flag = flag_name(name)
    if not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    if above and below:
        return
    if math.isinf(high) and low == 0:
        raise UsageError(f"{flag} must {'not be negative' if low_in else 'be positive'}, got {value:g}")
    interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
    raise UsageError(f"{flag} must be in {interval}, got {value:g}")


def world_size_from_env() -> int:
    """The ranks a launcher (torchrun, deepspeed) announces; 1 without one.

    As overdrive.parallel.distributed.launch_env decides: only RANK and WORLD_SIZE together mean a launcher
    (a shell may export WORLD_SIZE as a node count, as the seed's scripts do).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 1
    text = os.environ["WORLD_SIZE"].strip()
    try:
        world = int(text)
    except ValueError:
        world = 0
    if world < 1:
        raise UsageError(f"WORLD_SIZE={text!r} in the environment is not a positive integer; unset or fix it")
    return world


def resolve_global_batch(cfg: TrainConfig, explicit_global: bool) -> None:
    """HF's rule: global batch = per-device batch × ranks × accumulation, when accumulation is given."""
    if cfg.gradient_accumulation_steps is None:
        return
    from overdrive.parallel.strategy import DEFAULT_MICRO_BATCH

    world = world_size_from_env()
    cfg.micro_batch_size = cfg.micro_batch_size or DEFAULT_MICRO_BATCH  # HF's per-device batch default
    derived = cfg.micro_batch_size * world * cfg.gradient_accumulation_steps
    if explicit_global and cfg.global_batch_size != derived:
        raise UsageError(
            f"--global-batch-size {cfg.global_batch_size} disagrees with --micro-batch-size "
            f"{cfg.micro_batch_size} × {world} ranks × --gradient-accumulation-steps "
            f"{cfg.gradient_accumulation_steps} = {derived}; pass one of them"
        )
    cfg.global_batch_size = derived


def check_batch(cfg: TrainConfig) -> None:
    """The global batch must split over the data-parallel ranks the launcher started and the strategy leaves
    (world ÷ tensor parallel); Strategy.resolve_batch is the one place that decides it."""
    from overdrive.parallel.strategy import Strategy

    strategy = Strategy.from_name_or_path(None if cfg.strategy == "auto" else cfg.strategy)  # auto: any layout
    world = world_size_from_env()
    try:
        strategy.validate(world)
    except UsageError:
        return  # `train` reports the strategy's own problem first, before anything starts
    strategy.resolved_for(world).resolve_batch(
        cfg.global_batch_size, strategy.dp_degree(world), cfg.micro_batch_size
    )


def check_relations(cfg: TrainConfig) -> None:
    """Checks across fields and against the outside world; nothing is read beyond a stat."""
    if cfg.model and cfg.model_config:
        raise UsageError("--model and --model-config are exclusive; pass one (fine-tune or from scratch)")
    if cfg.dataset and cfg.train_file:
        raise UsageError("--dataset and --train-file are exclusive; pass one data source")
    check_data_format(cfg)
    check_batch(cfg)
    check_optimizer_options(cfg)
    if cfg.cache_dir and Path(cfg.cache_dir).exists() and not Path(cfg.cache_dir).is_dir():
        raise UsageError(f"--cache-dir {cfg.cache_dir} is a file; pass a directory")
    if cfg.report_to is not None:
        check_report_to(cfg.report_to)


def check_optimizer_options(cfg: TrainConfig) -> None:
    """GaLore options only with --optimizer galore-adamw; optimizers the strategy cannot run fail now."""
    defaults = TrainConfig()
    if cfg.optimizer != "galore-adamw":
        for name in ("galore_rank", "galore_update_gap", "galore_scale", "galore_proj_type", "galore_target"):
            if getattr(cfg, name) != getattr(defaults, name):
                raise UsageError(
                    f"{flag_name(name)} applies to --optimizer galore-adamw only; pass that or drop the flag"
                )
    elif not any(t.strip() for t in cfg.galore_target.split(",")):
        raise UsageError("--galore-target is empty; name linear layers, e.g. attn,mlp")
    from overdrive.parallel.strategy import Strategy
    from overdrive.train.optim import check_optimizer

    check_optimizer(cfg, Strategy.from_name_or_path(None if cfg.strategy == "auto" else cfg.strategy))


def check_data_format(cfg: TrainConfig) -> None:
    """Instruction data comes as rows (JSON Lines, JSON, Parquet, CSV or a hub dataset), never plain text."""
    fmt = cfg.data_format
    if fmt == "text":
        if cfg.train_on_prompt:
            raise UsageError("--train-on-prompt applies to instruction data; add --data-format prompt-completion/chat")
        return
    columns = "'messages' column" if fmt == "chat" else "'prompt' and 'completion' columns"
    if cfg.text_column is not None:
        raise UsageError(f"--text-column does not apply to --data-format {fmt} (it reads the {columns}); drop it")
    if not cfg.train_file and not cfg.dataset:
        raise UsageError(f"--data-format {fmt} needs --train-file or --dataset with a {columns}")
    for flag, path in (("--train-file", cfg.train_file), ("--validation-file", cfg.validation_file)):
        if path and Path(path).suffix.lower() in (".txt", ".text"):
            raise UsageError(
                f"{flag} {path} is plain text, but --data-format {fmt} reads rows with a {columns}; "
                "pass a .jsonl, .json or .parquet file, or drop --data-format"
            )


def check_report_to(value: str) -> None:
    """Trackers are checked now, so a missing library fails before the run, not after an hour."""
    names = [v.strip() for v in value.split(",")]
    if "all" in names:
        raise UsageError(
            "--report-to all is not supported; name the trackers: none, tensorboard, wandb, trackio, mlflow"
        )
    from overdrive.tracking import check_available, parse_report_to

    check_available(parse_report_to(value))
