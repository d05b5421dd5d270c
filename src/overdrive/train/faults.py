"""Fault injection for recovery tests: kill one rank at a chosen step, on the first attempt only.

OVERDRIVE_FAULT_STEP=N [OVERDRIVE_FAULT_RANK=r] makes rank r (default 1) SIGKILL itself right after step N
while torchrun's restart count is 0, so `torchrun --max-restarts 1 ... --resume latest` has to recover.
"""

from __future__ import annotations

import os
import signal

from overdrive.core.runtime import Runtime


def maybe_fail(step: int, runtime: Runtime) -> None:
    target = os.environ.get("OVERDRIVE_FAULT_STEP")
    if not target or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if step == int(target) and runtime.rank == int(os.environ.get("OVERDRIVE_FAULT_RANK", "1")):
        os.kill(os.getpid(), signal.SIGKILL)
