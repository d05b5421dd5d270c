"""HF run_clm.py / TrainingArguments flags, accepted by `overdrive train` as aliases.

A run_clm.py command keeps working when `python run_clm.py` (or the script path after `torchrun`) becomes
`overdrive train` (`-m overdrive train`). Flags with overdrive's meaning are extra spellings of the native flag;
the others are parsed here into private `clm_*` values and turned into config values by `flag_overrides`,
which also refuses contradictions (`--bf16 --fp16`) and what overdrive cannot do yet (`--optim sgd`).
Meanings that differ are listed in docs/run_clm.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from overdrive.config import Implied, TrainConfig
from overdrive.errors import UsageError

# HF name -> overdrive field, same meaning and value: an extra option string on the native flag
SAME_MEANING: dict[str, str] = {
    "model_name_or_path": "model",
    "config_name": "model_config",
    "tokenizer_name": "tokenizer",
    "torch_dtype": "dtype",
    "cache_dir": "cache_dir",
    "dataset_name": "dataset",
    "dataset_config_name": "dataset_config",
    "train_file": "train_file",
    "validation_file": "validation_file",
    "validation_split_percentage": "validation_split_percentage",
    "block_size": "block_size",
    "max_train_samples": "max_train_samples",
    "max_eval_samples": "max_eval_samples",
    "num_train_epochs": "num_train_epochs",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "per_device_eval_batch_size": "eval_batch_size",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "adam_epsilon": "adam_epsilon",
    "warmup_ratio": "warmup_ratio",
    "max_grad_norm": "max_grad_norm",
    "save_total_limit": "save_total_limit",
    "output_dir": "output_dir",
}
# other tools' names for a native flag, accepted in both spellings (TRL's SFTConfig: the training row length)
OTHER_NAMES: dict[str, str] = {"max_seq_length": "block_size"}
# HF booleans taking an optional value (`--bf16`, `--bf16 true`, `--bf16=0`) -> overdrive field
BOOL_FLAGS: dict[str, str] = {
    "trust_remote_code": "trust_remote_code",
    "gradient_checkpointing": "activation_checkpointing",
    "torch_compile": "compile",
    "overwrite_output_dir": "overwrite",
}
# run_clm flags with no meaning for overdrive: accepted, a note says why they change nothing
IGNORED: dict[str, str] = {
    "do_train": "overdrive always trains",
    "do_eval": "overdrive evaluates whenever there is validation data",
    "use_fast_tokenizer": "overdrive always loads the fast (Rust) tokenizer",
    "low_cpu_mem_usage": "overdrive builds models with transformers' defaults",
    "preprocessing_num_workers": "overdrive tokenises in one process per rank",
    "fsdp_config": "overdrive wraps every decoder layer; use --gradient_checkpointing for recomputation",
}
IGNORED_WITH_VALUE = ("preprocessing_num_workers", "fsdp_config")
STEP_FLAGS = ("logging_steps", "save_steps", "eval_steps")
SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "constant_with_warmup": "constant",
}
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
PREFIX = "clm_"

# HF spelling -> YAML key, for the hint on an unknown YAML key
YAML_KEY_FOR: dict[str, str] = {
    **{k: v for k, v in SAME_MEANING.items() if k != v},
    **BOOL_FLAGS,
    "per_device_train_batch_size": "micro_batch_size",
    "lr_scheduler_type": "lr_scheduler",
    "bf16": "precision",
    "fp16": "precision",
}


def hf_bool(text: str) -> bool:
    """HF's spelling of booleans (transformers' string_to_bool accepts the same words)."""
    word = text.strip().lower()
    if word in ("true", "yes", "t", "y", "1"):
        return True
    if word in ("false", "no", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (yes/no, 1/0), got {text!r}")


def aliases_for(field_name: str) -> list[str]:
    """The run_clm spellings that are plain extra names of the native flag `field_name`."""
    native = "--" + field_name.replace("_", "-")
    found = ["--" + hf for hf, target in SAME_MEANING.items() if target == field_name]
    found += [f"--{s}" for n, t in OTHER_NAMES.items() if t == field_name for s in (n.replace("_", "-"), n)]
    return [a for a in found if a != native]


def add_hf_arguments(parser: argparse.ArgumentParser) -> None:
    """The run_clm flags whose value needs translating; SAME_MEANING ones are added by the caller."""
    group = parser.add_argument_group("run_clm.py / TrainingArguments flags (see docs/run_clm.md)")

    def add(name: str, **kwargs: Any) -> None:
        group.add_argument("--" + name, dest=PREFIX + name, default=None, **kwargs)

    bools = {
        **{k: "--" + v.replace("_", "-") for k, v in BOOL_FLAGS.items()},
        "bf16": "--precision bf16",
        "fp16": "--precision fp16",
        **{k: "accepted, ignored" for k in IGNORED if k not in IGNORED_WITH_VALUE},
    }
    for name, meaning in bools.items():
        add(name, nargs="?", const=True, type=hf_bool, metavar="BOOL", help=meaning)
    add("preprocessing_num_workers", type=int, metavar="N", help=argparse.SUPPRESS)
    add("fsdp_config", metavar="JSON", help="accepted, ignored (overdrive wraps every decoder layer)")
    add("per_device_train_batch_size", type=int, metavar="N", help="--micro-batch-size; accumulation 1")
    add("max_steps", type=int, metavar="N", help="--max-steps; -1 means unset (HF's default)")
    add("warmup_steps", type=float, metavar="N", help="--warmup-steps; a value in (0, 1) is a ratio")
    for name in STEP_FLAGS:
        add(name, type=float, metavar="N", help=f"--{name.replace('_', '-')} (whole steps only)")
    add("lr_scheduler_type", metavar="NAME", help="linear, cosine (to 0), constant, constant_with_warmup")
    add("optim", metavar="NAME", help="adamw_torch or adamw_torch_fused")
    add("report_to", nargs="+", metavar="NAME", help="--report-to (a list of names or a comma list)")
    add("save_strategy", metavar="WHEN", help="steps or no")
    add("logging_strategy", metavar="WHEN", help="steps")
    add("eval_strategy", metavar="WHEN", help="steps or no")
    add("evaluation_strategy", metavar="WHEN", help=argparse.SUPPRESS)
    add("fsdp", nargs="?", const="full_shard", metavar="OPTIONS", help="full_shard, shard_grad_op, offload")
    add("deepspeed", metavar="JSON", help="a DeepSpeed config: its ZeRO stage picks a deepspeed preset")


class Overrides:
    """The config values the flags give, with which flag gave each (for contradiction messages)."""

    def __init__(self, args: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        self.values: dict[str, Any] = {k: v for k, v in args.items() if k in names}
        self.source = {k: _as_typed(k, v) for k, v in self.values.items() if v is not None}
        self.notes: list[str] = []
        self.ignored: list[str] = []

    def given(self, name: str) -> bool:
        return self.values.get(name) is not None and not isinstance(self.values[name], Implied)

    def set(self, name: str, value: Any, typed: str) -> None:
        """Set a field, refusing a different value already set by another flag (`typed`: the flag as typed)."""
        if self.given(name) and self.values[name] != value:
            raise UsageError(f"{typed} contradicts {self.source[name]}; pass one of them")
        self.values[name] = value
        self.source[name] = typed

    def imply(self, name: str, value: Any, unless: tuple[str, ...] = ()) -> None:
        if not self.given(name):
            self.values[name] = Implied(value, unless)


def _as_typed(name: str, value: Any) -> str:
    """A native flag as the user typed it, for messages."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def flag_overrides(args: dict[str, Any]) -> dict[str, Any]:
    """Parsed arguments -> {field: value or Implied} for `build_config`; prints notes for ignored flags."""
    out = Overrides(args)
    clm = {k.removeprefix(PREFIX): v for k, v in args.items() if k.startswith(PREFIX) and v is not None}
    for name, value in clm.items():
        HANDLERS[name](out, name, value)
    _check_strategies(out, clm)
    if out.ignored:
        out.notes.insert(0, "run_clm.py flags accepted and ignored: " + "; ".join(out.ignored))
    if os.environ.get("RANK", "0") == "0":
        for note in out.notes:
            print(f"overdrive: note: {note}", file=sys.stderr)
    return out.values


def _bool(out: Overrides, name: str, value: bool) -> None:
    out.set(BOOL_FLAGS[name], value, f"--{name} {str(value).lower()}")


def _precision(out: Overrides, name: str, value: bool) -> None:
    if value:
        out.set("precision", name, f"--{name}")
    else:  # an explicit false means fp32 in HF (overdrive's own default is auto)
        out.imply("precision", "fp32")


def _ignored(out: Overrides, name: str, value: Any) -> None:
    out.ignored.append(f"--{name} ({IGNORED[name]})")


def _per_device_batch(out: Overrides, name: str, value: int) -> None:
    """HF's global batch is per-device × ranks × accumulation, and accumulation defaults to 1."""
    out.set("micro_batch_size", value, f"--{name} {value}")
    out.imply("gradient_accumulation_steps", 1, unless=("global_batch_size",))


def _max_steps(out: Overrides, name: str, value: int) -> None:
    if value != -1:  # HF's default, meaning "use the epochs"
        out.set("max_steps", value, f"--{name} {value}")


def _warmup_steps(out: Overrides, name: str, value: float) -> None:
    """transformers 5 reads a warm-up below 1 as a ratio of the total steps."""
    if 0 < value < 1:
        out.set("warmup_ratio", value, f"--{name} {value:g}")
    elif math.isfinite(value) and value == int(value):
        out.set("warmup_steps", int(value), f"--{name} {value:g}")
    else:
        raise UsageError(f"--{name} must be whole steps or a ratio in (0, 1), got {value:g}")


def _steps(out: Overrides, name: str, value: float) -> None:
    if not math.isfinite(value) or value != int(value):
        raise UsageError(
            f"--{name} {value:g} is a fraction of the run in HF; overdrive needs whole steps, e.g. 100"
        )
    out.set(name, int(value), f"--{name} {value:g}")


def _scheduler(out: Overrides, name: str, value: str) -> None:
    if value not in SCHEDULERS:
        raise UsageError(f"--{name} {value} is not supported; use one of {', '.join(SCHEDULERS)}")
    out.set("lr_scheduler", SCHEDULERS[value], f"--{name} {value}")
    if value == "cosine":
        out.imply("min_lr_ratio", 0.0)  # HF's cosine decays to 0; overdrive's keeps a floor


def _optim(out: Overrides, name: str, value: str) -> None:
    if value not in OPTIMIZERS:
        raise UsageError(
            f"--optim {value} is not supported yet; overdrive trains with AdamW ({', '.join(OPTIMIZERS)})"
        )


def _report_to(out: Overrides, name: str, value: list[str]) -> None:
    names = ",".join(v.strip() for part in value for v in part.split(","))
    out.set("report_to", names, f"--{name} {' '.join(value)}")


def _strategy_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"--{name} {value} is not supported; use {' or '.join(allowed)}")


def _save_strategy(out: Overrides, name: str, value: str) -> None:
    _strategy_choice(name, value, ("steps", "no"))
    if value == "steps":
        out.imply("save_steps", 500)  # HF's default interval


def _logging_strategy(out: Overrides, name: str, value: str) -> None:
    _strategy_choice(name, value, ("steps",))


def _eval_strategy(out: Overrides, name: str, value: str) -> None:
    _strategy_choice(name, value, ("steps", "no"))


def _fsdp(out: Overrides, name: str, value: str) -> None:
    preset = fsdp_preset(value)
    if preset is not None:
        out.set("strategy", preset, f"--{name} {value}")
    else:  # --fsdp false: no FSDP, the single-process strategy (not overdrive's default auto)
        out.imply("strategy", None)


def _deepspeed(out: Overrides, name: str, value: str) -> None:
    preset = deepspeed_preset(value)
    out.set("strategy", preset, f"--{name} {value}")
    out.notes.append(
        f"--deepspeed {value}: running overdrive's {preset} strategy (the file's ZeRO stage and offload); "
        "batch sizes, optimizer and precision come from the flags"
    )


def _check_strategies(out: Overrides, clm: dict[str, Any]) -> None:
    """Contradictions between flags that are only visible once all are read."""
    if clm.get("save_strategy") == "no" and out.given("save_steps"):
        raise UsageError("--save_strategy no contradicts --save-steps; pass one of them")
    for name in ("eval_strategy", "evaluation_strategy"):
        if clm.get(name) == "no" and out.given("eval_steps"):
            raise UsageError(f"--{name} no contradicts --eval-steps; pass one of them")
        if clm.get(name) == "steps" and not out.given("eval_steps"):
            raise UsageError(f"--{name} steps needs --eval_steps N (overdrive has no default interval)")


def fsdp_preset(value: str) -> str | None:
    """HF's --fsdp options -> an overdrive FSDP2 preset (every decoder layer is wrapped: auto_wrap)."""
    words = set(value.replace(",", " ").lower().split())
    if words <= {"false", "no", "0"}:
        return None
    words -= {"auto_wrap", "true", "yes", "1"}
    unknown = words - {"full_shard", "shard_grad_op", "offload", "no_shard"}
    if unknown:
        raise UsageError(
            f"--fsdp option {sorted(unknown)[0]} is not supported; use full_shard, shard_grad_op, offload "
            "or auto_wrap (hybrid sharding: --strategy with a YAML file, see docs/strategies.md)"
        )
    if "no_shard" in words:
        return "ddp"
    if "shard_grad_op" in words:
        if "offload" in words:
            raise UsageError("--fsdp shard_grad_op offload has no preset; use full_shard offload")
        return "zero2"
    return "zero3-offload" if "offload" in words else "fsdp"


def deepspeed_preset(path: str) -> str:
    """A DeepSpeed JSON -> the overdrive deepspeed preset with its ZeRO stage and offload."""
    zero = _read_json(path, "--deepspeed").get("zero_optimization") or {}
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (1, 2, 3):
        raise UsageError(f"--deepspeed {path}: zero_optimization.stage must be 1, 2 or 3, got {stage!r}")
    offload = any(
        isinstance(zero.get(key), dict) and zero[key].get("device") in ("cpu", "nvme")
        for key in ("offload_optimizer", "offload_param")
    )
    if offload and stage != 3:
        raise UsageError(f"--deepspeed {path}: offload is supported with ZeRO stage 3 only")
    return "deepspeed-zero3-offload" if offload else f"deepspeed-zero{stage}"


def _read_json(path: str, flag: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path} does not exist; pass an existing JSON file")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path} is not valid JSON ({type(exc).__name__}); fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(f"{flag} {path} must hold a JSON object")
    return data


HANDLERS: dict[str, Callable[[Overrides, str, Any], None]] = {
    **{name: _bool for name in BOOL_FLAGS},
    **{name: _ignored for name in IGNORED},
    **{name: _steps for name in STEP_FLAGS},
    "bf16": _precision,
    "fp16": _precision,
    "per_device_train_batch_size": _per_device_batch,
    "max_steps": _max_steps,
    "warmup_steps": _warmup_steps,
    "lr_scheduler_type": _scheduler,
    "optim": _optim,
    "report_to": _report_to,
    "save_strategy": _save_strategy,
    "logging_strategy": _logging_strategy,
    "eval_strategy": _eval_strategy,
    "evaluation_strategy": _eval_strategy,
    "fsdp": _fsdp,
    "deepspeed": _deepspeed,
}
