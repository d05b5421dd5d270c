"""Stand-in for `overdrive train` when testing the torchrun argv: records what each process was given."""

import json
import os
import sys
from pathlib import Path

out = Path(os.environ["PROBE_DIR"]) / f"rank{os.environ['RANK']}.json"
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
out.write_text(json.dumps({"argv": sys.argv[1:], **{k: os.environ.get(k) for k in keys}}))
