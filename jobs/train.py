"""Train InfGen on Ray Train; rerunning with the same output and name resumes from the last checkpoint.

    python -m jobs.train --config conf/train/local.yaml [key=value ...]
"""

from jobs.config import run_job
from pipelines.train import TrainConfig, TrainResult, run_train


def report(result: TrainResult) -> None:
    print(f"model: {result.model_dir}\ncheckpoint: {result.checkpoint}\nMLflow run: {result.run_id}")


def main() -> None:
    run_job(__doc__, TrainConfig, run_train, report)


if __name__ == "__main__":
    main()
