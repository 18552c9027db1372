"""The whole pipeline on this machine: local data served over HTTP, local Ray, local MLflow.

    python -m jobs.demo --config conf/demo.yaml [key=value ...]
"""

import signal
import sys

from jobs.config import job_errors, parse_job_args
from pipelines.demo import check_config, run_demo


def main() -> None:
    # a SIGTERM (kill, a CI timeout) unwinds like Ctrl-C: the photo server, MLflow server and local Ray stop too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cfg = parse_job_args(__doc__, check=check_config)
    with job_errors():
        run_demo(cfg)


if __name__ == "__main__":
    main()
