"""The whole pipeline on this machine: local data served over HTTP, local Ray, local MLflow.

    python -m jobs.demo --config conf/demo.yaml [key=value ...]
"""

from jobs.config import parse_job_args
from pipelines.demo import run_demo


def main() -> None:
    run_demo(parse_job_args(__doc__))


if __name__ == "__main__":
    main()
