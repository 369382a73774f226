"""One process of a data-parallel test run (tests/test_distributed.py starts it with torchrun): trains each job of a
JSON list in turn, every process in the same process group.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py JOBS.json

JOBS.json: [{"config": {...}, "out": "RUN_DIR", "resume": false}, ...]
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlhflab.config import config_from_dict  # noqa: E402
from rlhflab.pipelines.train import train  # noqa: E402

for job in json.loads(open(sys.argv[1]).read()):
    train(config_from_dict(job["config"]), job["out"], resume=job.get("resume", False), quiet=True)
