"""Every bad input a user can type: exit 2, one `overdrive: error:` line, no traceback, nothing written.

To add a case, append a `Case` to `CASES` (or to a new list joined into it). `argv` is the full command line
after `overdrive` (so `train ...`, `export ...`, `launch ...`); the strings `{tmp}` and `{out}` in it become the
test's tmp dir and `{tmp}/run`. It may instead be a function of the tmp dir that writes whatever the case
needs (files, a finished run in `{tmp}/run`) and returns the argv. `env` sets environment variables. The test
snapshots `{tmp}/run` after the set-up and requires it unchanged (or still absent) afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from overdrive.cli import main

Argv = Sequence[str] | Callable[[Path], Sequence[str]]


class Case(NamedTuple):
    id: str
    argv: Argv
    expect: str  # a substring of the error line
    env: dict[str, str] | None = None


def train(*flags: str) -> list[str]:
    """`overdrive train FLAGS --output-dir {out}`: every such case must fail before the run dir exists."""
    return ["train", *flags, "--output-dir", "{out}"]


def with_yaml(text: str, *flags: str) -> Callable[[Path], list[str]]:
    """A case whose run config is the YAML `text` (written under tmp, outside the output dir)."""

    def build(tmp: Path) -> list[str]:
        path = tmp / "run.yaml"
        path.write_text(text)
        return train("--config", str(path), *flags)

    return build


def with_file(name: str, content: str | bytes, *flags: str) -> Callable[[Path], list[str]]:
    """A case that needs a file `{tmp}/name`; `{file}` in flags names it."""

    def build(tmp: Path) -> list[str]:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return train(*(f.replace("{file}", str(path)) for f in flags))

    return build


NUMERIC_FLAGS = [
    Case("lr-nan", train("--learning-rate", "nan"), "--learning-rate must be a finite number"),
    Case("lr-inf", train("--learning-rate", "inf"), "--learning-rate must be a finite number"),
    Case("lr-minus-inf", train("--learning-rate=-inf"), "--learning-rate must be a finite number"),
    Case("lr-zero", train("--learning-rate", "0"), "--learning-rate must be positive"),
    Case("lr-not-a-number", train("--learning-rate", "fast"), "invalid float value: 'fast'"),
    Case("epochs-nan", train("--num-train-epochs", "nan"), "--num-train-epochs must be a finite number"),
    Case("epochs-inf", train("--num-train-epochs", "inf"), "--num-train-epochs must be a finite number"),
    Case("epochs-zero", train("--num-train-epochs", "0"), "--num-train-epochs must be positive"),
    Case("beta1-2", train("--adam-beta1", "2.0"), "--adam-beta1 must be in [0, 1), got 2"),
    Case("beta1-negative", train("--adam-beta1", "-0.1"), "--adam-beta1 must be in [0, 1)"),
    Case("beta2-1", train("--adam-beta2", "1"), "--adam-beta2 must be in [0, 1), got 1"),
    Case("beta2-nan", train("--adam-beta2", "nan"), "--adam-beta2 must be a finite number"),
    Case("epsilon-negative", train("--adam-epsilon", "-1"), "--adam-epsilon must be positive, got -1"),
    Case("epsilon-zero", train("--adam-epsilon", "0"), "--adam-epsilon must be positive"),
    Case("weight-decay-negative", train("--weight-decay", "-0.1"), "--weight-decay must not be negative"),
    Case("weight-decay-inf", train("--weight-decay", "inf"), "--weight-decay must be a finite number"),
    Case("grad-norm-nan", train("--max-grad-norm", "nan"), "--max-grad-norm must be a finite number"),
    Case("grad-norm-negative", train("--max-grad-norm", "-1"), "--max-grad-norm must not be negative"),
    Case("warmup-ratio-1", train("--warmup-ratio", "1"), "--warmup-ratio must be in [0, 1)"),
    Case("warmup-ratio-nan", train("--warmup-ratio", "nan"), "--warmup-ratio must be a finite number"),
    Case("warmup-steps-negative", train("--warmup-steps", "-3"), "--warmup-steps must not be negative"),
    Case("min-lr-ratio-above-1", train("--min-lr-ratio", "1.5"), "--min-lr-ratio must be in [0, 1]"),
    Case("min-lr-ratio-inf", train("--min-lr-ratio", "inf"), "--min-lr-ratio must be a finite number"),
    Case(
        "save-total-limit-negative", train("--save-total-limit", "-1"), "--save-total-limit must be positive"
    ),
    Case("save-total-limit-zero", train("--save-total-limit", "0"), "--save-total-limit must be positive"),
    Case("vocab-below-bytes", train("--vocab-size", "100"), "a byte-level BPE needs 258"),
    Case("vocab-huge", train("--vocab-size", "1000000000"), "--vocab-size must be in [258, 1048576]"),
    Case("seed-negative", train("--seed", "-1"), "--seed must be in [0, 2**32), got -1"),
    Case("seed-2-32", train("--seed", str(2**32)), "--seed must be in [0, 2**32)"),
    Case("val-split-100", train("--validation-split-percentage", "100"), "must be in [0, 100), got 100"),
    Case("val-split-negative", train("--validation-split-percentage", "-5"), "must be in [0, 100), got -5"),
    Case("max-new-tokens-negative", train("--max-new-tokens", "-1"), "--max-new-tokens must not be negative"),
    Case("logging-steps-zero", train("--logging-steps", "0"), "--logging-steps must be positive"),
    Case("eval-steps-zero", train("--eval-steps", "0"), "--eval-steps must be positive"),
    Case("save-steps-negative", train("--save-steps", "-5"), "--save-steps must be positive"),
    Case("max-train-samples-zero", train("--max-train-samples", "0"), "--max-train-samples must be positive"),
    Case("max-eval-samples-zero", train("--max-eval-samples", "0"), "--max-eval-samples must be positive"),
    Case("eval-batch-zero", train("--eval-batch-size", "0"), "--eval-batch-size must be positive"),
    Case("accumulation-zero", train("--gradient-accumulation-steps", "0"), "must be positive, got 0"),
    Case("micro-batch-huge", train("--micro-batch-size", str(10**30)), "is too large"),
    Case("block-size-fraction", train("--block-size", "1.5"), "invalid int value: '1.5'"),
    Case(
        "global-not-multiple",
        train("--global-batch-size", "6", "--micro-batch-size", "4"),
        "must be a multiple of --micro-batch-size 4",
    ),
]

RUN_CLM_ALIASES = [
    Case("bf16-not-bool", train("--bf16", "maybe"), "argument --bf16: expected true or false"),
    Case("torch-compile-not-bool", train("--torch_compile", "sure"), "argument --torch_compile"),
    Case("bf16-and-fp16", train("--bf16", "--fp16"), "--fp16 contradicts --bf16"),
    Case(
        "fp16-and-precision", train("--precision", "bf16", "--fp16", "true"), "contradicts --precision bf16"
    ),
    Case("per-device-zero", train("--per_device_train_batch_size", "0"), "must be positive, got 0"),
    Case(
        "per-device-vs-micro",
        train("--per_device_train_batch_size", "2", "--micro-batch-size", "4"),
        "--per_device_train_batch_size 2 contradicts --micro-batch-size 4",
    ),
    Case(
        "accumulation-vs-global",
        train(
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--global-batch-size",
            "5",
        ),
        "--global-batch-size 5 disagrees",
    ),
    Case(
        "accumulation-vs-global-world",
        train(
            "--per_device_train_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "1",
            "--global-batch-size",
            "1",
        ),
        "1 × 4 ranks × --gradient-accumulation-steps 1 = 4",
        env={"WORLD_SIZE": "4", "RANK": "0"},
    ),
    Case(
        "world-size-garbage",
        train("--gradient_accumulation_steps", "2"),
        "WORLD_SIZE='two' in the environment is not a positive integer",
        env={"WORLD_SIZE": "two", "RANK": "0"},
    ),
    Case("optim-sgd", train("--optim", "sgd"), "--optim sgd is not supported yet"),
    Case("optim-adafactor", train("--optim", "adafactor"), "--optim adafactor is not supported yet"),
    Case("scheduler-polynomial", train("--lr_scheduler_type", "polynomial"), "polynomial is not supported"),
    Case("logging-steps-ratio", train("--logging_steps", "0.5"), "overdrive needs whole steps"),
    Case("save-steps-ratio", train("--save_steps", "0.25"), "overdrive needs whole steps"),
    Case("eval-steps-nan", train("--eval_steps", "nan"), "overdrive needs whole steps"),
    Case("warmup-steps-fraction", train("--warmup_steps", "2.5"), "whole steps or a ratio in (0, 1)"),
    Case("warmup-steps-alias-negative", train("--warmup_steps", "-1"), "--warmup-steps must not be negative"),
    Case("max-steps-alias-zero", train("--max_steps", "0"), "--max-steps must be positive"),
    Case("save-strategy-epoch", train("--save_strategy", "epoch"), "--save_strategy epoch is not supported"),
    Case(
        "save-strategy-no-with-steps",
        train("--save_strategy", "no", "--save_steps", "100"),
        "--save_strategy no contradicts --save-steps",
    ),
    Case("logging-strategy-epoch", train("--logging_strategy", "epoch"), "--logging_strategy epoch is not"),
    Case("eval-strategy-steps-alone", train("--eval_strategy", "steps"), "needs --eval_steps N"),
    Case(
        "eval-strategy-no-with-steps",
        train("--evaluation_strategy", "no", "--eval_steps", "10"),
        "--evaluation_strategy no contradicts --eval-steps",
    ),
    Case("fsdp-hybrid", train("--fsdp", "hybrid_shard"), "--fsdp option hybrid_shard is not supported"),
    Case("fsdp-grad-op-offload", train("--fsdp", "shard_grad_op offload"), "has no preset"),
    Case(
        "fsdp-vs-strategy", train("--fsdp", "full_shard", "--strategy", "ddp"), "contradicts --strategy ddp"
    ),
    Case("deepspeed-missing", train("--deepspeed", "{tmp}/ds.json"), "ds.json does not exist"),
    Case(
        "deepspeed-not-json", with_file("ds.json", "{stage: 3", "--deepspeed", "{file}"), "is not valid JSON"
    ),
    Case(
        "deepspeed-stage-0",
        with_file("ds.json", json.dumps({"zero_optimization": {"stage": 0}}), "--deepspeed", "{file}"),
        "zero_optimization.stage must be 1, 2 or 3, got 0",
    ),
    Case(
        "deepspeed-offload-stage-2",
        with_file(
            "ds.json",
            json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}),
            "--deepspeed",
            "{file}",
        ),
        "offload is supported with ZeRO stage 3 only",
    ),
    Case("report-to-all-alias", train("--report_to", "all"), "--report-to all is not supported"),
    Case("report-to-all", train("--report-to", "tensorboard,all"), "name the trackers"),
    Case("report-to-unknown", train("--report_to", "comet"), "--report-to comet: unknown tracker"),
    Case("report-to-none-and-more", train("--report_to", "none", "tensorboard"), "'none' cannot be combined"),
    Case("report-to-empty", train("--report-to", ""), "--report-to is empty"),
    Case(
        "epochs-alias-nan", train("--num_train_epochs", "nan"), "--num-train-epochs must be a finite number"
    ),
    Case("lr-alias-inf", train("--learning_rate", "inf"), "--learning-rate must be a finite number"),
    Case("beta1-alias", train("--adam_beta1", "1.5"), "--adam-beta1 must be in [0, 1)"),
    Case("save-limit-alias", train("--save_total_limit", "-1"), "--save-total-limit must be positive"),
    Case(
        "model-and-config-name",
        train("--model_name_or_path", "gpt2", "--config_name", "tiny"),
        "--model and --model-config are exclusive",
    ),
    Case(
        "dataset-and-train-file",
        train("--dataset_name", "wikitext", "--train_file", "a.txt"),
        "--dataset and --train-file are exclusive",
    ),
    Case(
        "cache-dir-is-file", with_file("cache", "x", "--cache_dir", "{file}"), "is a file; pass a directory"
    ),
    Case("torch-dtype-choice", train("--torch_dtype", "float64"), "invalid choice: 'float64'"),
]

YAML_VALUES = [
    Case("yaml-lr-nan", with_yaml("learning_rate: .nan\n"), "--learning-rate must be a finite number"),
    Case(
        "yaml-epochs-inf", with_yaml("num_train_epochs: .inf\n"), "--num-train-epochs must be a finite number"
    ),
    Case("yaml-block-null", with_yaml("block_size: null\n"), "--block-size needs a value, got null"),
    Case("yaml-seed-bool", with_yaml("seed: true\n"), "--seed must be a number, got True"),
    Case("yaml-steps-fraction", with_yaml("max_steps: 1.5\n"), "--max-steps must be a whole number"),
    Case("yaml-lr-word", with_yaml("learning_rate: fast\n"), "--learning-rate must be a number, got 'fast'"),
    Case("yaml-beta-string", with_yaml("adam_beta1: '2'\n"), "--adam-beta1 must be in [0, 1)"),
    Case(
        "yaml-train-file-list",
        with_yaml("train_file: [a.txt, b.txt]\n"),
        "--train-file must be a single value",
    ),
    Case(
        "yaml-precision-list",
        with_yaml("precision: [bf16]\n"),
        "--precision must be one of auto, fp32, bf16, fp16",
    ),
    Case(
        "yaml-save-limit-negative", with_yaml("save_total_limit: -1\n"), "--save-total-limit must be positive"
    ),
    Case("yaml-report-to-all", with_yaml("report_to: all\n"), "--report-to all is not supported"),
    Case(
        "yaml-report-to-mapping", with_yaml("report_to: {wandb: 1}\n"), "--report-to must be a single value"
    ),
    Case("yaml-hf-key", with_yaml("per_device_train_batch_size: 4\n"), "the YAML key for run_clm's"),
    Case("yaml-unknown-key", with_yaml("learning_rat: 0.1\n"), "unknown key 'learning_rat'"),
    Case("yaml-not-mapping", with_yaml("- 1\n- 2\n"), "must be a mapping of option: value"),
    Case("yaml-syntax", with_yaml("a: [1, 2\n"), "is not valid YAML"),
    Case("yaml-missing", train("--config", "{tmp}/none.yaml"), "none.yaml not found"),
    Case(
        "yaml-not-utf8",
        with_file("c.yaml", b"\xff\xfe\x00", "--config", "{file}"),
        "cannot be read (UnicodeDecodeError)",
    ),
    Case(
        "yaml-accumulation-vs-global",
        with_yaml("gradient_accumulation_steps: 2\nglobal_batch_size: 3\n", "--micro-batch-size", "1"),
        "--global-batch-size 3 disagrees",
    ),
]

CHOICES = [
    Case("precision-fp8", train("--precision", "fp8"), "invalid choice: 'fp8'"),
    Case("scheduler-native", train("--lr-scheduler", "poly"), "invalid choice: 'poly'"),
    Case("packing", train("--packing", "none"), "invalid choice: 'none'"),
    Case("attention", train("--attn-implementation", "flash3"), "invalid choice: 'flash3'"),
    Case("unknown-flag", train("--no-such-flag"), "unrecognized arguments: --no-such-flag"),
]


def finished_run(*flags: str, checkpoints: bool = False) -> Callable[[Path], list[str]]:
    """A case that needs `{tmp}/run` to hold a finished run (the files a run writes, without training)."""

    def build(tmp: Path) -> list[str]:
        run = tmp / "run"
        (run / "final").mkdir(parents=True)
        (run / "summary.json").write_text('{"steps": 3}')
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n')
        if checkpoints:
            (run / "checkpoints" / "step-0000003").mkdir(parents=True)
            (run / "checkpoints" / "step-0000003" / "overdrive-checkpoint.json").write_text("{torn")
        return [a.replace("{run}", str(run)) for a in flags]

    return build


T5 = json.dumps({"model_type": "t5", "d_model": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 100})
DATA_AND_MODEL = [
    Case("csv-ragged", with_file("d.csv", "text,n\na,1\nb,2,3\n", "--train-file", "{file}"), "line 3 has 3"),
    Case(
        "csv-int-column",
        with_file("d.csv", "text,n\na,1\nb,2\n", "--train-file", "{file}", "--text-column", "n"),
        "holds int64 numbers, not text",
    ),
    Case("one-line-file", with_file("d.txt", "one line\n", "--train-file", "{file}"), "too few to hold out"),
    Case("binary-file", with_file("d.txt", b"ab\xff\xfe\x00\x01", "--train-file", "{file}"), "not UTF-8"),
    Case("json-invalid", with_file("d.json", "{nope", "--train-file", "{file}"), "not valid JSON"),
    Case("t5-config", with_file("t5.json", T5, "--model-config", "{file}"), "not a causal language model"),
    Case(
        "model-hub-offline",
        train("--model", "some-org/some-model"),
        "the hub is offline (HF_HUB_OFFLINE=1)",
        {"HF_HUB_OFFLINE": "1"},
    ),
    Case(
        "tokenizer-hub-offline",
        train("--tokenizer", "some-org/tok"),
        "the hub is offline (HF_HUB_OFFLINE=1)",
        {"HF_HUB_OFFLINE": "1"},
    ),
    Case("model-dir-missing", train("--model", "./no-such-dir"), "does not exist"),
    Case("strategy-unknown", train("--strategy", "warp-speed"), "neither a preset nor a YAML file"),
    Case("output-dir-is-a-file", finished_run("train", "--output-dir", "{run}/summary.json"), "is a file"),
    Case(
        "output-dir-under-a-file",
        finished_run("train", "--output-dir", "{run}/summary.json/x"),
        "summary.json is a file; pass another --output-dir",
    ),
]

RUNS_AND_CHECKPOINTS = [
    Case(
        "resume-latest-finished-run-without-checkpoints",
        finished_run("train", "--resume", "latest", "--output-dir", "{run}"),
        "holds a run with no complete checkpoint",
    ),
    Case(
        "new-run-into-finished-run",
        finished_run("train", "--output-dir", "{run}"),
        "already exists and is not empty; pass --overwrite",
    ),
    Case(
        "resume-a-run-dir",
        finished_run("train", "--resume", "{run}"),
        "is a run directory, not a checkpoint",
    ),
    Case(
        "resume-torn-marker",
        finished_run("train", "--resume", "{run}/checkpoints/step-0000003", checkpoints=True),
        "unreadable overdrive-checkpoint.json",
    ),
    Case(
        "export-a-run-dir",
        finished_run("export", "{run}", "{run}/../exported"),
        "is a run directory, not a checkpoint",
    ),
    Case(
        "export-missing-tokenizer",
        finished_run("export", "{run}", "{run}/../exported", "--tokenizer", "{run}/../none"),
        "is a run directory",
    ),
    Case("export-latest", ["export", "latest", "{tmp}/exported"], "not 'latest'"),
    Case("export-missing-checkpoint", ["export", "{tmp}/nope", "{tmp}/exported"], "does not exist"),
]

LAYOUTS = [
    Case(
        "tp-does-not-divide-heads",
        train("--strategy", "tp"),
        "tensor_parallel 3 does not divide the model's 8 attention heads",
        {"RANK": "0", "WORLD_SIZE": "3"},
    ),
    Case(
        "tp-does-not-divide-world",
        with_file("s.yaml", "data_parallel: fsdp\ntensor_parallel: 2\n", "--strategy", "{file}"),
        "tensor_parallel 2 must divide the world size 3",
        {"RANK": "0", "WORLD_SIZE": "3"},
    ),
    Case(
        "tp-with-ddp",
        with_file("s.yaml", "data_parallel: ddp\ntensor_parallel: 2\n", "--strategy", "{file}"),
        "tensor_parallel with ddp is not supported",
        {"RANK": "0", "WORLD_SIZE": "4"},
    ),
    Case(
        "tp-with-deepspeed",
        with_file(
            "s.yaml", "engine: deepspeed\ndata_parallel: ddp\ntensor_parallel: 2\n", "--strategy", "{file}"
        ),
        "tensor_parallel works with engine torch",
    ),
]

LAUNCH = [
    Case("launch-nproc-zero", ["launch", "--nproc-per-node", "0", "--dry-run", "train"], "--nproc-per-node"),
    Case(
        "launch-nproc-word", ["launch", "--nproc-per-node", "abc", "--dry-run", "train"], "--nproc-per-node"
    ),
    Case("launch-bogus-train-flag", ["launch", "--dry-run", "train", "--bogus-flag"], "--bogus-flag"),
    Case(
        "launch-restarts-negative", ["launch", "--max-restarts", "-1", "--dry-run", "train"], "--max-restarts"
    ),
]

CASES: list[Case] = [
    *NUMERIC_FLAGS,
    *RUN_CLM_ALIASES,
    *YAML_VALUES,
    *CHOICES,
    *DATA_AND_MODEL,
    *RUNS_AND_CHECKPOINTS,
    *LAYOUTS,
    *LAUNCH,
]


def listing(path: Path) -> list[tuple[str, int, int]] | None:
    """Every entry under `path` with size and mtime, or None when it does not exist."""
    if not path.exists():
        return None
    return sorted(
        (str(p.relative_to(path)), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in [path, *path.rglob("*")]
    )


def resolve_argv(argv: Argv, tmp: Path) -> list[str]:
    raw = argv(tmp) if callable(argv) else argv
    out = str(tmp / "run")
    return [a.replace("{out}", out).replace("{tmp}", str(tmp)) for a in raw]


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (case.env or {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # a default `runs/` would land here, and be caught below
    argv = resolve_argv(case.argv, tmp_path)
    before = listing(tmp_path / "run")
    capsys.readouterr()

    code = main(argv)

    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("overdrive: error: ")]
    assert code == 2, captured.err
    assert len(errors) == 1, captured.err
    assert all(line.startswith(("overdrive: error: ", "overdrive: note: ")) for line in lines), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert case.expect in errors[0], errors[0]
    assert listing(tmp_path / "run") == before
    assert not (tmp_path / "runs").exists()
