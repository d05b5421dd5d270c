"""One rank of a 2-process job whose peer dies (SIGKILL) or hangs (SIGSTOP) mid-run.

Started directly with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (no torchrun agent that would tear the job down
for us), so the survivor must notice on its own: through the gloo error or the process-group timeout.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from overdrive.parallel import Strategy
from overdrive.parallel.distributed import guard, init_runtime, shutdown


def main() -> int:
    mode = sys.argv[1]  # "kill" or "hang"
    runtime = init_runtime(Strategy(data_parallel="ddp"))
    with guard(runtime):
        for step in range(1000):
            if step == 3 and runtime.rank == 1:
                print("rank 1: stopping itself", flush=True)
                os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
            runtime.all_reduce_sum(torch.ones(4))
            time.sleep(0.05)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
