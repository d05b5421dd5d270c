"""Console output: a rich progress bar with ETA on a terminal, plain lines otherwise, nothing with --quiet."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total: int, completed: int, enabled: bool, quiet: bool) -> None:
        self.enabled = enabled
        self.quiet = quiet
        self._bar = None
        if enabled and not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task("train", total=total, completed=completed, loss="-")
            self._bar.start()

    def info(self, message: str) -> None:
        if not self.enabled or self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def advance(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, loss=f"{loss:.4f}")

    def metrics(self, record: dict[str, Any]) -> None:
        tps = record.get("tokens_per_sec")
        self.info(
            f"step {record['step']}: loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"grad_norm {record['grad_norm']:.3f}" + (f" {tps:.0f} tok/s" if tps else "")
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
