"""Train InfGen on Ray Train; rerunning with the same output and name resumes from the last checkpoint.

    python -m jobs.train --config conf/train/local.yaml [key=value ...]
"""

from jobs.config import job_errors, parse_job_args
from pipelines.common import plain_config
from pipelines.train import check_config, run_train


def main() -> None:
    cfg = parse_job_args(__doc__, check=lambda cfg: check_config(plain_config(cfg)))
    with job_errors():
        result = run_train(cfg)
    print(f"model: {result.model_dir}\ncheckpoint: {result.checkpoint}\nMLflow run: {result.run_id}")


if __name__ == "__main__":
    main()
