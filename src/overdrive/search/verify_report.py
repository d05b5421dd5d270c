"""`overdrive verify`'s output: the per-step table on the terminal and verify.json for tools."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

from overdrive.search.verify import StepDiff, Tolerance, median_grad_norm_diff, passed


def fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6f}"


def print_table(diffs: list[StepDiff], tol: Tolerance) -> None:
    """A rich table on a terminal, plain columns otherwise (logs, pipes)."""
    loss_unit = "rel" if tol.loss_relative else "abs"
    gn_unit = "rel" if tol.grad_norm_relative else "abs"
    header = [
        "step",
        "reference loss",
        "strategy loss",
        f"loss diff ({loss_unit})",
        f"grad-norm diff ({gn_unit})",
        "",
    ]
    rows = [
        [
            str(d.step),
            fmt(d.ref_loss),
            fmt(d.loss),
            f"{d.loss_diff:.2e}",
            f"{d.grad_norm_diff:.2e}",
            "" if d.ok else "FAIL",
        ]
        for d in diffs
    ]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title_justify="left")
        for col in header:
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*row, style=None if not row[-1] else "red")
        Console().print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def write_report(
    out: Path,
    strategy: str,
    nproc: int,
    steps: int,
    tol: Tolerance,
    diffs: list[StepDiff],
    verdict: str,
    commands: dict[str, list[str]],
) -> None:
    """verify.json: both curves, the differences, the tolerance, the verdict and the commands (atomic)."""
    from overdrive.atomic import write_json

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    bad = [d.step for d in diffs if not d.ok]
    write_json(
        out / "verify.json",
        {
            "strategy": strategy,
            "nproc_per_node": nproc,
            "steps": steps,
            "verdict": "pass" if passed(diffs, tol) else "fail",
            "verdict_line": verdict,
            "first_failing_step": bad[0] if bad else None,
            "tolerance": dataclasses.asdict(tol),
            "max_loss_diff": finite(max(d.loss_diff for d in diffs)),
            "max_grad_norm_diff": finite(max(d.grad_norm_diff for d in diffs)),
            "median_grad_norm_diff": finite(median_grad_norm_diff(diffs)),
            "reference": {"loss": [d.ref_loss for d in diffs], "grad_norm": [d.ref_grad_norm for d in diffs]},
            "strategy_run": {"loss": [d.loss for d in diffs], "grad_norm": [d.grad_norm for d in diffs]},
            "loss_diff": [finite(d.loss_diff) for d in diffs],
            "grad_norm_diff": [finite(d.grad_norm_diff) for d in diffs],
            "commands": {name: " ".join(cmd) for name, cmd in commands.items()},
            "configs": {"strategy": str(out / "strategy.yaml"), "reference": str(out / "reference.yaml")},
            "logs": {"strategy": str(out / "strategy.log"), "reference": str(out / "reference.log")},
        },
    )
