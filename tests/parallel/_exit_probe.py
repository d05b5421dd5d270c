"""Stand-in for `overdrive train` under real torchrun: each rank prints one error line and exits PROBE_EXIT."""

import os
import sys

code = int(os.environ.get("PROBE_EXIT", "0"))
if code:
    print(f"overdrive: error: probe rank {os.environ['RANK']} stops with {code}", file=sys.stderr)
sys.exit(code)
