"""The render job as a script for ``ray submit`` (which runs a file, not ``-m``):

    ray submit infra/render.yaml scripts/render_job.py -- --source objaverse --output /data/shards ...

It is ``python -m data_pipeline render <args>`` joining the cluster it runs on
(``--ray-address auto`` unless another address is given).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's data_pipeline

from data_pipeline.__main__ import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--ray-address" or a.startswith("--ray-address=") for a in args):
        args += ["--ray-address", "auto"]
    sys.exit(main(["render", *args]))
