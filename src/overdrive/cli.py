"""Command line: `overdrive train|launch|export|bench`.

Bad input ends with one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from overdrive.errors import OverdriveError, UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the usage block on errors; we print one line that names the problem."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (plus its run_clm.py spellings), then the run_clm-only flags."""
    from overdrive.config import TrainConfig, field_types, literal_choices
    from overdrive.hf_flags import add_hf_arguments, aliases_for

    types = field_types()
    parser.add_argument("--config", help="YAML file with the same keys as the flags (flags win)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for f in dataclasses.fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-"), *aliases_for(f.name)]
        tp = types[f.name]
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        choices = literal_choices(tp)
        common: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        base = [a for a in getattr(tp, "__args__", ()) if a is not type(None)] or [tp]
        if base[0] is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif choices is not None:
            parser.add_argument(*flags, choices=choices, **common)
        else:
            kind = base[0] if base[0] in (int, float) else str
            parser.add_argument(*flags, type=kind, metavar=kind.__name__.upper(), **common)
    add_hf_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="overdrive", description="Training accelerator for HF causal language models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    train = sub.add_parser("train", help="train a causal LM (tiny preset on embedded text by default)")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    add_train_arguments(train)

    from overdrive.parallel.launch import add_launch_arguments

    launch = sub.add_parser(
        "launch", help="run a command on several processes/nodes with torchrun (or SLURM)"
    )
    add_launch_arguments(launch)

    export = sub.add_parser("export", help="write an HF model directory (safetensors) from a checkpoint")
    export.add_argument("checkpoint", help="checkpoint directory (OUTPUT/checkpoints/step-N)")
    export.add_argument("out", help="directory to create")
    export.add_argument("--tokenizer", help="tokenizer to copy (default: the run's OUTPUT/tokenizer)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    export.add_argument("--merge", action="store_true", help="LoRA checkpoints: fold the adapters into the base")

    from overdrive.bench.cli import add_bench_parser

    add_bench_parser(sub)

    from overdrive.search.cli import add_plan_parser

    add_plan_parser(sub)

    from overdrive.search.tune_cli import add_tune_parser

    add_tune_parser(sub)

    from overdrive.search.verify import add_verify_parser

    add_verify_parser(sub)
    return parser


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from overdrive.config import build_config, load_yaml
    from overdrive.hf_flags import flag_overrides

    overrides = flag_overrides(vars(args))
    yaml_values = load_yaml(args.config) if args.config else {}
    cfg = build_config(yaml_values, overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from overdrive.train.loop import train

    train(cfg)
    return 0


def run_launch(args: argparse.Namespace) -> int:
    from overdrive.parallel.launch import run_launch as launch

    return launch(args)


def run_export(args: argparse.Namespace) -> int:
    """Checkpoint of any engine -> HF directory that `AutoModelForCausalLM.from_pretrained` loads."""
    from pathlib import Path

    from overdrive.atomic import staged_dir
    from overdrive.parallel.checkpoint import export_hf
    from overdrive.train.checkpoint import resolve_resume, run_dir_of

    if args.checkpoint == "latest":
        raise UsageError(
            "overdrive export needs a checkpoint directory (OUTPUT/checkpoints/step-N), not 'latest'"
        )
    checkpoint = resolve_resume(args.checkpoint, None)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; pass a directory to write the model into")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} already exists and is not empty; pass --overwrite or another directory")
    tokenizer = load_export_tokenizer(args.tokenizer, run_dir_of(checkpoint) / "tokenizer")
    with staged_dir(out) as tmp:
        export_hf(checkpoint, tmp, merge=args.merge, location=out)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    print(f"exported {checkpoint} -> {out}" + ("" if tokenizer is not None else " (no tokenizer found)"))
    return 0


def load_export_tokenizer(requested: str | None, run_tokenizer: Any) -> Any:
    """--tokenizer must load (checked before anything is written); else the run's own, when it has one."""
    from overdrive.data.tokenizer import load_tokenizer

    if requested is None:
        return load_tokenizer(str(run_tokenizer)) if run_tokenizer.is_dir() else None
    if not os.path.isdir(requested):
        raise UsageError(f"--tokenizer {requested} is not a directory; pass a saved tokenizer directory")
    return load_tokenizer(requested)


def run_bench(args: argparse.Namespace) -> int:
    from overdrive.bench.cli import run_bench as bench

    return bench(args)


def run_plan(args: argparse.Namespace) -> int:
    from overdrive.search.cli import run_plan as plan

    return plan(args)


def run_tune(args: argparse.Namespace) -> int:
    from overdrive.search.tune_cli import run_tune as tune

    return tune(args)


def run_verify(args: argparse.Namespace) -> int:
    from overdrive.search.verify import run_verify as verify

    return verify(args)


COMMANDS: dict[str, Any] = {
    "train": run_train,
    "launch": run_launch,
    "export": run_export,
    "bench": run_bench,
    "plan": run_plan,
    "tune": run_tune,
    "verify": run_verify,
}


def quiet_libraries(debug: bool) -> None:
    """Our progress bar and log lines replace the libraries' own bars and banners."""
    import logging
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("DS_ACCELERATOR"):
        # DeepSpeed (imported by transformers when installed) announces its accelerator guess otherwise.
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    if debug:
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    # DTensor advises on multi-dimensional redistributions (clipping and export under FSDP × TP): not for users
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    # bitsandbytes (imported through transformers → peft) warns on CPUs with AVX512-BF16 that it cannot fetch an
    # optional QLoRA kernel from the hub; its own CPU path runs instead, and the line would precede every error
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    quiet_libraries(debug)
    try:
        args = build_parser().parse_args(argv or ["train"])
        if args.command is None:
            args = build_parser().parse_args(["train", *argv])
        return COMMANDS[args.command](args)
    except OverdriveError as exc:
        if debug:
            raise
        print(f"overdrive: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("overdrive: interrupted", file=sys.stderr)
        return 130
